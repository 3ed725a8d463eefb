"""Prefect flow `stage-imagenet`: ILSVRC2012 source -> one staged dataset version (shards + manifest).

Only sequencing lives here; the work is in `pipelines.staging`. Units (a train class, a val chunk) and shards
are tasks with retries running on a thread pool (decoding and encoding release the GIL). A finished version
is detected from its manifest and returned at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines import imagenet, staging
from pipelines.atomic import atomic_write_bytes, remove_stale_temporaries

LATEST = "LATEST"


# Idempotence comes from the files themselves (checksummed spools and shards), not from Prefect's cache.
@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, task_run_name="unit-{split}-{index}")
def stage_unit(
    source: imagenet.ImageNetSource, unit: object, split: str, index: int, work: Path, params: staging.StageParams
) -> staging.UnitResult:
    return staging.process_unit(source, unit, split, work, params)


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, task_run_name="shard-{shard.split}-{shard.tier}-{shard.index}")
def stage_shard(plan: staging.DatasetPlan, shard: staging.ShardPlan, work: Path, out: Path) -> dict:
    return staging.write_shard(plan, shard, work, out)


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@flow(name="stage-imagenet", task_runner=ThreadPoolTaskRunner(max_workers=_workers()), log_prints=True)
def stage_imagenet(
    source: str, out: str, tiers: list[int] | None = None, shard_size: int = 1024, minival: float = 25_000,
    seed: int = 0, jpeg_quality: int = 90, max_bad_fraction: float = 0.01,
) -> str:
    """Stage an ILSVRC2012 source (raw archives, extracted tree or Kaggle layout) under `out/<version>`.

    `minival` >= 1 is a number of images held out of train (25,000 = 25 per class on ImageNet); below 1 it is
    a fraction of each class. Returns the dataset version directory. Rerunning reuses everything finished.
    """
    logger = get_run_logger()
    params = staging.StageParams(
        tiers=tuple(tiers) if tiers else staging.StageParams().tiers, shard_size=shard_size,
        minival=int(minival) if minival >= 1 else float(minival), seed=seed, jpeg_quality=jpeg_quality,
        max_bad_fraction=max_bad_fraction,
    )
    src = imagenet.open_source(source)
    fingerprint = src.fingerprint()
    version = staging.dataset_version(fingerprint, params)
    root = Path(out).resolve()
    dest = root / version
    if (dest / staging.MANIFEST).exists():
        logger.info("dataset %s is already staged at %s: reusing it", version, dest)
        atomic_write_bytes(root / LATEST, (version + "\n").encode())
        return str(dest)
    work = dest / "work"
    work.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(dest)
    if removed:
        logger.info("removed %d partial files left by an interrupted run", removed)

    units = [("train", u) for u in src.train_units()] + [("val", u) for u in src.val_units()]
    logger.info("staging %s (%s source, %d classes) as %s: %d units, tiers %s",
                source, src.kind, len(src.classes), version, len(units), list(params.tiers))
    t0 = time.time()
    futures = [stage_unit.submit(src, u, split, i, work, params) for i, (split, u) in enumerate(units)]
    results = []
    for done, fut in enumerate(futures, 1):
        results.append(fut.result())
        if done % max(1, len(futures) // 20) == 0 or done == len(futures):
            rate = done / max(time.time() - t0, 1e-9)
            logger.info("units %d/%d, ETA %.0f s", done, len(futures), (len(futures) - done) / rate)

    plan = staging.plan_dataset(results, src.classes, params)
    logger.info("plan: %s images, %d bad files, %d shards",
                {s: len(k) for s, k in plan.splits.items()}, len(plan.bad), len(plan.shards))
    shard_futures = [stage_shard.submit(plan, s, work, dest) for s in plan.shards]
    entries = [f.result() for f in shard_futures]
    manifest = staging.build_manifest(
        plan, entries, params, fingerprint, src.kind, version, staging.code_version())
    staging.write_manifest(dest, manifest)
    atomic_write_bytes(root / LATEST, (version + "\n").encode())
    logger.info("staged %s in %.1f s: %s", version, time.time() - t0, dest)
    return str(dest)


def latest_version(out: str | Path) -> Path:
    """The most recently staged version under a datasets root."""
    marker = Path(out) / LATEST
    if not marker.exists():
        raise FileNotFoundError(f"{out}: no staged dataset (no {LATEST} file); run `effnet stage` first")
    return Path(out) / marker.read_text().strip()
