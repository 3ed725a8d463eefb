"""What the scaling search, the scaling study and the baseline search share around their Tune experiments: the
checks before anything trains, the MLflow parent run, each trial's row, the files on the parent run, the verdict.

Each search is one Ray Tune experiment of short trainings (`pipelines.search.trials`); its flow sequences these
steps, and `pipelines.search.baseline` holds the baseline search's own sampling and rewards.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from models import CoefficientSet, VariantSpec
from pipelines.dataset import Manifest, latest_version
from pipelines.registry import compare, tracking
from pipelines.registry.compare import TRAINED, row_status
from pipelines.search import trials
from pipelines.settings import DataLayout
from pipelines.training import cluster
from pipelines.training.coefficients import load_coefficient_set, save_coefficient_set, set_path
from pipelines.training.evaluate import evaluate_on_cluster
from pipelines.training.family import member_recipes
from pipelines.training.job import validate_job
from pipelines.training.recipe import Recipe

T = TypeVar("T")


def check_asha(epochs: int, grace_period: int, reduction_factor: float, max_concurrent_trials: int) -> None:
    """ASHA's settings against the trials' epochs; ValueError naming them."""
    if not 1 <= grace_period <= epochs or not reduction_factor > 1 or max_concurrent_trials < 0:
        raise ValueError(
            f"need 1 <= grace_period ({grace_period}) <= epochs ({epochs}), reduction_factor "
            f"({reduction_factor}) > 1 and max_concurrent_trials ({max_concurrent_trials}) >= 0"
        )


def plan_trials(
    baseline: str, recipe: str, overrides: dict | None, dataset_dir: str | None, layout: DataLayout, epochs: int
) -> tuple[Path, Recipe, VariantSpec, Manifest]:
    """The dataset version, the trials' recipe, the baseline's spec and the dataset's manifest; ValueError naming
    the first problem."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    ((_, base_recipe),) = member_recipes([baseline], recipe, overrides, layout=layout)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    spec, manifest, _ = validate_job(base_recipe, dataset)
    return dataset, trials.trial_recipe(base_recipe, epochs), spec, manifest


@dataclass(frozen=True)
class Planned:
    """A search or study checked before anything trains: its dataset version, the trials' recipe, the baseline, the
    dataset's manifest, the trials, each trial's BatchPlan and the experiment's key."""

    dataset: Path
    recipe: Recipe
    base: VariantSpec
    manifest: Manifest
    plans: list[trials.TrialPlan]
    batches: dict[str, Any]
    key: str


def plan_search(
    layout: DataLayout,
    baseline: str,
    recipe: str,
    overrides: dict | None,
    dataset_dir: str | None,
    grid: tuple[Sequence[float], Sequence[float], Sequence[float]],
    tolerance: float,
    epochs: int,
    asha: tuple[int, float],
    max_concurrent_trials: int,
    set_name: str,
    replace: bool,
) -> Planned:
    """The scaling search's grid points as trials, everything checked (ASHA's settings, the baseline, recipe and
    dataset, each trial's memory, the set name, the cluster); ValueError naming the first problem."""
    check_asha(epochs, *asha, max_concurrent_trials)
    points = trials.search_points(*grid, tolerance)
    dataset, trial_recipe, base, manifest = plan_trials(baseline, recipe, overrides, dataset_dir, layout, epochs)
    plans = trials.search_trials(base, points)
    batches = check_trials(plans, trial_recipe, dataset)
    key = trials.experiment_key(
        trials.SEARCH_KIND,
        {
            "baseline": base.name,
            "recipe": trial_recipe.model_dump(),
            "points": [p.label for p in plans],
            "tolerance": tolerance,
            "asha": list(asha),
            "dataset": manifest.version,
        },
    )
    check_set_name(layout, set_name, key, replace)
    connect_and_check(layout, trial_recipe)
    return Planned(dataset, trial_recipe, base, manifest, plans, batches, key)


def plan_study(
    layout: DataLayout,
    baseline: str,
    recipe: str,
    overrides: dict | None,
    dataset_dir: str | None,
    targets: Sequence[float],
    methods: Sequence[str],
    coefficients: str,
    epochs: int,
    max_concurrent_trials: int,
) -> Planned:
    """The scaling study's members as trials, everything checked; ValueError naming the first problem."""
    if max_concurrent_trials < 0:
        raise ValueError(f"max_concurrent_trials must be >= 0, got {max_concurrent_trials}")
    cs, _ = load_coefficient_set(layout, coefficients)
    dataset, trial_recipe, base, manifest = plan_trials(baseline, recipe, overrides, dataset_dir, layout, epochs)
    plans = trials.study_trials(base, methods, targets, cs, manifest.num_classes)
    batches = check_trials(plans, trial_recipe, dataset)
    connect_and_check(layout, trial_recipe)
    key = trials.experiment_key(
        trials.STUDY_KIND,
        {
            "baseline": base.name,
            "recipe": trial_recipe.model_dump(),
            "members": [p.model for p in plans],
            "coefficients": [cs.alpha, cs.beta, cs.gamma],
            "dataset": manifest.version,
        },
    )
    return Planned(dataset, trial_recipe, base, manifest, plans, batches, key)


