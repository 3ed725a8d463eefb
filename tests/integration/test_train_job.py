"""A real training job: 2 Ray workers (DDP over gloo), MLflow SQLite store, registry with aliases."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    """Another dataset, five classes of its own, to fine-tune onto with a new head."""
    archives = write_demo_imagenet(tmp_path_factory.mktemp("archives5"), num_classes=5, train_per_class=40,
                                   val_per_class=8, seed=7).out_dir
    params = StageParams(tiers=(64,), shard_size=32, minival=0.2, seed=0, max_bad_fraction=0.05)
    return stage_directly(archives, tmp_path_factory.mktemp("datasets5"), params)


def _tiny_recipe(epochs: int = 6):
    return load_recipe("demo").with_overrides(
        model={"variant": "efficientnet_b0", "phi": -9}, schedule={"epochs": epochs, "patience": None},
        data={"batch_size": 16},
    )


def test_train_job_learns_and_registers(learnable_dataset, five_classes, data_layout_tmp, ray_cluster, capsys):
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
    # The score early stopping chose the checkpoint by (2 ranks, each scoring half of minival) is that checkpoint's
    # own, as promotion measures it alone in one process: the ranks' BN statistics were averaged into it.
    assert result.promotion_top1 == pytest.approx(result.minival_top1, abs=1e-9)

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

    check_the_registered_model_in_use(data_layout_tmp, learnable_dataset, result, mv, capsys)

    # A second job (another recipe: one epoch) is measured against the champion on the same minival: the
    # champion, rebuilt from its registered weights, scores there what it scored when it was registered.
    second = run_training(_tiny_recipe(epochs=1), learnable_dataset, data_layout_tmp)
    mv2 = c.get_model_version(second.registered_model, second.version)
    assert mv2.tags["champion_before"] == result.version
    assert mv2.tags["champion_minival_top1"] == mv.tags["promotion_minival_top1"]
    assert second.champion == (float(mv2.tags["promotion_minival_top1"]) > float(mv.tags["promotion_minival_top1"]))
    expected = second.version if second.champion else result.version
    assert str(c.get_model_version_by_alias(result.registered_model, "champion").version) == expected

    check_fine_tuning_onto_other_classes(data_layout_tmp, five_classes, result)
    # Another task, another registered model: the source's champion is where it was.
    assert str(c.get_model_version_by_alias(result.registered_model, "champion").version) == expected



def check_the_registered_model_in_use(layout, dataset, result, mv, capsys) -> None:
    """What a user does with the version: load it with MLflow's own loader (no pickle in it), evaluate it with
    `effnet eval` (val top-1 as recorded at registration), export it in every format (each file run and
    compared), and a checkpoint holding a pickled object refused in one line."""
    import mlflow
    import numpy as np
    import torch

    from cli.effnet import main
    from pipelines.registry.model_ref import load_model

    uri = f"models:/{result.registered_model}@candidate"
    mlflow.set_tracking_uri(layout.tracking_uri)
    served = mlflow.pyfunc.load_model(uri)
    files = [p.name for p in Path(mlflow.artifacts.download_artifacts(uri)).rglob("*")]
    assert "served_model.py" in files and "state_dict.pt" in files and not [f for f in files if f.endswith(".pkl")]
    res = int(mv.tags["eval_resolution"])
    x = np.random.default_rng(0).standard_normal((2, 3, res, res), dtype=np.float32)
    rebuilt = load_model(uri, layout.tracking_uri)
    assert rebuilt.source == f"models:/{result.registered_model}/{result.version}"
    np.testing.assert_allclose(served.predict(x), rebuilt.model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)

    out = layout.root / "eval.json"
    assert main(["--data-dir", str(layout.root), "eval", uri, "--data", str(dataset), "--per-class",
                 "--mlflow", "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert abs(evaluated["top1"] - float(mv.tags["val_top1"])) <= 0.1, (evaluated["top1"], mv.tags["val_top1"])
    assert evaluated["resolution"] == res and evaluated["samples"] == CLASSES * 8
    assert len(evaluated["per_class_top1"]) == CLASSES
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    assert c.get_run(evaluated["mlflow_run"]).data.metrics["val_top1"] == evaluated["top1"]

    for fmt in ("onnx", "torchscript", "pt2"):
        target = layout.root / f"model.{fmt}"
        args = ["--data-dir", str(layout.root), "export", uri, "--format", fmt, "--out", str(target)]
        assert main(args + (["--attach"] if fmt == "onnx" else [])) == 0
        assert target.stat().st_size > 0
    assert c.get_model_version(result.registered_model, result.version).tags["export.onnx"] == "export/model.onnx"

    pickled = layout.root / "pickled.pt"
    torch.save({"model_args": {"name": "efficientnet_b0"}, "state_dict": _NotATensor()}, pickled)
    capsys.readouterr()
    assert main(["--data-dir", str(layout.root), "eval", str(pickled), "--data", str(dataset)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a plain checkpoint: it holds pickled objects" in err and "\n" not in err, err


class _NotATensor:
    """An object a checkpoint must not hold: loading it would need unpickling."""


def check_fine_tuning_onto_other_classes(layout, dataset, source) -> None:
    """`effnet finetune` from the registered version onto five other classes with a new head, the backbone frozen
    for the first epoch: it learns well above chance, and the new run and version record where it started."""
    from cli.effnet import main

    out = layout.root / "finetune.json"
    uri = f"models:/{source.registered_model}/{source.version}"
    assert main(["--data-dir", str(layout.root), "finetune", uri, "--data", str(dataset), "--recipe", "demo",
                 "--epochs", "5", "--workers", "1", "--freeze", "backbone", "--freeze-epochs", "1",
                 "--result-file", str(out)]) == 0
    tuned = json.loads(out.read_text())
    print(f"\nfine-tuned onto 5 classes (backbone frozen 1 of 5 epochs): minival top-1 {tuned['minival_top1']:.1f}, "
          f"val top-1 {tuned['val_top1']:.1f} (chance 20)")
    chance = 100 / 5
    assert tuned["minival_top1"] > chance + 20, tuned
    assert tuned["variant"] == source.variant and tuned["init_from"] == uri
    assert tuned["registered_model"] == f"{source.registered_model}-finetuned" and tuned["champion"]
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    assert c.get_run(tuned["run_id"]).data.tags["init_from"] == uri
    assert c.get_model_version(tuned["registered_model"], tuned["version"]).tags["init_from"] == uri


def test_a_progressive_job_grows_the_size_and_chooses_from_its_last_stage(learnable_dataset, data_layout_tmp,
                                                                           ray_cluster):
    """V2 progressive learning in a real job: the size grows stage by stage, minival is measured every epoch, and
    the checkpoint is chosen among the last stage's (`progressive.choose_from: last_stage`), trained at the size
    evaluation uses."""
    recipe = load_recipe("demo-progressive").with_overrides(
        schedule={"epochs": 4}, progressive={"stages": 2, "choose_from": "last_stage"}, data={"batch_size": 16})
    result = run_training(recipe, learnable_dataset, data_layout_tmp)

    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)

    def history(key):
        return [m.value for m in sorted(c.get_metric_history(result.run_id, key), key=lambda m: m.step)]

    assert history("image_size") == [32, 32, 64, 64]
    assert len(history("minival_top1")) == 4
    assert result.best_epoch in (2, 3) and result.eval_resolution == 64
    last_stage = history("minival_top1")[2:]
    assert result.minival_top1 == max(last_stage)
    # The earliest of equals, and the registered weights are that epoch's (Ray alone keeps the later of a tie).
    assert result.best_epoch == 2 + last_stage.index(max(last_stage))
