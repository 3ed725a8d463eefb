"""Named baseline stage tables: what a baseline search stores (one JSON file each in the data directory's
`baselines/`: the table's rows, where it came from), and what a recipe or a family member names
(`model.baseline`, `phi=2,baseline=my-nas`).

Like a coefficient set, a named baseline is resolved when the job is planned (`resolve_baseline`): the recipe a
job runs with carries the table's rows themselves (`model.table`), so its key, its workers and its checkpoints
hold the architecture whatever happens to the file later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models import Architecture
from models.variants import architecture_from_dict, architecture_to_dict
from pipelines.atomic import atomic_write_json
from pipelines.settings import DataLayout
from pipelines.training.coefficients import resolve_coefficients
from pipelines.training.recipe import SET_NAME, Recipe

SUFFIX = ".json"


def baseline_path(layout: DataLayout, name: str) -> Path:
    if not re.match(SET_NAME, name):
        raise ValueError(f"baseline name {name!r}: letters, digits, '_', '.', '-' only")
    return layout.baselines / f"{name}{SUFFIX}"


def save_baseline(layout: DataLayout, name: str, arch: Architecture, source: dict[str, Any] | None = None) -> Path:
    return atomic_write_json(baseline_path(layout, name), {"table": architecture_to_dict(arch), "source": source or {}})


def load_baseline(layout: DataLayout, name: str) -> Architecture:
    """A stored baseline's table; ValueError naming the ones there are, or what is wrong with the file."""
    path = baseline_path(layout, name)
    if not path.exists():
        known = sorted(p.stem for p in layout.baselines.glob(f"*{SUFFIX}"))
        raise ValueError(
            f"no baseline {name!r}; known: {', '.join(known) or 'none'} (baselines live in {layout.baselines})"
        )
    try:
        return architecture_from_dict(json.loads(path.read_text())["table"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a baseline ({exc})") from None


def resolve_baseline(recipe: Recipe, layout: DataLayout) -> Recipe:
    """The recipe with its named baseline's rows as `model.table` (unchanged when it names none)."""
    if recipe.model.baseline is None:
        return recipe
    if recipe.model.table is not None:
        raise ValueError(f"model.baseline {recipe.model.baseline!r} and model.table both given: give one of them")
    table = architecture_to_dict(load_baseline(layout, recipe.model.baseline))
    return recipe.with_overrides(model={"table": table, "baseline": None})


def resolve_named(recipe: Recipe, layout: DataLayout) -> Recipe:
    """Every name a recipe's model section gives resolved to what it names: the coefficient set's numbers, the
    baseline's rows."""
    return resolve_baseline(resolve_coefficients(recipe, layout), layout)
