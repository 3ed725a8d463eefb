"""A real training job: 2 Ray workers (DDP over gloo), MLflow SQLite store, registry with aliases."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipelines.source.demo import write_demo_imagenet
from pipelines.staging.params import StageParams
from pipelines.training.job import run_training
from pipelines.training.recipe import load_recipe

from helpers import stage_directly

CLASSES = 4


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory):
    """Enough images per class for a few epochs to move minival well above chance (the session's tiny
    dataset gives two steps an epoch)."""
    archives = write_demo_imagenet(tmp_path_factory.mktemp("archives"), num_classes=CLASSES, train_per_class=40,
                                   val_per_class=8, seed=1).out_dir
    params = StageParams(tiers=(64,), shard_size=32, minival=0.2, seed=0, max_bad_fraction=0.05)
    return stage_directly(archives, tmp_path_factory.mktemp("datasets"), params)


def _tiny_recipe(epochs: int = 6):
    return load_recipe("demo").with_overrides(
        model={"variant": "efficientnet_b0", "phi": -9}, schedule={"epochs": epochs, "patience": None},
        data={"batch_size": 16},
    )


def test_train_job_learns_and_registers(learnable_dataset, data_layout_tmp, ray_cluster):
    # Each step's 16 images per worker in two micro-batches of 8: gradients accumulated, all-reduced once.
    recipe = _tiny_recipe().with_overrides(data={"micro_batch_size": 8})
    result = run_training(recipe, learnable_dataset, data_layout_tmp)

    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri, registry_uri=data_layout_tmp.tracking_uri)
    loss = [m.value for m in sorted(c.get_metric_history(result.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(loss) == recipe.schedule.epochs
    assert loss[-1] < loss[0], f"training loss did not fall: {loss}"
    chance = 100 / CLASSES
    assert result.minival_top1 > chance + 20, f"minival top-1 {result.minival_top1} is near chance"
    assert result.epochs_run == recipe.schedule.epochs

    mv = c.get_model_version_by_alias(result.registered_model, "candidate")
    assert str(mv.version) == result.version and mv.run_id == result.run_id
    for tag in ("params", "gmacs", "train_resolution", "recipe", "dataset_version", "manifest_sha256",
                "minival_top1", "val_top1", "epochs_run", "best_epoch", "early_stopped_epoch"):
        assert tag in mv.tags, f"registered version lacks tag {tag}"
    assert int(mv.tags["params"]) == result.params
    champion = c.get_model_version_by_alias(result.registered_model, "champion")
    assert str(champion.version) == result.version  # the first model of its name becomes champion
    assert mv.tags["champion_minival_top1"] == "none" and mv.tags["promotion"].startswith("promoted")
    for metric in ("model_params", "gmacs", "eval_resolution", "wall_clock_hours", "gpu_hours"):
        assert metric in c.get_run(result.run_id).data.metrics, metric
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.params["sizing.micro_batch"], run.data.params["sizing.accumulation"]) == ("8", "2")
    assert "val_top1" in run.data.metrics

    # The registered model loads back with MLflow's own loader and classifies a batch.
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(data_layout_tmp.tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{result.registered_model}@candidate")
    res = int(mv.tags["eval_resolution"])
    out = model(torch.zeros(2, 3, res, res))
    assert out.shape == (2, CLASSES)

    # A second job (another recipe: one epoch) is measured against the champion on the same minival: the
    # champion, rebuilt from its registered weights, scores there what it scored when it was registered.
    second = run_training(_tiny_recipe(epochs=1), learnable_dataset, data_layout_tmp)
    mv2 = c.get_model_version(second.registered_model, second.version)
    assert mv2.tags["champion_before"] == result.version
    assert mv2.tags["champion_minival_top1"] == mv.tags["promotion_minival_top1"]
    assert second.champion == (float(mv2.tags["promotion_minival_top1"]) > float(mv.tags["promotion_minival_top1"]))
    expected = second.version if second.champion else result.version
    assert str(c.get_model_version_by_alias(result.registered_model, "champion").version) == expected

