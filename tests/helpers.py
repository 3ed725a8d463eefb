"""Test helpers shared by the unit and integration tiers: staging without Prefect, reading shards back.

Import as `from helpers import ...` (pytest puts `tests/` on sys.path for `tests/conftest.py`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Sequence

from pipelines import imagenet, staging
from pipelines.atomic import atomic_write_bytes, remove_stale_temporaries

# The tiny demo ImageNet: 4 classes x 12 train (one of them truncated) + 4 val per class, 160x120 px +-15%.
DEMO_KWARGS: dict[str, Any] = dict(num_classes=4, train_per_class=12, val_per_class=4, seed=0)

# One bad file in 64 is 1.6%, above the default max_bad_fraction of 1%: the tiny set needs a looser limit.
STAGE_PARAMS = staging.StageParams(tiers=(32, 64), shard_size=8, minival=0.25, seed=0, max_bad_fraction=0.05)

LATEST = "LATEST"  # as flows/stage_imagenet.py writes it (not imported: that would import Prefect)


def stage_directly(
    source_dir: str | Path, out_dir: str | Path, params: staging.StageParams,
    unit_order: Sequence[int] | None = None,
) -> Path:
    """The `stage-imagenet` flow's sequence without Prefect; returns the dataset version directory.

    `unit_order` (a permutation of the unit indices) processes units in another order, as a parallel or
    resumed run would; the result must not depend on it.
    """
    src = imagenet.open_source(source_dir)
    fingerprint = src.fingerprint()
    version = staging.dataset_version(fingerprint, params)
    root = Path(out_dir).resolve()
    dest = root / version
    if (dest / staging.MANIFEST).exists():
        atomic_write_bytes(root / LATEST, (version + "\n").encode())
        return dest
    work = dest / "work"
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    units = [("train", u) for u in src.train_units()] + [("val", u) for u in src.val_units(params.val_chunk)]
    order = list(unit_order) if unit_order is not None else list(range(len(units)))
    results = [staging.process_unit(src, units[i][1], units[i][0], work, params) for i in order]
    plan = staging.plan_dataset(results, src.classes, params)
    entries = [staging.write_shard(plan, shard, work, dest) for shard in plan.shards]
    manifest = staging.build_manifest(plan, entries, params, fingerprint, src.kind, version, staging.code_version())
    staging.write_manifest(dest, manifest)
    atomic_write_bytes(root / LATEST, (version + "\n").encode())
    return dest


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
