"""The recipes that ship with the project, one YAML file each (the schema is `pipelines.training.recipe`).

A package of its own, importing nothing heavy, so that the command line lists them without loading torch.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def list_recipes() -> list[str]:
    """The shipped recipes' names (what a recipe parameter takes besides a YAML file's path)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
