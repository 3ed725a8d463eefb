"""Learning-rate and EMA schedules are pure functions of (epoch or step, recipe): checked against tables."""

from __future__ import annotations

import math

import pytest

from pipelines.training.recipe import OptimConfig, load_recipe
from pipelines.training.schedules import ema_decay_at, learning_rate, peak_lr

PAPER = OptimConfig()  # the V1 paper's defaults: 0.016 x batch/256, 5 warm-up epochs, x0.97 every 2.4 epochs
COSINE = OptimConfig(schedule="cosine", lr_per_256=0.1, warmup_epochs=1)
COSINE_FLOOR = OptimConfig(schedule="cosine", lr_per_256=0.1, warmup_epochs=1, min_lr_ratio=0.1)


@pytest.mark.parametrize(
    "global_batch, expected",
    [(256, 0.016), (128, 0.008), (512, 0.032), (4096, 0.256), (32, 0.002)],
)
def test_peak_lr_scales_linearly_with_the_global_batch(global_batch: int, expected: float) -> None:
    assert peak_lr(PAPER, global_batch) == pytest.approx(expected)
    assert learning_rate(PAPER.warmup_epochs, PAPER, global_batch, 350) == pytest.approx(expected)


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0.0, 0.0),
        (0.5, 0.016 * 0.1),
        (1.0, 0.016 * 0.2),
        (2.5, 0.008),
        (4.999, 0.016 * 4.999 / 5),
        (5.0, 0.016),  # end of warm-up: the peak
        (7.39, 0.016),  # first 2.4 epochs after warm-up: still the peak
        (7.41, 0.016 * 0.97),
        (9.79, 0.016 * 0.97),
        (9.81, 0.016 * 0.97**2),
        (5 + 2.4 * 10 + 0.01, 0.016 * 0.97**10),
        (349.9, 0.016 * 0.97 ** math.floor(344.9 / 2.4)),
    ],
)
def test_paper_schedule_warmup_then_staircase(epoch: float, expected: float) -> None:
    assert learning_rate(epoch, PAPER, 256, 350) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_staircase_counts_from_the_end_of_warmup() -> None:
    # 0.97 per 2.4 epochs after warm-up, never before: the first drop is at epoch 7.4, not 2.4 or 4.8.
    drops = [e / 100 for e in range(0, 1500) if learning_rate(e / 100, PAPER, 256, 350)
             < learning_rate((e - 1) / 100, PAPER, 256, 350) and e / 100 > 5]
    assert drops[:3] == pytest.approx([7.4, 9.8, 12.2], abs=0.011)


@pytest.mark.parametrize(
    "optim, epoch, expected",
    [
        (COSINE, 0.5, 0.05),  # warm-up
        (COSINE, 1.0, 0.1),
        (COSINE, 5.5, 0.05),  # half way through the cosine
        (COSINE, 10.0, 0.0),  # end value
        (COSINE, 12.0, 0.0),  # past the end: stays at the end value
        (COSINE_FLOOR, 1.0, 0.1),
        (COSINE_FLOOR, 5.5, 0.1 * (0.1 + 0.9 * 0.5)),
        (COSINE_FLOOR, 10.0, 0.01),
        (COSINE_FLOOR, 0.0, 0.0),  # warm-up starts at 0, below the floor
    ],
)
def test_cosine_schedule(optim: OptimConfig, epoch: float, expected: float) -> None:
    assert learning_rate(epoch, optim, 256, 10) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("optim", [PAPER, COSINE, COSINE_FLOOR])
def test_schedule_rises_then_never_rises_again(optim: OptimConfig) -> None:
    total = 40
    lrs = [learning_rate(e / 10, optim, 512, total) for e in range(total * 10 + 1)]
    peak = peak_lr(optim, 512)
    top = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(peak)
    assert top == round(optim.warmup_epochs * 10)
    assert all(a <= b for a, b in zip(lrs[:top], lrs[1:top + 1]))
    assert all(a >= b for a, b in zip(lrs[top:], lrs[top + 1:]))
    assert min(lrs[top:]) >= peak * optim.min_lr_ratio - 1e-12


def test_no_warmup_starts_at_the_peak() -> None:
    optim = OptimConfig(warmup_epochs=0)
    assert learning_rate(0.0, optim, 256, 350) == pytest.approx(0.016)
    assert learning_rate(2.41, optim, 256, 350) == pytest.approx(0.016 * 0.97)


def test_staircase_respects_the_floor() -> None:
    optim = OptimConfig(min_lr_ratio=0.05)
    assert learning_rate(1000.0, optim, 256, 1000) == pytest.approx(0.016 * 0.05)


def test_shipped_recipes_give_their_documented_peaks() -> None:
    v1 = load_recipe("v1")
    # 8 workers x 256 per worker = 2048: 0.016 x 8 = 0.128.
    global_batch = v1.data.batch_size * v1.ray.num_workers
    assert learning_rate(v1.optim.warmup_epochs, v1.optim, global_batch, v1.schedule.epochs) == pytest.approx(0.128)


@pytest.mark.parametrize(
    "step, decay, expected",
    [
        (0, 0.9999, 0.1),
        (8, 0.9999, 0.5),
        (90, 0.9999, 0.91),
        (990, 0.9999, 0.991),
        (89_990, 0.9999, 89_991 / 90_000),
        (89_991, 0.9999, 0.9999),
        (10**7, 0.9999, 0.9999),
        (0, 0.05, 0.05),  # a decay below the warm-up value is used from the start
        (80, 0.9, 0.9),
        (1000, 0.9, 0.9),
    ],
)
def test_ema_decay_at(step: int, decay: float, expected: float) -> None:
    assert ema_decay_at(step, decay) == pytest.approx(expected)


def test_ema_decay_warms_up_monotonically() -> None:
    values = [ema_decay_at(s, 0.9999) for s in range(0, 200_000, 97)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] == 0.9999
