"""Prefect flow `stage-imagenet`: a dataset as distributed (ILSVRC2012, ImageNet-21k, CIFAR, Flowers-102, Stanford
Cars, idx files, class folders; `pipelines.source.kinds`) -> one staged dataset version (shards + manifest). The
name stays from when ILSVRC2012 was the only source: deployments and runs are found by it.

Only sequencing lives here; `pipelines.staging.stager` does the work and calls back into this flow to run its
units (a train class, a val chunk) and shards as Prefect tasks with retries on a thread pool. Exactly `workers`
unit tasks run (and decode) at once, on their own threads or, with `processes`, each handing its unit to one of
`workers` processes (see `pipelines.staging.runners.unit_runner`); the first unit or shard that fails (bad input
at once, anything else after its retries) ends the run, and no task is started after it. A finished version is
detected from its manifest and returned at once; a source that grew is staged as a new version on top of the
latest one (`base_version`). The parameters' defaults are StageParams' own (`params.DEFAULTS`), so that Prefect
shows the values a run gets.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.failures import one_line_failures
from pipelines.source.records import SOURCE_KINDS, SourceKind
from pipelines.staging import runners
from pipelines.staging.params import AUTO, DEFAULTS, MIN_TRAIN_PER_CLASS, StageParams, minival_value
from pipelines.staging.runners import INPUT_ERRORS, MAX_WORKERS, Mapper, available_cores, resolve_workers
from pipelines.staging.spools import UnitResult
from pipelines.staging.stager import stage


def _run_step(step: Callable[..., Any], args: tuple) -> Any:
    try:
        return step(*args)
    except INPUT_ERRORS as exc:
        # Bad input: a failed task with the reason and no traceback in the log; the flow raises `exc`.
        return Failed(message=str(exc), data=exc)


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass on a second try (I/O); bad input fails the same way every time."""
    return not isinstance(state.data, INPUT_ERRORS)


# Idempotence comes from the files themselves (checksummed spools and shards), not from Prefect's cache.
# `step` is the staging function to run, wrapped by `stage` to count progress (and, for units, to run in a
# worker process); its arguments travel quoted so that Prefect does not walk the (large) plan for futures.
@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_input)
def stage_unit(step: Callable[..., UnitResult], args: tuple) -> UnitResult:
    return _run_step(step, args)


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE, retry_condition_fn=_retry_unless_bad_input)
def stage_shard(step: Callable[..., dict], args: tuple) -> dict:
    return _run_step(step, args)


def _task_mapper(t: Any, name: Callable[[tuple], str], window: int) -> Mapper:
    """A mapper that submits one task per argument tuple, `window` at a time, and returns the results in order.

    Tasks are submitted as others finish rather than all at once: what runs is what the window says (no task
    sits in Running while it waits for a slot), and the first failure, whichever task it is, ends the map with
    nothing more submitted: only the tasks already running finish.
    """

    def run(step: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        results: list[Any] = [None] * len(args)
        queue = iter(enumerate(args))
        running: dict[Any, tuple[int, Any]] = {}  # the task's concurrent future -> (index, Prefect future)
        while True:
            for i, a in itertools.islice(queue, window - len(running)):
                future = t.with_options(task_run_name=name(a)).submit(quote(step), quote(a))
                running[future.wrapped_future] = (i, future)
            if not running:
                return results
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for finished in done:
                i, future = running.pop(finished)
                results[i] = future.result()  # raises the task's error

    return run


def _kind(value: str | None) -> SourceKind | None:
    """The flow's `source_kind` (a plain string: Prefect validates parameters against the flow's own module, where
    the Literal is not defined) checked against the kinds, in one line."""
    if value is None or value == "":
        return None
    for kind in SOURCE_KINDS:
        if kind == value:
            return kind
    raise ValueError(f"source_kind must be one of {', '.join(SOURCE_KINDS)}, got {value!r}")


def stage_params(**fields: Any) -> StageParams:
    """Flow parameters (StageParams fields by name) as StageParams: lists become tuples, and `minival` >= 1 is a
    whole number of images, below 1 a fraction. A field not given keeps StageParams' default; an empty `tiers`
    is an error, not the default tiers."""
    if "minival" in fields:
        fields["minival"] = minival_value(fields["minival"])
    given: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in fields.items()}
    return StageParams(**given)


