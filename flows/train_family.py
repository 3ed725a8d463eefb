"""Prefect flow `train-family`: one Ray Train job per variant, then a side-by-side summary table.

Its deployments (`train-family/b0-b7`, nightly, and `train-family/demo`) are declared in `flows/deployments.py`.
Every variant, the recipe, the dataset and the cluster's resources are checked before the first job starts; then
every variant is submitted at once, each as its own Ray job (`pipelines.training.submit`) waited on by one task
run, so the variants train side by side as far as the cluster's resources allow. A failed task is retried
(`retries`): it reattaches to its Ray job if that still runs, else submits it again, and the job resumes from its
checkpoints. A variant that fails for good does not stop the others; the run ends Failed, naming it.

In MLflow the family is one parent run with its members' runs nested under it; the parent ends holding the
comparison (`pipelines.registry.compare`: plots, page, table), which is also the flow run's `family-summary`
markdown artifact in the Prefect UI.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.failures import RunFailed, one_line_failures
from pipelines.registry import compare, tracking
from pipelines.registry.compare import TRAINED
from pipelines.registry.tracking import Tags
from pipelines.settings import DataLayout, data_layout
from pipelines.training import cluster, submit
from pipelines.training.family import Jobs, failed_members, from_champions, plan_family, variant_row
from pipelines.training.job import TrainResult, job_key_for
from pipelines.training.recipe import Recipe

START_FROM = ("scratch", "champion")


class FamilyFailed(RunFailed):
    """Some variants of the family failed; `rows` holds every variant's row (see `train_family`)."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


@task(cache_policy=NO_CACHE, task_run_name="train-{variant}")
def train_variant(variant: str, recipe: Recipe, dataset_dir: str, data_dir: str | None, tags: dict[str, str]) -> dict:
    """One job, as a Ray job that this task waits on (its log lines come into this task run's log); a retry or a
    rerun of the flow reattaches to it while it runs, or resubmits it to resume (see `submit.train_on_cluster`).
    `tags` go on the job's MLflow run (the family's parent run)."""
    from prefect.runtime import flow_run

    result: TrainResult = submit.train_on_cluster(recipe, dataset_dir, data_layout(data_dir), str(flow_run.id),
                                                  emit=get_run_logger().info, tags=tags)
    return asdict(result)


