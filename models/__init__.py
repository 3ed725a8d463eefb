"""EfficientNet V1 (B0-B8) and V2 (S/M/L/XL) built from one variant table. Depends on torch only.

    model = create_model("efficientnet_b0", num_classes=1000)
    tiny = create_model("efficientnet_b0", phi=-3)          # compound-scaled below B0
    spec = resolve_variant("efficientnet_b0", phi=-3)       # metadata only: resolutions, crop, rates
    set_regularization(model, dropout=0.3, stochastic_depth=0.1)
"""

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
from .variants import (
    ARCHITECTURES,
    DEFAULT_COEFFICIENT_TOLERANCE,
    PAPER_COEFFICIENTS,
    VARIANTS,
    Architecture,
    CoefficientSet,
    ProgressiveSpec,
    ScaledCoefficients,
    StageSpec,
    VariantSpec,
    check_coefficients,
    compound_scale,
    get_variant,
    list_models,
    resolve_variant,
    round_channels,
    round_repeats,
    round_resolution,
    stage_repeats,
    variant_range,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_COEFFICIENT_TOLERANCE",
    "PAPER_COEFFICIENTS",
    "VARIANTS",
    "Architecture",
    "CoefficientSet",
    "BlockPlan",
    "EfficientNet",
    "NetworkPlan",
    "ProgressiveSpec",
    "Regularization",
    "ScaledCoefficients",
    "StageSpec",
    "VariantSpec",
    "build_model",
    "check_coefficients",
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
