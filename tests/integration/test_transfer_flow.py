"""The `transfer` flow on the demo, as the papers run transfer: the family's champion (pretrained on a tiny
ImageNet-21k release) fine-tuned onto CIFAR-10 and Flowers-102 (generated in their own formats) and registered as a
task of its own per dataset, then onto the demo ILSVRC2012 with the 1k head started from the 21k head's rows; the transfer table on the
parent MLflow run and as the flow run's artifact, each cell linked to its run. Bad input is a one-line Failed run.
And `head: match` from a registered version: the rows of the shared class ids are the source's, the lineage
recorded (the 21k -> 1k start, without the 21k data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import STAGE_PARAMS, flow_run_artifacts
from mlflow.tracking import MlflowClient

import models
from flows.train_family import train_family
from flows.transfer import ARTIFACT, transfer
from pipelines.dataset import read_manifest
from pipelines.registry import tracking
from pipelines.registry.tracking import EXPERIMENT, TRANSFER_KIND, Tags
from pipelines.registry.model_ref import load_registered_weights
from pipelines.source.samples.cifar import write_cifar
from pipelines.source.samples.flowers import write_flowers
from pipelines.source.samples.imagenet21k import write_imagenet21k
from pipelines.staging.stager import stage
from pipelines.training.job import init_weights_path
from pipelines.training.recipe import InitConfig
from pipelines.training.transfer import (
    TABLE_DIR,
    TABLE_JSON,
    TABLE_MD,
    plan_transfer,
    resolve_sources,
    resolve_target,
    transfer_recipes,
)
from pipelines.training.warm_start import BIAS, WEIGHT, write_init_weights

MEMBER = "phi=-9"
# One Ray worker x 1 CPU per job: the fine-tuning and the from-scratch job side by side on the 2-CPU cluster. The
# finetune recipe is the paper's (8 GPU workers, batch 512): here its learning-rate schedule on the demo's scale.
CPU = {
    "ray": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "device_memory_gb": None},
    "data": {"batch_size": 8, "loader_workers": 0},
    "runtime": {"amp": False, "system_metrics_seconds": 2},
    "schedule": {"patience": None, "checkpoint_every_minutes": None},
}


def _stage(source: Path, out: Path, **kwargs) -> Path:
    return stage(source, out, STAGE_PARAMS, log=lambda *_: None, min_train_per_class=0, **kwargs)


@pytest.fixture(scope="module")
def in21k_dataset(staged_dataset, tmp_path_factory):
    """A tiny ImageNet-21k release (its whole tar of synset tars) holding two of the demo ILSVRC2012's classes
    and two others, staged with a val of 2 held out per synset: the V2 paper's pretraining set in small."""
    shared = read_manifest(staged_dataset).classes[:2]
    release = write_imagenet21k(
        tmp_path_factory.mktemp("in21k"), (*shared, "n09999001", "n09999002"), per_class=14, seed=2
    )
    return _stage(release.path.parent, tmp_path_factory.mktemp("in21k_datasets"), val_per_class=2)


@pytest.fixture(scope="module")
def target_datasets(tmp_path_factory):
    """The transfer sets in their own formats, staged: a CIFAR-10 binary archive and a Flowers-102 release."""
    root = tmp_path_factory.mktemp("targets")
    write_cifar(root / "cifar", variant="cifar10", per_class_train=8, per_class_test=2)
    write_flowers(root / "flowers", num_classes=3, per_class_train=6, per_class_val=2, per_class_test=3, seed=1)
    out = tmp_path_factory.mktemp("target_datasets")
    return [_stage(root / "cifar", out), _stage(root / "flowers", out)]


