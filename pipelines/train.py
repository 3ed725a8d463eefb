"""One training job: a variant trained by Ray Train (DDP over Ray workers), early-stopped on minival, the chosen
checkpoint evaluated on val and registered in MLflow.

Read top to bottom: `train_worker` is the loop every Ray worker runs; `run_training` is the driver that sets up
MLflow, starts the `TorchTrainer`, and finishes with evaluation and registration.

Resume: every epoch rank 0 reports a checkpoint holding the model, EMA, optimizer, epoch, early-stopping state
and the per-epoch metric history. After a worker failure Ray restarts the workers, `ray.train.get_checkpoint()`
returns the latest checkpoint and the loop continues from the next epoch. Randomness is re-seeded from
(seed, epoch, rank) at the start of every epoch, so a resumed epoch draws the same crops as an uninterrupted one.
MLflow gets an epoch's metrics only after its checkpoint is persisted; a restarted rank 0 first logs whatever
the checkpoint's history has that MLflow lacks, so the run's history stays continuous with no duplicates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import models
from pipelines import augment, cluster, loaders, tracking
from pipelines.atomic import atomic_write_json
from pipelines.config import Recipe
from pipelines.schedules import EpochSettings, ema_decay_at, epoch_settings, learning_rate
from pipelines.settings import DataLayout, data_layout
from pipelines.staging import check_version, manifest_hash, read_manifest

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
SCORE = "minival_top1"
FIRST_STEP_TAG = "first_step_unix"


class JobSpec(BaseModel):
    """What every worker needs to know; sent to the workers as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    recipe: Recipe
    dataset_dir: str
    num_classes: int
    tracking_uri: str
    run_id: str


# --------------------------------------------------------------------------------------------- pieces


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only: BN scales/shifts and biases (ndim < 2) are exempt."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = recipe.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.optimizer == "rmsprop":
        # TF adds eps inside the square root and PyTorch outside; with eps=1e-3 the two differ only for tiny
        # second moments, which is where eps matters least. `alpha` is TF's `decay`.
        return torch.optim.RMSprop(groups, lr=0.0, alpha=o.rmsprop_decay, eps=o.eps, momentum=o.momentum)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=0.0, eps=1e-8)


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)  # BN running statistics are copied, as the TF reference does


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    channels_last: bool, amp: bool,
) -> dict[str, float]:
    """Sums (loss, top-1, top-5, count) over this rank's batches, then across ranks; returns means."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels in batches:
        x = loaders.normalize(images.to(device, non_blocking=True), channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor(
            [F.cross_entropy(logits, y, reduction="sum").item(), (top5[:, 0] == y).sum().item(),
             (top5 == y[:, None]).any(dim=1).sum().item(), len(y)],
            dtype=torch.float64, device=device,
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise RuntimeError("evaluation saw no samples: is the split empty?")
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "samples": n}


def prepare_batch(
    images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, settings: EpochSettings, num_classes: int,
    channels_last: bool, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch on the device -> augmented, normalised input and soft targets (smoothing, mixup/cutmix)."""
    if recipe.augment.policy == "randaugment":
        images = augment.rand_augment(images, settings.randaug_magnitude, recipe.augment.randaug_ops, generator)
    elif recipe.augment.policy == "autoaugment":
        images = augment.auto_augment(images, generator)
    x = loaders.normalize(images, channels_last)
    return augment.mix_batch(x, labels, num_classes, settings.mixup_alpha, settings.cutmix_alpha,
                             recipe.regularization.label_smoothing, generator)


def _bad_samples(loader: Any) -> int:
    """Samples a loader skipped because they did not decode (counted in this process only: a DataLoader
    worker's count stays in the worker)."""
    return int(getattr(loader, "bad_samples", getattr(getattr(loader, "dataset", None), "bad_samples", 0)))


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch) * 1_009 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


@dataclass
class LoopState:
    """Everything besides tensors that an exact resume needs."""

    epoch: int = 0  # next epoch to run
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] | None = None


