"""One training job, driven from the caller's process: a variant trained by Ray Train (DDP over Ray workers
running `pipelines.training.loop.train_worker`), early-stopped on minival, the chosen checkpoint evaluated
on val and registered in MLflow.

Read `run_training` top to bottom: check the job (variant, dataset, cluster), start or resume its MLflow run
(`_open_job`: a job is its variant, its whole recipe and the dataset version), fit, evaluate the chosen
checkpoint on val (`_chosen_checkpoint`, `evaluate_on_cluster` of `pipelines.training.evaluate`), decide on
minival whether it takes `champion` (`_promotion`), register it (`_register`). Cancelling the caller (SIGTERM,
Ctrl-C, a cancelled flow run) stops the workers and records the run KILLED (`supervise.StopOnSigterm`, `abort`);
`EpochProgress` prints one line per epoch from MLflow while the job runs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from models.checkpoint import read_checkpoint, scored_weights
from models.summary import count_gmacs, count_params, meta_model
from pipelines.atomic import atomic_write_json
from pipelines.dataset import FFCV, SPLITS, DataError, Manifest, check_version, manifest_hash, read_manifest
from pipelines.hashing import content_hash
from pipelines.loading.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipelines.registry import tracking
from pipelines.registry.promotion import Promotion, decide_promotion
from pipelines.registry.tracking import Tags
from pipelines.settings import TRACKING_URI_ENV, DataLayout, data_layout
from pipelines.training import cluster
from pipelines.training.evaluate import evaluate_on_cluster
from pipelines.training.loop import (
    CHECKPOINT_FILE,
    CHECKPOINT_RANK,
    UNSCORED,
    JobSpec,
    score_order,
    train_steps_per_epoch,
    train_worker,
)
from pipelines.training.recipe import Recipe
from pipelines.training.schedules import check_progressive_eval_size
from pipelines.training.sizing import BatchPlan, size_job
from pipelines.training.supervise import EpochProgress, StopOnSigterm, abort, abortable_trainer
from pipelines.training.warm_start import write_init_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    variant: str
    run_id: str
    job_name: str
    registered_model: str
    version: str
    champion: bool
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    minival_top1: float
    val_top1: float
    val_top5: float
    params: int
    resumed: bool
    gmacs: float = 0.0  # at the eval resolution
    train_resolution: int = 0
    eval_resolution: int = 0
    wall_clock_hours: float = 0.0  # every attempt's, from fit to registration
    gpu_hours: float = 0.0  # wall-clock hours x GPU workers (0 on CPU)
    promotion: str = ""  # the champion decision, one line
    promotion_top1: float = 0.0  # this version on its dataset version's minival, as the decision measured it
    champion_before: str | None = None  # the champion's version when this one was registered (None: none)
    champion_before_top1: float | None = None  # that champion on the same minival (None: none comparable)
    init_from: str | None = None  # models:/NAME/VERSION it was fine-tuned from (None: from scratch)


def _job_key(variant_slug: str, recipe: Recipe, dataset_version: str) -> str:
    """Names one job: the variant, the recipe after every override, the dataset version. Any change to one of
    them is another job (a rerun with `--epochs 1` must not resume an unfinished 10-epoch job)."""
    recipe_hash = content_hash(recipe.model_dump(), 10)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{variant_slug}__{recipe.name}-{recipe_hash}__{dataset_version}")


def tuned_variant_slug(recipe: Recipe) -> str:
    """The slug of the variant a recipe trains, every model override in it (what names its registered model)."""
    return recipe.model.spec().name


def job_key_for(recipe: Recipe, dataset_dir: str | Path) -> str:
    """The key `run_training` gives this recipe's job on this dataset version, for a caller that hands the job
    to another process (a Ray job) and must find it again."""
    return _job_key(tuned_variant_slug(recipe), recipe, read_manifest(dataset_dir).version)


def _job_marker(layout: DataLayout, key: str) -> Path:
    return layout.ray_storage / "jobs" / f"{key}.json"


# A job's marker status -> its MLflow run status. "running" left behind means the driver died (SIGKILL, power):
# the next run with the same key resumes it, as it does a failed or killed one (from its last checkpoint).
RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def validate_job(recipe: Recipe, dataset_dir: str | Path) -> tuple[models.VariantSpec, Manifest, BatchPlan]:
    """Everything that can be checked before Ray starts: the variant, the dataset and its files, and that the
    variant fits the recipe's device memory (the micro-batch and accumulation that make its batch)."""
    spec = recipe.model.spec()
    check_progressive_eval_size(recipe, spec)
    if recipe.init is not None:
        models.frozen_part(meta_model(spec, 1), recipe.init.freeze)  # ValueError: not so many stages
    manifest = read_manifest(dataset_dir)
    for split in SPLITS:
        if split not in manifest.splits or manifest.splits[split].samples == 0:
            raise ValueError(f"{dataset_dir}: the staged dataset has no {split} images")
    # A stat per file: a deleted or truncated shard is found here, not inside the Ray workers after retries.
    check_version(dataset_dir)
    if recipe.data.backend == FFCV and FFCV not in manifest.extra:
        raise DataError(
            f"{dataset_dir}: the recipe reads through data.backend {FFCV}, but the version has no FFCV "
            f"files; stage it with formats including '{FFCV}' (or choose the wds backend)"
        )
    batches = size_job(recipe, spec, manifest.num_classes)
    train_steps_per_epoch(
        manifest.splits["train"].samples, recipe.data, batches.micro_batch, batches.accumulation, recipe.ray.num_workers
    )
    return spec, manifest, batches


