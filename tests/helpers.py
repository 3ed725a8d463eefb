"""Test helpers shared by the unit and integration tiers: staging without Prefect, reading shards back.

Import as `from helpers import ...` (pytest puts `tests/` on sys.path for `tests/conftest.py`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Sequence

from pipelines import staging

# The tiny demo ImageNet: 4 classes x 12 train (one of them truncated) + 4 val per class, 160x120 px +-15%.
DEMO_KWARGS: dict[str, Any] = dict(num_classes=4, train_per_class=12, val_per_class=4, seed=0)

# One bad file in 64 is 1.6%, above the default max_bad_fraction of 1%: the tiny set needs a looser limit.
STAGE_PARAMS = staging.StageParams(tiers=(32, 64), shard_size=8, minival=0.25, seed=0, max_bad_fraction=0.05)

LATEST = staging.LATEST


def stage_directly(
    source_dir: str | Path, out_dir: str | Path, params: staging.StageParams,
    unit_order: Sequence[int] | None = None,
) -> Path:
    """The `stage-imagenet` flow's sequence without Prefect; returns the dataset version directory.

    `unit_order` (a permutation of the unit indices) processes units in another order, as a parallel or
    resumed run would; the result must not depend on it.
    """

    def map_units(fn, args):
        order = list(unit_order) if unit_order is not None else list(range(len(args)))
        done = {i: fn(*args[i]) for i in order}
        return [done[i] for i in range(len(args))]

    return staging.stage(source_dir, out_dir, params, map_units=map_units, log=lambda *_: None)


def shard_paths(dataset_dir: str | Path, split: str, tier: int) -> list[Path]:
    """The shard files of one split x tier, in manifest (= name) order."""
    manifest = staging.read_manifest(dataset_dir)
    return [Path(dataset_dir) / s["path"] for s in manifest["shards"] if s["split"] == split and s["tier"] == tier]


def read_samples(dataset_dir: str | Path, split: str, tier: int) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} for every sample of one split x tier, read with plain `tarfile`.

    Raises if a key appears twice, so callers can rely on one entry per image.
    """
    samples: dict[str, dict[str, bytes]] = {}
    for path in shard_paths(dataset_dir, split, tier):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                reader = tar.extractfile(member)
                assert reader is not None
                parts = samples.setdefault(key, {})
                assert suffix not in parts, f"{key}.{suffix} appears twice in {split}/{tier}"
                parts[suffix] = reader.read()
    return samples


def work_of(dataset_dir: str | Path, params: staging.StageParams) -> Path:
    """The spool folder a staged version was made from (shared by versions of the same source + encoding)."""
    fingerprint = staging.read_manifest(dataset_dir)["source"]["fingerprint"]
    return staging.work_dir(Path(dataset_dir).parent, fingerprint, params)


def add_images(tree: str | Path, wnids: Sequence[str], per_class: dict[str, int], start: int = 900_000,
               split: str = "train") -> list[str]:
    """Write new demo JPEGs into an extracted tree (`train/<wnid>/`, or `val/<wnid>/` for split='val'), as a
    source that grew since it was staged; returns the new keys."""
    import io

    import numpy as np

    from pipelines.demo_data import render_image

    keys = []
    for wnid, count in per_class.items():
        label = list(wnids).index(wnid)
        for i in range(count):
            number = start + i
            key = f"{wnid}_{number}" if split == "train" else f"ILSVRC2012_val_{number:08d}"
            rng = np.random.default_rng([7, label, number])
            buf = io.BytesIO()
            render_image(label, len(wnids), (160, 120), rng).save(buf, format="JPEG", quality=90)
            path = Path(tree) / split / wnid / f"{key}.JPEG"
            path.write_bytes(buf.getvalue())
            keys.append(key)
    return keys


# Bad input for the stager, as users have it: each kind must fail with an error naming the file.
BAD_INPUTS = ["missing path", "missing val archive", "truncated train archive", "devkit with too few labels"]


def _rewrite_devkit_ground_truth(devkit: Path, drop: int) -> None:
    """The devkit with its last `drop` val labels removed: it no longer matches the val images."""
    import io

    with tarfile.open(devkit, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(devkit, "w:gz") as tar:
        for m, data in members:
            if data is not None and m.name.endswith("ILSVRC2012_validation_ground_truth.txt"):
                data = b"".join(data.splitlines(keepends=True)[:-drop])
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


def _damage(archives: Path, kind: str) -> str:
    """Damage a copy of the demo archives; returns the file name the error must name."""
    if kind == "missing val archive":
        (archives / "ILSVRC2012_img_val.tar").unlink()
        return "ILSVRC2012_img_val.tar"
    if kind == "truncated train archive":
        path = archives / "ILSVRC2012_img_train.tar"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "ILSVRC2012_img_train.tar"
    if kind == "devkit with too few labels":
        _rewrite_devkit_ground_truth(archives / "ILSVRC2012_devkit_t12.tar.gz", drop=1)
        return "ILSVRC2012_validation_ground_truth.txt"
    raise AssertionError(kind)


def damaged_source(demo_archives: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(source folder, file the error must name) for one kind of bad input."""
    import shutil

    if kind == "missing path":
        return tmp_path / "nowhere", "nowhere"
    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    return source, _damage(source, kind)
