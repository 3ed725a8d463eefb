"""Prefect flow `nightly`: stage what the source gained, fine-tune (or retrain) the family on it, promote on
minival.

Its deployments (`nightly/default`, at 02:00 in a timezone of the deployer's choice, and `nightly/demo`) are
declared in `flows/deployments.py`; a deployment concurrency limit of one, with Prefect's CANCEL_NEW strategy,
cancels a night that finds the previous one still running (the next night stages everything added since).

A night, top to bottom:
1. `stage-imagenet` on the source with `base_version="auto"`: the images added since the latest version are
   staged as a new version on top of it (the same minival, its shards reused); a source that did not grow gives
   back the version it already has.
2. The members that have no registered version on that dataset version yet (all of them on a night with new
   images; none on a night without, which ends Completed saying so; the rest after a crash) are trained by
   `train-family`: with `mode="finetune"` each from its variant's champion for a short schedule at a lower
   learning rate (`finetune_overrides`), with `mode="retrain"` from scratch with the recipe.
3. Each new version takes `champion` only when it beats the champion on the new version's minival, the
   champion evaluated there too (`pipelines.registry.promotion`); val is reported, never used to choose. The
   decisions, each champion before and after, are the flow run's `nightly-promotions` artifact and files on the
   family's parent MLflow run (`nightly/`).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows.failures import one_line_failures
from flows.stage_imagenet import stage_imagenet
from flows.train_family import FamilyFailed, train_family
from pipelines.dataset import read_manifest
from pipelines.registry import compare, tracking
from pipelines.registry.tracking import Tags
from pipelines.settings import data_layout, default_source
from pipelines.training.family import (
    finetune_overrides,
    member_recipes,
    night_member_overrides,
    untrained_members,
)
from pipelines.training.job import tuned_variant_slug
from pipelines.training.recipe import load_recipe

MODES = ("finetune", "retrain")
ARTIFACT = "nightly-promotions"


def check_staging(staging: dict | None) -> dict[str, Any]:
    """`stage-imagenet` parameters for the nightly's staging; ValueError for one it does not take (or one the
    nightly sets itself)."""
    own = {"source", "out", "base_version"}
    allowed = set(inspect.signature(stage_imagenet.fn).parameters) - own
    unknown = sorted(set(staging or {}) - allowed)
    if unknown:
        raise ValueError(f"staging: unknown stage-imagenet parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(allowed))}")
    return dict(staging or {})


def report(c: Any, rows: list[dict], title: str) -> None:
    """The nightly's promotion table: the flow run's artifact, and files on the family's parent MLflow run."""
    shown = compare.champion_rows(rows)
    print("\n" + compare.to_text(shown, compare.CHAMPION_COLUMNS))
    markdown = f"## {title}\n\n{compare.to_markdown(shown, compare.CHAMPION_COLUMNS)}"
    create_markdown_artifact(key=ARTIFACT, markdown=markdown,
                             description="Each variant's champion before and after the night, decided on minival")
    parents = {c.get_run(r["run_id"]).data.tags.get(Tags.PARENT_RUN) for r in rows if r.get("run_id")}
    with tempfile.TemporaryDirectory() as tmp:
        files = compare.write_champions(rows, Path(tmp), title)
        for parent in parents - {None}:
            for path in files:
                c.log_artifact(parent, str(path), "nightly")


@flow(name="nightly", log_prints=True)
@one_line_failures
def nightly(
    variants: list[str], recipe: str = "v1", mode: str = "finetune",
    source: str | None = None, data_dir: str | None = None, staging: dict | None = None,
    finetune_epochs: int = 5, finetune_lr_scale: float = 0.1, overrides: dict | None = None,
    member_overrides: dict[str, dict] | None = None, retries: int = 1,
) -> list[dict]:
    """Stage the images added to the source, train the family on them (fine-tuning each champion, or from
    scratch), and promote each new version only where it beats the champion on the new minival; returns the
    family's rows (none when there was nothing new).

    Args:
        variants: Members of the family, as train-family takes them (efficientnet_b0 ..., or "phi=N").
        recipe: The recipe (a name or a YAML file's path); fine-tuning shortens it (finetune_epochs, ...).
        mode: "finetune": each member starts from its variant's champion (from scratch where there is none yet);
            "retrain": every member from scratch, with the recipe's whole schedule.
        source: The ILSVRC2012 source that grows (archives, extracted tree or Kaggle layout); empty for
            $EFFNET_SOURCE, else the data directory's source/ folder.
        data_dir: The data directory (datasets, stores, checkpoints); empty for EFFNET_DATA_DIR or ./data.
        staging: stage-imagenet parameters (tiers, minival, shard_size, ...), the same every night, so that each
            night's version grows the last one.
        finetune_epochs: Epochs of a fine-tuning night (no warm-up).
        finetune_lr_scale: A fine-tuning night's learning rate, as a fraction of the recipe's.
        overrides: Recipe fields to change, by section, e.g. {"ray": {"num_workers": 4}}.
        member_overrides: Recipe fields to change for one member, over the rest, e.g. {"efficientnet_b7": {...}}.
        retries: How many more times a member whose job fails is tried, resuming from its checkpoints (>= 0).
    """
    logger, layout = get_run_logger(), data_layout(data_dir).ensure()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    stage_args = check_staging(staging)
    night = (finetune_overrides(load_recipe(recipe).with_overrides(**(overrides or {})), finetune_epochs,
                                finetune_lr_scale) if mode == "finetune" else None)
    # Every member's recipe checked now, not after hours of staging.
    members = [(v, tuned_variant_slug(r)) for v, r in member_recipes(variants, recipe, overrides, member_overrides,
                                                                     layout)]
    src = str(source or default_source(layout))
    dataset = stage_imagenet(src, str(layout.datasets), base_version="auto", **stage_args)
    version = read_manifest(dataset).version
    c = tracking.client(layout.tracking_uri)
    pending = untrained_members(c, members, version)
    if not pending:
        message = (f"no new images in {src}: every member already has a version trained on dataset {version}; "
                   "nothing to do")
        logger.info(message)
        return cast(list[dict], Completed(message=message, data=[]))  # the run's state: Completed, saying so
    if len(pending) < len(members):
        logger.info("already trained on %s: %s", version, ", ".join(v for v, _ in members if v not in pending))
    own, finetuned = night_member_overrides(c, [(v, slug) for v, slug in members if v in pending], night,
                                            member_overrides)
    logger.info("on dataset %s: %s", version, "; ".join(
        f"{v} {'fine-tunes its champion' if v in finetuned else 'trains from scratch'}" for v in pending))
    try:
        rows = train_family(pending, recipe=recipe, dataset_dir=dataset, data_dir=str(layout.root),
                            overrides=overrides, member_overrides=own,
                            start_from="champion" if night else "scratch", retries=retries)
    except FamilyFailed as exc:
        report(c, exc.rows, f"nightly: {mode} on {version}")
        raise
    report(c, rows, f"nightly: {mode} on {version}")
    return rows
