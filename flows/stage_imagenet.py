"""Prefect flow `stage-imagenet`: ILSVRC2012 source -> one staged dataset version (shards + manifest).

Only sequencing lives here; `pipelines.staging.stage` does the work and calls back into this flow to run its
units (a train class, a val chunk) and shards as Prefect tasks with retries on a thread pool (decoding and
encoding release the GIL). A finished version is detected from its manifest and returned at once.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines import staging


# Idempotence comes from the files themselves (checksummed spools and shards), not from Prefect's cache.
@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def stage_unit(*args: Any) -> staging.UnitResult:
    return staging.process_unit(*args)


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def stage_shard(*args: Any) -> dict:
    return staging.write_shard(*args)


def _task_mapper(t: Any, what: str, name: Callable[[tuple], str]) -> staging.Mapper:
    """A mapper that submits one task per argument tuple and logs progress with an ETA."""

    def run(_fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        logger = get_run_logger()
        futures = [t.with_options(task_run_name=name(a)).submit(*a) for a in args]
        t0, results = time.time(), []
        for done, fut in enumerate(futures, 1):
            results.append(fut.result())
            if done % max(1, len(futures) // 20) == 0 or done == len(futures):
                eta = (len(futures) - done) * (time.time() - t0) / done
                logger.info("%s %d/%d, ETA %.0f s", what, done, len(futures), eta)
        return results

    return run


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
    t0 = time.time()
    dest = staging.stage(
        source, out, params,
        map_units=_task_mapper(stage_unit, "units", lambda a: staging.unit_identifier(a[1], a[2])),
        map_shards=_task_mapper(stage_shard, "shards", lambda a: f"shard-{a[1].split}-{a[1].tier}-{a[1].index}"),
        log=logger.info,
    )
    logger.info("dataset ready in %.1f s: %s", time.time() - t0, dest)
    return str(dest)
