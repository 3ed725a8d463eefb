"""Prefect flow `transfer`: registered models fine-tuned onto other datasets as the papers run it, and the
papers' transfer table.

Its deployment (`transfer/v2-paper`) is declared in `flows/deployments.py`. The plan (`pipelines.training.transfer`)
pairs every model with every dataset version and checks every job before the first starts; then every job is
submitted at once, each its own Ray job (as `train-family` runs its members: `train_jobs`): each pair fine-tuned
with the `finetune` recipe and a new head, registered as `<variant>-<dataset>`, and, with `from_scratch`, the same
variant trained from scratch beside it. In MLflow the transfer is one parent run (tag `run_kind=transfer`) with
the jobs' runs nested under it; it ends holding the table (`transfer/transfer_table.json` and `.md`), which is
also the flow run's `transfer-table` markdown artifact in the Prefect UI, each cell linked to its run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.failures import RunFailed, one_line_failures
from flows.train_family import train_jobs
from pipelines.registry import tracking
from pipelines.settings import data_layout
from pipelines.training import cluster
from pipelines.training.transfer import (
    TABLE_DIR,
    TABLE_JSON,
    TABLE_MD,
    check_jobs,
    failed_cells,
    plan_transfer,
    resolve_sources,
    resolve_target,
    source_refs,
    to_markdown,
    to_text,
    transfer_jobs,
    transfer_recipes,
    transfer_table,
)

ARTIFACT = "transfer-table"


class TransferFailed(RunFailed):
    """Some transfer jobs failed; `table` holds every pair's cell (see `transfer`)."""

    def __init__(self, message: str, table: dict[str, Any]):
        super().__init__(message)
        self.table = table


@flow(name="transfer", log_prints=True)
@one_line_failures
def transfer(
    datasets: list[str], models: list[str] | None = None, family: list[str] | None = None,
    recipe: str = "finetune", head: str = "reset", from_scratch: bool = False, scratch_recipe: str = "v1",
    epochs: int | None = None, overrides: dict | None = None, data_dir: str | None = None,
    retries: int = 1, retry_delay_seconds: float = 10,
) -> dict[str, Any]:
    """Fine-tune each model on each dataset version (and, with from_scratch, train its variant from scratch there),
    evaluate on each version's val split, register each as `<variant>-<dataset>`; returns the transfer table.

    Args:
        datasets: Staged dataset versions to transfer to, by name (under the data directory's datasets) or directory.
        models: Registered models to start from: models:/NAME/VERSION, models:/NAME@ALIAS, or NAME (its champion);
            empty for the champions of `family`.
        family: Members as train-family takes them (efficientnet_b0, "phi=-9", ...): their variants' champions
            start, when `models` is empty.
        recipe: The fine-tuning recipe (a name or a YAML file's path); the source's architecture replaces its model.
        head: The new classifier: "reset" (fresh), or "match" (the rows of the class ids both datasets share are
            the source's, e.g. ImageNet-21k onto ILSVRC2012).
        from_scratch: Also train each variant from scratch on each dataset (`<variant>-<dataset>-scratch`).
        scratch_recipe: The recipe of the from-scratch jobs.
        epochs: Epochs of every job (empty: the recipes').
        overrides: Recipe fields to change in every job, by section, e.g. {"ray": {"num_workers": 4}}.
        data_dir: The data directory (datasets, stores, checkpoints); empty for EFFNET_DATA_DIR or ./data.
        retries: How many more times a job that fails is tried, resuming from its checkpoints (>= 0).
        retry_delay_seconds: Seconds between a failed try and the next (>= 0).
    """
    logger, layout = get_run_logger(), data_layout(data_dir).ensure()
    if retries < 0 or retry_delay_seconds < 0:
        raise ValueError(f"retries ({retries}) and retry_delay_seconds ({retry_delay_seconds}) must be >= 0")
    finetune, scratch = transfer_recipes(recipe, scratch_recipe if from_scratch else None, epochs, overrides)
    c = tracking.client(layout.tracking_uri)
    refs = source_refs(c, models, family, recipe, overrides, layout)
    targets = [resolve_target(layout.datasets, d) for d in datasets]
    pairs = plan_transfer(resolve_sources(c, refs), targets, finetune, scratch, head)
    jobs = transfer_jobs(pairs)
    check_jobs(jobs)
    cluster.connect_layout(layout)
    for _, tuned, _ in jobs:
        cluster.check_fits(tuned)
    logger.info("transfer: %d pair(s), %d job(s): %s", len(pairs), len(jobs), ", ".join(j[0] for j in jobs))
    from prefect.runtime import flow_run

    title = f"transfer {flow_run.name}: {len(refs)} model(s) onto {', '.join(t.dataset for t in targets)}"
    exp_id = tracking.experiment_id(c, layout.artifact_root)
    parent = tracking.open_parent_run(c, exp_id, str(flow_run.id), tracking.TRANSFER_KIND, title,
                                      {"models": refs, "datasets": datasets, "recipe": recipe, "head": head})
    rows = train_jobs(c, layout, jobs, data_dir, parent, retries, retry_delay_seconds)
    table = transfer_table(pairs, {job[0]: row for job, row in zip(jobs, rows)},
                           lambda run_id: tracking.run_url(layout.tracking_uri, exp_id, run_id), title)
    problem = failed_cells(table)
    report_transfer(c, parent, table, "FAILED" if problem else "FINISHED")
    if problem:
        raise TransferFailed(problem, table)
    return table


def report_transfer(c: Any, parent: str, table: dict[str, Any], status: str) -> None:
    """The table on the parent MLflow run (ended), and as the flow run's markdown artifact in the Prefect UI."""
    markdown = to_markdown(table)
    print("\n" + to_text(table))
    tracking.log_dict(c, parent, table, f"{TABLE_DIR}/{TABLE_JSON}")
    c.log_text(parent, markdown, f"{TABLE_DIR}/{TABLE_MD}")
    c.set_terminated(parent, status)
    create_markdown_artifact(key=ARTIFACT, markdown=markdown,
                             description="The transfer table: val top-1 per dataset and model, each linked to its "
                                         "MLflow run (MLflow: the parent run's transfer/)")
