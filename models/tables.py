"""Stage tables: the typed row (`StageSpec`), a base network (`Architecture`), the papers' base tables, and the
registry of tables a `VariantSpec` names by key (`ARCHITECTURES`, which searched tables join at run time).

Sources: EfficientNet (arXiv 1905.11946) Table 1 (B0); EfficientNetV2 (arXiv 2104.00298) Table 4 (S) and the
released configs (M, L, XL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from .checks import check_positive_int

BlockKind = Literal["mbconv", "fused_mbconv"]

BLOCK_KINDS: tuple[BlockKind, ...] = ("mbconv", "fused_mbconv")


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

    def __post_init__(self) -> None:
        # Tables also arrive as plain data (a recipe's `model.table`, a stored baseline): reject what cannot be built.
        for field in ("stem", "head"):
            check_positive_int(f"Architecture.{field}", getattr(self, field))
        if not self.stages:
            raise ValueError("a stage table needs at least one stage")


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
    """A table from plain data, every row checked (StageSpec) and the whole (Architecture); ValueError naming what
    is wrong."""
    try:
        stages = tuple(StageSpec(**row) for row in data["stages"])
        arch = Architecture(
            stem=int(data["stem"]),
            stages=stages,
            head=int(data["head"]),
            ten_percent_rule=bool(data["ten_percent_rule"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"not a stage table ({type(exc).__name__}: {exc}); expected stem, stages, head, ten_percent_rule"
        ) from None
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