@dataclass(frozen=True)
class _Job:
    key: str
    name: str
    run_id: str
    resumed: bool
    marker: Path
    seconds_before: float = 0.0  # the wall-clock seconds of its earlier attempts (a resumed job)

    def mark(self, status: str, seconds: float = 0.0) -> None:
        """Record the job's status and its wall-clock seconds so far (this attempt's `seconds` added)."""
        atomic_write_json(
            self.marker,
            {
                "job_name": self.name,
                "run_id": self.run_id,
                "status": status,
                "wall_clock_seconds": self.seconds_before + seconds,
            },
        )


def _open_job(
    c: Any,
    exp_id: str,
    layout: DataLayout,
    spec: Any,
    recipe: Recipe,
    manifest: Manifest,
    batches: BatchPlan,
    tags: Mapping[str, str],
) -> _Job:
    """The unfinished job with this key (reopened), or a new one with a new MLflow run whose params are the recipe
    and the resolved batch sizes; `tags` go on the run either way (e.g. the Prefect flow run that drives it now)."""
    key = _job_key(spec.name, recipe, manifest.version)
    marker = _job_marker(layout, key)
    previous = json.loads(marker.read_text()) if marker.exists() else None
    if previous is not None and previous.get("status") != "finished":
        job = _Job(
            key, previous["job_name"], previous["run_id"], True, marker, float(previous.get("wall_clock_seconds", 0.0))
        )
        c.update_run(job.run_id, status="RUNNING")
        for k, v in tags.items():
            c.set_tag(job.run_id, k, v)
        log.info("resuming unfinished job %s (MLflow run %s, was %s)", job.name, job.run_id, previous["status"])
    else:
        name = f"{key}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(
            c,
            exp_id,
            run_name=f"{spec.name} {recipe.name}",
            params={**recipe.model_dump(), **batches.as_params()},
            tags={
                Tags.VARIANT: spec.name,
                Tags.RECIPE: recipe.name,
                Tags.DATASET_VERSION: manifest.version,
                Tags.JOB_NAME: name,
                Tags.JOB_KEY: key,
                **tags,
            },
        )
        tracking.log_dict(c, run_id, recipe.model_dump(), "config/recipe.json")
        tracking.log_dict(c, run_id, {"variant": spec.to_dict()}, "config/variant.json")
        job = _Job(key, name, run_id, False, marker)
    job.mark("running")
    return job


