"""TODO docstring (from pipelines/train.py)."""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import models
from pipelines.dataset import read_manifest
from pipelines.loading import make_loader
from pipelines.loading.sampling import batches_per_epoch
from pipelines.loading.transforms import normalize
from pipelines.training import augment, tracking
from pipelines.training.recipe import Recipe
from pipelines.training.schedules import EpochSettings, ema_decay_at, epoch_settings, learning_rate

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
        x = normalize(images.to(device, non_blocking=True), channels_last)
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
    x = normalize(images, channels_last)
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
    steps_per_epoch = batches_per_epoch(n_train, data.batch_size, world, split_workers)
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
        train_loader = make_loader(
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
            minival_loader = make_loader(
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