# The mappers bound what runs at once (units: `workers`, shards: `_SHARD_TASKS`); the runner only needs enough
# threads for the larger of the two windows.
_SHARD_TASKS = 2 * available_cores()  # shard tasks wait on disk: a few more than the cores keep it busy


# Prefect's own annotations do not accept its ThreadPoolTaskRunner where `flow` takes a TaskRunner: the ignore.
_RUNNER: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=max(MAX_WORKERS, _SHARD_TASKS))


@flow(name="stage-imagenet", log_prints=True, task_runner=_RUNNER)  # type: ignore[arg-type]
@one_line_failures
def stage_imagenet(
    source: str, out: str, tiers: list[int] = list(DEFAULTS.tiers), shard_size: int = DEFAULTS.shard_size,
    minival: float = DEFAULTS.minival, seed: int = DEFAULTS.seed, jpeg_quality: int = DEFAULTS.jpeg_quality,
    max_bad_fraction: float = DEFAULTS.max_bad_fraction, base_version: str | None = AUTO, workers: int | None = None,
    progress_bar: bool = False, formats: list[str] = list(DEFAULTS.formats), processes: bool = False,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS, source_kind: str | None = None,
    val_per_class: int | None = None,
) -> str:
    """Stage a dataset as distributed under `out/<version>` (named after the dataset: `cifar100-<hash>`); returns
    the dataset version directory. Rerunning reuses everything finished. The Args are what the Prefect UI's run
    form shows beside each field.

    Args:
        source: The folder holding the dataset's files as distributed: ILSVRC2012 (archives, extracted tree,
            Kaggle layout), ImageNet-21k's whole tar, the CIFAR binary archives, Flowers-102, Stanford Cars, idx
            files (MNIST, Fashion-MNIST, KMNIST) or a class-folder tree.
        out: The datasets directory; the version is staged under out/<version>.
        tiers: Shorter-side sizes (px) to write the shards at, one set of shards per tier.
        shard_size: Images per WebDataset shard.
        minival: Held out of train for early stopping: >= 1 a whole number of images, below 1 a fraction of each
            class.
        seed: Seed of the minival draw and the shard order.
        jpeg_quality: JPEG quality of the resized images.
        max_bad_fraction: The largest fraction of undecodable images skipped before the run fails.
        base_version: "auto" stages the images added since the latest version as a new version on top of it (same
            minival, its shards reused); a version name grows that one; empty stages in full.
        workers: Units decoded at once; empty for all cores.
        progress_bar: Draw a progress bar on stderr (the CLI sets it on a terminal).
        formats: Extra files beside the shards: "ffcv" (.beton per tier and split), "dali" (shard indexes).
        processes: Decode in worker processes rather than threads (for many cores).
        min_train_per_class: A minival that leaves a class fewer train images than this is refused (0 allows it).
        source_kind: The kind of source, instead of detecting it from the file names: one of archives, tree,
            kaggle (ILSVRC2012), folders, imagenet21k, cifar, flowers102, cars, idx.
        val_per_class: Images of each class held out as val where the dataset has no val split (ImageNet-21k,
            class folders without val/ or test/); empty for the default.
    """
    logger = get_run_logger()
    t0 = time.time()
    workers = resolve_workers(workers)
    dest = stage(
        source, out,
        stage_params(tiers=tiers, shard_size=shard_size, minival=minival, seed=seed, jpeg_quality=jpeg_quality,
                     max_bad_fraction=max_bad_fraction, formats=formats),
        map_units=_task_mapper(stage_unit, lambda a: a[0].ident(a[1]), workers),
        map_shards=_task_mapper(stage_shard, lambda a: f"shard-{a[1].split}-{a[1].tier}-{a[1].index}", _SHARD_TASKS),
        log=logger.info, progress=runners.progress_bar() if progress_bar else None, workers=workers,
        base_version=base_version, processes=processes, min_train_per_class=min_train_per_class,
        source_kind=_kind(source_kind), val_per_class=val_per_class,
    )
    logger.info("dataset ready in %.1f s: %s", time.time() - t0, dest)
    return str(dest)
