"""Sizes of the family: parameter counts and multiply-accumulates per variant.

MACs are counted by torch's FlopCounterMode (convolutions and matmuls only, the convention of the
published figures) on the meta device: no weights are allocated and nothing is computed, so even the
largest variant at its full resolution takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .efficientnet import build_model
from .variants import VariantSpec, get_variant, list_models

TABLE_COLUMNS: tuple[str, ...] = (
    "name",
    "params",
    "gmacs_train",
    "gmacs_eval",
    "train_resolution",
    "eval_resolution",
    "dropout",
)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, resolution: int, batch: int = 1) -> float:
    """Multiply-accumulates (x 1e9) of one forward pass at `resolution` x `resolution`.

    Runs on the model's device; on the meta device this is shape propagation only.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout and drop-path off: count the network, not the regulariser
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(batch, 3, resolution, resolution, device=device))
    finally:
        model.train(was_training)
    # The counter reports FLOPs as 2 per multiply-accumulate.
    return counter.get_total_flops() / 2 / 1e9


def meta_model(spec: VariantSpec, num_classes: int = 1000) -> nn.Module:
    """A weightless model with the real structure, built on the meta device: what the project counts parameters,
    MACs and activation memory on (this module, the scaling trials' figures, `pipelines.training.sizing`)."""
    with torch.device("meta"):
        return build_model(spec, num_classes)


def variant_row(spec: VariantSpec, num_classes: int = 1000) -> dict[str, Any]:
    model = meta_model(spec, num_classes)
    gmacs_train = count_gmacs(model, spec.train_resolution)
    same_size = spec.eval_resolution == spec.train_resolution
    return {
        "name": spec.name,
        "params": count_params(model),
        "gmacs_train": gmacs_train,
        "gmacs_eval": gmacs_train if same_size else count_gmacs(model, spec.eval_resolution),
        "train_resolution": spec.train_resolution,
        "eval_resolution": spec.eval_resolution,
        "dropout": spec.dropout,
    }


def family_table(names: Iterable[str] | None = None, num_classes: int = 1000) -> list[dict[str, Any]]:
    """One row per variant (all registered ones by default): name, params, gmacs_train, gmacs_eval,
    train_resolution, eval_resolution, dropout. GMACs at batch 1."""
    if isinstance(names, str):
        names = [names]
    specs = [get_variant(name) for name in (list_models() if names is None else names)]
    return [variant_row(spec, num_classes) for spec in specs]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def aligned_text(cells: Sequence[Sequence[str]], right: Sequence[bool] = (), rule: bool = False) -> str:
    """Rows of cells, the header first, in columns as wide as their widest cell: left-aligned, right-aligned where
    `right` says so; with `rule`, a line of dashes under the header. The one text-table layout of the project
    (this module's `format_table`, the family comparison's `to_text`)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    right = list(right) + [False] * (len(widths) - len(right))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    lines = [line(row) for row in cells]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Aligned text table; text columns left-aligned, numbers right-aligned. Columns are those of the
    first row, in order."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows) for c in columns]
    return aligned_text([columns, *cells], numeric, rule=True)
