"""Prefect flows `search-scaling` (compound scaling's step 1) and `scaling-study` (compound against one-dimension
scaling at equal FLOPs), each one Ray Tune experiment of short trainings (`pipelines.search.trials`).

Their deployments (`search-scaling/default`, `scaling-study/default`) are declared in `flows/deployments.py`; the
defaults fit the demo data on two CPU cores. For ImageNet pass e.g. baseline "efficientnet_b0", recipe "v1" and
longer trials.

Both check everything first (baseline, recipe, grid or targets, dataset, each trial's memory, the cluster), then
run the trials under one MLflow parent run with a nested run per trial. The search stores its winner as a named
coefficient set (a file in the data directory's `coefficients/`, which recipes and family members name: e.g.
"phi=2,coefficients=searched"; and on the parent run). The study's parent run holds the plot of val top-1
against GMACs per method and the table. A rerun after a crash (same parameters, same dataset) goes on where
it stopped: trials that ended are kept, the others resume from their last epoch.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.failures import failed_run
from flows.train_family import BAD_INPUT, member_recipes
from models import CoefficientSet, VariantSpec
from pipelines.dataset import latest_version
from pipelines.settings import DataLayout, data_layout
from pipelines.training import cluster
from pipelines.registry import compare, tracking
from pipelines.search import trials
from pipelines.training.coefficients import load_coefficient_set, save_coefficient_set, set_path
from pipelines.training.job import evaluate_on_cluster, validate_job
from pipelines.training.recipe import Recipe
from pipelines.registry.tracking import Tags

SEARCH_ARTIFACT, STUDY_ARTIFACT = "scaling-search", "scaling-study"
# The demo's grid: 8 points within 10% of alpha * beta^2 * gamma^2 = 2, the paper's (1.2, 1.1, 1.15) among them.
DEMO_ALPHAS, DEMO_BETAS, DEMO_GAMMAS = (1.1, 1.2, 1.3, 1.4), (1.0, 1.1, 1.2), (1.1, 1.15, 1.2)


def plan_trials(baseline: str, recipe: str, overrides: dict | None, dataset_dir: str | None, layout: DataLayout,
                epochs: int) -> tuple[Path, Recipe, VariantSpec, dict[str, Any]]:
    """The dataset version, the trials' recipe, the baseline's spec and the dataset's manifest; ValueError naming
    the first problem."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    (_, base_recipe), = member_recipes([baseline], recipe, overrides, layout=layout)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    spec, manifest, _ = validate_job(base_recipe, dataset)
    return dataset, trials.trial_recipe(base_recipe, epochs), spec, manifest


def check_trials(plans: Sequence[trials.TrialPlan], recipe: Recipe, dataset: Path) -> dict[str, Any]:
    """Each trial's model checked against the dataset and its memory; its BatchPlan by label."""
    return {p.label: validate_job(recipe.with_overrides(model=p.model), dataset)[2] for p in plans}


def connect_and_check(layout: DataLayout, recipe: Recipe) -> None:
    cluster.connect(layout.ray_address, env={"MLFLOW_TRACKING_URI": layout.tracking_uri})
    cluster.check_fits(recipe)  # one trial's worker; Tune runs as many at once as fit


def finish_search(c: Any, parent: str, stored: Path, folder: str, tags: dict[str, str], logger: Any,
                  summary: str) -> None:
    """A search's parent run ended: what it found as tags and as the stored file's copy (under `folder`), the
    summary logged."""
    for k, v in tags.items():
        c.set_tag(parent, k, v)
    c.log_artifact(parent, str(stored), folder)
    c.set_terminated(parent, "FINISHED")
    logger.info("%s", summary)


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
        raise ValueError(f"a coefficient set named {name!r} exists ({path}); choose another set_name or pass "
                         "replace=true")


def _trial_row(o: trials.TrialOutcome, figures: dict[str, Any]) -> dict[str, Any]:
    status = {"status": compare.TRAINED} if o.error is None else {"status": "failed",
                                                                   "reason": o.error.strip().splitlines()[0]}
    return {"trial": o.label, **o.params, **figures, "epochs_run": o.epochs_run, "best_epoch": o.best_epoch,
            "stopped_early": "yes" if o.stopped_early else "no", "best_minival_top1": o.best_minival_top1,
            "best_minival_loss": o.best_minival_loss, "run_id": o.run_id, **status}


