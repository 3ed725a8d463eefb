"""Named compound-scaling coefficient sets: `paper` (1.2, 1.1, 1.15), and those a scaling search stores, one
JSON file each in the data directory's `coefficients/` (`<name>.json`: alpha, beta, gamma, the tolerance it was
checked with, where it came from).

A recipe or a family member names a set (`model.coefficients`, `phi=2,coefficients=my-search`); the set is
resolved to its numbers when the job is planned (`resolve_coefficients`), so the recipe a job runs with, its key
and its workers hold the numbers themselves, whatever happens to the file later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models import DEFAULT_COEFFICIENT_TOLERANCE, PAPER_COEFFICIENTS, CoefficientSet, check_coefficients
from pipelines.atomic import atomic_write_json
from pipelines.settings import DataLayout
from pipelines.training.recipe import SET_NAME, Recipe

SUFFIX = ".json"


def set_path(layout: DataLayout, name: str) -> Path:
    if not re.match(SET_NAME, name):
        raise ValueError(f"coefficient set name {name!r}: letters, digits, '_', '.', '-' only")
    return layout.coefficients / f"{name}{SUFFIX}"


def known_sets(layout: DataLayout) -> list[str]:
    return [PAPER_COEFFICIENTS.name, *sorted(p.stem for p in layout.coefficients.glob(f"*{SUFFIX}"))]


def save_coefficient_set(
    layout: DataLayout,
    cs: CoefficientSet,
    tolerance: float = DEFAULT_COEFFICIENT_TOLERANCE,
    source: dict[str, Any] | None = None,
) -> Path:
    """Store a set under its name (checked first; `paper` is built in and cannot be replaced)."""
    if cs.name == PAPER_COEFFICIENTS.name:
        raise ValueError(f"coefficient set {cs.name!r} is built in; store a search's result under another name")
    check_coefficients(f"coefficient set {cs.name!r}", cs.alpha, cs.beta, cs.gamma, tolerance)
    return atomic_write_json(
        set_path(layout, cs.name),
        {"alpha": cs.alpha, "beta": cs.beta, "gamma": cs.gamma, "tolerance": tolerance, "source": source or {}},
    )


def load_coefficient_set(layout: DataLayout, name: str) -> tuple[CoefficientSet, float]:
    """A set by name and the tolerance it was checked with; ValueError naming the sets there are."""
    if name == PAPER_COEFFICIENTS.name:
        return PAPER_COEFFICIENTS, DEFAULT_COEFFICIENT_TOLERANCE
    path = set_path(layout, name)
    if not path.exists():
        raise ValueError(
            f"no coefficient set {name!r}; known: {', '.join(known_sets(layout))} (sets live in {layout.coefficients})"
        )
    try:
        data = json.loads(path.read_text())
        tolerance = float(data.get("tolerance", DEFAULT_COEFFICIENT_TOLERANCE))
        cs = check_coefficients(
            f"coefficient set {name!r} ({path})", data["alpha"], data["beta"], data["gamma"], tolerance
        )
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a coefficient set ({exc.__class__.__name__}: {exc})") from None
    return CoefficientSet(name, cs.alpha, cs.beta, cs.gamma), tolerance


def resolve_coefficients(recipe: Recipe, layout: DataLayout) -> Recipe:
    """The recipe with its named coefficient set's numbers filled in (unchanged when it names none);
    ValueError when explicit alpha/beta/gamma disagree with the set it names."""
    m = recipe.model
    if m.coefficients is None:
        return recipe
    cs, tolerance = load_coefficient_set(layout, m.coefficients)
    numbers = {"alpha": cs.alpha, "beta": cs.beta, "gamma": cs.gamma}
    clash = [k for k, v in numbers.items() if getattr(m, k) is not None and getattr(m, k) != v]
    if clash:
        raise ValueError(
            f"model.coefficients {cs.name!r} has {', '.join(f'{k} {numbers[k]:g}' for k in clash)}, "
            f"the recipe says {', '.join(f'{k} {getattr(m, k):g}' for k in clash)}: give one of them"
        )
    return recipe.with_overrides(model={**numbers, "coefficient_tolerance": tolerance})
