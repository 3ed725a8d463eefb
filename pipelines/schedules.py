"""Schedules as pure functions of (epoch, recipe): testable with tables, free of optimizer state."""

from __future__ import annotations

import math

from pipelines.config import OptimConfig


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
