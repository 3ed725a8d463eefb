"""What staging gives ILSVRC2012 it gives every kind of source: a run killed after some units resumes to the very
bytes of an uninterrupted run; a version is named after its dataset (the extra formats: tests/integration/
test_backends_other_kinds.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.dataset import read_manifest
from pipelines.source.samples.cars import write_cars
from pipelines.source.samples.cifar import write_cifar
from pipelines.source.samples.flowers import write_flowers
from pipelines.source.samples.folders import write_class_folders
from pipelines.source.samples.idx import write_idx
from pipelines.source.samples.imagenet21k import write_imagenet21k
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

PARAMS = StageParams(tiers=(16, 32), shard_size=16, minival=2, seed=1, max_bad_fraction=0.1)

# kind -> (writes a tiny source under the folder given and returns the folder to stage, the version's prefix)
SOURCES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "folders": (lambda d: write_class_folders(d / "tree", num_classes=3, train_per_class=6).root, "tree-"),
    "imagenet21k": (
        lambda d: write_imagenet21k(d, ("n01440764", "n09999001", "n09999002"), per_class=8, gz=True).path.parent,
        "imagenet21k-",
    ),
    "cifar10": (lambda d: (write_cifar(d, variant="cifar10", per_class_train=4, per_class_test=1), d)[1], "cifar10-"),
    "cifar100": (
        lambda d: (write_cifar(d, variant="cifar100", per_class_train=1, per_class_test=1), d)[1],
        "cifar100-",
    ),
    "flowers102": (
        lambda d: (write_flowers(d, num_classes=3, per_class_train=3, per_class_val=2, per_class_test=2, seed=0), d)[1],
        "flowers102-",
    ),
    "cars": (lambda d: (write_cars(d, num_classes=3, per_class_train=5, per_class_test=2, seed=0), d)[1], "cars-"),
    "idx": (lambda d: (write_idx(d / "kmnist", per_class_train=5, per_class_test=2), d / "kmnist")[1], "kmnist-"),
}


def _files(version: Path) -> dict[str, str]:
    return {
        p.relative_to(version).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(version.rglob("*"))
        if p.is_file()
    }


class _Killed(Exception):
    pass


def _dies_after(units: int) -> Callable:
    def map_units(fn: Callable, args: list) -> list:
        out = []
        for i, a in enumerate(args):
            if i == units:
                raise _Killed
            out.append(fn(*a))
        return out

    return map_units


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_a_killed_stage_resumes_to_the_same_bytes(tmp_path: Path, kind: str) -> None:
    write, prefix = SOURCES[kind]
    source = write(tmp_path / "src")
    quiet: Callable[..., None] = lambda *_: None  # noqa: E731
    clean = stage(source, tmp_path / "clean", PARAMS, log=quiet, min_train_per_class=0)
    assert clean.name.startswith(prefix)
    with pytest.raises(_Killed):
        stage(source, tmp_path / "resumed", PARAMS, map_units=_dies_after(1), log=quiet, min_train_per_class=0)
    resumed = stage(source, tmp_path / "resumed", PARAMS, log=quiet, min_train_per_class=0)
    assert resumed.name == clean.name
    assert _files(resumed) == _files(clean)
    manifest = read_manifest(clean)
    assert manifest.source["dataset"] == prefix[:-1] and manifest.splits["val"].samples > 0
