"""The EfficientNet V1 and V2 families as data: one frozen `VariantSpec` per registered name (`VARIANTS`).

Everything a consumer needs to know about a variant (its stage table, multipliers, resolutions, eval crop,
regularisation, progressive-learning ranges) is on its spec, built from:

* the stage tables of `models.tables` (V1-B0, V2-S/M/L/XL), named by key;
* one coefficient table for the released V1 models (`V1_COEFFICIENTS`);
* one table per V2 model (`V2_SETTINGS`), with both the paper's and the reference code's progressive ranges.

Variants beyond the registered ones (any phi, explicit multipliers, a searched table) come from the override
language of `models.overrides` (`resolve_variant`).

Sources: EfficientNet (arXiv 1905.11946) Table 1; EfficientNetV2 (arXiv 2104.00298) Tables 4 and 6; the released
configs of both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .checks import check_crop_ratio, check_late_depth_stages, check_rate, check_real, check_resolution

# Besides what this module uses, the scaling and table names code outside the package has long imported from
# `models.variants` (their homes are `models.scaling` and `models.tables`; new code imports them from `models`).
from .scaling import (  # noqa: F401
    B0_RESOLUTION,
    DEFAULT_COEFFICIENT_TOLERANCE,
    PAPER_COEFFICIENTS,
    CoefficientSet,
    check_coefficients,
    compound_scale,
    round_resolution,
)
from .tables import ARCHITECTURES, Architecture, architecture_from_dict, architecture_to_dict  # noqa: F401

Family = Literal["v1", "v2"]

# V2 paper Sec. 4.2: scaling V2 up, the largest inference image size is capped at 480 (larger images cost memory
# and training speed for little accuracy). Table variants keep theirs (XL's released code evaluates at 512).
V2_MAX_RESOLUTION = 480

# Stochastic-depth rate of every released model (the rate approached by the last block).
DEFAULT_STOCHASTIC_DEPTH = 0.2

# Eval preprocessing of the original V1 code: resize so that a centred crop of `resolution` leaves a
# 32-pixel border, i.e. crop_ratio = res / (res + 32). This gives 0.875 for B0 (the usual 224/256)
# and the per-model ratios other ports use for B1-B8 (0.882, 0.890, ... 0.955).
V1_EVAL_CROP_PADDING = 32
# V2 evaluates on the whole image resized to the eval resolution (no crop).
V2_CROP_RATIO = 1.0


def v1_crop_ratio(eval_resolution: int) -> float:
    """Fraction of the resized image kept by the V1 centre crop (see V1_EVAL_CROP_PADDING)."""
    return eval_resolution / (eval_resolution + V1_EVAL_CROP_PADDING)


@dataclass(frozen=True)
class ProgressiveSpec:
    """Min -> max range of each progressive-learning knob over training (V2)."""

    image_size_min: int
    image_size_max: int
    randaug_magnitude_min: float
    randaug_magnitude_max: float
    mixup_alpha_min: float
    mixup_alpha_max: float
    dropout_min: float
    dropout_max: float


@dataclass(frozen=True)
class VariantSpec:
    """Everything known about one (possibly overridden) variant. `name` is a file/registry-safe slug."""

    name: str
    family: Family
    architecture: str  # key of ARCHITECTURES
    width_mult: float
    depth_mult: float
    train_resolution: int
    eval_resolution: int
    # Eval preprocessing: resize the short side to round(eval_resolution / crop_ratio), centre-crop
    # eval_resolution.
    crop_ratio: float
    dropout: float  # before the classifier
    stochastic_depth: float  # rate approached by the last block; see drop_path_rates
    # V2 progressive learning. `progressive_paper` is Table 6 of the V2 paper; `progressive_automl` is
    # what the released training code does (image size up to train_resolution, RandAugment from 5 and
    # mixup from 0 to the final config values; its dropout schedule is computed but never applied, so
    # dropout is constant at the final value).
    progressive_paper: ProgressiveSpec | None = None
    progressive_automl: ProgressiveSpec | None = None
    base: str = ""  # the registered name this spec was resolved from (its own name if registered)
    phi: float | None = None  # set when width/depth/resolution came from compound_scale
    # Non-uniform depth (V2's rule, `stage_repeats`): the blocks depth scaling adds go to the last this many
    # stages only; 0 scales every stage alike.
    late_depth_stages: int = 0

    def __post_init__(self) -> None:
        # Specs also arrive from saved checkpoints (`from_dict`): reject what could not be built.
        if self.family not in ("v1", "v2"):
            raise ValueError(f"VariantSpec.family must be 'v1' or 'v2', got {self.family!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {list(ARCHITECTURES)}")
        check_real("width_mult", self.width_mult, positive=True)
        check_real("depth_mult", self.depth_mult, positive=True)
        check_resolution("train_resolution", self.train_resolution)
        check_resolution("eval_resolution", self.eval_resolution)
        check_crop_ratio("crop_ratio", self.crop_ratio)
        check_rate("dropout", self.dropout)
        check_rate("stochastic_depth", self.stochastic_depth)
        check_late_depth_stages("late_depth_stages", self.late_depth_stages)

    @property
    def eval_resize(self) -> int:
        """Short-side size to resize to before the eval centre crop."""
        return round(self.eval_resolution / self.crop_ratio)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able dict (for checkpoints and run metadata); inverse of `from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VariantSpec fields {unknown}")
        data = dict(data)
        for key in ("progressive_paper", "progressive_automl"):
            if isinstance(data.get(key), dict):
                data[key] = ProgressiveSpec(**data[key])
        return cls(**data)


class V1Coefficients(NamedTuple):
    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float


# The released V1 models use these rounded coefficients (not compound_scale's exact powers).
V1_COEFFICIENTS: dict[str, V1Coefficients] = {
    "b0": V1Coefficients(1.0, 1.0, B0_RESOLUTION, 0.2),
    "b1": V1Coefficients(1.0, 1.1, 240, 0.2),
    "b2": V1Coefficients(1.1, 1.2, 260, 0.3),
    "b3": V1Coefficients(1.2, 1.4, 300, 0.3),
    "b4": V1Coefficients(1.4, 1.8, 380, 0.4),
    "b5": V1Coefficients(1.6, 2.2, 456, 0.4),
    "b6": V1Coefficients(1.8, 2.6, 528, 0.5),
    "b7": V1Coefficients(2.0, 3.1, 600, 0.5),
    "b8": V1Coefficients(2.2, 3.6, 672, 0.5),  # released code only; not in the paper
}


class V2Settings(NamedTuple):
    train_resolution: int  # final (largest) progressive training size
    eval_resolution: int
    dropout: float  # final value
    randaug_magnitude: float  # final value in the released code
    mixup_alpha: float  # final value in the released code
    paper_progressive: ProgressiveSpec | None  # paper Table 6 (S, M, L only)


# Progressive learning starts every knob here in the released code.
_AUTOML_IMAGE_SIZE_MIN = 128
_AUTOML_RANDAUG_MIN = 5.0
_AUTOML_MIXUP_MIN = 0.0

V2_SETTINGS: dict[str, V2Settings] = {
    "s": V2Settings(300, 384, 0.2, 10, 0.0, ProgressiveSpec(128, 300, 5, 15, 0.0, 0.0, 0.1, 0.3)),
    "m": V2Settings(384, 480, 0.3, 15, 0.2, ProgressiveSpec(128, 380, 5, 20, 0.0, 0.2, 0.1, 0.4)),
    "l": V2Settings(384, 480, 0.4, 20, 0.5, ProgressiveSpec(128, 380, 5, 25, 0.0, 0.4, 0.1, 0.5)),
    # XL: released code only (eval 512); the paper gives no Table 6 row for it.
    "xl": V2Settings(384, 512, 0.4, 20, 0.5, None),
}


def _v1_spec(key: str, coefficients: V1Coefficients) -> VariantSpec:
    # V1 trains and evaluates at the same resolution.
    return VariantSpec(
        name=f"efficientnet_{key}",
        base=f"efficientnet_{key}",
        family="v1",
        architecture="v1_b0",
        width_mult=coefficients.width_mult,
        depth_mult=coefficients.depth_mult,
        train_resolution=coefficients.resolution,
        eval_resolution=coefficients.resolution,
        crop_ratio=v1_crop_ratio(coefficients.resolution),
        dropout=coefficients.dropout,
        stochastic_depth=DEFAULT_STOCHASTIC_DEPTH,
    )


def _v2_spec(key: str, settings: V2Settings) -> VariantSpec:
    automl = ProgressiveSpec(
        image_size_min=_AUTOML_IMAGE_SIZE_MIN,
        image_size_max=settings.train_resolution,
        randaug_magnitude_min=_AUTOML_RANDAUG_MIN,
        randaug_magnitude_max=settings.randaug_magnitude,
        mixup_alpha_min=_AUTOML_MIXUP_MIN,
        mixup_alpha_max=settings.mixup_alpha,
        dropout_min=settings.dropout,
        dropout_max=settings.dropout,
    )
    return VariantSpec(
        name=f"efficientnet_v2_{key}",
        base=f"efficientnet_v2_{key}",
        family="v2",
        architecture=f"v2_{key}",
        width_mult=1.0,
        depth_mult=1.0,
        train_resolution=settings.train_resolution,
        eval_resolution=settings.eval_resolution,
        crop_ratio=V2_CROP_RATIO,
        dropout=settings.dropout,
        stochastic_depth=DEFAULT_STOCHASTIC_DEPTH,
        progressive_paper=settings.paper_progressive,
        progressive_automl=automl,
    )


VARIANTS: dict[str, VariantSpec] = {
    **{spec.name: spec for spec in (_v1_spec(k, c) for k, c in V1_COEFFICIENTS.items())},
    **{spec.name: spec for spec in (_v2_spec(k, s) for k, s in V2_SETTINGS.items())},
}

# The V1 table that phi scales from.
V1_BASE_NAME = "efficientnet_b0"


def list_models() -> list[str]:
    """Registered variant names, V1 by size then V2 by size."""
    return list(VARIANTS)


def variant_range(first: str, last: str) -> list[str]:
    """Registered names from `first` to `last` in registry order: ("efficientnet_b0", "efficientnet_b7") is B0-B7."""
    names = list_models()
    for name in (first, last):
        get_variant(name)  # ValueError listing the valid names
    i, j = names.index(first), names.index(last)
    if i > j:
        raise ValueError(f"{first} comes after {last} in the registry")
    return names[i : j + 1]


def get_variant(name: str) -> VariantSpec:
    """The registered spec for `name`; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def architecture_of(spec: VariantSpec) -> Architecture:
    """The stage table a spec builds (a registered one, or a searched one registered in this process)."""
    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.architecture!r}; valid: {list(ARCHITECTURES)}")
    return ARCHITECTURES[spec.architecture]
