"""Prefect flow `train-family`: one Ray Train job per variant, then a side-by-side summary from MLflow.

Deployments of this flow (`train-family/b0-b7`, `train-family/v2-s-m-l`, `train-family/demo`) are declared in
`flows/deployments.py`. Variants run one after another: each job already spreads over the whole Ray cluster.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.staging import latest_version
from pipelines.config import Recipe, load_recipe, parse_family_member
from pipelines.settings import data_layout
from pipelines.train import TrainResult, run_training


@task(cache_policy=NO_CACHE, task_run_name="train-{variant}")
def train_variant(variant: str, recipe: Recipe, dataset_dir: str, data_dir: str | None) -> dict:
    """One job; on a crash the next run of the flow resumes it (see `run_training`)."""
    tuned = recipe.with_overrides(model=parse_family_member(variant))
    result: TrainResult = run_training(tuned, dataset_dir, data_layout(data_dir))
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


@flow(name="train-family", log_prints=True)
def train_family(
    variants: list[str], recipe: str = "v1", dataset_dir: str | None = None, data_dir: str | None = None,
    overrides: dict | None = None,
) -> list[dict]:
    """Train each variant with one recipe on one staged dataset version (default: the latest staged one).

    `overrides` maps recipe sections to fields, e.g. {"schedule": {"epochs": 3}}.
    """
    logger = get_run_logger()
    layout = data_layout(data_dir)
    base = load_recipe(recipe)
    if overrides:
        base = base.with_overrides(**overrides)
    dataset = Path(dataset_dir) if dataset_dir else latest_version(layout.datasets)
    rows = []
    for variant in variants:
        rows.append(train_variant(variant, base, str(dataset), data_dir))
        logger.info("%s: val top-1 %.2f (model %s v%s)", variant, rows[-1]["val_top1"],
                    rows[-1]["registered_model"], rows[-1]["version"])
    print("\n" + format_summary(rows))
    return rows
