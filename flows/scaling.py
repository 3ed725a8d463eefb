"""Prefect flows `search-scaling` (compound scaling's step 1) and `scaling-study` (compound against one-dimension
scaling at equal FLOPs), each one Ray Tune experiment of short trainings (`pipelines.search.trials`; the steps
around it in `pipelines.search.experiment`).

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

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.failures import RunFailed, one_line_failures
from models import DEFAULT_COEFFICIENT_TOLERANCE
from pipelines.registry import compare
from pipelines.search import experiment as ex
from pipelines.search import trials
from pipelines.settings import data_layout
from pipelines.training.family import DEMO_BASELINE

SEARCH_ARTIFACT, STUDY_ARTIFACT = "scaling-search", "scaling-study"
# The demo's grid: 12 points within 10% of alpha * beta^2 * gamma^2 = 2, the paper's (1.2, 1.1, 1.15) among them.
DEMO_ALPHAS, DEMO_BETAS, DEMO_GAMMAS = (1.1, 1.2, 1.3, 1.4), (1.0, 1.1, 1.2), (1.1, 1.15, 1.2)


@flow(name="search-scaling", log_prints=True)
@one_line_failures
def search_scaling(
    baseline: str = DEMO_BASELINE, recipe: str = "demo", dataset_dir: str | None = None,
    data_dir: str | None = None, overrides: dict | None = None, alphas: list[float] = list(DEMO_ALPHAS),
    betas: list[float] = list(DEMO_BETAS), gammas: list[float] = list(DEMO_GAMMAS),
    tolerance: float = DEFAULT_COEFFICIENT_TOLERANCE, epochs: int = 8, grace_period: int = 2,
    reduction_factor: float = 2.0, max_concurrent_trials: int = 0, set_name: str = "searched",
    replace: bool = False,
) -> dict:
    """Compound scaling's step 1: a grid search of (alpha, beta, gamma) at phi = 1 on a baseline, the winner
    stored as a named coefficient set. Returns the set (name, alpha, beta, gamma, its minival top-1) and one row
    per trial.

    Args:
        baseline: The model scaled at phi = 1, as a family member: "efficientnet_b0" (the paper's), "phi=-9" (demo).
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
    layout = data_layout(data_dir)
    pl = ex.plan_search(layout, baseline, recipe, overrides, dataset_dir, (alphas, betas, gammas), tolerance, epochs,
                        (grace_period, reduction_factor), max_concurrent_trials, set_name, replace)
    get_run_logger().info("scaling search %s: %d grid point(s) within %.0f%% of alpha*beta^2*gamma^2 = 2 on baseline "
                          "%s, %d epoch(s) each, on %s", pl.key, len(pl.plans), 100 * tolerance, pl.base.name, epochs,
                          pl.dataset.name)
    title = f"search-scaling {flow_run.name}: {pl.base.name} on {pl.dataset.name}"
    c, exp_id, parent = ex.open_parent(
        layout, trials.SEARCH_KIND, pl.key, title,
        {"baseline": baseline, "recipe": recipe, "alphas": alphas, "betas": betas, "gammas": gammas,
         "tolerance": tolerance, "epochs": epochs, "grace_period": grace_period,
         "reduction_factor": reduction_factor, "dataset": pl.dataset.name, "set_name": set_name},
        pl.manifest.version, str(flow_run.id))
    outcomes = ex.killed_on_interrupt(c, parent, lambda: trials.run_trials(
        pl.key, pl.plans, ex.setup_of(pl, layout), pl.batches, layout.ray_storage / "tune", c, exp_id, parent,
        scheduler=trials.asha(epochs, grace_period, reduction_factor), max_concurrent=max_concurrent_trials))
    rows = [ex.trial_row(o, trials.member_figures(o, pl.manifest.num_classes)) for o in outcomes]
    ex.report(c, parent, rows, title, compare.SEARCH_COLUMNS, lambda d: compare.write_table(
        rows, d, title, compare.SEARCH_COLUMNS, compare.SEARCH_FILES), "search")
    if (problem := ex.failed_trials(rows)):
        c.set_terminated(parent, "FAILED")
        raise RunFailed(problem)
    found, path, summary = ex.store_winner(c, layout, parent, outcomes, set_name, tolerance, source={
        "search_run": parent, "search_key": pl.key, "flow_run": str(flow_run.id), "baseline": pl.base.name,
        "dataset": pl.manifest.version})
    get_run_logger().info("%s", summary)
    create_markdown_artifact(key=SEARCH_ARTIFACT, description="The scaling search's trials (MLflow: the parent "
                             "run's search/)", markdown=f"## {title}\n\n{summary}\n\n"
                             f"{compare.to_markdown(rows, compare.SEARCH_COLUMNS)}")
    return ex.search_result(found, path, parent, outcomes, rows)


@flow(name="scaling-study", log_prints=True)
@one_line_failures
def scaling_study(
    baseline: str = DEMO_BASELINE, recipe: str = "demo", dataset_dir: str | None = None,
    data_dir: str | None = None, overrides: dict | None = None, targets: list[float] = [2.0, 4.0],
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
    pl = ex.plan_study(layout, baseline, recipe, overrides, dataset_dir, targets, methods, coefficients, epochs,
                       max_concurrent_trials)
    logger.info("scaling study %s: %d member(s) (%s at FLOPs x %s) from %s, %d epoch(s) each, on %s", pl.key,
                len(pl.plans), ", ".join(methods), ", ".join(f"{t:g}" for t in sorted(set(targets))), pl.base.name,
                epochs, pl.dataset.name)
    title = f"scaling-study {flow_run.name}: {pl.base.name} on {pl.dataset.name}"
    c, exp_id, parent = ex.open_parent(
        layout, trials.STUDY_KIND, pl.key, title,
        {"baseline": baseline, "recipe": recipe, "targets": targets, "methods": methods,
         "coefficients": coefficients, "epochs": epochs, "dataset": pl.dataset.name},
        pl.manifest.version, str(flow_run.id))

    def train_and_evaluate() -> list[dict]:
        outcomes = trials.run_trials(pl.key, pl.plans, ex.setup_of(pl, layout), pl.batches, layout.ray_storage / "tune",
                                     c, exp_id, parent, max_concurrent=max_concurrent_trials)
        return [ex.study_row(c, o, plan, pl.dataset, pl.recipe, pl.manifest.num_classes)
                for o, plan in zip(outcomes, pl.plans)]

    rows = ex.with_gmacs_ratios(ex.killed_on_interrupt(c, parent, train_and_evaluate))
    ex.report(c, parent, rows, title, compare.STUDY_COLUMNS, lambda d: compare.write_study(rows, d, title),
              "comparison")
    verdict = ex.study_verdict(rows)
    c.set_tag(parent, "verdict", verdict)
    problem = ex.failed_trials([{**r, "trial": r["method"]} for r in rows])
    c.set_terminated(parent, "FAILED" if problem else "FINISHED")
    create_markdown_artifact(key=STUDY_ARTIFACT, description="Scaling methods at equal FLOPs (MLflow: the parent "
                             "run's comparison/)", markdown=f"## {title}\n\n{verdict}\n\n"
                             f"{compare.to_markdown(rows, compare.STUDY_COLUMNS)}")
    logger.info("%s", verdict)
    if problem:
        raise RunFailed(problem)
    return rows