def setup_of(planned: Planned, layout: DataLayout) -> trials.TrialSetup:
    return trials.TrialSetup(
        recipe=planned.recipe,
        dataset_dir=str(planned.dataset),
        num_classes=planned.manifest.num_classes,
        tracking_uri=layout.tracking_uri,
    )


def check_trials(plans: Sequence[trials.TrialPlan], recipe: Recipe, dataset: Path) -> dict[str, Any]:
    """Each trial's model checked against the dataset and its memory; its BatchPlan by label."""
    return {p.label: validate_job(recipe.with_overrides(model=p.model), dataset)[2] for p in plans}


def connect_and_check(layout: DataLayout, recipe: Recipe) -> None:
    cluster.connect_layout(layout)
    cluster.check_fits(recipe)  # one trial's worker; Tune runs as many at once as fit


def check_set_name(layout: DataLayout, name: str, key: str, replace: bool) -> None:
    """A stored set of that name is replaced only when asked, or when this same search stored it (a rerun after
    a crash that came after the winner was stored)."""
    path = set_path(layout, name)
    if not path.exists() or replace:
        return
    try:
        source = json.loads(path.read_text()).get("source", {})
    except (json.JSONDecodeError, AttributeError):
        source = {}
    if source.get("search_key") != key:
        raise ValueError(
            f"a coefficient set named {name!r} exists ({path}); choose another set_name or pass replace=true"
        )


def tracking_client(layout: DataLayout) -> tuple[Any, str]:
    """(MLflow client, experiment id) of the data directory's store."""
    c = tracking.client(layout.tracking_uri)
    return c, tracking.experiment_id(c, layout.artifact_root)


def open_parent_in(
    c: Any, exp_id: str, kind: str, key: str, title: str, params: dict[str, Any], dataset_version: str, flow_run_id: str
) -> str:
    """The search's parent run, found again by its key on a rerun."""
    return trials.open_parent_run(
        c,
        exp_id,
        kind,
        key,
        title,
        params,
        {tracking.Tags.FLOW_RUN: flow_run_id, tracking.Tags.DATASET_VERSION: dataset_version},
    )


def open_parent(
    layout: DataLayout, kind: str, key: str, title: str, params: dict[str, Any], dataset_version: str, flow_run_id: str
) -> tuple[Any, str, str]:
    """(MLflow client, experiment id, the search's parent run)."""
    c, exp_id = tracking_client(layout)
    return c, exp_id, open_parent_in(c, exp_id, kind, key, title, params, dataset_version, flow_run_id)