def test_pretrain_on_21k_then_transfer_the_champion_onto_cifar_and_flowers(
    staged_dataset, in21k_dataset, target_datasets, data_layout_tmp, prefect_server, ray_cluster
):
    layout = data_layout_tmp
    assert read_manifest(in21k_dataset).splits["val"].per_class == dict.fromkeys(read_manifest(in21k_dataset).classes, 2)
    pretrained = train_family(
        [MEMBER],
        recipe="demo",
        dataset_dir=str(in21k_dataset),
        data_dir=str(layout.root),
        overrides={"ray": {"num_workers": 1}, "schedule": {"epochs": 1, "patience": None}},
    )
    source = f"models:/{pretrained[0]['registered_model']}/{pretrained[0]['version']}"  # the champion: the first

    # Without from_scratch: its job is the same job from no weights (the plan and the table with it:
    # tests/unit/test_transfer.py), and more jobs on the 2-CPU cluster lengthen the flow.
    state = transfer(
        [str(d) for d in target_datasets], family=[MEMBER], epochs=1, overrides=CPU, data_dir=str(layout.root),
        return_state=True,
    )
    assert state.is_completed(), state.message
    table = state.result()
    c = MlflowClient(tracking_uri=layout.tracking_uri, registry_uri=layout.tracking_uri)
    assert len(table["cells"]) == 2
    for cell, target_dir, dataset in zip(table["cells"], target_datasets, ("cifar10", "flowers102"), strict=True):
        target = read_manifest(target_dir).version
        name = f"efficientnet-b0-phi-9-{dataset}"  # <variant>-<dataset>
        assert (cell["model"], cell["dataset_version"], cell["registered_as"]) == (source, target, name)
        # Registered as its own task, fine-tuned from the champion with a new head (lineage on the run and the
        # version), evaluated on the target's val split (the dataset's own test split).
        assert cell["status"] == "trained" and cell["registered_model"] == name and "scratch" not in cell
        mv = c.get_model_version(name, cell["version"])
        assert mv.run_id == cell["run_id"] and mv.tags[Tags.DATASET_VERSION] == target
        assert mv.tags[Tags.INIT_FROM] == source == c.get_run(cell["run_id"]).data.tags[Tags.INIT_FROM]
        assert mv.tags[Tags.INIT_HEAD] == "reset" and mv.tags[Tags.VAL_TOP1] == f"{cell['top1']:.3f}"

    # The parent run: the jobs' runs nested under it, the table with one cell per pair linked to its run.
    exp = c.get_experiment_by_name(EXPERIMENT).experiment_id
    flow_run_id = str(state.state_details.flow_run_id)
    [parent] = c.search_runs(
        [exp], filter_string=f"tags.{Tags.FLOW_RUN} = '{flow_run_id}' and tags.{Tags.RUN_KIND} = '{TRANSFER_KIND}'"
    )
    assert parent.info.status == "FINISHED"
    files = {a.path for a in c.list_artifacts(parent.info.run_id, TABLE_DIR)}
    assert files == {f"{TABLE_DIR}/{TABLE_JSON}", f"{TABLE_DIR}/{TABLE_MD}"}
    local = Path(c.download_artifacts(parent.info.run_id, TABLE_DIR, str(layout.root / "downloaded")))
    logged = json.loads((local / TABLE_JSON).read_text())
    assert logged == table
    markdown = (local / TABLE_MD).read_text()
    for cell in table["cells"]:
        assert c.get_run(cell["run_id"]).data.tags[Tags.PARENT_RUN] == parent.info.run_id
        run_url = tracking.run_url(layout.tracking_uri, exp, cell["run_id"])
        assert cell["run_url"] == run_url and f"[{cell['top1']:.2f}]({run_url})" in markdown, markdown
    # The same table as the flow run's artifact in the Prefect UI.
    artifact = flow_run_artifacts(flow_run_id)[ARTIFACT]
    assert artifact.type == "markdown" and artifact.data == markdown

    # The dataset the champion was trained on is no transfer: one line, before anything runs.
    again = transfer(
        [str(in21k_dataset)], models=[source], overrides=CPU, data_dir=str(layout.root), return_state=True
    )
    assert again.is_failed() and "was trained on" in again.message and "\n" not in again.message, again.message

    # ImageNet-21k -> ILSVRC2012 as in the V2 paper: the 1k head's rows of the WNIDs 21k has start from the 21k
    # head's rows; the others are fresh.
    onto_1k = transfer(
        [str(staged_dataset)], models=[source], head="match", epochs=1, overrides=CPU, data_dir=str(layout.root),
        return_state=True,
    )
    assert onto_1k.is_completed(), onto_1k.message
    (cell,) = onto_1k.result()["cells"]
    mv = c.get_model_version("efficientnet-b0-phi-9-imagenet", cell["version"])
    assert mv.tags[Tags.INIT_FROM] == source and mv.tags[Tags.INIT_HEAD] == "match: 2 of 4 classes from the source's rows"
    finetune, _ = transfer_recipes("finetune", None, 1, CPU)
    (pair,) = plan_transfer(
        resolve_sources(c, [source]), [resolve_target(layout.datasets, str(staged_dataset))], finetune, None, "match"
    )
    start = torch.load(init_weights_path(layout, pair.finetune, staged_dataset), weights_only=True)
    src_model, _ = load_registered_weights(c, c.get_model_version(*source.removeprefix("models:/").split("/")))
    src = src_model.state_dict()
    in21k, in1k = read_manifest(in21k_dataset).classes, read_manifest(staged_dataset).classes
    for t, wnid in enumerate(in1k):
        same = torch.equal(start[WEIGHT][t], src[WEIGHT][in21k.index(wnid)]) if wnid in in21k else False
        assert same == (wnid in in21k), wnid


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(models=["models:/no-such-model/1"]), "the registry has no version 1 of model 'no-such-model'"),
        (dict(models=["no-such-model"]), "the registry has no alias 'champion' of model 'no-such-model'"),
        (dict(family=[MEMBER]), "no champion yet for phi=-9"),
        (dict(models=["x"], datasets=["no-such-version"]), "dataset no-such-version: neither a directory nor a staged"),
        (dict(models=["x"], recipe="nope"), "recipe 'nope' not found"),
        (dict(), "no models to transfer"),
    ],
)
def test_bad_transfer_input_fails_in_one_line(kwargs, named, target_datasets, data_layout_tmp, prefect_server):
    args = {"datasets": [str(target_datasets[0])], "data_dir": str(data_layout_tmp.root), **kwargs}
    state = transfer(**args, return_state=True)
    assert state.is_failed() and named in state.message and "\n" not in state.message, state.message


