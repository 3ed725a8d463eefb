"""The baseline search's space as data, in the model tables' own rows, and the papers' rewards as pure functions.

A space is built around a base table (`space_around`: B0 for the V1 search, V2-S for the V2 one): per stage the
block kind (MBConv / Fused-MBConv), kernel (3, 5), expansion (1, 4, 6), repeats (within `repeat_range` of the
base's) and SE ratio (0, 0.25) are choices; the stem, the head, each stage's channels and strides are the
base's. A point of the space is an `Architecture` like any in `ARCHITECTURES`, so it builds through the same
builder (`register_architecture` gives it a name a `VariantSpec` can carry); the base itself is a point.

Rewards (V1: MnasNet's multi-objective reward, ACC x (FLOPS / T)^w; V2: the training-aware A x S^w x P^v) are
plain functions of the measured figures and their exponents.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .tables import BLOCK_KINDS, Architecture, BlockKind, StageSpec, architecture_name, register_architecture

__all__ = [
    "EXPANSIONS",
    "KERNELS",
    "SE_RATIOS",
    "V1_FLOPS_EXPONENT",
    "V1_TARGET_FLOPS",
    "V2_PARAMS_EXPONENT",
    "V2_STEP_TIME_EXPONENT",
    "SearchSpace",
    "StageChoices",
    "describe",
    "normalised_step_times",
    "space_around",
    "v1_reward",
    "v2_reward",
    # From models.tables, offered here too: a point of the space is named and made buildable with them.
    "architecture_name",
    "register_architecture",
]

KERNELS = (3, 5)
EXPANSIONS = (1, 4, 6)
SE_RATIOS = (0.0, 0.25)
# Rewards' defaults: V1 (EfficientNet Sec. 4, after MnasNet): w = -0.07, target 400M FLOPs; V2 (Sec. 4.1):
# w = -0.07 on the normalised training-step time, v = -0.05 on the parameters.
V1_TARGET_FLOPS = 400e6
V1_FLOPS_EXPONENT = -0.07
V2_STEP_TIME_EXPONENT = -0.07
V2_PARAMS_EXPONENT = -0.05


@dataclass(frozen=True)
class StageChoices:
    """What one stage may be: each field's allowed values; channels and stride are fixed."""

    channels: int
    stride: int
    blocks: tuple[BlockKind, ...] = BLOCK_KINDS
    kernels: tuple[int, ...] = KERNELS
    expansions: tuple[int, ...] = EXPANSIONS
    repeats: tuple[int, ...] = (1,)
    se_ratios: tuple[float, ...] = SE_RATIOS

    def options(self) -> list[StageSpec]:
        """Every row this stage may take."""
        return [
            StageSpec(b, e, k, self.stride, self.channels, r, se_ratio=s)
            for b, k, e, r, s in itertools.product(
                self.blocks, self.kernels, self.expansions, self.repeats, self.se_ratios
            )
        ]

    def allows(self, row: StageSpec) -> bool:
        return (
            row.channels == self.channels
            and row.stride == self.stride
            and row.block in self.blocks
            and row.kernel in self.kernels
            and row.expand in self.expansions
            and row.repeats in self.repeats
            and row.se_ratio in self.se_ratios
        )


@dataclass(frozen=True)
class SearchSpace:
    stem: int
    head: int
    stages: tuple[StageChoices, ...]
    ten_percent_rule: bool

    @property
    def size(self) -> int:
        """How many architectures the space holds."""
        return math.prod(len(s.options()) for s in self.stages)

    def contains(self, arch: Architecture) -> bool:
        return (
            arch.stem == self.stem
            and arch.head == self.head
            and len(arch.stages) == len(self.stages)
            and all(c.allows(row) for c, row in zip(self.stages, arch.stages))
        )

    def sample(self, rng: random.Random) -> Architecture:
        """A point drawn uniformly, stage by stage (random search)."""
        return Architecture(
            stem=self.stem,
            stages=tuple(rng.choice(c.options()) for c in self.stages),
            head=self.head,
            ten_percent_rule=self.ten_percent_rule,
        )

    def mutate(self, arch: Architecture, rng: random.Random) -> Architecture:
        """The point with one stage's row redrawn among its other options (regularised evolution's step)."""
        i = rng.randrange(len(self.stages))
        others = [row for row in self.stages[i].options() if row != arch.stages[i]] or [arch.stages[i]]
        stages = list(arch.stages)
        stages[i] = rng.choice(others)
        return Architecture(
            stem=arch.stem, stages=tuple(stages), head=arch.head, ten_percent_rule=arch.ten_percent_rule
        )


def space_around(base: Architecture, repeat_range: int = 1) -> SearchSpace:
    """The space of the base table's stem, head, channels and strides, each stage's repeats within
    `repeat_range` of the base's (at least 1), and every block kind, kernel, expansion and SE ratio."""
    if repeat_range < 0:
        raise ValueError(f"repeat_range must be >= 0, got {repeat_range}")

    def repeats(base_repeats: int) -> tuple[int, ...]:
        return tuple(range(max(1, base_repeats - repeat_range), base_repeats + repeat_range + 1))

    stages = tuple(
        StageChoices(channels=row.channels, stride=row.stride, repeats=repeats(row.repeats)) for row in base.stages
    )
    return SearchSpace(stem=base.stem, head=base.head, stages=stages, ten_percent_rule=base.ten_percent_rule)


def describe(arch: Architecture) -> list[str]:
    """The table row by row, as the papers print it: "MBConv6 k5x5 s2 c40 x2 se0.25"."""
    kinds = {"mbconv": "MBConv", "fused_mbconv": "Fused-MBConv"}
    return [
        f"{kinds[r.block]}{r.expand} k{r.kernel}x{r.kernel} s{r.stride} c{r.channels} x{r.repeats} se{r.se_ratio:g}"
        for r in arch.stages
    ]


def v1_reward(
    accuracy: float, flops: float, target: float = V1_TARGET_FLOPS, exponent: float = V1_FLOPS_EXPONENT
) -> float:
    """MnasNet's multi-objective reward as EfficientNet used it: ACC(m) x (FLOPS(m) / T)^w."""
    _positive(flops=flops, target=target)
    return accuracy * (flops / target) ** exponent


def v2_reward(
    accuracy: float,
    step_time: float,
    params: float,
    step_exponent: float = V2_STEP_TIME_EXPONENT,
    params_exponent: float = V2_PARAMS_EXPONENT,
) -> float:
    """EfficientNetV2's training-aware reward: A x S^w x P^v (S the normalised training-step time, P the
    parameter count)."""
    _positive(step_time=step_time, params=params)
    return accuracy * step_time**step_exponent * params**params_exponent


def normalised_step_times(step_times: Sequence[float]) -> list[float]:
    """Step times relative to their median (S in the V2 reward: only ratios between trials matter)."""
    ordered = sorted(step_times)
    median = (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    )
    return [t / median for t in step_times]


def _positive(**values: float) -> None:
    bad = [f"{k} {v!r}" for k, v in values.items() if not (isinstance(v, (int, float)) and v > 0)]
    if bad:
        raise ValueError(f"rewards need positive figures, got {', '.join(bad)}")