def _log_pending(c: Any, run_id: str, history: list[dict[str, float]], logged_upto: int) -> int:
    for row in history:
        if row["epoch"] > logged_upto:
            tracking.log_metrics(c, run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            logged_upto = int(row["epoch"])
    return logged_upto


def _last_logged_epoch(c: Any, run_id: str) -> int:
    history = c.get_metric_history(run_id, SCORE)
    return max((m.step for m in history), default=-1)


# --------------------------------------------------------------------------------------------- the loop


def _quiet_ray_train_reports() -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        # NOTE: Ray 2.60 logs "Reporting training result ..." on a logger named by its file path, outside the
        # ray.train hierarchy.
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker training loop run by Ray Train's TorchTrainer."""
    import ray.train
    import ray.train.torch

    job = JobSpec.model_validate(config)
    recipe = job.recipe
    # Ray Train logs every report (the whole metrics dict) and every checkpoint at INFO from each worker: ~20
    # lines an epoch on the driver's console. The driver prints one line per epoch instead (EpochProgress).
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(recipe.runtime.torch_threads or max(1, int(recipe.ray.cpus_per_worker)))
    device = ray.train.torch.get_device()
    amp = recipe.runtime.amp and device.type == "cuda"
    channels_last = recipe.runtime.channels_last

    seed_everything(recipe.seed, 0, 0)  # same initial weights on every rank
    overrides = recipe.model.overrides()
    spec = models.resolve_variant(recipe.model.variant, **overrides)
    model = models.create_model(recipe.model.variant, num_classes=job.num_classes, **overrides)
    if recipe.model.bn_momentum is not None:
        set_bn_momentum(model, recipe.model.bn_momentum)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False) if recipe.regularization.ema_decay else None
    model = model.to(device)
    ema = ema.to(device) if ema is not None else None
    optimizer = build_optimizer(model, recipe)

    state = LoopState(history=[])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        state = LoopState(**saved["loop"])
        log.info("rank %d resumed at epoch %d", rank, state.epoch)
        if rank == 0:
            tracking.client(job.tracking_uri).set_tag(job.run_id, "resumed_at_epoch", str(state.epoch))

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    if recipe.runtime.compile:
        ddp_model = torch.compile(ddp_model)
    scored_model = ema if ema is not None else model

    c = tracking.client(job.tracking_uri) if rank == 0 else None
    logged_upto = _log_pending(c, job.run_id, state.history, _last_logged_epoch(c, job.run_id)) if c else 0

    data = recipe.data
    manifest = read_manifest(job.dataset_dir)
    n_train = manifest["splits"]["train"]["samples"]
    global_batch = data.batch_size * world
    # Only the wds DataLoader splits a rank's share across worker processes (each drops its own partial batch).
    split_workers = data.loader_workers if data.backend == "wds" else 0
    steps_per_epoch = loaders.batches_per_epoch(n_train, data.batch_size, world, split_workers)
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training images give no full batch of {data.batch_size} on {world} workers")
    eval_resolution = recipe.model.eval_resolution or spec.eval_resolution

    for epoch in range(state.epoch, recipe.schedule.epochs):
        if state.stopped_early:
            break
        seed_everything(recipe.seed, epoch, rank)
        # Progressive learning (or constant settings): image size and regularisation for this epoch, set on
        # the built model and the loader without restarting anything.
        settings = epoch_settings(epoch, recipe, spec)
        models.set_regularization(model, dropout=settings.dropout, stochastic_depth=settings.stochastic_depth)
        resolution = settings.image_size
        aug_gen = torch.Generator(device=device).manual_seed((recipe.seed * 1_000_003 + epoch) * 1_009 + rank)
        ddp_model.train()
        train_loader = loaders.make_loader(
            job.dataset_dir, "train", resolution, data.batch_size, rank, world, epoch, data.backend,
            seed=recipe.seed, num_workers=data.loader_workers,
        )
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):
            lr = learning_rate(epoch + i / steps_per_epoch, recipe.optim, global_batch, recipe.schedule.epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, targets = prepare_batch(images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                       recipe, settings, job.num_classes, channels_last, aug_gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = ddp_model(x)
            loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
            optimizer.step()
            state.step += 1
            if state.step == 1 and c is not None:
                # When the job's first step ended: the start-up latency a user waits through (flow run -> here).
                c.set_tag(job.run_id, FIRST_STEP_TAG, f"{time.time():.3f}")
            if ema is not None:
                update_ema(ema, model, ema_decay_at(state.step, recipe.regularization.ema_decay))
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        elapsed = time.perf_counter() - t0

        row: dict[str, float] = {
            "epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": lr,
            "images_per_s": seen * world / elapsed, "epoch_seconds": elapsed, "image_size": resolution,
            "stage": settings.stage,
            "dropout": settings.dropout, "stochastic_depth": settings.stochastic_depth,
            "randaug_magnitude": settings.randaug_magnitude, "mixup_alpha": settings.mixup_alpha,
            "train_bad_samples": float(_bad_samples(train_loader)),
        }
        if (epoch + 1) % recipe.schedule.eval_every == 0 or epoch + 1 == recipe.schedule.epochs:
            minival_loader = loaders.make_loader(
                job.dataset_dir, "minival", eval_resolution, data.eval_batch_size or data.batch_size, rank, world,
                crop_ratio=spec.crop_ratio, num_workers=data.loader_workers,
            )
            m = evaluate(scored_model, minival_loader, device, channels_last, amp)
            row.update({"minival_loss": m["loss"], "minival_top1": m["top1"], "minival_top5": m["top5"]})
            if m["top1"] > state.best_top1:
                state.best_top1, state.best_epoch, state.epochs_without_improvement = m["top1"], epoch, 0
            else:
                state.epochs_without_improvement += 1
            patience = recipe.schedule.patience
            state.stopped_early = patience is not None and state.epochs_without_improvement >= patience
        row.update({"best_minival_top1": state.best_top1, "best_epoch": state.best_epoch})
        row.setdefault(SCORE, float("nan"))
        state.epoch = epoch + 1
        state.history.append(row)

        # Every rank reports every epoch (Ray waits for all); only rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(
                    {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "optimizer": optimizer.state_dict(), "loop": state.__dict__,
                     "variant": spec.name, "model_args": {"name": recipe.model.variant, **overrides,
                                                          "num_classes": job.num_classes},
                     "recipe": recipe.model_dump()},
                    Path(tmp) / CHECKPOINT_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**row, SCORE: row[SCORE]}, checkpoint=ckpt)
        if c is not None:
            logged_upto = _log_pending(c, job.run_id, state.history, logged_upto)
        if state.stopped_early:
            break

    return {"epochs_run": state.epoch, "best_epoch": state.best_epoch, "best_minival_top1": state.best_top1,
            "stopped_early": state.stopped_early}