@flow(name="train-family", log_prints=True)
@one_line_failures
def train_family(
    variants: list[str], recipe: str = "v1", dataset_dir: str | None = None, data_dir: str | None = None,
    overrides: dict | None = None, retries: int = 1, retry_delay_seconds: float = 10,
    member_overrides: dict[str, dict] | None = None, start_from: str = "scratch",
) -> list[dict]:
    """Train each variant with one recipe on one staged dataset version, all at once; returns one row per variant
    (its TrainResult's fields and "status": "trained", or "status": "failed" and "reason").

    The Args are what the Prefect UI's run form shows beside each field.

    Args:
        variants: Members of the family: registered variants (efficientnet_b0 ... efficientnet_b7, efficientnet_v2_s,
            ...) or "phi=N", B0 compound-scaled by phi N (e.g. "phi=-3", "phi=1.5"), by the paper's coefficients or
            a named set ("phi=2,coefficients=my-search") or explicit ones ("phi=2,alpha=1.3,beta=1.1,gamma=1.1").
        recipe: A recipe name (`effnet recipes` lists them) or the path of a recipe YAML file.
        dataset_dir: A staged dataset version directory; empty for the latest one staged in the data directory.
        data_dir: The data directory (stores, checkpoints, datasets); empty for EFFNET_DATA_DIR or ./data.
        overrides: Recipe fields to change, by section, e.g. {"schedule": {"epochs": 3}}.
        retries: How many more times a variant whose job fails is tried, resuming from its checkpoints (>= 0).
        retry_delay_seconds: Seconds between a failed try and the next (>= 0).
        member_overrides: Recipe fields to change for one member, over `overrides`, by member as written in
            `variants`, e.g. {"efficientnet_b7": {"data": {"batch_size": 64}}}.
        start_from: "scratch", or "champion": each member fine-tunes its variant's registered champion (a member
            with none yet trains from scratch).
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    if retries < 0 or retry_delay_seconds < 0:
        raise ValueError(f"retries ({retries}) and retry_delay_seconds ({retry_delay_seconds}) must be >= 0")
    if start_from not in START_FROM:
        raise ValueError(f"start_from must be 'scratch' or 'champion', not {start_from!r}")
    dataset, jobs = plan_family(variants, recipe, dataset_dir, data_dir, overrides, member_overrides)
    c = tracking.client(layout.tracking_uri)
    if start_from == "champion":
        jobs, no_champion = from_champions(c, jobs)
        if no_champion:
            logger.info("no champion yet for %s: from scratch", ", ".join(no_champion))
    cluster.connect_layout(layout)
    for _, tuned in jobs:
        cluster.check_fits(tuned)
    logger.info("training %d variant(s) on %s: %s", len(jobs), dataset.name, ", ".join(v for v, _ in jobs))
    from prefect.runtime import flow_run

    title = f"train-family {flow_run.name}: {recipe} on {dataset.name}"
    parent = tracking.open_family_run(c, tracking.experiment_id(c, layout.artifact_root), str(flow_run.id),
                                      title, {"variants": variants, "recipe": recipe, "dataset": dataset.name})
    rows = train_members(c, layout, jobs, dataset, data_dir, parent, retries, retry_delay_seconds)
    report_family(c, parent, rows, title)
    problem = failed_members(rows)
    if problem:
        raise FamilyFailed(problem, rows)
    return rows


def train_members(c: Any, layout: DataLayout, jobs: Jobs, dataset: Path, data_dir: str | None, parent: str,
                  retries: int, retry_delay_seconds: float) -> list[dict]:
    """Every member's job submitted at once, each waited on by a task run; their rows, in the members' order."""
    return train_jobs(c, layout, [(variant, tuned, dataset) for variant, tuned in jobs], data_dir, parent, retries,
                      retry_delay_seconds)


def train_jobs(c: Any, layout: DataLayout, jobs: list[tuple[str, Recipe, Path]], data_dir: str | None, parent: str,
               retries: int, retry_delay_seconds: float) -> list[dict]:
    """Every job (label, recipe, dataset version) submitted at once as a Ray job, each waited on by a task run and
    nested under the `parent` MLflow run; their rows (`variant_row`, by label), in the jobs' order."""
    logger = get_run_logger()
    train = train_variant.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = [train.submit(label, tuned, str(dataset), data_dir, {Tags.PARENT_RUN: parent})
               for label, tuned, dataset in jobs]
    try:
        outcomes = [f.result(raise_on_failure=False) for f in futures]
    except BaseException:
        # Cancelled or interrupted (Prefect's TerminationSignal, Ctrl-C): the Ray jobs would train on with nobody
        # waiting. Stopped, their drivers record their runs killed. (A flow process that dies without a signal
        # leaves them running; a rerun reattaches.)
        stopped = submit.stop_jobs(layout, [job_key_for(tuned, dataset) for _, tuned, dataset in jobs])
        logger.warning("stopped Ray job(s): %s", ", ".join(stopped) or "none running")
        c.set_terminated(parent, "KILLED")
        raise
    rows = [variant_row(label, outcome) for (label, _, _), outcome in zip(jobs, outcomes)]
    for (label, _, _), row in zip(jobs, rows):
        if row["status"] == TRAINED:
            logger.info("%s: trained, val top-1 %.2f (model %s v%s)", label, row["val_top1"],
                        row["registered_model"], row["version"])
        else:
            logger.error("%s: failed: %s", label, row["reason"])
    return rows


def report_family(c: Any, parent: str, rows: list[dict], title: str) -> None:
    """The comparison on the parent MLflow run (ended), the table as the flow run's artifact in the Prefect UI."""
    print("\n" + compare.to_text(rows))
    tracking.close_family_run(c, parent, rows, title, "FAILED" if failed_members(rows) else "FINISHED")
    create_markdown_artifact(key="family-summary", markdown=f"## {title}\n\n{compare.to_markdown(rows)}",
                             description="The family side by side (MLflow: the parent run's comparison/)")
