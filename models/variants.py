"""The EfficientNet V1 and V2 families as data.

Everything a consumer needs to know about a variant (multipliers, resolutions, eval crop, regularisation,
progressive-learning ranges) lives in one frozen `VariantSpec` per registered name, built from:

* one stage-row dataclass (`StageSpec`) and one `Architecture` per base table (V1-B0, V2-S/M/L/XL);
* one coefficient table for the released V1 models (`V1_COEFFICIENTS`);
* one table per V2 model (`V2_SETTINGS`), with both the paper's and the reference code's progressive ranges.

Sizes are derived, never written down: `round_channels` and `round_repeats` turn a base table plus
multipliers into concrete widths and depths; `compound_scale` turns any phi into multipliers.

Sources: EfficientNet (arXiv 1905.11946) Table 1 and Section 3.3; EfficientNetV2 (arXiv 2104.00298)
Tables 4 and 6; the released configs of both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Sequence

Family = Literal["v1", "v2"]
BlockKind = Literal["mbconv", "fused_mbconv"]

BLOCK_KINDS: tuple[str, ...] = ("mbconv", "fused_mbconv")

# Channel counts are rounded to multiples of this (keeps convolutions vector-friendly on every backend).
CHANNEL_DIVISOR = 8

# Compound-scaling constants from the paper's grid search at phi = 1 (alpha * beta^2 * gamma^2 ~= 2).
PAPER_ALPHA = 1.2  # depth
PAPER_BETA = 1.1  # width
PAPER_GAMMA = 1.15  # resolution

# Resolutions produced by compound scaling are rounded to this multiple and never go below the
# network's total stride, so the last feature map is at least 1x1.
RESOLUTION_MULTIPLE = 8
MIN_RESOLUTION = 32

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


# --------------------------------------------------------------------------------------------------
# Stage tables
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One row of a stage table: `repeats` blocks of one kind; the first one carries the stride.

    Input channels are not a field: the builder tracks them (the stem's output feeds stage 1, each
    stage's output feeds the next).
    """

    block: BlockKind
    expand: int  # expansion ratio of the hidden width over the block's input width
    kernel: int
    stride: int
    channels: int  # output channels before width scaling
    repeats: int  # blocks before depth scaling
    se_ratio: float = 0.0  # squeeze width = int(block input channels * se_ratio); 0 = no SE

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {self.block!r}; expected one of {BLOCK_KINDS}")
        for field in ("expand", "kernel", "stride", "channels", "repeats"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StageSpec.{field} must be a positive int, got {value!r}")
        if self.kernel % 2 != 1:
            raise ValueError(f"StageSpec.kernel must be odd (symmetric padding), got {self.kernel}")
        if not 0.0 <= self.se_ratio <= 1.0:
            raise ValueError(f"StageSpec.se_ratio must be in [0, 1], got {self.se_ratio!r}")


@dataclass(frozen=True)
class Architecture:
    """A base network: stem width, stage rows, head width, and how widths are rounded."""

    stem: int  # output channels of the 3x3 stride-2 stem conv
    stages: tuple[StageSpec, ...]
    head: int  # output channels of the final 1x1 conv
    # V1 rounds a scaled width up one more step when rounding to the nearest multiple would lose more
    # than 10% of it (narrow layers would otherwise shrink by up to a third, e.g. 12 -> 8). The V2
    # code dropped that rule; its widths are already multiples of 8, so it only matters under a
    # width override.
    ten_percent_rule: bool


def _mb(expand: int, kernel: int, stride: int, channels: int, repeats: int) -> StageSpec:
    return StageSpec("mbconv", expand, kernel, stride, channels, repeats, se_ratio=0.25)


def _fused(expand: int, kernel: int, stride: int, channels: int, repeats: int) -> StageSpec:
    # Fused-MBConv stages carry no squeeze-excitation in any V2 table.
    return StageSpec("fused_mbconv", expand, kernel, stride, channels, repeats, se_ratio=0.0)


ARCHITECTURES: dict[str, Architecture] = {
    # EfficientNet paper, Table 1 (B0). Every V1 variant is this table times (width, depth).
    "v1_b0": Architecture(
        stem=32,
        stages=(
            _mb(1, 3, 1, 16, 1),
            _mb(6, 3, 2, 24, 2),
            _mb(6, 5, 2, 40, 2),
            _mb(6, 3, 2, 80, 3),
            _mb(6, 5, 1, 112, 3),
            _mb(6, 5, 2, 192, 4),
            _mb(6, 3, 1, 320, 1),
        ),
        head=1280,
        ten_percent_rule=True,
    ),
    # EfficientNetV2 paper, Table 4 (S); M, L and XL from the released configs. No multipliers:
    # each is its own table.
    "v2_s": Architecture(
        stem=24,
        stages=(
            _fused(1, 3, 1, 24, 2),
            _fused(4, 3, 2, 48, 4),
            _fused(4, 3, 2, 64, 4),
            _mb(4, 3, 2, 128, 6),
            _mb(6, 3, 1, 160, 9),
            _mb(6, 3, 2, 256, 15),
        ),
        head=1280,
        ten_percent_rule=False,
    ),
    "v2_m": Architecture(
        stem=24,
        stages=(
            _fused(1, 3, 1, 24, 3),
            _fused(4, 3, 2, 48, 5),
            _fused(4, 3, 2, 80, 5),
            _mb(4, 3, 2, 160, 7),
            _mb(6, 3, 1, 176, 14),
            _mb(6, 3, 2, 304, 18),
            _mb(6, 3, 1, 512, 5),
        ),
        head=1280,
        ten_percent_rule=False,
    ),
    "v2_l": Architecture(
        stem=32,
        stages=(
            _fused(1, 3, 1, 32, 4),
            _fused(4, 3, 2, 64, 7),
            _fused(4, 3, 2, 96, 7),
            _mb(4, 3, 2, 192, 10),
            _mb(6, 3, 1, 224, 19),
            _mb(6, 3, 2, 384, 25),
            _mb(6, 3, 1, 640, 7),
        ),
        head=1280,
        ten_percent_rule=False,
    ),
    # The reference code's XL (released for ImageNet-21k pre-training only).
    "v2_xl": Architecture(
        stem=32,
        stages=(
            _fused(1, 3, 1, 32, 4),
            _fused(4, 3, 2, 64, 8),
            _fused(4, 3, 2, 96, 8),
            _mb(4, 3, 2, 192, 16),
            _mb(6, 3, 1, 256, 24),
            _mb(6, 3, 2, 512, 32),
            _mb(6, 3, 1, 640, 8),
        ),
        head=1280,
        ten_percent_rule=False,
    ),
}


def architecture_to_dict(arch: Architecture) -> dict[str, Any]:
    """A table as plain data (what a recipe and a checkpoint carry); `architecture_from_dict` reads it back."""
    return dataclasses.asdict(arch)


def architecture_from_dict(data: dict[str, Any]) -> Architecture:
    """A table from plain data, every row checked (StageSpec); ValueError naming what is wrong."""
    try:
        stages = tuple(StageSpec(**row) for row in data["stages"])
        arch = Architecture(stem=int(data["stem"]), stages=stages, head=int(data["head"]),
                            ten_percent_rule=bool(data["ten_percent_rule"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a stage table ({type(exc).__name__}: {exc}); expected stem, stages, head, "
                         "ten_percent_rule") from None
    if not stages:
        raise ValueError("a stage table needs at least one stage")
    return arch


def architecture_name(arch: Architecture) -> str:
    """A name that is the table's content: the same rows, the same name, in any process."""
    digest = hashlib.sha256(json.dumps(architecture_to_dict(arch), sort_keys=True).encode()).hexdigest()[:12]
    return f"searched_{digest}"


def register_architecture(arch: Architecture, name: str | None = None) -> str:
    """Make a table buildable under a name (its content's by default); ValueError when the name holds another
    table. Registering the same table again is a no-op (each process registers what its recipe carries)."""
    name = name or architecture_name(arch)
    known = ARCHITECTURES.get(name)
    if known is not None and known != arch:
        raise ValueError(f"architecture name {name!r} is taken by another table")
    ARCHITECTURES[name] = arch
    return name




# --------------------------------------------------------------------------------------------------
# Rounding and scaling (pure functions)
# --------------------------------------------------------------------------------------------------

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
        raise ValueError(f"late_depth_stages must be in 1..{len(base_repeats)} (the stages there are), "
                         f"got {late_stages}")
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


def v1_crop_ratio(eval_resolution: int) -> float:
    """Fraction of the resized image kept by the V1 centre crop (see V1_EVAL_CROP_PADDING)."""
    return eval_resolution / (eval_resolution + V1_EVAL_CROP_PADDING)


class ScaledCoefficients(NamedTuple):
    depth_mult: float
    width_mult: float
    resolution: int


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
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
    value = check_real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def check_resolution(name: str, value: Any) -> int:
    value = check_positive_int(name, value)
    if value < MIN_RESOLUTION:
        raise ValueError(f"{name} must be >= {MIN_RESOLUTION} (the network's total stride), got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Compound-scaling coefficient sets
# --------------------------------------------------------------------------------------------------

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


def check_coefficients(name: str, alpha: Any, beta: Any, gamma: Any,
                       tolerance: float = DEFAULT_COEFFICIENT_TOLERANCE) -> CoefficientSet:
    """A coefficient set, checked: each a real >= 1, and alpha * beta^2 * gamma^2 within `tolerance` (relative)
    of 2; ValueError naming the set and what is wrong."""
    values = {k: check_real(f"{name}: {k}", v, positive=True) for k, v in
              (("alpha", alpha), ("beta", beta), ("gamma", gamma))}
    below = [f"{k} {v:g}" for k, v in values.items() if v < 1]
    if below:
        raise ValueError(f"{name}: alpha, beta and gamma must be >= 1 (scaling up makes nothing smaller), got "
                         + ", ".join(below))
    tolerance = check_real(f"{name}: tolerance", tolerance, positive=True)
    cs = CoefficientSet(name, **values)
    if abs(cs.flops_factor - FLOPS_PER_PHI) > tolerance * FLOPS_PER_PHI:
        raise ValueError(f"{name}: alpha * beta^2 * gamma^2 = {cs.flops_factor:.3f} (alpha {cs.alpha:g}, beta "
                         f"{cs.beta:g}, gamma {cs.gamma:g}), not within {tolerance:.0%} of {FLOPS_PER_PHI:g}")
    return cs


PAPER_COEFFICIENTS = CoefficientSet("paper", PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA)


def compound_scale(
    phi: float,
    alpha: float = PAPER_ALPHA,
    beta: float = PAPER_BETA,
    gamma: float = PAPER_GAMMA,
    base_resolution: int = 224,
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


# --------------------------------------------------------------------------------------------------
# Variant metadata
# --------------------------------------------------------------------------------------------------


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
        crop = check_real("crop_ratio", self.crop_ratio, positive=True)
        if crop > 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop}")
        check_rate("dropout", self.dropout)
        check_rate("stochastic_depth", self.stochastic_depth)
        if isinstance(self.late_depth_stages, bool) or not isinstance(self.late_depth_stages, int) \
                or self.late_depth_stages < 0:
            raise ValueError(f"late_depth_stages must be an int >= 0, got {self.late_depth_stages!r}")

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
    "b0": V1Coefficients(1.0, 1.0, 224, 0.2),
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


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------

# Override keys in slug order, each with its slug tag.
_OVERRIDE_TAGS: dict[str, str] = {
    "phi": "phi",
    "alpha": "alpha",
    "beta": "beta",
    "gamma": "gamma",
    "width_mult": "w",
    "depth_mult": "d",
    "resolution": "r",
    "eval_resolution": "er",
    "dropout": "drop",
    "stochastic_depth": "sd",
    "late_depth_stages": "late",
    "crop_ratio": "crop",
}
OVERRIDE_KEYS: tuple[str, ...] = tuple(_OVERRIDE_TAGS)


def _slug_number(value: float) -> str:
    """Shortest exact text for a number that is safe in file and registry names: 3, -3, 0.5, 1e-05."""
    value = float(value)
    text = str(int(value)) if value.is_integer() else repr(value)
    return text.replace("+", "")


def resolve_variant(name: str, **overrides: Any) -> VariantSpec:
    """The spec for `name` with overrides applied; its `name` slug records every effective override.

    Overrides:
      phi (V1 only): width, depth and resolution from `compound_scale` applied to the B0 table, with
        optional `alpha`, `beta`, `gamma` (paper values by default); replaces the named variant's
        multipliers and resolution, keeps its dropout.
      width_mult, depth_mult, resolution, eval_resolution: explicit values; they win over phi.
        `resolution` sets the training resolution; for V1 (which trains and evaluates at one size) it
        sets the eval resolution too, for V2 the eval resolution keeps its ratio to the training one.
      crop_ratio: the eval centre crop's share of the resized image, in (0, 1] (default: the variant's).
      dropout, stochastic_depth: rates in [0, 1).
      late_depth_stages: non-uniform depth (V2's rule, `stage_repeats`): the blocks that depth scaling adds go
        to the last N stages only (0: every stage alike).
      allow_large_resolution: a V2 resolution override above V2_MAX_RESOLUTION is refused unless True.
      table: a stage table (an Architecture, or its `architecture_to_dict` form: a searched baseline) built in
        place of the variant's, with the variant's multipliers, resolutions and rates; registered under its
        content's name (`architecture_name`), so every process that resolves it builds the same network.
    Overrides equal to the named variant's value leave the name unchanged.
    """
    spec = get_variant(name)
    overrides = dict(overrides)
    allow_large = bool(overrides.pop("allow_large_resolution", False))
    table = overrides.pop("table", None)
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid overrides: {list(OVERRIDE_KEYS)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    if not given and table is None:
        return spec

    scaling_keys = [key for key in ("alpha", "beta", "gamma") if key in given]
    if scaling_keys and "phi" not in given:
        raise ValueError(f"{scaling_keys} only apply together with phi")

    changes: dict[str, Any] = {}
    tags: list[str] = []

    def tag(key: str, value: Any) -> None:
        tags.append(f"{_OVERRIDE_TAGS[key]}{_slug_number(value)}")

    if "phi" in given:
        if spec.family != "v1":
            raise ValueError(
                f"phi scales the V1 B0 table; {name} is a V2 model (use width_mult/depth_mult/resolution)"
            )
        coefficients = {k: check_real(k, given[k], positive=True) for k in scaling_keys}
        base = get_variant(V1_BASE_NAME)
        scaled = compound_scale(given["phi"], base_resolution=base.train_resolution, **coefficients)
        changes.update(
            phi=float(given["phi"]),
            width_mult=scaled.width_mult,
            depth_mult=scaled.depth_mult,
            train_resolution=scaled.resolution,
            eval_resolution=scaled.resolution,
        )
        tag("phi", given["phi"])
        for key in ("alpha", "beta", "gamma"):
            default = {"alpha": PAPER_ALPHA, "beta": PAPER_BETA, "gamma": PAPER_GAMMA}[key]
            if key in coefficients and coefficients[key] != default:
                tag(key, coefficients[key])

    for key in ("width_mult", "depth_mult"):
        if key in given:
            value = check_real(key, given[key], positive=True)
            if value != getattr(spec, key) or "phi" in given:
                changes[key] = value
                tag(key, value)

    if "resolution" in given:
        value = check_resolution("resolution", given["resolution"])
        if value != spec.train_resolution or "phi" in given:
            ratio = spec.eval_resolution / spec.train_resolution
            changes.update(train_resolution=value, eval_resolution=max(MIN_RESOLUTION, round(value * ratio)))
            tag("resolution", value)
    if "eval_resolution" in given:
        value = check_resolution("eval_resolution", given["eval_resolution"])
        if value != changes.get("eval_resolution", spec.eval_resolution):
            changes["eval_resolution"] = value
            tag("eval_resolution", value)

    for key in ("dropout", "stochastic_depth"):
        if key in given:
            value = check_rate(key, given[key])
            if value != getattr(spec, key):
                changes[key] = value
                tag(key, value)

    if "late_depth_stages" in given:
        value = given["late_depth_stages"]
        stages = len(ARCHITECTURES[spec.architecture].stages)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= stages:
            raise ValueError(f"late_depth_stages must be an int in 0..{stages} (the stages of {name}), got {value!r}")
        if value != spec.late_depth_stages:
            changes["late_depth_stages"] = value
            tag("late_depth_stages", value)

    if table is not None:  # a searched stage table in place of the variant's (scaled like it)
        arch = table if isinstance(table, Architecture) else architecture_from_dict(table)
        if arch != ARCHITECTURES[spec.architecture]:  # the variant's own table changes nothing
            architecture = register_architecture(arch)
            changes["architecture"] = architecture
            tags.append(f"t{architecture.removeprefix('searched_')[:8]}")

    if "crop_ratio" in given:  # an explicit ratio wins over the one V1 derives from the eval resolution
        value = check_real("crop_ratio", given["crop_ratio"], positive=True)
        if not value <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {value!r}")
        if value != spec.crop_ratio or "eval_resolution" in changes:
            changes["crop_ratio"] = value
            tag("crop_ratio", value)

    if not changes:
        return spec
    sizes = (changes.get("train_resolution", spec.train_resolution), changes.get("eval_resolution",
                                                                              spec.eval_resolution))
    if spec.family == "v2" and max(sizes) > V2_MAX_RESOLUTION and not allow_large:
        raise ValueError(f"{name}: train/eval resolution {sizes[0]}/{sizes[1]} goes above V2's cap of "
                         f"{V2_MAX_RESOLUTION} (paper Sec. 4.2); set model.allow_large_resolution: true to train it "
                         "anyway")
    if "eval_resolution" in changes and spec.family == "v1" and "crop_ratio" not in changes:
        changes["crop_ratio"] = v1_crop_ratio(changes["eval_resolution"])
    return dataclasses.replace(spec, name="_".join([spec.name, *tags]), **changes)


def architecture_of(spec: VariantSpec) -> Architecture:
    if spec.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.architecture!r}; valid: {list(ARCHITECTURES)}")
    return ARCHITECTURES[spec.architecture]