# --------------------------------------------------------------------------------------------- the driver


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


def _job_key(variant_slug: str, recipe: Recipe, dataset_version: str) -> str:
    """Names one job: the variant, the recipe after every override, the dataset version. Any change to one of
    them is another job (a rerun with `--epochs 1` must not resume an unfinished 10-epoch job)."""
    recipe_hash = hashlib.sha256(json.dumps(recipe.model_dump(), sort_keys=True).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{variant_slug}__{recipe.name}-{recipe_hash}__{dataset_version}")


def _job_marker(layout: DataLayout, key: str) -> Path:
    return layout.ray_storage / "jobs" / f"{key}.json"


# A job's marker status -> its MLflow run status. "running" left behind means the driver died (SIGKILL, power):
# the next run with the same key resumes it, as it does a failed or killed one (from its last checkpoint).
RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def validate_job(recipe: Recipe, dataset_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """Everything that can be checked before Ray starts: the variant, the dataset and its files."""
    spec = models.resolve_variant(recipe.model.variant, **recipe.model.overrides())
    manifest = read_manifest(dataset_dir)
    for split in ("train", "minival", "val"):
        if manifest["splits"].get(split, {}).get("samples", 0) == 0:
            raise ValueError(f"{dataset_dir}: the staged dataset has no {split} images")
    # A stat per file: a deleted or truncated shard is found here, not inside the Ray workers after retries.
    check_version(dataset_dir)
    return spec, manifest


@dataclass(frozen=True)
class _Job:
    key: str
    name: str
    run_id: str
    resumed: bool
    marker: Path

    def mark(self, status: str) -> None:
        atomic_write_json(self.marker, {"job_name": self.name, "run_id": self.run_id, "status": status})


def _open_job(
    c: Any, exp_id: str, layout: DataLayout, spec: Any, recipe: Recipe, manifest: dict, tags: Mapping[str, str],
) -> _Job:
    """The unfinished job with this key (reopened), or a new one with a new MLflow run; `tags` go on the run
    either way (e.g. the Prefect flow run that drives it now)."""
    key = _job_key(spec.name, recipe, manifest["version"])
    marker = _job_marker(layout, key)
    previous = json.loads(marker.read_text()) if marker.exists() else None
    if previous is not None and previous.get("status") != "finished":
        job = _Job(key, previous["job_name"], previous["run_id"], True, marker)
        c.update_run(job.run_id, status="RUNNING")
        for k, v in tags.items():
            c.set_tag(job.run_id, k, v)
        log.info("resuming unfinished job %s (MLflow run %s, was %s)", job.name, job.run_id, previous["status"])
    else:
        name = f"{key}__{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = tracking.start_run(
            c, exp_id, run_name=f"{spec.name} {recipe.name}", params=recipe.model_dump(),
            tags={"variant": spec.name, "recipe": recipe.name, "dataset_version": manifest["version"],
                  "job_name": name, "job_key": key, **tags},
        )
        tracking.log_dict(c, run_id, recipe.model_dump(), "config/recipe.json")
        tracking.log_dict(c, run_id, {"variant": spec.__dict__ if hasattr(spec, "__dict__") else str(spec)},
                          "config/variant.json")
        job = _Job(key, name, run_id, False, marker)
    job.mark("running")
    return job


def _abortable_trainer(*args: Any, **kwargs: Any) -> Any:
    """A TorchTrainer whose run can be aborted from the driver (a cancelled flow run), so Ray Train stops its
    workers and withdraws its resource request instead of leaving them to the owner's death (`_abort`)."""
    from ray.train.torch import TorchTrainer

    class AbortableTorchTrainer(TorchTrainer):
        controller: Any = None

        # NOTE: Ray 2.60's only hook that sees the controller actor (DataParallelTrainer registers its own
        # SIGINT handler with it); pinned in constraints.txt.
        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller
            super()._register_sigint_handler(controller)

    return AbortableTorchTrainer(*args, **kwargs)


def _abort(trainer: Any) -> None:
    import ray

    if getattr(trainer, "controller", None) is None:
        return
    try:
        ray.get(trainer.controller.abort.remote(), timeout=25)
    except Exception:  # noqa: BLE001 (already gone: nothing left to stop)
        pass


class _StopOnSigterm:
    """SIGTERM (a cancelled Prefect flow run, `kill`) while Ray Train runs the job.

    The driver waits in `ray.get`, which runs a signal handler at once but raises the handler's exception only
    when the job has ended (as a SystemError): the cancellation would wait for the whole training. So the
    handler here keeps the exception that the handler before it (Prefect's TerminationSignal, or exit) raises,
    and stops the job from a thread (`on_stop`); once `fit` returns, `reraise` raises that exception.
    """

    def __init__(self, on_stop: Callable[[], Any]):
        self.on_stop, self.exc, self.previous = on_stop, None, None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.exc is not None:
            return  # already stopping
        try:
            if callable(self.previous):
                self.previous(signum, frame)
            self.exc = SystemExit(128 + signum)  # the default action, after the job is stopped
        except BaseException as exc:  # noqa: BLE001 (kept, raised by `reraise`)
            self.exc = exc
        self.thread = threading.Thread(target=self.on_stop, name="stop-job", daemon=True)
        self.thread.start()

    def wait(self, timeout: float = 30) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def reraise(self) -> None:
        if self.exc is not None:
            self.wait()
            raise self.exc


class EpochProgress:
    """One line per finished epoch, read from the job's MLflow run while Ray trains (rank 0 logs each epoch
    there as soon as its checkpoint is persisted), so the driver's log (the Prefect run's) follows the job."""

    # An epoch's metrics land in one batch: once its `epoch_seconds` is seen, the rest of its row is there too,
    # so that key is read first and decides which epochs are complete.
    DONE_KEY = "epoch_seconds"
    KEYS = ("train_loss", "minival_top1", "best_minival_top1", "images_per_s", "image_size")

    def __init__(self, c: Any, run_id: str, label: str, epochs: int, emit: Callable[[str], None],
                 interval: float = 2.0):
        self.c, self.run_id, self.label, self.epochs, self.emit, self.interval = c, run_id, label, epochs, emit, interval
        self.shown = _last_logged_epoch(c, run_id)  # a resumed job shows only its new epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)

    def __enter__(self) -> "EpochProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last epoch's line, if it landed after the final poll

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 (a missed poll is shown by the next one)
                log.debug("progress poll failed: %s", exc)

    def poll(self) -> None:
        rows = {m.step: {self.DONE_KEY: m.value}
                for m in self.c.get_metric_history(self.run_id, self.DONE_KEY) if m.step > self.shown}
        if not rows:
            return
        for key in self.KEYS:
            for m in self.c.get_metric_history(self.run_id, key):
                if m.step in rows:
                    rows[m.step][key] = m.value
        for epoch in sorted(rows):
            self.emit(format_epoch_line(self.label, epoch, self.epochs, rows[epoch]))
            self.shown = epoch


def format_epoch_line(label: str, epoch: int, epochs: int, row: Mapping[str, float]) -> str:
    parts = [f"{label} epoch {epoch + 1}/{epochs}"]
    if "train_loss" in row:
        parts.append(f"train loss {row['train_loss']:.3f}")
    if not math.isnan(row.get("minival_top1", math.nan)):
        parts.append(f"minival top-1 {row['minival_top1']:.1f}")
    if "best_minival_top1" in row:
        parts.append(f"best {row['best_minival_top1']:.1f}")
    if "image_size" in row:
        parts.append(f"{row['image_size']:.0f} px")
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.0f} img/s")
    if "epoch_seconds" in row:
        parts.append(f"{row['epoch_seconds']:.1f} s")
    return ", ".join(parts)


