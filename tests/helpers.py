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
