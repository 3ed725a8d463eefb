"""A family of jobs: each member's recipe, checked before anything trains, and its row in the family's table.

A member is written as a flow parameter takes it (a registered variant, or "phi=N" with its scaling; see
`recipe.parse_family_member`). Its recipe is layered: the recipe, the family's overrides, the member's model, then
the member's own overrides (`member_recipes`). A fine-tuning night changes each member that has a champion
(`finetune_overrides`, `night_member_overrides`); `from_champions` pins each member to its champion's version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.dataset import latest_version
from pipelines.registry import tracking
from pipelines.registry.compare import FAILED, row_status
from pipelines.registry.tracking import Tags
from pipelines.settings import DataLayout, data_layout
from pipelines.training.baselines import resolve_named
from pipelines.training.job import tuned_variant_slug, validate_job
from pipelines.training.recipe import Recipe, load_recipe, merge_sections, parse_family_member

Jobs = list[tuple[str, Recipe]]  # (member as written, its recipe)
# Two compound-scaled members far below B0 (phi < 0 shrinks depth, width and resolution together) so the demo
# family trains on two CPU cores in minutes; the first is also the demo searches' baseline (their proxy scale).
DEMO_FAMILY = ("phi=-9", "phi=-7")
DEMO_BASELINE = DEMO_FAMILY[0]
DEMO_PHI = float(parse_family_member(DEMO_BASELINE)["phi"])


def member_recipes(
    variants: list[str],
    recipe: str,
    overrides: dict | None,
    member_overrides: dict[str, dict] | None = None,
    layout: DataLayout | None = None,
) -> Jobs:
    """Each member's recipe: the recipe, `overrides`, the member's model, then the member's own overrides; a named
    coefficient set resolved to its numbers (from `layout`'s sets).

    Raises ValueError / FileNotFoundError naming the first problem.
    """
    if not variants:
        raise ValueError("no variants given")
    strangers = sorted(set(member_overrides or {}) - set(variants))
    if strangers:
        raise ValueError(f"member_overrides names {', '.join(strangers)}, not among the variants {variants}")
    base = load_recipe(recipe)
    if overrides:
        base = base.with_overrides(**overrides)
    jobs = []
    for variant in variants:
        tuned = base.with_overrides(model=parse_family_member(variant))
        if own := (member_overrides or {}).get(variant):
            tuned = tuned.with_overrides(**own)
        jobs.append((variant, resolve_named(tuned, layout or data_layout())))
    return jobs


def plan_family(
    variants: list[str],
    recipe: str,
    dataset_dir: str | None,
    data_dir: str | None,
    overrides: dict | None,
    member_overrides: dict[str, dict] | None = None,
) -> tuple[Path, Jobs]:
    """Every member's recipe (`member_recipes`), checked with the dataset, before anything trains.

    Raises ValueError / FileNotFoundError naming the first problem.
    """
    layout = data_layout(data_dir)
    jobs = member_recipes(variants, recipe, overrides, member_overrides, layout)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    for _, tuned in jobs:
        validate_job(tuned, dataset)
    return dataset, jobs


def from_champions(c: Any, jobs: Jobs) -> tuple[Jobs, list[str]]:
    """Each member set to fine-tune from its variant's registered champion, pinned to the champion's version
    (a retry resumes the same job even if the alias moves meanwhile); the members whose variant has no champion
    yet stay from scratch and are named in the second list."""
    out, no_champion = [], []
    for variant, tuned in jobs:
        name = tracking.registered_name(tuned_variant_slug(tuned))
        champ = tracking.champion_version(c, name)
        if champ is None:
            no_champion.append(variant)
            out.append((variant, tuned))
        else:
            out.append((variant, tuned.with_overrides(init={"from": f"models:/{name}/{champ.version}"})))
    return out, no_champion


def variant_row(variant: str, outcome: dict | BaseException) -> dict:
    """A variant's row: its TrainResult's fields and status "trained", or its name, status "failed" and why."""
    if isinstance(outcome, BaseException):
        return {"variant": variant, **row_status(outcome)}
    return {**outcome, **row_status(None)}


def failed_members(rows: list[dict]) -> str | None:
    """One line naming the failed members and why, or None when every member trained."""
    failed = [row for row in rows if row["status"] == FAILED]
    if not failed:
        return None
    return f"{len(failed)} of {len(rows)} variant(s) failed: " + "; ".join(
        f"{row['variant']} ({row['reason']})" for row in failed
    )


def finetune_overrides(recipe: Recipe, epochs: int, lr_scale: float) -> dict[str, dict[str, Any]]:
    """The recipe sections a fine-tuning night changes: `epochs` epochs without warm-up (the weights are trained
    already) at `lr_scale` times the recipe's learning rate; minival at least once."""
    if epochs < 1 or not lr_scale > 0:
        raise ValueError(f"finetune_epochs ({epochs}) must be >= 1 and finetune_lr_scale ({lr_scale}) > 0")
    return {
        "schedule": {"epochs": epochs, "eval_every": min(recipe.schedule.eval_every, epochs)},
        "optim": {"warmup_epochs": 0.0, "lr_per_256": recipe.optim.lr_per_256 * lr_scale},
    }


def untrained_members(c: Any, members: list[tuple[str, str]], dataset_version: str) -> list[str]:
    """The members (variant as written, its variant slug) with no registered version on `dataset_version`."""

    def trained(slug: str) -> bool:
        name = tracking.registered_name(slug)
        query = f"name = '{name}' and tags.{Tags.DATASET_VERSION} = '{dataset_version}'"
        return bool(c.search_model_versions(query))

    return [variant for variant, slug in members if not trained(slug)]


def night_member_overrides(
    c: Any, members: list[tuple[str, str]], night: dict | None, member_overrides: dict | None
) -> tuple[dict[str, dict], list[str]]:
    """Each member's own overrides for the night, and the members that fine-tune: with `night` (fine-tuning),
    a member whose variant has a champion gets the fine-tuning sections under its own overrides; one without
    trains from scratch with the recipe's whole schedule (the first night)."""
    names = {v for v, _ in members}
    own = {v: o for v, o in (member_overrides or {}).items() if v in names}
    finetuned = [
        v for v, slug in members if night and tracking.champion_version(c, tracking.registered_name(slug)) is not None
    ]
    for v in finetuned:
        own[v] = merge_sections({}, night, own.get(v))
    return own, finetuned