def run_training(
    recipe: Recipe, dataset_dir: str | Path, layout: DataLayout | None = None, ray_address: str | None = None,
    progress: Callable[[str], None] | None = None, tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train one variant to the end (or early stop), evaluate the chosen checkpoint on val, register it.

    Before anything starts, the job is checked against the cluster (ClusterError names what is missing). An
    unfinished job with the same variant, recipe and dataset version is resumed (same Ray run, same MLflow run);
    a finished one is not touched and a new job starts. A job that fails or is cancelled (SIGTERM, Ctrl-C)
    leaves its MLflow run FAILED or KILLED, its marker saying so, and its Ray workers and resource request
    withdrawn. `progress` gets one line per epoch (default: this module's logger); `tags` go on the MLflow run.
    """
    import ray
    import ray.train

    layout = (layout or data_layout()).ensure()
    dataset_dir = Path(dataset_dir).resolve()
    spec, manifest = validate_job(recipe, dataset_dir)
    cluster.connect(ray_address or layout.ray_address, env={"MLFLOW_TRACKING_URI": layout.tracking_uri})
    cluster.check_fits(recipe)

    c = tracking.client(layout.tracking_uri)
    exp_id = tracking.experiment_id(c, layout.artifact_root)
    job = _open_job(c, exp_id, layout, spec, recipe, manifest, tags or {})
    spec_for_workers = JobSpec(recipe=recipe, dataset_dir=str(dataset_dir), num_classes=manifest["num_classes"],
                               tracking_uri=layout.tracking_uri, run_id=job.run_id)
    trainer = _abortable_trainer(
        train_worker,
        train_loop_config=spec_for_workers.model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=recipe.ray.num_workers, use_gpu=recipe.ray.use_gpu,
            resources_per_worker=cluster.worker_resources(recipe),
        ),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=str(layout.ray_storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=recipe.ray.max_failures),
        ),
    )
    def record(status: str) -> None:
        job.mark(status)
        try:
            c.set_terminated(job.run_id, RUN_STATUS[status])
        except Exception:  # noqa: BLE001 (the tracking server may be what failed)
            log.warning("could not mark MLflow run %s %s", job.run_id, RUN_STATUS[status])

    stop = _StopOnSigterm(lambda: (record("killed"), _abort(trainer)))
    try:
        with EpochProgress(c, job.run_id, spec.name, recipe.schedule.epochs, progress or log.info), stop:
            result = trainer.fit()
        stop.reraise()
        if result.error is not None:
            raise RuntimeError(f"training job {job.name} failed: {result.error}") from result.error
        out = _evaluate_and_register(c, layout, job, recipe, spec, manifest, dataset_dir, result)
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
        _abort(trainer)
        raise
    record("finished")
    return out


def _evaluate_and_register(
    c: Any, layout: DataLayout, job: _Job, recipe: Recipe, spec: Any, manifest: dict, dataset_dir: Path,
    result: Any,
) -> TrainResult:
    """Val on the chosen (best-minival) checkpoint only, then registration with the variant's tags."""
    import ray

    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise RuntimeError(f"training job {job.name} reported no checkpoint")
    with best.as_directory() as d:
        saved = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    loop = saved["loop"]
    # The latest checkpoint knows how far the job went; the best one only how far it had gone then.
    ret = result.return_value or {}
    epochs_run, stopped_early = int(ret.get("epochs_run", loop["epoch"])), bool(ret.get("stopped_early", False))

    model = models.create_model(recipe.model.variant, num_classes=manifest["num_classes"], **recipe.model.overrides())
    model.load_state_dict(saved["ema"] if saved["ema"] is not None else saved["model"])
    model.eval()
    eval_resolution = recipe.model.eval_resolution or spec.eval_resolution
    # Val is evaluated once, on the chosen checkpoint only, in a Ray task that gets one worker's resources (a
    # GPU on a GPU cluster, where the driver may have none).
    val = ray.get(
        ray.remote(evaluate_split)
        .options(num_cpus=recipe.ray.cpus_per_worker, num_gpus=1 if recipe.ray.use_gpu else 0)
        .remote(model, str(dataset_dir), "val", eval_resolution, spec.crop_ratio, recipe)
    )
    tracking.log_metrics(c, job.run_id, {"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"]},
                         step=int(loop["best_epoch"]))

    params = sum(p.numel() for p in model.parameters())
    preprocessing = {
        "input": "float32 NCHW RGB, normalised with mean/std below",
        "mean": loaders.IMAGENET_MEAN, "std": loaders.IMAGENET_STD, "resolution": eval_resolution,
        "resize": round(eval_resolution / spec.crop_ratio), "crop": eval_resolution, "crop_ratio": spec.crop_ratio,
        "classes": manifest["classes"],
    }
    tags = {
        "variant": spec.name, "params": params, "gmacs": f"{_gmacs(model, eval_resolution):.4f}",
        "train_resolution": spec.train_resolution, "eval_resolution": eval_resolution, "recipe": recipe.name,
        "dataset_version": manifest["version"], "manifest_sha256": manifest_hash(dataset_dir),
        "minival_top1": f"{loop['best_top1']:.3f}", "val_top1": f"{val['top1']:.3f}",
        "epochs_run": epochs_run, "best_epoch": loop["best_epoch"],
        "early_stopped_epoch": epochs_run - 1 if stopped_early else "none",
    }
    with tempfile.TemporaryDirectory() as tmp:
        sd = Path(tmp) / "state_dict.pt"
        torch.save({"state_dict": model.state_dict(), "model_args": saved["model_args"]}, sd)
        example = np.zeros((1, 3, eval_resolution, eval_resolution), dtype=np.float32)
        name, version, champion = tracking.register_best_checkpoint(
            layout.tracking_uri, job.run_id, model, spec.name, example, preprocessing, tags, val["top1"],
            manifest["version"], sd,
        )
    return TrainResult(
        variant=spec.name, run_id=job.run_id, job_name=job.name, registered_model=name, version=version,
        champion=champion, best_epoch=int(loop["best_epoch"]), epochs_run=epochs_run, stopped_early=stopped_early,
        minival_top1=float(loop["best_top1"]), val_top1=val["top1"], val_top5=val["top5"], params=params,
        resumed=job.resumed,
    )


def evaluate_split(
    model: torch.nn.Module, dataset_dir: str, split: str, resolution: int, crop_ratio: float, recipe: Recipe
) -> dict[str, float]:
    """Evaluate a model on a whole split in one process (on a GPU when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    if recipe.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = loaders.make_loader(
        dataset_dir, split, resolution, recipe.data.eval_batch_size or recipe.data.batch_size,
        crop_ratio=crop_ratio, num_workers=recipe.data.loader_workers,
    )
    return evaluate(model, batches, device, recipe.runtime.channels_last, amp=recipe.runtime.amp and device.type == "cuda")


def _gmacs(model: torch.nn.Module, resolution: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() / 2 / 1e9
