"""The loop every Ray Train worker runs for one job; read `train_worker` top to bottom.

`train_worker`: build this rank's model, EMA and optimizer (`start_worker`), resume from Ray's latest checkpoint
(`resume`), then per epoch `run_epoch` (`train_one_epoch`, `evaluate_and_early_stop` on minival when due) and
`save_checkpoint`. The job driver is `pipelines.training.job`; a scaling trial runs `run_epoch` too.

Resume: every epoch, and within an epoch every `schedule.checkpoint_every_steps` steps or
`checkpoint_every_minutes` minutes, rank 0 reports a checkpoint holding the model, EMA, optimizer, the data
position (epoch, batch within it, global step, samples consumed), the epoch's running sums, early-stopping state
and the per-epoch metric history. After a worker failure Ray restarts the workers (and a relaunched driver
reopens the same Ray run), `ray.train.get_checkpoint()` returns the latest checkpoint, and the loop goes on at
the batch it holds: the loader starts at that batch (`make_loader(start_batch=...)`: the remaining samples of the
epoch in the same order, with the same crops), and every step re-seeds its random streams (dropout, stochastic
depth, batch augmentations) from (seed, epoch, batch, rank), so nothing random depends on what ran before it in
the process. The weights then end as an uninterrupted run's. MLflow gets an epoch's metrics only after its
checkpoint is persisted; a restarted rank 0 first logs whatever the checkpoint's history has that MLflow lacks,
so the run's history stays continuous with no duplicates.
Training and minival both read through the recipe's `data.backend` (wds, ffcv or dali).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from pydantic import BaseModel, ConfigDict

import models
from models.checkpoint import read_checkpoint, scored_weights
from pipelines.dataset import read_manifest
from pipelines.loading import make_loader
from pipelines.loading.sampling import batches_per_epoch
from pipelines.registry import tracking
from pipelines.registry.tracking import Tags
from pipelines.training.evaluate import evaluate
from pipelines.training.recipe import Recipe
from pipelines.training.schedules import (
    ema_decay_at,
    epoch_settings,
    first_scored_epoch,
    learning_rate,
)
from pipelines.training.steps import (
    accumulate_gradients,
    average_bn_statistics,
    build_optimizer,
    seed_everything,
    seed_step,
    set_bn_momentum,
    update_ema,
)
from pipelines.training.warm_start import load_init_weights

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
SCORE = "minival_top1"

# What Ray Train keeps checkpoints by (`checkpoint_rank`), or UNSCORED for a checkpoint without a score (mid-epoch,
# or an epoch that skipped minival). Not NaN: Ray's run snapshot stores it as null, and a relaunched driver's Ray
# Train then fails to rank the next checkpoint.
CHECKPOINT_RANK = "checkpoint_rank"
UNSCORED = -1.0
# Each epoch lowers its rank by this much, less than one image of any minival (0.004 points at 25,000 images)
# over a thousand epochs: the rank keeps the order of the scores and breaks their ties as `score_order` does.
EPOCH_RANK_STEP = 1e-6


def score_order(score: Any, order: int) -> tuple[Any, int]:
    """The one rule that chooses among scored epochs (early stopping, the checkpoint a job registers, a trial's
    best epoch) and trials (a search's winner): the best score, the earliest of equals; `max` by this key chooses.
    `score` may be a tuple (the score, then its own tie-breaks)."""
    return score, -order


def checkpoint_rank(score: float, epoch: float) -> float:
    """`score_order` as the one number Ray Train keeps checkpoints by: Ray keeps the later of two checkpoints of
    equal rank, so the epoch's tie-break is folded into the number (EPOCH_RANK_STEP)."""
    return score - EPOCH_RANK_STEP * epoch


class JobSpec(BaseModel):
    """What every worker needs to know; sent to the workers as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: Recipe
    dataset_dir: str
    num_classes: int
    tracking_uri: str
    run_id: str
    # The resolved sizes (pipelines.training.sizing): recipe.data.batch_size = micro_batch x accumulation.
    micro_batch: int | None = None  # None: the recipe's batch at once
    accumulation: int = 1
    init_weights: str | None = None  # the starting weights' file (recipe `init`, written by the driver)

    @property
    def loader_batch(self) -> int:
        """Images per forward pass, what the loader batches."""
        return self.micro_batch or self.recipe.data.batch_size


def _bad_samples(loader: Any) -> int:
    """Samples a loader skipped because they did not decode (counted in this process only: a DataLoader
    worker's count stays in the worker)."""
    return int(getattr(loader, "bad_samples", getattr(getattr(loader, "dataset", None), "bad_samples", 0)))


@dataclass
class LoopState:
    """Everything besides tensors that an exact resume needs: plain data (a checkpoint loads without unpickling)."""

    epoch: int = 0  # the epoch under way (batch > 0) or the next to run
    batch: int = 0  # batches of `epoch` trained: > 0 in a mid-epoch checkpoint only
    step: int = 0  # optimizer steps since the start of the job
    samples_consumed: int = 0  # training samples of `epoch` consumed so far, over all ranks
    # The epoch's running figures on rank 0 (its row's train_loss and images_per_s), carried across a resume.
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def record_minival(state: LoopState, top1: float, epoch: int, patience: int | None) -> None:
    """Early stopping: keep the best minival top-1 and its epoch; after `patience` evaluations in a row without a
    gain (None: never), mark the loop stopped. A tie is no gain: the earlier checkpoint stays the chosen one."""
    if score_order(top1, epoch) > score_order(state.best_top1, state.best_epoch):
        state.best_top1, state.best_epoch, state.epochs_without_improvement = top1, epoch, 0
    else:
        state.epochs_without_improvement += 1
    state.stopped_early = patience is not None and state.epochs_without_improvement >= patience


def log_pending(c: Any, run_id: str, history: list[dict[str, float]], logged_upto: int) -> int:
    """Log to MLflow the rows of `history` after epoch `logged_upto`; the last epoch logged now."""
    for row in history:
        if row["epoch"] > logged_upto:
            tracking.log_metrics(c, run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            logged_upto = int(row["epoch"])
    return logged_upto


def last_logged_epoch(c: Any, run_id: str) -> int:
    """The last epoch whose row the run has (-1: none), where a resumed job's logging and progress go on."""
    history = c.get_metric_history(run_id, SCORE)
    return max((m.step for m in history), default=-1)


def quiet_ray_train_reports() -> None:
    """Ray Train's per-report INFO lines off (the driver prints one line per epoch instead)."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        # NOTE: Ray 2.60 logs "Reporting training result ..." on a logger named by its file path, outside the
        # ray.train hierarchy.
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The loop every Ray Train worker runs: resume, then per epoch train, evaluate and early-stop, checkpoint."""
    job = JobSpec.model_validate(config)
    # Ray Train logs every report (the whole metrics dict) and every checkpoint at INFO from each worker: ~20
    # lines an epoch on the driver's console. The driver prints one line per epoch instead (EpochProgress).
    quiet_ray_train_reports()
    worker = start_worker(job)
    state = resume(worker)
    monitor = _system_metrics(job, resumed=state.step > 0)
    try:
        return _train_loop(worker, state)
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(job: JobSpec, resumed: bool) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where NVML is present) of this worker's node,
    sampled every `runtime.system_metrics_seconds` by its first worker into the job's run as system/node_<n>/...;
    None on the node's other workers, or when off."""
    import ray.train

    ctx = ray.train.get_context()
    seconds = job.recipe.runtime.system_metrics_seconds
    if seconds is None or ctx.get_local_rank() != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        job.run_id,
        sampling_interval=seconds,
        node_id=f"node_{ctx.get_node_rank()}",
        tracking_uri=job.tracking_uri,
        resume_logging=resumed,
    )
    monitor.start()
    return monitor


def _train_loop(worker: Worker, state: LoopState) -> dict[str, Any]:
    """Per epoch from the resumed one: train, evaluate and early-stop when due, checkpoint, log."""
    job = worker.job
    logged_upto = (
        log_pending(worker.client, job.run_id, state.history, last_logged_epoch(worker.client, job.run_id))
        if worker.client
        else 0
    )
    schedule = job.recipe.schedule
    clock = CheckpointClock(schedule.checkpoint_every_steps, schedule.checkpoint_every_minutes)
    for epoch in range(state.epoch, schedule.epochs):
        if state.stopped_early:  # resumed from the checkpoint of the epoch that stopped the job
            break
        row = run_epoch(worker, state, epoch, clock)
        save_checkpoint(worker, state, row, scored=epoch >= first_scored_epoch(job.recipe))
        clock.restart()
        if worker.client is not None:  # only what a persisted checkpoint holds, so a restart logs no duplicates
            logged_upto = log_pending(worker.client, job.run_id, state.history, logged_upto)
        if state.stopped_early:
            break
    return {
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_minival_top1": state.best_top1,
        "stopped_early": state.stopped_early,
    }


def run_epoch(worker: Worker, state: LoopState, epoch: int, clock: CheckpointClock) -> dict[str, float]:
    """One epoch of the loop: train, evaluate and early-stop when due; the epoch's row (SCORE NaN when it was
    not evaluated), appended to the state's history, the state moved on to the next epoch. What keeps it (a Ray
    Train checkpoint, a scaling trial's files) is the caller's."""
    schedule = worker.recipe.schedule
    row = train_one_epoch(worker, state, epoch, clock)
    if (epoch + 1) % schedule.eval_every == 0 or epoch + 1 == schedule.epochs:
        row.update(evaluate_and_early_stop(worker, state, epoch))
    row.update({"best_minival_top1": state.best_top1, "best_epoch": state.best_epoch})
    row.setdefault(SCORE, float("nan"))
    state.epoch = epoch + 1
    state.history.append(row)
    return row


@dataclass
class Worker:
    """What one rank trains and where: built once per worker process, never checkpointed as such."""

    job: JobSpec
    rank: int
    world: int
    device: torch.device
    amp: bool  # bf16 autocast: on CUDA only
    spec: models.VariantSpec
    model: torch.nn.Module  # the bare model: its state_dict is what a checkpoint holds
    ema: torch.nn.Module | None
    net: torch.nn.Module  # what the forward pass calls: `model` wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    client: Any  # MLflow client on rank 0, None elsewhere
    steps_per_epoch: int

    @property
    def recipe(self) -> Recipe:
        return self.job.recipe

    @property
    def scored(self) -> torch.nn.Module:
        """The weights minival scores and a checkpoint is chosen by: the EMA when there is one."""
        return scored_weights({"model": self.model, "ema": self.ema})


def start_worker(job: JobSpec) -> Worker:
    """This Ray Train worker's rank: its model, EMA and optimizer on its device (`build_worker`), the model
    wrapped by DDP when there are several ranks."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return build_worker(
        job,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),
        wrap=ray.train.torch.prepare_model,
    )


def build_worker(
    job: JobSpec, rank: int, world: int, device: torch.device, wrap: Callable[..., torch.nn.Module] | None = None
) -> Worker:
    """A rank's model, EMA and optimizer on `device`, with the same initial weights on every rank; `wrap` (DDP's)
    wraps the model when `world` > 1. With rank 0 and world 1 it is a whole training process on its own (a Tune
    trial of the scaling search)."""
    recipe = job.recipe
    torch.set_num_threads(recipe.runtime.torch_threads or max(1, int(recipe.ray.cpus_per_worker)))
    seed_everything(recipe.seed, 0, 0)  # rank 0's stream on every rank: the same initial weights
    spec = recipe.model.spec()
    model = models.build_model(spec, job.num_classes)
    if job.init_weights:
        load_init_weights(model, job.init_weights)  # before the EMA copy: both start from them
    if recipe.model.bn_momentum is not None:
        set_bn_momentum(model, recipe.model.bn_momentum)
    if recipe.runtime.channels_last:
        # torch's stubs omit Module.to's memory_format keyword (documented, and what runs).
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = copy.deepcopy(model).requires_grad_(False).to(device) if recipe.regularization.ema_decay else None
    model = model.to(device)
    net = wrap(model, move_to_device=False) if world > 1 and wrap is not None else model
    if recipe.runtime.compile:
        # A compiled Module is a Module (OptimizedModule); torch's stubs type the result as any callable.
        net = cast(torch.nn.Module, torch.compile(net))
    return Worker(
        job=job,
        rank=rank,
        world=world,
        device=device,
        amp=recipe.runtime.amp and device.type == "cuda",
        spec=spec,
        model=model,
        ema=ema,
        net=net,
        optimizer=build_optimizer(model, recipe),
        client=tracking.client(job.tracking_uri) if rank == 0 else None,
        steps_per_epoch=_steps_per_epoch(job, world),
    )


def _steps_per_epoch(job: JobSpec, world: int) -> int:
    n_train = read_manifest(job.dataset_dir).splits["train"].samples
    return train_steps_per_epoch(n_train, job.recipe.data, job.loader_batch, job.accumulation, world)


def train_steps_per_epoch(n_train: int, data: Any, loader_batch: int, accumulation: int, world: int) -> int:
    """Optimizer steps in an epoch of `n_train` images (`data`: the recipe's data section); ValueError if none,
    which the driver checks before Ray starts (`validate_job`)."""
    # Only the wds DataLoader splits a rank's share across worker processes (each drops its own partial batch).
    split_workers = data.loader_workers if data.backend == "wds" else 0
    # A step takes `accumulation` micro-batches; an epoch's last micro-batches that do not make a whole step are
    # left, as a partial batch is.
    steps = batches_per_epoch(n_train, loader_batch, world, split_workers) // accumulation
    if steps < 1:
        raise ValueError(f"{n_train} training images give no full batch of {data.batch_size} on {world} workers")
    return steps


def resume(worker: Worker) -> LoopState:
    """Weights, optimizer and loop state from Ray's latest checkpoint of this job, or a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState(history=[])
    with checkpoint.as_directory() as d:
        state = restore_checkpoint(worker, Path(d) / CHECKPOINT_FILE)
    log.info("rank %d resumed at epoch %d, batch %d (step %d)", worker.rank, state.epoch, state.batch, state.step)
    if worker.client is not None:
        worker.client.set_tag(worker.job.run_id, Tags.RESUMED_AT_EPOCH, str(state.epoch))
        worker.client.set_tag(worker.job.run_id, Tags.RESUMED_AT_BATCH, str(state.batch))
    return state


def restore_checkpoint(worker: Worker, path: Path) -> LoopState:
    """Weights, EMA and optimizer from a checkpoint file `write_checkpoint` wrote (tensors and plain data only,
    read without unpickling); its loop state."""
    saved = read_checkpoint(path, worker.device)
    worker.model.load_state_dict(saved["model"])
    if worker.ema is not None:
        worker.ema.load_state_dict(saved["ema"])
    worker.optimizer.load_state_dict(saved["optimizer"])
    return LoopState(**saved["loop"])


def write_checkpoint(worker: Worker, state: LoopState, path: Path) -> None:
    """This worker's state as a checkpoint file: model, EMA, optimizer, loop state, and the variant and recipe
    that rebuild the model."""
    recipe = worker.recipe
    torch.save(
        {
            "model": worker.model.state_dict(),
            "ema": worker.ema.state_dict() if worker.ema is not None else None,
            "optimizer": worker.optimizer.state_dict(),
            "loop": dict(state.__dict__),
            "variant": worker.spec.name,
            "model_args": recipe.model.model_args(worker.job.num_classes),
            "recipe": recipe.model_dump(),
        },
        path,
    )


def train_one_epoch(worker: Worker, state: LoopState, epoch: int, clock: CheckpointClock) -> dict[str, float]:
    """One pass over this rank's share of train at the epoch's image size and regularisation, from the batch a
    mid-epoch checkpoint reached (`state.batch`, else the first); the epoch's row. Reports a mid-epoch checkpoint
    whenever `clock` says one is due."""
    recipe, job, device = worker.recipe, worker.job, worker.device
    seed_everything(recipe.seed, epoch, worker.rank)
    # Progressive learning (or constant settings): image size and regularisation for this epoch, set on the
    # built model and the loader without restarting anything.
    settings = epoch_settings(epoch, recipe, worker.spec)
    models.set_regularization(worker.model, dropout=settings.dropout, stochastic_depth=settings.stochastic_depth)
    aug_gen = torch.Generator(device=device)
    global_batch = recipe.data.batch_size * worker.world
    worker.net.train()
    frozen = frozen_parameters(worker, epoch)
    start = state.batch
    loader = make_loader(
        job.dataset_dir,
        "train",
        settings.image_size,
        job.loader_batch,
        worker.rank,
        worker.world,
        epoch,
        recipe.data.backend,
        seed=recipe.seed,
        num_workers=recipe.data.loader_workers,
        start_batch=start * job.accumulation,
        train_crop=recipe.data.train_crop,
    )
    micro_batches = iter(loader)
    # Summed on the device: read back (a host sync) only at a checkpoint and at the end of the epoch.
    loss_sum = torch.tensor(state.epoch_loss_sum, dtype=torch.float64, device=device)
    lr = learning_rate(epoch + start / worker.steps_per_epoch, recipe.optim, global_batch, recipe.schedule.epochs)
    t0 = time.perf_counter()
    for i in range(start, worker.steps_per_epoch):
        seed_step(recipe.seed, epoch, i, worker.rank, aug_gen)
        lr = learning_rate(epoch + i / worker.steps_per_epoch, recipe.optim, global_batch, recipe.schedule.epochs)
        for g in worker.optimizer.param_groups:
            g["lr"] = lr
        worker.optimizer.zero_grad(set_to_none=True)
        step_loss, images = accumulate_gradients(
            worker.net,
            (next(micro_batches) for _ in range(job.accumulation)),
            recipe,
            settings,
            job.num_classes,
            device,
            worker.amp,
            aug_gen,
        )
        for p in frozen:  # no gradient: the optimizer leaves them (and their decay, their moments) be
            p.grad = None
        if recipe.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(worker.model.parameters(), recipe.optim.grad_clip)
        worker.optimizer.step()
        state.step += 1
        if state.step == 1 and worker.client is not None:
            # When the job's first step ended: the start-up latency a user waits through (flow run -> here).
            worker.client.set_tag(job.run_id, Tags.FIRST_STEP, f"{time.time():.3f}")
        if worker.ema is not None:
            assert recipe.regularization.ema_decay is not None  # the EMA is built only when the recipe has a decay
            update_ema(worker.ema, worker.model, ema_decay_at(state.step, recipe.regularization.ema_decay))
        loss_sum += step_loss
        state.batch, state.samples_consumed = i + 1, (i + 1) * global_batch
        state.epoch_samples += images
        if state.batch < worker.steps_per_epoch and clock.due(state.step, device):
            state.epoch_loss_sum = loss_sum.item()
            state.epoch_seconds, t0 = state.epoch_seconds + time.perf_counter() - t0, time.perf_counter()
            save_checkpoint(
                worker,
                state,
                {"epoch": epoch, "batch": state.batch, "step": state.step, "samples_consumed": state.samples_consumed},
            )
            clock.restart()
    elapsed = state.epoch_seconds + time.perf_counter() - t0
    seen, loss_total = state.epoch_samples, loss_sum.item()
    state.batch = state.samples_consumed = state.epoch_samples = 0
    state.epoch_loss_sum = state.epoch_seconds = 0.0
    return {
        "epoch": epoch,
        "train_loss": loss_total / max(seen, 1),
        "lr": lr,
        "images_per_s": seen * worker.world / elapsed,
        "epoch_seconds": elapsed,
        "image_size": settings.image_size,
        "stage": settings.stage,
        "dropout": settings.dropout,
        "stochastic_depth": settings.stochastic_depth,
        "randaug_magnitude": settings.randaug_magnitude,
        "mixup_alpha": settings.mixup_alpha,
        "train_bad_samples": float(_bad_samples(loader)),
    }


def frozen_parameters(worker: Worker, epoch: int) -> list[torch.nn.Parameter]:
    """Fine-tuning's layer-wise freezing (`init.freeze` for the first `init.freeze_epochs`): the frozen modules
    put in eval mode (their BN statistics kept), their parameters returned for the loop to drop their gradients.
    The gradients are still computed (and all-reduced under DDP, which expects every parameter's): dropping them
    after the backward leaves DDP's buckets whole. Nothing on other epochs."""
    init = worker.recipe.init
    if init is None or epoch >= init.freeze_epochs:
        return []
    modules = models.frozen_part(worker.model, init.freeze)
    for m in modules:
        m.eval()
    return [p for m in modules for p in m.parameters()]


@dataclass
class CheckpointClock:
    """When a mid-epoch checkpoint is due: every `every_steps` optimizer steps, or once `every_minutes` have
    passed since the last checkpoint. Every rank must report together (Ray Train waits for all), so the minutes
    are rank 0's clock, broadcast to the other ranks; only every MINUTES_CHECK_STEPS steps, as reading the answer
    back is a host sync that would stall a GPU's queue every step."""

    every_steps: int | None
    every_minutes: float | None
    since: float = field(default_factory=time.monotonic)
    MINUTES_CHECK_STEPS = 32  # a few seconds of steps on any GPU: nothing next to minutes

    def restart(self) -> None:
        self.since = time.monotonic()

    def due(self, step: int, device: torch.device) -> bool:
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        if self.every_minutes is None or step % self.MINUTES_CHECK_STEPS:
            return False
        late = torch.tensor(
            [time.monotonic() - self.since >= 60 * self.every_minutes], dtype=torch.uint8, device=device
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(late, src=0)
        return bool(late.item())


def evaluate_and_early_stop(worker: Worker, state: LoopState, epoch: int) -> dict[str, float]:
    """Minival top-1 of the scored weights (summed across ranks), recorded for early stopping from the first
    scored epoch on (`progressive.choose_from`). The ranks' BN statistics are averaged first, so that the score is
    that of the weights rank 0 checkpoints."""
    recipe, spec = worker.recipe, worker.spec
    average_bn_statistics(*(m for m in (worker.model, worker.ema) if m is not None))
    loader = make_loader(
        worker.job.dataset_dir,
        "minival",
        spec.eval_resolution,
        recipe.data.eval_batch_size or recipe.data.batch_size,
        worker.rank,
        worker.world,
        backend=recipe.data.backend,
        seed=recipe.seed,
        crop_ratio=spec.crop_ratio,
        num_workers=recipe.data.loader_workers,
    )
    m = evaluate(worker.scored, loader, worker.device, recipe.runtime.channels_last, worker.amp)
    if epoch >= first_scored_epoch(recipe):
        record_minival(state, m["top1"], epoch, recipe.schedule.patience)
    return {"minival_loss": m["loss"], "minival_top1": m["top1"], "minival_top5": m["top5"]}


def save_checkpoint(worker: Worker, state: LoopState, row: dict[str, float], scored: bool = True) -> None:
    """Report an epoch's row (or a mid-epoch data position) to Ray Train; rank 0 attaches the checkpoint (every
    rank reports: Ray waits for all). An epoch before the first scored one is kept unranked, never chosen."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if worker.rank == 0:
            write_checkpoint(worker, state, Path(tmp) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(ray_metrics(row, scored), checkpoint=checkpoint)


def ray_metrics(row: dict[str, float], scored: bool = True) -> dict[str, float]:
    """What a report tells Ray Train: the row's finite figures, and the rank its checkpoint is kept by (UNSCORED
    for a row without a score, or one of an epoch early stopping does not score)."""
    score = row.get(SCORE, math.nan) if scored else math.nan
    rank = checkpoint_rank(score, row.get("epoch", 0)) if math.isfinite(score) else UNSCORED
    return {**{k: v for k, v in row.items() if math.isfinite(v)}, CHECKPOINT_RANK: rank}