def test_head_match_starts_from_the_rows_of_the_shared_class_ids(data_layout_tmp, tmp_path):
    """A source registered as training registers it (its classes recorded with it), a dataset whose classes it
    partly has: the job's starting weights have the source's rows for those, fresh ones for the rest."""
    c = tracking.client(data_layout_tmp.tracking_uri)
    spec = models.resolve_variant("efficientnet_b0", phi=-9)
    source_classes, target_classes = ["n01", "n02", "n03", "n04", "n05"], ("n04", "n77", "n01")
    torch.manual_seed(3)
    source = models.build_model(spec, len(source_classes))
    run = tracking.start_run(c, tracking.experiment_id(c, data_layout_tmp.artifact_root), "pretrained", {}, {})
    name, version, _ = tracking.register_best_checkpoint(
        data_layout_tmp.tracking_uri,
        run,
        spec.name,
        np.zeros((1, 3, 32, 32), np.float32),
        {"classes": source_classes},
        {},
        promote=True,
        weights={
            "state_dict": source.state_dict(),
            "model_args": {"name": "efficientnet_b0", "phi": -9, "num_classes": len(source_classes)},
        },
    )
    init = InitConfig.model_validate({"from": f"models:/{name}@champion", "head": "match"})
    dest = tmp_path / "init.pt"
    tags = write_init_weights(c, init, spec, target_classes, seed=0, dest=dest)
    assert tags == {
        Tags.INIT_FROM: f"models:/{name}/{version}",
        Tags.INIT_HEAD: "match: 2 of 3 classes from the source's rows",
    }
    state, src = torch.load(dest, weights_only=True), source.state_dict()
    for t, s in ((0, 3), (2, 0)):
        assert torch.equal(state[WEIGHT][t], src[WEIGHT][s]) and torch.equal(state[BIAS][t], src[BIAS][s])
    torch.manual_seed(0)  # the seed the job's new head is drawn with
    fresh = models.build_model(spec, len(target_classes)).state_dict()
    assert torch.equal(state[WEIGHT][1], fresh[WEIGHT][1]) and torch.equal(state[BIAS][1], fresh[BIAS][1])

    with pytest.raises(ValueError, match="^init.from .*head: match finds no class id shared"):
        write_init_weights(c, init, spec, ("airplane", "bird"), seed=0, dest=tmp_path / "other.pt")
