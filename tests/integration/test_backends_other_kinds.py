"""The extra formats of a version staged from another kind than ILSVRC2012 (CIFAR's raw pixels, Flowers' JPEGs in
a .tgz) are written, and every loader backend reads the same labels from them as the WebDataset shards hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.dataset import read_manifest
from pipelines.loading import make_loader
from pipelines.source.samples.cifar import write_cifar
from pipelines.source.samples.flowers import write_flowers
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

PARAMS = StageParams(tiers=(32,), shard_size=16, minival=2, seed=1, formats=("ffcv", "dali"))


def _cifar(d: Path) -> Path:
    write_cifar(d, variant="cifar10", per_class_train=4, per_class_test=1)
    return d


def _flowers(d: Path) -> Path:
    write_flowers(d, num_classes=3, per_class_train=3, per_class_val=2, per_class_test=2, seed=0)
    return d


@pytest.mark.parametrize("write", [_cifar, _flowers], ids=["cifar10", "flowers102"])
def test_every_backend_reads_another_kind(tmp_path: Path, write) -> None:
    version = stage(write(tmp_path / "src"), tmp_path / "out", PARAMS, log=lambda *_: None, min_train_per_class=0)
    manifest = read_manifest(version)
    assert {"ffcv", "dali"} <= set(manifest.extra)
    n = manifest.splits["val"].samples
    labels = {}
    for backend in ("wds", "ffcv", "dali"):
        batches = list(make_loader(version, "val", 32, n, backend=backend))
        images = torch.cat([b[0] for b in batches])
        labels[backend] = sorted(torch.cat([b[1] for b in batches]).tolist())
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
    assert labels["wds"] == labels["ffcv"] == labels["dali"]
    assert sorted(labels["wds"]) == sorted(
        label for c, count in manifest.splits["val"].per_class.items() for label in [manifest.classes.index(c)] * count
    )
