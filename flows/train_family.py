"""Prefect flow `train-family`: one Ray Train job per variant, then a side-by-side summary table.

Its deployments (`train-family/b0-b7`, nightly, and `train-family/demo`) are declared in `flows/deployments.py`.
Every variant, the recipe, the dataset and the cluster's resources are checked before the first job starts; then
variants run one after another in this flow's process (each job already spreads over the whole Ray cluster), and
the first that fails ends the flow run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from pipelines.dataset import DataError, latest_version
from pipelines.settings import data_layout
from pipelines.training import cluster
from pipelines.training.job import TrainResult, run_training, validate_job
from pipelines.training.recipe import Recipe, load_recipe, parse_family_member
from pipelines.training.tracking import Tags

# Bad input: an unknown variant or recipe, a bad override, a missing or damaged dataset, a cluster that cannot
# fit the job.
BAD_INPUT = (ValueError, FileNotFoundError, DataError)


@task(cache_policy=NO_CACHE, task_run_name="train-{variant}")
def train_variant(variant: str, recipe: Recipe, dataset_dir: str, data_dir: str | None) -> dict:
    """One job; on a crash the next run of the flow resumes it (see `run_training`)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    result: TrainResult = run_training(recipe, dataset_dir, data_layout(data_dir), progress=logger.info,
                                       tags={Tags.FLOW_RUN: str(flow_run.id)})
    return asdict(result)


def format_summary(rows: list[dict]) -> str:
    cols = [("variant", "variant", "{}"), ("params", "params", "{:,}"), ("epochs", "epochs_run", "{}"),
            ("best ep", "best_epoch", "{}"), ("minival top-1", "minival_top1", "{:.1f}"),
            ("val top-1", "val_top1", "{:.1f}"), ("val top-5", "val_top5", "{:.1f}"),
            ("registered", "registered_model", "{}"), ("version", "version", "{}"),
            ("champion", "champion", "{}")]
    table = [[h for h, _, _ in cols]] + [[fmt.format(r[k]) for _, k, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def plan_family(
    variants: list[str], recipe: str, dataset_dir: str | None, data_dir: str | None, overrides: dict | None,
) -> tuple[Path, list[tuple[str, Recipe]]]:
    """Every member's recipe, checked (variant, recipe, overrides, dataset), before anything trains.

    Raises ValueError / FileNotFoundError naming the first problem.
    """
    if not variants:
        raise ValueError("no variants given")
    layout = data_layout(data_dir)
    base = load_recipe(recipe)
    if overrides:
        base = base.with_overrides(**overrides)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    jobs = []
    for variant in variants:
        tuned = base.with_overrides(model=parse_family_member(variant))
        validate_job(tuned, dataset)
        jobs.append((variant, tuned))
    return dataset, jobs


@flow(name="train-family", log_prints=True)
def train_family(
    variants: list[str], recipe: str = "v1", dataset_dir: str | None = None, data_dir: str | None = None,
    overrides: dict | None = None,
) -> list[dict]:
    """Train each variant with one recipe on one staged dataset version (default: the latest staged one).

    `recipe` is a recipe name (v1, v2-progressive, demo, ...) or a path to a recipe YAML file; `overrides` maps
    recipe sections to fields, e.g. {"schedule": {"epochs": 3}}.
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    try:
        dataset, jobs = plan_family(variants, recipe, dataset_dir, data_dir, overrides)
        cluster.connect(layout.ray_address, env={"MLFLOW_TRACKING_URI": layout.tracking_uri})
        for _, tuned in jobs:
            cluster.check_fits(tuned)
    except BAD_INPUT as exc:
        # Bad input: one line in the run's log and a Failed run with that message, no traceback (a direct
        # caller, such as `effnet family`, gets the exception raised).
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)  # type: ignore[return-value]
    logger.info("training %d variant(s) on %s: %s", len(jobs), dataset.name, ", ".join(v for v, _ in jobs))
    rows = []
    for variant, tuned in jobs:
        rows.append(train_variant(variant, tuned, str(dataset), data_dir))
        logger.info("%s: val top-1 %.2f (model %s v%s)", variant, rows[-1]["val_top1"],
                    rows[-1]["registered_model"], rows[-1]["version"])
    print("\n" + format_summary(rows))
    return rows