def killed_on_interrupt(c: Any, parent: str, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`work(*args, **kwargs)`; the parent run recorded KILLED if it is interrupted or fails (a rerun with the
    same parameters restores the experiment)."""
    try:
        return work(*args, **kwargs)
    except BaseException:
        c.set_terminated(parent, "KILLED")
        raise


def trial_row(o: trials.TrialOutcome, figures: dict[str, Any]) -> dict[str, Any]:
    """A scaling search trial's row: its grid point, figures, epochs and best minival."""
    return {
        "trial": o.label,
        **o.params,
        **figures,
        "epochs_run": o.epochs_run,
        "best_epoch": o.best_epoch,
        "stopped_early": "yes" if o.stopped_early else "no",
        "best_minival_top1": o.best_minival_top1,
        "best_minival_loss": o.best_minival_loss,
        "run_id": o.run_id,
        **row_status(o.error),
    }


def log_files(c: Any, run_id: str, write: Callable[[Path], Sequence[Path]], folder: str) -> None:
    """The files `write` makes in a temporary folder, logged to the run under `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write(Path(tmp)):
            c.log_artifact(run_id, str(path), folder)


def failed_trials(rows: list[dict[str, Any]]) -> str | None:
    """One line naming the failed trials and why, or None when every trial trained."""
    failed = [r for r in rows if r["status"] != TRAINED]
    if not failed:
        return None
    return f"{len(failed)} of {len(rows)} trial(s) failed: " + "; ".join(
        f"{r['trial']} ({r['reason']})" for r in failed
    )


def finish_search(c: Any, parent: str, stored: Path, folder: str, tags: dict[str, str]) -> None:
    """A search's parent run ended: what it found as tags and as the stored file's copy (under `folder`)."""
    for k, v in tags.items():
        c.set_tag(parent, k, v)
    c.log_artifact(parent, str(stored), folder)
    c.set_terminated(parent, "FINISHED")


def store_winner(
    c: Any,
    layout: DataLayout,
    parent: str,
    outcomes: Sequence[trials.TrialOutcome],
    set_name: str,
    tolerance: float,
    source: dict[str, Any],
) -> tuple[CoefficientSet, Path, str]:
    """The search's best trial stored as a named coefficient set and on the parent run, which ends; the set, its
    file and a one-line summary."""
    winner = trials.pick_winner(outcomes)
    found = CoefficientSet(set_name, winner.params["alpha"], winner.params["beta"], winner.params["gamma"])
    path = save_coefficient_set(
        layout, found, tolerance, source={**source, "minival_top1": winner.best_minival_top1, "trials": len(outcomes)}
    )
    stopped = sum(o.stopped_early for o in outcomes)
    summary = (
        f"winner {winner.label} (minival top-1 {winner.best_minival_top1:.2f}), stored as coefficient set "
        f"{set_name!r} ({path}); ASHA stopped {stopped} of {len(outcomes)} trial(s) early"
    )
    finish_search(
        c,
        parent,
        path,
        "coefficients",
        {
            "coefficients.name": set_name,
            "coefficients.alpha": f"{found.alpha:g}",
            "coefficients.beta": f"{found.beta:g}",
            "coefficients.gamma": f"{found.gamma:g}",
            "trials_stopped_early": str(stopped),
        },
    )
    return found, path, summary


def search_result(
    found: CoefficientSet, path: Path, parent: str, outcomes: Sequence[trials.TrialOutcome], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """What search-scaling returns: the stored set, its winner's minival top-1, and every trial's row."""
    return {
        "coefficients": found.name,
        "alpha": found.alpha,
        "beta": found.beta,
        "gamma": found.gamma,
        "minival_top1": trials.pick_winner(outcomes).best_minival_top1,
        "stopped_early": sum(o.stopped_early for o in outcomes),
        "path": str(path),
        "parent_run": parent,
        "trials": rows,
    }


def study_row(
    c: Any, o: trials.TrialOutcome, plan: trials.TrialPlan, dataset: Path, recipe: Recipe, num_classes: int
) -> dict[str, Any]:
    """A study member's row: its figures, and its chosen checkpoint's val top-1 (also logged on its run)."""
    figures = trials.member_figures(o, num_classes)
    row = {
        "method": plan.params["method"],
        "target": plan.params["target"],
        "depth_factor": 1.0,
        "width_factor": 1.0,
        "resolution_factor": 1.0,
        **plan.params,
        **figures,
        "best_epoch": o.best_epoch,
        "minival_top1": o.best_minival_top1,
        "run_id": o.run_id,
    }
    if o.error is not None or o.best_checkpoint is None:
        return {**row, **row_status(o.error or "no scored checkpoint")}
    val = evaluate_on_cluster(
        trials.load_trial_weights(o, num_classes), dataset, "val", trials.member_spec(o.model), recipe
    )
    tracking.log_metrics(
        c,
        o.run_id,
        {
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_loss": val["loss"],
            "gmacs": figures["gmacs"],
            "model_params": figures["params"],
        },
        step=o.best_epoch,
    )
    return {**row, "val_top1": val["top1"], "val_top5": val["top5"], **row_status(None)}


def with_gmacs_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's rows, each with its GMACs as a multiple of the baseline's (the first row)."""
    base_gmacs = rows[0].get("gmacs") or math.nan
    return [{**r, "gmacs_ratio": r["gmacs"] / base_gmacs if r.get("gmacs") else math.nan} for r in rows]


def study_verdict(rows: list[dict[str, Any]]) -> str:
    """One line per FLOPs target: each method's val top-1 there, and whether compound came out ahead."""
    lines = []
    trained = [r for r in rows if r["status"] == TRAINED and r["method"] != "baseline"]
    for target in sorted({r["target"] for r in trained}):
        at = {r["method"]: r for r in trained if r["target"] == target}
        figures = ", ".join(f"{m} {r['val_top1']:.2f} ({r['gmacs_ratio']:.2f}x GMACs)" for m, r in at.items())
        if "compound" in at and len(at) > 1:
            best_other = max(r["val_top1"] for m, r in at.items() if m != "compound")
            ahead = at["compound"]["val_top1"] - best_other
            result = "compound ahead" if ahead > 0 else "compound level" if ahead == 0 else "compound behind"
            lines.append(f"x{target:g}: {figures}: {result} by {abs(ahead):.2f} point(s) of val top-1")
        else:
            lines.append(f"x{target:g}: {figures}")
    return "; ".join(lines) or "no member trained"


def report(
    c: Any,
    parent: str,
    rows: list[dict[str, Any]],
    title: str,
    columns: Any,
    write: Callable[[Path], Sequence[Path]],
    folder: str,
) -> None:
    """The trials' table printed and their files (`write`) on the parent run under `folder`."""
    print("\n" + compare.to_text(rows, columns))
    log_files(c, parent, write, folder)
