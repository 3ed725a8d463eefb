"""`train-family` checks everything before the first job: bad input and a cluster that cannot fit the recipe end
the run Failed at once, with one line naming the problem, no traceback in the run's log, no MLflow run started."""

from __future__ import annotations

import time

import pytest
from helpers import flow_run_logs
from mlflow.tracking import MlflowClient

from flows.train_family import train_family
from pipelines.registry.tracking import EXPERIMENT
from pipelines.training import cluster
from pipelines.training.job import run_training
from pipelines.training.recipe import load_recipe


def _runs(layout) -> list:
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id]) if exp else []


CASES = {
    "unknown variant at the end": (dict(variants=["phi=-9", "efficientnet_b99"], recipe="demo"), "efficientnet_b99"),
    "unknown recipe": (dict(variants=["phi=-9"], recipe="no-such-recipe"), "no-such-recipe"),
    "bad override": (dict(variants=["phi=-9"], recipe="demo", overrides={"schedule": {"epochs": 0}}),
                     "schedule.epochs (given 0)"),
    "bad phi": (dict(variants=["phi=fast"], recipe="demo"), "phi=fast"),
    "missing dataset": (dict(variants=["phi=-9"], recipe="demo", dataset_dir="/nonexistent/version"),
                        "/nonexistent/version"),
    # A batch the tiny dataset holds: v1's 256 x 8 workers is refused first, for the data.
    "unfit cluster": (dict(variants=["phi=-9"], recipe="v1",
                           overrides={"data": {"batch_size": 1, "loader_workers": 0}}), "missing: CPU, GPU"),
    "batch larger than the data": (dict(variants=["phi=-9"], recipe="demo", overrides={"data": {"batch_size": 4096}}),
                                   "give no full batch of 4096"),
    "unknown coefficient set": (dict(variants=["phi=-9,coefficients=nope"], recipe="demo"),
                                "no coefficient set 'nope'"),
    "member override for no member": (dict(variants=["phi=-9"], recipe="demo", member_overrides={"phi=-8": {}}),
                                      "member_overrides names phi=-8"),
    "bad member override": (dict(variants=["phi=-9"], recipe="demo",
                                 member_overrides={"phi=-9": {"data": {"batch_size": 0}}}), "data.batch_size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_family_input_fails_at_once_in_one_line(case, staged_dataset, data_layout_tmp, prefect_server,
                                                     ray_cluster):
    kwargs, named = CASES[case]
    kwargs = {"dataset_dir": str(staged_dataset), **kwargs, "data_dir": str(data_layout_tmp.root)}
    t0 = time.time()
    state = train_family(**kwargs, return_state=True)
    assert state.is_failed()
    assert named in state.message and "\n" not in state.message, state.message
    assert time.time() - t0 < 60
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert any(named in line for line in logs), logs
    assert not any("Traceback" in line for line in logs), logs
    assert _runs(data_layout_tmp) == []  # nothing trained, nothing half-started
    assert not (data_layout_tmp.ray_storage / "jobs").exists()


def test_run_training_refuses_an_unfit_recipe_before_starting(staged_dataset, data_layout_tmp, ray_cluster):
    recipe = load_recipe("demo").with_overrides(model={"phi": -9}, ray={"num_workers": 3},  # 3 x 1 CPU on 2
                                                data={"batch_size": 2})  # that the tiny dataset holds on 3
    with pytest.raises(cluster.ClusterError, match=r"3 workers x \{CPU: 1\}.*missing: CPU"):
        run_training(recipe, staged_dataset, data_layout_tmp)
    assert _runs(data_layout_tmp) == []


def test_a_damaged_dataset_fails_the_family_before_ray(copy_staged, data_layout_tmp, prefect_server):
    from pipelines.dataset import read_manifest

    shard = next(copy_staged / s["path"] for s in read_manifest(copy_staged).shards if s["split"] == "train")
    shard.unlink()
    state = train_family(["phi=-9"], recipe="demo", dataset_dir=str(copy_staged), data_dir=str(data_layout_tmp.root),
                         return_state=True)
    assert state.is_failed() and f"{shard.relative_to(copy_staged)} is missing" in state.message
    assert not any("Traceback" in line for line in flow_run_logs(state.state_details.flow_run_id))
    assert _runs(data_layout_tmp) == []
