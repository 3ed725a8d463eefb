"""Prefect flow `demo`: generate the demo ImageNet, stage it, train a small compound-scaled family, summarise.

The whole main job end to end on the built-in demo data. A second run reuses the generated archives and the
staged shards (each step says so) and adds new MLflow runs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.deployments import DEMO_STAGING
from flows.stage_imagenet import stage_imagenet
from flows.train_family import train_family
from pipelines.settings import data_layout
from pipelines.source.demo import DEMO_SIZE, write_demo_imagenet
from pipelines.training.family import DEMO_FAMILY


@flow(name="demo", log_prints=True)
def demo(
    data_dir: str | None = None, family: list[str] = list(DEMO_FAMILY), epochs: int | None = None,
    num_classes: int = DEMO_SIZE.num_classes, train_per_class: int = DEMO_SIZE.train_per_class,
    val_per_class: int = DEMO_SIZE.val_per_class, seed: int = DEMO_SIZE.seed,
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
