"""The EfficientNet builder: a `VariantSpec` in, an `nn.Module` out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from .checks import check_positive_int, check_rate
from .layers import BLOCKS, ConvBNAct, _ResidualBlock
from .overrides import resolve_variant
from .scaling import round_channels, stage_repeats
from .variants import VariantSpec, architecture_of


@dataclass(frozen=True)
class BlockPlan:
    """One concrete block after width/depth scaling (input channels filled in by `plan_blocks`)."""

    stage: int
    block: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int
    se_ratio: float


class NetworkPlan(NamedTuple):
    stem_channels: int
    blocks: tuple[BlockPlan, ...]
    head_channels: int


def plan_blocks(spec: VariantSpec) -> NetworkPlan:
    """Expand a spec's stage table into concrete blocks. Pure: no torch.

    Each stage's first block takes the stride and the width change; the extra repeats that depth
    scaling adds go at the end of the stage, as stride-1 blocks at the stage's output width.
    """
    arch = architecture_of(spec)

    def width(channels: int) -> int:
        return round_channels(channels, spec.width_mult, ten_percent_rule=arch.ten_percent_rule)

    stem = width(arch.stem)
    in_channels = stem
    blocks: list[BlockPlan] = []
    repeats = stage_repeats([stage.repeats for stage in arch.stages], spec.depth_mult, spec.late_depth_stages)
    for stage_index, (stage, stage_blocks) in enumerate(zip(arch.stages, repeats)):
        out_channels = width(stage.channels)
        for repeat in range(stage_blocks):
            blocks.append(
                BlockPlan(
                    stage=stage_index,
                    block=stage.block,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    kernel=stage.kernel,
                    stride=stage.stride if repeat == 0 else 1,
                    expand=stage.expand,
                    se_ratio=stage.se_ratio,
                )
            )
            in_channels = out_channels
    return NetworkPlan(stem, tuple(blocks), width(arch.head))


def drop_path_rates(num_blocks: int, rate: float) -> list[float]:
    """Per-block stochastic-depth rates: rate x i / num_blocks for block i = 0 .. num_blocks - 1.

    Linear in the block index over the whole network, as in the reference code: the first block is
    never dropped and the last one approaches (does not reach) `rate`.
    """
    return [rate * index / num_blocks for index in range(num_blocks)]


class Regularization(NamedTuple):
    dropout: float
    stochastic_depth: float


class EfficientNet(nn.Module):
    """stem -> stages of MBConv / Fused-MBConv blocks -> 1x1 head conv -> avg pool -> dropout -> linear.

    `variant` holds the VariantSpec the model was built from (enough to rebuild it).
    """

    def __init__(self, variant: VariantSpec, num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = check_positive_int("num_classes", num_classes)
        plan = plan_blocks(variant)
        rates = drop_path_rates(len(plan.blocks), variant.stochastic_depth)
        self._stochastic_depth = variant.stochastic_depth

        self.stem = ConvBNAct(3, plan.stem_channels, 3, stride=2)
        stages: list[list[nn.Module]] = []
        for block, rate in zip(plan.blocks, rates):
            if block.stage == len(stages):
                stages.append([])
            stages[-1].append(
                BLOCKS[block.block](
                    block.in_channels,
                    block.out_channels,
                    block.kernel,
                    block.stride,
                    block.expand,
                    block.se_ratio,
                    drop_path_rate=rate,
                )
            )
        self.stages = nn.Sequential(*(nn.Sequential(*stage) for stage in stages))
        self.head = ConvBNAct(plan.blocks[-1].out_channels, plan.head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(variant.dropout)
        self.classifier = nn.Linear(plan.head_channels, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation: convs He-normal over fan-out, BN to identity, the classifier
        uniform in +-1/sqrt(classes), biases zero."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def blocks(self) -> list[_ResidualBlock]:
        """All blocks in network order (what stochastic-depth indices count)."""
        # nn.Sequential types its items as plain Modules; __init__ fills each stage with BLOCKS entries only.
        return [cast(_ResidualBlock, block) for stage in self.stages for block in cast(nn.Sequential, stage)]

    @property
    def regularization(self) -> Regularization:
        """Current dropout and stochastic-depth rates (may differ from `variant` after
        `set_regularization`; `variant` stays the spec the model was built from)."""
        return Regularization(self.dropout.p, self._stochastic_depth)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 3, H, W) -> (N, head_channels, H/32, W/32)
        return self.head(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.forward_features(x)).flatten(1)  # (N, head_channels)
        return self.classifier(self.dropout(x))  # (N, num_classes)


def build_model(spec: VariantSpec, num_classes: int = 1000) -> EfficientNet:
    """Build from a (possibly saved and reloaded) VariantSpec."""
    return EfficientNet(spec, num_classes)


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> EfficientNet:
    """Build a registered variant, with optional overrides (see `resolve_variant`).

    Builds on the current default device: `with torch.device("meta"): create_model(...)` gives a
    weightless model for counting parameters and MACs.
    """
    return build_model(resolve_variant(name, **overrides), num_classes)


def set_regularization(model: nn.Module, dropout: float | None = None, stochastic_depth: float | None = None) -> None:
    """Change the classifier dropout and/or the stochastic-depth rate of a built model in place.

    `stochastic_depth` is the network rate; per-block rates are re-derived by `drop_path_rates`.
    Either may be None to leave it unchanged. No rebuild, parameters untouched.
    """
    model = unwrap_model(model)
    if dropout is not None:
        model.dropout.p = check_rate("dropout", dropout)
    if stochastic_depth is not None:
        rate = check_rate("stochastic_depth", stochastic_depth)
        blocks = model.blocks()
        for block, block_rate in zip(blocks, drop_path_rates(len(blocks), rate)):
            block.set_drop_path_rate(block_rate)
        model._stochastic_depth = rate


def frozen_part(model: nn.Module, stages: int | str) -> list[nn.Module]:
    """The modules layer-wise freezing holds still: the stem and the first `stages` stages, or with "backbone"
    everything but the classifier (stem, stages, head conv). ValueError for more stages than the model has."""
    net = unwrap_model(model)
    if stages == "backbone":
        return [net.stem, *net.stages, net.head]
    if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= len(net.stages):
        raise ValueError(f"freeze: {stages!r} is not 'backbone' or a number of stages in 0..{len(net.stages)}")
    return [net.stem, *list(net.stages)[:stages]] if stages else []


def unwrap_model(model: nn.Module) -> EfficientNet:
    """The EfficientNet inside torch.compile's and DistributedDataParallel's wrappers."""
    inner = model
    while not isinstance(inner, EfficientNet):
        # torch.compile keeps the original as `_orig_mod`; DDP and DataParallel as `module`.
        wrapped = getattr(inner, "_orig_mod", None)
        if wrapped is None:
            wrapped = getattr(inner, "module", None)
        if not isinstance(wrapped, nn.Module):
            raise ValueError(f"expected an EfficientNet (or a wrapper of one), got {type(model).__name__}")
        inner = wrapped
    return inner
