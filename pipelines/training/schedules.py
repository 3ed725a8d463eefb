"""Schedules as pure functions of (epoch, recipe): testable with tables, free of optimizer state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.training.recipe import OptimConfig

if TYPE_CHECKING:
    from pipelines.training.recipe import Recipe


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """The paper's linear scaling: lr = lr_per_256 x global_batch / 256."""
    return optim.lr_per_256 * global_batch / 256


def learning_rate(epoch: float, optim: OptimConfig, global_batch: int, total_epochs: int) -> float:
    """Learning rate at a (fractional) epoch.

    Linear warm-up from 0 over `warmup_epochs`, then either the paper's staircase (x decay_rate every
    decay_epochs, counted from the end of warm-up, as the TF reference does) or cosine to min_lr_ratio x peak.
    """
    peak = peak_lr(optim, global_batch)
    if optim.warmup_epochs > 0 and epoch < optim.warmup_epochs:
        return peak * epoch / optim.warmup_epochs
    after = epoch - optim.warmup_epochs
    if optim.schedule == "exponential":
        lr = peak * optim.decay_rate ** math.floor(after / optim.decay_epochs)
    else:
        span = max(total_epochs - optim.warmup_epochs, 1e-9)
        progress = min(max(after / span, 0.0), 1.0)
        lr = peak * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return max(lr, peak * optim.min_lr_ratio)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as in the TF reference: small early, so the average is not stuck at the init."""
    return min(decay, (1 + step) / (10 + step))


@dataclass(frozen=True)
class EpochSettings:
    """What is in force during one epoch: the loader's image size and the regularisation knobs."""

    stage: int
    image_size: int
    dropout: float
    stochastic_depth: float
    randaug_magnitude: float
    mixup_alpha: float
    cutmix_alpha: float


def progressive_stage(epoch: int, total_epochs: int, stages: int) -> int:
    """Index of the stage an epoch falls in when `total_epochs` are split into `stages` equal parts."""
    if total_epochs < 1 or stages < 1:
        raise ValueError("total_epochs and stages must be >= 1")
    return min(stages - 1, epoch * stages // total_epochs)


def stage_fraction(stage: int, stages: int, rule: str) -> float:
    """How far along min -> max a stage sits: paper i/(n-1) (first stage at min, last at max); automl
    (i+1)/n (first stage already above min, as the released code does)."""
    if rule == "paper":
        return stage / (stages - 1) if stages > 1 else 1.0
    if rule == "automl":
        return (stage + 1) / stages
    raise ValueError(f"unknown progressive rule {rule!r}")


def first_scored_epoch(recipe: Recipe) -> int:
    """The first epoch early stopping scores: the last stage's first under `progressive.choose_from:
    last_stage`, else 0."""
    prog, epochs = recipe.progressive, recipe.schedule.epochs
    if not prog.enabled or prog.choose_from == "any_stage":
        return 0
    last = progressive_stage(epochs - 1, epochs, prog.stages)  # with fewer epochs than stages, not stages - 1
    return next(e for e in range(epochs) if progressive_stage(e, epochs, prog.stages) == last)


def _lerp(bounds: tuple[float, float], t: float) -> float:
    lo, hi = bounds
    return lo + (hi - lo) * t


def epoch_settings(epoch: int, recipe: Recipe, spec: Any) -> EpochSettings:
    """The settings in force at `epoch` for a variant `spec` (a models.VariantSpec) under `recipe`."""
    model, aug, prog = recipe.model, recipe.augment, recipe.progressive
    size = model.resolution or spec.train_resolution
    dropout = model.dropout if model.dropout is not None else spec.dropout
    magnitude = aug.randaug_magnitude if aug.policy == "randaugment" else 0.0
    mixup = aug.mixup_alpha
    if not prog.enabled:
        return EpochSettings(0, size, dropout, spec.stochastic_depth, magnitude, mixup, aug.cutmix_alpha)
    table = spec.progressive_paper if prog.rule == "paper" else spec.progressive_automl
    if table is None and None in (prog.image_size, prog.dropout, prog.randaug_magnitude, prog.mixup_alpha):
        raise ValueError(f"{spec.name} has no {prog.rule} progressive table: give every [min, max] in the recipe")
    stage = progressive_stage(epoch, recipe.schedule.epochs, prog.stages)
    t = stage_fraction(stage, prog.stages, prog.rule)
    sizes = prog.image_size or (table.image_size_min, table.image_size_max)
    drops = prog.dropout or (table.dropout_min, table.dropout_max)
    mags = prog.randaug_magnitude or (table.randaug_magnitude_min, table.randaug_magnitude_max)
    mixes = prog.mixup_alpha or (table.mixup_alpha_min, table.mixup_alpha_max)
    # automl computes a dropout schedule but never applies it: its dropout stays at the final value.
    stage_dropout = drops[1] if prog.rule == "automl" else _lerp(drops, t)
    return EpochSettings(
        stage=stage,
        image_size=int(_lerp(sizes, t)),
        dropout=stage_dropout,
        stochastic_depth=spec.stochastic_depth,
        randaug_magnitude=_lerp(mags, t) if aug.policy == "randaugment" else 0.0,
        mixup_alpha=_lerp(mixes, t),
        cutmix_alpha=aug.cutmix_alpha,
    )


def check_progressive_eval_size(recipe: Recipe, spec: Any) -> None:
    """Refuse a progressive recipe whose last stage trains above the size the model is evaluated at.

    The V2 paper evaluates at or above its last training size (V2-S: trains up to 300, evaluates at 384). Below
    it, minival (which chooses the checkpoint) and val see smaller objects than training ended on: measured by
    benchmarks/progressive.py, 64 -> 192 px training evaluated at the phi=-5 variant's own 112 px lost val top-1
    that evaluating at 192 px did not. It happens when a recipe moves `progressive.image_size` off the variant's
    table and leaves the model's resolution alone.
    """
    if not recipe.progressive.enabled:
        return
    last = epoch_settings(recipe.schedule.epochs - 1, recipe, spec).image_size
    if last > spec.eval_resolution:
        raise ValueError(
            f"progressive training ends at {last} px but {spec.name} evaluates at {spec.eval_resolution} px: "
            f"set model.resolution to {last} (the eval size follows it) or model.eval_resolution to at least {last}"
        )
