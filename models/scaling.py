"""Sizes derived, never written down: widths and depths rounded per layer (`round_channels`, `round_repeats`,
`stage_repeats`), resolutions rounded (`round_resolution`), and compound scaling (`compound_scale`) turning any phi
and a coefficient set (`CoefficientSet`; the paper's is `PAPER_COEFFICIENTS`) into multipliers. Pure functions.

Source: EfficientNet (arXiv 1905.11946) Section 3.3 and Eq. 3; EfficientNetV2 (arXiv 2104.00298) Section 4.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .checks import MIN_RESOLUTION, check_positive_int, check_real

# Channel counts are rounded to multiples of this (keeps convolutions vector-friendly on every backend).
CHANNEL_DIVISOR = 8

# Compound-scaling constants from the paper's grid search at phi = 1 (alpha * beta^2 * gamma^2 ~= 2).
PAPER_ALPHA = 1.2  # depth
PAPER_BETA = 1.1  # width
PAPER_GAMMA = 1.15  # resolution

# B0's resolution (paper Table 1's input size): what phi scales from, and B0's row of the V1 table.
B0_RESOLUTION = 224

# Resolutions produced by compound scaling are rounded to this multiple and never go below MIN_RESOLUTION (the
# network's total stride), so the last feature map is at least 1x1.
RESOLUTION_MULTIPLE = 8

# Products such as 5 * 1.2 come out as 6.000000000000001 in binary floating point; rounding to this
# many decimals first keeps float noise from adding a block or a channel step.
_FLOAT_NOISE_DECIMALS = 9


def round_channels(
    channels: int, width_mult: float, divisor: int = CHANNEL_DIVISOR, ten_percent_rule: bool = True
) -> int:
    """Scale a channel count and round it to the nearest multiple of `divisor` (at least `divisor`).

    With `ten_percent_rule` (V1), a result more than 10% below the scaled width goes up one more step.
    """
    scaled = round(channels * width_mult, _FLOAT_NOISE_DECIMALS)
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if ten_percent_rule and rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scale a stage's block count, rounding up (a stage never disappears)."""
    return max(1, math.ceil(round(repeats * depth_mult, _FLOAT_NOISE_DECIMALS)))


def stage_repeats(base_repeats: Sequence[int], depth_mult: float, late_stages: int = 0) -> list[int]:
    """Each stage's block count at `depth_mult`.

    Uniform (late_stages 0, V1's rule): every stage scaled by `round_repeats`. Non-uniform (V2 paper Sec. 4.2:
    "gradually add more layers to later stages"): the blocks uniform scaling would add, the same number in all,
    go to the last `late_stages` stages only, shared in proportion to their base repeats (largest remainder; ties
    to the later stage). Shrinking (depth_mult <= 1) stays uniform: there is nothing to add.
    """
    uniform = [round_repeats(r, depth_mult) for r in base_repeats]
    if late_stages == 0 or depth_mult <= 1:
        return uniform
    if not 0 < late_stages <= len(base_repeats):
        raise ValueError(
            f"late_depth_stages must be in 1..{len(base_repeats)} (the stages there are), got {late_stages}"
        )
    added = sum(uniform) - sum(base_repeats)
    late = range(len(base_repeats) - late_stages, len(base_repeats))
    weight = sum(base_repeats[i] for i in late)
    shares = {i: added * base_repeats[i] / weight for i in late}
    counts = {i: math.floor(shares[i]) for i in late}
    by_remainder = sorted(late, key=lambda i: (shares[i] - counts[i], i), reverse=True)
    for i in by_remainder[: added - sum(counts.values())]:
        counts[i] += 1
    return [r + counts.get(i, 0) for i, r in enumerate(base_repeats)]


def round_resolution(resolution: float) -> int:
    """Nearest multiple of RESOLUTION_MULTIPLE (halves round up), at least MIN_RESOLUTION."""
    return max(MIN_RESOLUTION, math.floor(resolution / RESOLUTION_MULTIPLE + 0.5) * RESOLUTION_MULTIPLE)


# Paper Sec. 3.3: alpha * beta^2 * gamma^2 ~= 2, so that FLOPs grow by about 2^phi; alpha, beta, gamma >= 1.
FLOPS_PER_PHI = 2.0
DEFAULT_COEFFICIENT_TOLERANCE = 0.1  # relative: alpha * beta^2 * gamma^2 within 10% of 2 (the paper's: 1.92)


@dataclass(frozen=True)
class CoefficientSet:
    """Depth, width and resolution bases of compound scaling, under a name ("paper", or a search's)."""

    name: str
    alpha: float  # depth
    beta: float  # width
    gamma: float  # resolution

    @property
    def flops_factor(self) -> float:
        """How much one unit of phi multiplies the FLOPs by: alpha * beta^2 * gamma^2."""
        return self.alpha * self.beta**2 * self.gamma**2


def check_coefficients(
    name: str, alpha: Any, beta: Any, gamma: Any, tolerance: float = DEFAULT_COEFFICIENT_TOLERANCE
) -> CoefficientSet:
    """A coefficient set, checked: each a real >= 1, and alpha * beta^2 * gamma^2 within `tolerance` (relative)
    of 2; ValueError naming the set and what is wrong."""
    values = {
        k: check_real(f"{name}: {k}", v, positive=True) for k, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma))
    }
    below = [f"{k} {v:g}" for k, v in values.items() if v < 1]
    if below:
        raise ValueError(
            f"{name}: alpha, beta and gamma must be >= 1 (scaling up makes nothing smaller), got " + ", ".join(below)
        )
    tolerance = check_real(f"{name}: tolerance", tolerance, positive=True)
    cs = CoefficientSet(name, **values)
    if abs(cs.flops_factor - FLOPS_PER_PHI) > tolerance * FLOPS_PER_PHI:
        raise ValueError(
            f"{name}: alpha * beta^2 * gamma^2 = {cs.flops_factor:.3f} (alpha {cs.alpha:g}, beta "
            f"{cs.beta:g}, gamma {cs.gamma:g}), not within {tolerance:.0%} of {FLOPS_PER_PHI:g}"
        )
    return cs


PAPER_COEFFICIENTS = CoefficientSet("paper", PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA)


class ScaledCoefficients(NamedTuple):
    """Compound scaling's result: multipliers of the base table, and the resolution."""

    depth_mult: float
    width_mult: float
    resolution: int


def compound_scale(
    phi: float,
    alpha: float = PAPER_ALPHA,
    beta: float = PAPER_BETA,
    gamma: float = PAPER_GAMMA,
    base_resolution: int = B0_RESOLUTION,
) -> ScaledCoefficients:
    """Paper Eq. 3: depth = alpha^phi, width = beta^phi, resolution = gamma^phi x base.

    phi may be any finite real, fractional or negative. Multipliers are returned unrounded (widths and
    depths are rounded per layer by the builder); the resolution is rounded by `round_resolution`.
    """
    phi = check_real("phi", phi)
    alpha = check_real("alpha", alpha, positive=True)
    beta = check_real("beta", beta, positive=True)
    gamma = check_real("gamma", gamma, positive=True)
    base_resolution = check_positive_int("base_resolution", base_resolution)
    return ScaledCoefficients(
        depth_mult=alpha**phi,
        width_mult=beta**phi,
        resolution=round_resolution(base_resolution * gamma**phi),
    )