def run_training(
    recipe: Recipe,
    dataset_dir: str | Path,
    layout: DataLayout | None = None,
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train one variant to the end (or early stop), evaluate the chosen checkpoint on val, register it.

    Before anything starts, the job is checked against the cluster (ClusterError names what is missing). An
    unfinished job with the same variant, recipe and dataset version is resumed (same Ray run, same MLflow run);
    a finished one is not touched and a new job starts. A job that fails or is cancelled (SIGTERM, Ctrl-C)
    leaves its MLflow run FAILED or KILLED, its marker saying so, and its Ray workers and resource request
    withdrawn. `progress` gets one line per epoch (default: this module's logger); `tags` go on the MLflow run.
    """
    layout = (layout or data_layout()).ensure()
    dataset_dir = Path(dataset_dir).resolve()
    spec, manifest, batches = validate_job(recipe, dataset_dir)
    cluster.connect(ray_address or layout.ray_address, env={TRACKING_URI_ENV: layout.tracking_uri})
    cluster.check_fits(recipe)

    c = tracking.client(layout.tracking_uri)
    init_weights, lineage = _warm_start(c, layout, recipe, spec, manifest)
    job = _open_job(
        c,
        tracking.experiment_id(c, layout.artifact_root),
        layout,
        spec,
        recipe,
        manifest,
        batches,
        {**(tags or {}), **lineage},
    )
    trainer = _trainer(job, recipe, layout, dataset_dir, manifest, batches, init_weights)

    started = time.monotonic()

    def record(status: str) -> None:
        job.mark(status, time.monotonic() - started)
        try:
            c.set_terminated(job.run_id, RUN_STATUS[status])
        except Exception:  # noqa: BLE001 (the tracking server may be what failed)
            log.warning("could not mark MLflow run %s %s", job.run_id, RUN_STATUS[status])

    def stop_job() -> None:
        record("killed")
        abort(trainer)

    stop = StopOnSigterm(stop_job)
    try:
        with EpochProgress(c, job.run_id, spec.name, recipe.schedule.epochs, progress or log.info), stop:
            result = trainer.fit()
        stop.reraise()
        if result.error is not None:
            raise RuntimeError(f"training job {job.name} failed: {result.error}") from result.error
        chosen = _chosen_checkpoint(result, job, recipe, manifest)
        val = evaluate_on_cluster(chosen.model, dataset_dir, "val", spec, recipe)
        tracking.log_metrics(
            c, job.run_id, {f"val_{k}": val[k] for k in ("top1", "top5", "loss")}, step=chosen.best_epoch
        )
        promotion = _promotion(c, chosen.model, dataset_dir, spec, recipe, manifest)
        hours = (job.seconds_before + time.monotonic() - started) / 3600
        out = _register(c, layout, job, recipe, spec, manifest, dataset_dir, chosen, val, promotion, hours, lineage)
    except BaseException as exc:
        if stop.exc is not None:
            # Stopped from outside (recorded as killed by the stop itself); whatever `fit` raised on the way
            # out (the aborted controller) is an echo of that.
            stop.wait()
            raise stop.exc from None
        # An Exception is a failure; anything else (KeyboardInterrupt, Prefect's TerminationSignal on cancel,
        # SystemExit) is the job being stopped from outside. Recorded first, as a canceller waits only so long
        # (Prefect's runner: 30 s) before a SIGKILL; stopping Ray Train's workers takes longer.
        record("failed" if isinstance(exc, Exception) else "killed")
        abort(trainer)
        raise
    record("finished")
    return out


def _warm_start(
    c: Any, layout: DataLayout, recipe: Recipe, spec: Any, manifest: Manifest
) -> tuple[str | None, dict[str, str]]:
    """A fine-tuning job's starting weights, fitted and written once for its workers (recipe `init`), and its
    lineage tags (`init_from`, `init_head`); (None, {}) from scratch."""
    if recipe.init is None:
        return None, {}
    dest = _init_weights_file(layout, _job_key(spec.name, recipe, manifest.version))
    return str(dest), write_init_weights(c, recipe.init, spec, manifest.classes, recipe.seed, dest)


def _init_weights_file(layout: DataLayout, key: str) -> Path:
    return _job_marker(layout, key).with_suffix(".init.pt")


def init_weights_path(layout: DataLayout, recipe: Recipe, dataset_dir: str | Path) -> Path:
    """Where this recipe's job on this dataset version keeps the weights it started from (recipe `init`): a
    tensors-only state_dict, e.g. to check a `head: match` classifier's rows after the job."""
    return _init_weights_file(layout, job_key_for(recipe, dataset_dir))


def _trainer(
    job: _Job,
    recipe: Recipe,
    layout: DataLayout,
    dataset_dir: Path,
    manifest: Manifest,
    batches: BatchPlan,
    init_weights: str | None,
) -> Any:
    """The job's TorchTrainer: its workers, its storage (where a resumed job finds its checkpoints), the best
    checkpoint by minival kept."""
    import ray.train

    spec_for_workers = JobSpec(
        recipe=recipe,
        dataset_dir=str(dataset_dir),
        num_classes=manifest.num_classes,
        tracking_uri=layout.tracking_uri,
        run_id=job.run_id,
        micro_batch=batches.micro_batch,
        accumulation=batches.accumulation,
        init_weights=init_weights,
    )
    return abortable_trainer(
        train_worker,
        train_loop_config=spec_for_workers.model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=recipe.ray.num_workers,
            use_gpu=recipe.ray.use_gpu,
            resources_per_worker=cluster.worker_resources(recipe),
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=str(layout.ray_storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_RANK, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=recipe.ray.max_failures),
        ),
    )


@dataclass(frozen=True)
class _Chosen:
    """The checkpoint early stopping chose, loaded for evaluation and registration."""

    model: torch.nn.Module  # in eval mode, the EMA weights when the job kept an EMA
    model_args: dict[str, Any]
    best_epoch: int
    minival_top1: float
    epochs_run: int
    stopped_early: bool


def best_scored_checkpoint(kept: list[tuple[Any, Mapping[str, Any]]]) -> Any:
    """The kept checkpoint with the best minival score, the earliest of equals (`score_order`, as early stopping
    chooses); mid-epoch and unevaluated checkpoints (UNSCORED) are never chosen."""
    scored = [(c, m) for c, m in kept if m.get(CHECKPOINT_RANK, UNSCORED) != UNSCORED]
    best = max(scored, key=lambda cm: score_order(float(cm[1][CHECKPOINT_RANK]), int(cm[1]["epoch"])), default=None)
    return best[0] if best is not None else None


def _chosen_checkpoint(result: Any, job: _Job, recipe: Recipe, manifest: Manifest) -> _Chosen:
    best = best_scored_checkpoint(result.best_checkpoints or [])
    if best is None:
        raise RuntimeError(f"training job {job.name} reported no checkpoint scored on minival")
    with best.as_directory() as d:
        saved = read_checkpoint(Path(d) / CHECKPOINT_FILE)
    loop = saved["loop"]
    # The latest checkpoint knows how far the job went; the best one only how far it had gone then.
    ret = result.return_value or {}
    model = models.build_model(recipe.model.spec(), manifest.num_classes)
    model.load_state_dict(scored_weights(saved))
    return _Chosen(
        # The epoch these weights are of (saved after it, so `epoch` is already the next one): the same as
        # early stopping's best epoch, given the rank's tie-break (EPOCH_RANK_STEP).
        model=model.eval(),
        model_args=saved["model_args"],
        best_epoch=int(loop["epoch"]) - 1,
        minival_top1=float(loop["best_top1"]),
        epochs_run=int(ret.get("epochs_run", loop["epoch"])),
        stopped_early=bool(ret.get("stopped_early", False)),
    )


def _promotion(
    c: Any, model: torch.nn.Module, dataset_dir: Path, spec: Any, recipe: Recipe, manifest: Manifest
) -> Promotion:
    """The candidate and the current champion, each evaluated on this version's minival: champion or not."""

    def minival_top1(m: torch.nn.Module, m_spec: Any) -> float:
        return evaluate_on_cluster(m, dataset_dir, "minival", m_spec, recipe)["top1"]

    return decide_promotion(
        c, registered_model_name(recipe, spec.name), minival_top1(model, spec), manifest.num_classes, minival_top1
    )


def _register(
    c: Any,
    layout: DataLayout,
    job: _Job,
    recipe: Recipe,
    spec: Any,
    manifest: Manifest,
    dataset_dir: Path,
    chosen: _Chosen,
    val: dict[str, float],
    promotion: Promotion,
    wall_clock_hours: float,
    lineage: Mapping[str, str],
) -> TrainResult:
    """The chosen checkpoint registered with the variant's tags, its preprocessing and the promotion decision;
    its size, cost and resolutions logged as metrics of the run too (what MLflow's compare view plots)."""
    model, resolution = chosen.model, spec.eval_resolution
    params, gmacs = count_params(model), count_gmacs(model, resolution)
    gpu_hours = wall_clock_hours * recipe.ray.num_workers if recipe.ray.use_gpu else 0.0
    tracking.log_metrics(
        c,
        job.run_id,
        {
            "model_params": params,
            "gmacs": gmacs,
            "train_resolution": spec.train_resolution,
            "eval_resolution": resolution,
            "wall_clock_hours": wall_clock_hours,
            "gpu_hours": gpu_hours,
        },
        step=chosen.best_epoch,
    )
    preprocessing = {
        "input": "float32 NCHW RGB, normalised with mean/std below",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "resolution": resolution,
        "resize": spec.eval_resize,
        "crop": resolution,
        "crop_ratio": spec.crop_ratio,
        "classes": list(manifest.classes),
    }
    tags = {
        Tags.VARIANT: spec.name,
        Tags.PARAMS: params,
        Tags.GMACS: f"{gmacs:.4f}",
        Tags.TRAIN_RESOLUTION: spec.train_resolution,
        Tags.EVAL_RESOLUTION: resolution,
        Tags.RECIPE: recipe.name,
        Tags.DATASET_VERSION: manifest.version,
        Tags.MANIFEST_SHA256: manifest_hash(dataset_dir),
        Tags.MINIVAL_TOP1: f"{chosen.minival_top1:.3f}",
        Tags.VAL_TOP1: f"{val['top1']:.3f}",
        Tags.EPOCHS_RUN: chosen.epochs_run,
        Tags.BEST_EPOCH: chosen.best_epoch,
        Tags.EARLY_STOPPED_EPOCH: chosen.epochs_run - 1 if chosen.stopped_early else "none",
        **promotion.tags(),
        **lineage,
        **scaling_tags(recipe),
    }
    example = np.zeros((1, 3, resolution, resolution), dtype=np.float32)
    name, version, champion = tracking.register_best_checkpoint(
        layout.tracking_uri,
        job.run_id,
        spec.name,
        example,
        preprocessing,
        tags,
        promotion.promote,
        weights={"state_dict": model.state_dict(), "model_args": chosen.model_args},
        name=registered_model_name(recipe, spec.name),
    )
    return TrainResult(
        variant=spec.name,
        run_id=job.run_id,
        job_name=job.name,
        registered_model=name,
        version=version,
        champion=champion,
        best_epoch=chosen.best_epoch,
        epochs_run=chosen.epochs_run,
        stopped_early=chosen.stopped_early,
        minival_top1=chosen.minival_top1,
        val_top1=val["top1"],
        val_top5=val["top5"],
        params=params,
        resumed=job.resumed,
        gmacs=gmacs,
        train_resolution=spec.train_resolution,
        eval_resolution=resolution,
        wall_clock_hours=wall_clock_hours,
        gpu_hours=gpu_hours,
        promotion=promotion.reason,
        promotion_top1=promotion.candidate_top1,
        champion_before=promotion.champion_version,
        champion_before_top1=promotion.champion_top1,
        init_from=lineage.get(Tags.INIT_FROM),
    )


def registered_model_name(recipe: Recipe, variant_slug: str) -> str:
    """The registered model a job's version goes to: the recipe's `register_as`, else efficientnet-<variant>."""
    return recipe.register_as or tracking.registered_name(variant_slug)


def scaling_tags(recipe: Recipe) -> dict[str, str]:
    """Which phi and coefficient set a compound-scaled member was built with ({} for a table variant)."""
    m = recipe.model
    if m.phi is None:
        return {}
    cs = m.coefficient_set()
    return {
        Tags.PHI: f"{m.phi:g}",
        Tags.COEFFICIENTS: cs.name,
        Tags.SCALING: f"alpha={cs.alpha:g} beta={cs.beta:g} gamma={cs.gamma:g}",
    }
