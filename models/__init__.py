"""EfficientNet V1 (B0-B8) and V2 (S/M/L/XL) built from one variant table. Depends on torch only.

    model = create_model("efficientnet_b0", num_classes=1000)
    tiny = create_model("efficientnet_b0", phi=-3)          # compound-scaled below B0
    spec = resolve_variant("efficientnet_b0", phi=-3)       # metadata only: resolutions, crop, rates
    set_regularization(model, dropout=0.3, stochastic_depth=0.1)

Modules, each fact in one: `tables` (the stage-row type and the base tables), `scaling` (rounding, compound
scaling, coefficient sets), `variants` (the registered variants' specs), `overrides` (the override language and
its keys), `checks` (the range checks they share), `layers` and `efficientnet` (the network), `summary`,
`checkpoint`, `search_space`.
"""

from .checks import MIN_RESOLUTION
from .efficientnet import (
    BlockPlan,
    EfficientNet,
    NetworkPlan,
    Regularization,
    build_model,
    create_model,
    drop_path_rates,
    frozen_part,
    plan_blocks,
    set_regularization,
    unwrap_model,
)
from .overrides import COEFFICIENT_KEYS, OVERRIDE_KEYS, PHI_SIZE_KEYS, check_override, resolve_variant
from .scaling import (
    DEFAULT_COEFFICIENT_TOLERANCE,
    PAPER_COEFFICIENTS,
    CoefficientSet,
    ScaledCoefficients,
    check_coefficients,
    compound_scale,
    round_channels,
    round_repeats,
    round_resolution,
    stage_repeats,
)
from .tables import (
    ARCHITECTURES,
    BLOCK_KINDS,
    Architecture,
    StageSpec,
    architecture_from_dict,
    architecture_to_dict,
)
from .variants import V1_BASE_NAME, VARIANTS, ProgressiveSpec, VariantSpec, get_variant, list_models, variant_range

__all__ = [
    "ARCHITECTURES",
    "BLOCK_KINDS",
    "COEFFICIENT_KEYS",
    "DEFAULT_COEFFICIENT_TOLERANCE",
    "MIN_RESOLUTION",
    "OVERRIDE_KEYS",
    "PAPER_COEFFICIENTS",
    "PHI_SIZE_KEYS",
    "V1_BASE_NAME",
    "VARIANTS",
    "Architecture",
    "BlockPlan",
    "CoefficientSet",
    "EfficientNet",
    "NetworkPlan",
    "ProgressiveSpec",
    "Regularization",
    "ScaledCoefficients",
    "StageSpec",
    "VariantSpec",
    "architecture_from_dict",
    "architecture_to_dict",
    "build_model",
    "check_coefficients",
    "check_override",
    "compound_scale",
    "create_model",
    "drop_path_rates",
    "frozen_part",
    "get_variant",
    "list_models",
    "plan_blocks",
    "resolve_variant",
    "round_channels",
    "round_repeats",
    "round_resolution",
    "set_regularization",
    "stage_repeats",
    "unwrap_model",
    "variant_range",
]
