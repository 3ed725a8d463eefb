"""The range checks of the package's inputs, one function per kind of value, each raising ValueError that names
the value and what is allowed.

Used by the variant table (`VariantSpec`, which also reads specs back from checkpoints), the override language
(`resolve_variant`; its `check_override` names the check of each override key), the builder (`create_model`,
`set_regularization`) and, through `check_override`, the recipe schema of `pipelines.training.recipe`: a recipe is
refused for the same reasons, in the same words, as the variant it asks for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

# The network's total stride is 32 (a stride-2 stem and four stride-2 stages): below this the last feature map
# would be empty. The floor of every resolution, from compound scaling's rounding to a recipe's `resolution`.
MIN_RESOLUTION = 32


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """`value` as a finite float (> 0 with `positive`); bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_rate(name: str, value: Any) -> float:
    """A probability that may not be 1 (dropout, stochastic depth): in [0, 1)."""
    value = check_real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_resolution(name: str, value: Any) -> int:
    value = check_positive_int(name, value)
    if value < MIN_RESOLUTION:
        raise ValueError(f"{name} must be >= {MIN_RESOLUTION} (the network's total stride), got {value}")
    return value


def check_crop_ratio(name: str, value: Any) -> float:
    """The eval centre crop's share of the resized image: in (0, 1] (1 keeps the whole image, V2's rule)."""
    value = check_real(name, value, positive=True)
    if value > 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def check_late_depth_stages(name: str, value: Any, stages: int | None = None, of: str = "") -> int:
    """Non-uniform depth's stage count: an int >= 0, and at most `stages` (those of the table `of`) when known."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (stages is not None and value > stages):
        allowed = ">= 0" if stages is None else f"in 0..{stages} (the stages of {of})"
        raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
    return value