def log_files(c: Any, run_id: str, write: Any, folder: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for path in write(Path(tmp)):
            c.log_artifact(run_id, str(path), folder)


def failed_trials(rows: list[dict[str, Any]]) -> str | None:
    failed = [r for r in rows if r["status"] != compare.TRAINED]
    if not failed:
        return None
    return (f"{len(failed)} of {len(rows)} trial(s) failed: "
            + "; ".join(f"{r['trial']} ({r['reason']})" for r in failed))


@flow(name="search-scaling", log_prints=True)
def search_scaling(
    baseline: str = "phi=-9", recipe: str = "demo", dataset_dir: str | None = None, data_dir: str | None = None,
    overrides: dict | None = None, alphas: list[float] = list(DEMO_ALPHAS), betas: list[float] = list(DEMO_BETAS),
    gammas: list[float] = list(DEMO_GAMMAS), tolerance: float = 0.1, epochs: int = 8, grace_period: int = 2,
    reduction_factor: float = 2.0, max_concurrent_trials: int = 0, set_name: str = "searched",
    replace: bool = False,
) -> dict:
    """Compound scaling's step 1: a grid search of (alpha, beta, gamma) at phi = 1 on a baseline, the winner
    stored as a named coefficient set. Returns the set (name, alpha, beta, gamma, its minival top-1) and one row
    per trial.

    Args:
        baseline: The model scaled at phi = 1, as a family member is written: "efficientnet_b0" (the paper's),
            "phi=-9" (B0 shrunk to demo size), "efficientnet_v2_s".
        recipe: How each trial trains (a recipe name or YAML path); one process per trial, with one Ray Train
            worker's resources (ray.cpus_per_worker, ray.use_gpu).
        dataset_dir: A staged dataset version directory; empty for the latest one staged in the data directory.
        data_dir: The data directory; empty for EFFNET_DATA_DIR or ./data.
        overrides: Recipe fields to change, by section, e.g. {"data": {"batch_size": 32}}.
        alphas: Depth bases to try (each >= 1).
        betas: Width bases to try (each >= 1).
        gammas: Resolution bases to try (each >= 1).
        tolerance: The grid's points are those with alpha * beta^2 * gamma^2 within this fraction of 2.
        epochs: Epochs of each trial (ASHA's max_t).
        grace_period: Epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps the best 1/reduction_factor of the trials at each rung (> 1).
        max_concurrent_trials: Trials at once; 0 for as many as the Ray cluster's resources hold.
        set_name: The name the winner is stored under (then "phi=2,coefficients=<set_name>").
        replace: Replace a stored set of that name (else a name in use is refused before anything trains).
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    try:
        if not 1 <= grace_period <= epochs or not reduction_factor > 1 or max_concurrent_trials < 0:
            raise ValueError(f"need 1 <= grace_period ({grace_period}) <= epochs ({epochs}), reduction_factor "
                             f"({reduction_factor}) > 1 and max_concurrent_trials ({max_concurrent_trials}) >= 0")
        points = trials.search_points(alphas, betas, gammas, tolerance)
        dataset, trial_recipe, base, manifest = plan_trials(baseline, recipe, overrides, dataset_dir, layout, epochs)
        plans = trials.search_trials(base, points)
        batches = check_trials(plans, trial_recipe, dataset)
        key = trials.experiment_key(trials.SEARCH_KIND, {
            "baseline": base.name, "recipe": trial_recipe.model_dump(), "points": [p.label for p in plans],
            "tolerance": tolerance, "asha": [grace_period, reduction_factor], "dataset": manifest["version"]})
        check_set_name(layout, set_name, key, replace)
        connect_and_check(layout, trial_recipe)
    except BAD_INPUT as exc:
        return failed_run(logger, exc)  # type: ignore[return-value]
    logger.info("scaling search %s: %d grid point(s) within %.0f%% of alpha*beta^2*gamma^2 = 2 on baseline %s, "
                "%d epoch(s) each, on %s", key, len(plans), 100 * tolerance, base.name, epochs, dataset.name)
    c = tracking.client(layout.tracking_uri)
    exp_id = tracking.experiment_id(c, layout.artifact_root)
    from prefect.runtime import flow_run

    title = f"search-scaling {flow_run.name}: {base.name} on {dataset.name}"
    parent = trials.open_parent_run(
        c, exp_id, trials.SEARCH_KIND, key, title,
        {"baseline": baseline, "recipe": recipe, "alphas": alphas, "betas": betas, "gammas": gammas,
         "tolerance": tolerance, "epochs": epochs, "grace_period": grace_period,
         "reduction_factor": reduction_factor, "dataset": dataset.name, "set_name": set_name},
        {Tags.FLOW_RUN: str(flow_run.id), Tags.DATASET_VERSION: manifest["version"]})
    setup = trials.TrialSetup(recipe=trial_recipe, dataset_dir=str(dataset), num_classes=manifest["num_classes"],
                               tracking_uri=layout.tracking_uri)
    try:
        outcomes = trials.run_trials(key, plans, setup, batches, layout.ray_storage / "tune", c, exp_id, parent,
                                      scheduler=trials.asha(epochs, grace_period, reduction_factor),
                                      max_concurrent=max_concurrent_trials)
    except BaseException:
        c.set_terminated(parent, "KILLED")  # a rerun with the same parameters restores the experiment
        raise
    rows = [_trial_row(o, trials.member_figures(o, manifest["num_classes"])) for o in outcomes]
    print("\n" + compare.to_text(rows, compare.SEARCH_COLUMNS))
    log_files(c, parent, lambda d: compare.write_table(rows, d, title, compare.SEARCH_COLUMNS,
                                                        compare.SEARCH_FILES), "search")
    problem = failed_trials(rows)
    if problem:
        c.set_terminated(parent, "FAILED")
        return failed_run(logger, RuntimeError(problem))  # type: ignore[return-value]
    winner = trials.pick_winner(outcomes)
    found = CoefficientSet(set_name, winner.params["alpha"], winner.params["beta"], winner.params["gamma"])
    path = save_coefficient_set(layout, found, tolerance, source={
        "search_run": parent, "search_key": key, "flow_run": str(flow_run.id), "baseline": base.name,
        "dataset": manifest["version"], "minival_top1": winner.best_minival_top1, "trials": len(plans)})
    stopped = sum(o.stopped_early for o in outcomes)
    summary = (f"winner {winner.label} (minival top-1 {winner.best_minival_top1:.2f}), stored as coefficient set "
               f"{set_name!r} ({path}); ASHA stopped {stopped} of {len(plans)} trial(s) early")
    finish_search(c, parent, path, "coefficients", {
        "coefficients.name": set_name, "coefficients.alpha": f"{found.alpha:g}",
        "coefficients.beta": f"{found.beta:g}", "coefficients.gamma": f"{found.gamma:g}",
        "trials_stopped_early": str(stopped)}, logger, summary)
    create_markdown_artifact(key=SEARCH_ARTIFACT, description="The scaling search's trials (MLflow: the parent "
                             "run's search/)", markdown=f"## {title}\n\n{summary}\n\n"
                             f"{compare.to_markdown(rows, compare.SEARCH_COLUMNS)}")
    return {"coefficients": set_name, "alpha": found.alpha, "beta": found.beta, "gamma": found.gamma,
            "minival_top1": winner.best_minival_top1, "stopped_early": stopped, "path": str(path),
            "parent_run": parent, "trials": rows}


@flow(name="scaling-study", log_prints=True)
def scaling_study(
    baseline: str = "phi=-9", recipe: str = "demo", dataset_dir: str | None = None, data_dir: str | None = None,
    overrides: dict | None = None, targets: list[float] = [2.0, 4.0],
    methods: list[str] = list(trials.METHODS), coefficients: str = "paper", epochs: int = 6,
    max_concurrent_trials: int = 0,
) -> list[dict]:
    """The paper's comparison of scaling methods (Figure 8 / Table 3) at small scale: from one baseline and the
    same FLOPs targets, members scaled by width only, depth only, resolution only and compound, all trained
    with the same recipe; val top-1 of each chosen (best minival) checkpoint against its GMACs, per method.
    Returns one row per member, the baseline first.

    Args:
        baseline: The model every member is scaled from, as a family member is written ("phi=-9", ...).
        recipe: How every member trains (a recipe name or YAML path); one process per member.
        dataset_dir: A staged dataset version directory; empty for the latest one staged in the data directory.
        data_dir: The data directory; empty for EFFNET_DATA_DIR or ./data.
        overrides: Recipe fields to change, by section.
        targets: FLOPs targets as multiples of the baseline's (each > 1); each member's factor is fitted so its
            GMACs come as close as rounding allows.
        methods: Among width, depth, resolution, compound.
        coefficients: The coefficient set compound scaling uses: "paper" or one a search stored.
        epochs: Epochs every member trains (the recipe's early stopping is off: all run alike).
        max_concurrent_trials: Members training at once; 0 for as many as the Ray cluster's resources hold.
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    try:
        if max_concurrent_trials < 0:
            raise ValueError(f"max_concurrent_trials must be >= 0, got {max_concurrent_trials}")
        cs, _ = load_coefficient_set(layout, coefficients)
        dataset, trial_recipe, base, manifest = plan_trials(baseline, recipe, overrides, dataset_dir, layout, epochs)
        plans = trials.study_trials(base, methods, targets, cs, manifest["num_classes"])
        batches = check_trials(plans, trial_recipe, dataset)
        connect_and_check(layout, trial_recipe)
    except BAD_INPUT as exc:
        return failed_run(logger, exc)  # type: ignore[return-value]
    key = trials.experiment_key(trials.STUDY_KIND, {
        "baseline": base.name, "recipe": trial_recipe.model_dump(), "members": [p.model for p in plans],
        "coefficients": [cs.alpha, cs.beta, cs.gamma], "dataset": manifest["version"]})
    logger.info("scaling study %s: %d member(s) (%s at FLOPs x %s) from %s, %d epoch(s) each, on %s", key,
                len(plans), ", ".join(methods), ", ".join(f"{t:g}" for t in sorted(set(targets))), base.name,
                epochs, dataset.name)
    c = tracking.client(layout.tracking_uri)
    exp_id = tracking.experiment_id(c, layout.artifact_root)
    from prefect.runtime import flow_run

    title = f"scaling-study {flow_run.name}: {base.name} on {dataset.name}"
    parent = trials.open_parent_run(
        c, exp_id, trials.STUDY_KIND, key, title,
        {"baseline": baseline, "recipe": recipe, "targets": targets, "methods": methods,
         "coefficients": coefficients, "epochs": epochs, "dataset": dataset.name},
        {Tags.FLOW_RUN: str(flow_run.id), Tags.DATASET_VERSION: manifest["version"]})
    setup = trials.TrialSetup(recipe=trial_recipe, dataset_dir=str(dataset), num_classes=manifest["num_classes"],
                               tracking_uri=layout.tracking_uri)
    try:
        outcomes = trials.run_trials(key, plans, setup, batches, layout.ray_storage / "tune", c, exp_id, parent,
                                      max_concurrent=max_concurrent_trials)
        rows = [_study_row(c, o, plan, dataset, trial_recipe, manifest["num_classes"])
                for o, plan in zip(outcomes, plans)]
    except BaseException:
        c.set_terminated(parent, "KILLED")
        raise
    base_gmacs = rows[0].get("gmacs") or math.nan
    for r in rows:
        r["gmacs_ratio"] = r["gmacs"] / base_gmacs if r.get("gmacs") else math.nan
    print("\n" + compare.to_text(rows, compare.STUDY_COLUMNS))
    log_files(c, parent, lambda d: compare.write_study(rows, d, title), "comparison")
    verdict = study_verdict(rows)
    c.set_tag(parent, "verdict", verdict)
    problem = failed_trials([{**r, "trial": r["method"]} for r in rows])
    c.set_terminated(parent, "FAILED" if problem else "FINISHED")
    create_markdown_artifact(key=STUDY_ARTIFACT, description="Scaling methods at equal FLOPs (MLflow: the parent "
                             "run's comparison/)", markdown=f"## {title}\n\n{verdict}\n\n"
                             f"{compare.to_markdown(rows, compare.STUDY_COLUMNS)}")
    logger.info("%s", verdict)
    if problem:
        return failed_run(logger, RuntimeError(problem))  # type: ignore[return-value]
    return rows


def _study_row(c: Any, o: trials.TrialOutcome, plan: trials.TrialPlan, dataset: Path, recipe: Recipe,
               num_classes: int) -> dict[str, Any]:
    """A member's row: its figures, and its chosen checkpoint's val top-1 (also logged on its run)."""
    figures = trials.member_figures(o, num_classes)
    row = {"method": plan.params["method"], "target": plan.params["target"], "depth_factor": 1.0,
           "width_factor": 1.0, "resolution_factor": 1.0, **plan.params, **figures, "best_epoch": o.best_epoch,
           "minival_top1": o.best_minival_top1, "run_id": o.run_id}
    if o.error is not None or o.best_checkpoint is None:
        return {**row, "status": "failed", "reason": (o.error or "no scored checkpoint").strip().splitlines()[0]}
    val = evaluate_on_cluster(trials.load_trial_weights(o, num_classes), dataset, "val",
                              trials.member_spec(o.model), recipe)
    tracking.log_metrics(c, o.run_id, {"val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                                       "gmacs": figures["gmacs"], "model_params": figures["params"]},
                         step=o.best_epoch)
    return {**row, "val_top1": val["top1"], "val_top5": val["top5"], "status": compare.TRAINED}


def study_verdict(rows: list[dict[str, Any]]) -> str:
    """One line per FLOPs target: each method's val top-1 there, and whether compound came out ahead."""
    lines = []
    trained = [r for r in rows if r["status"] == compare.TRAINED and r["method"] != "baseline"]
    for target in sorted({r["target"] for r in trained}):
        at = {r["method"]: r for r in trained if r["target"] == target}
        figures = ", ".join(f"{m} {r['val_top1']:.2f} ({r['gmacs_ratio']:.2f}x GMACs)" for m, r in at.items())
        if "compound" in at and len(at) > 1:
            best_other = max(r["val_top1"] for m, r in at.items() if m != "compound")
            ahead = at["compound"]["val_top1"] - best_other
            result = ("compound ahead" if ahead > 0 else "compound level" if ahead == 0 else "compound behind")
            lines.append(f"x{target:g}: {figures}: {result} by {abs(ahead):.2f} point(s) of val top-1")
        else:
            lines.append(f"x{target:g}: {figures}")
    return "; ".join(lines) or "no member trained"
