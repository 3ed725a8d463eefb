"""Prefect flow `demo`: generate the demo ImageNet, stage it, train a small compound-scaled family, summarise.

The whole main job end to end on the built-in demo data. A second run reuses the generated archives and the
staged shards (each step says so) and adds new MLflow runs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.deployments import DEMO_FAMILY, DEMO_STAGING
from flows.stage_imagenet import stage_imagenet
from flows.train_family import train_family
from pipelines.settings import data_layout
from pipelines.source.demo import write_demo_imagenet


@flow(name="demo", log_prints=True)
def demo(
    data_dir: str | None = None, family: list[str] = list(DEMO_FAMILY), epochs: int | None = None,
    num_classes: int = 10, train_per_class: int = 40, val_per_class: int = 10, seed: int = 0,
) -> list[dict]:
    logger = get_run_logger()
    layout = data_layout(data_dir).ensure()
    summary = write_demo_imagenet(
        layout.demo_archives, num_classes=num_classes, train_per_class=train_per_class,
        val_per_class=val_per_class, seed=seed,
    )
    logger.info("%s demo ImageNet at %s", "reusing the" if summary.reused else "generated a", layout.demo_archives)
    dataset = stage_imagenet(str(layout.demo_archives), str(layout.datasets), seed=seed, **DEMO_STAGING)
    overrides = {"schedule": {"epochs": epochs}} if epochs is not None else None
    return train_family(list(family), recipe="demo", dataset_dir=dataset, data_dir=str(layout.root),
                        overrides=overrides)
