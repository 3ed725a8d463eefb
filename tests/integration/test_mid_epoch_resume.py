"""A job stopped mid-epoch resumes at the batch it had reached and ends with the weights of a job that was never
stopped (max abs difference <= 1e-6), in one MLflow run with one metric point per epoch: a Ray Train worker
SIGKILLed (Ray restarts the workers), or the driver itself (`effnet train` run again with the same arguments).

CPU, gloo, 2 Ray workers, each reading through 2 DataLoader worker processes; a checkpoint after every step, so
that a stop lands mid-epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.settings import DataLayout
from pipelines.training.job import run_training
from pipelines.training.recipe import Recipe, load_recipe
from pipelines.registry.tracking import EXPERIMENT, Tags
from pipelines.training.loop import CHECKPOINT_FILE

EPOCHS = 2
STOP_AT_BATCH = 3  # of the first epoch's 8: stopped once a checkpoint this far in is persisted


def _recipe() -> Recipe:
    return load_recipe("demo").with_overrides(
        schedule={"epochs": EPOCHS, "patience": None, "checkpoint_every_steps": 1},
        data={"batch_size": 2, "loader_workers": 2}, ray={"max_failures": 3},
    )


def _checkpoints(layout: DataLayout) -> list[dict[str, Any]]:
    """Every checkpoint persisted so far under the layout's Ray storage (one being written is passed over)."""
    found = []
    for path in layout.ray_storage.glob(f"*/checkpoint_*/{CHECKPOINT_FILE}"):
        try:
            found.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # noqa: BLE001 (still being copied in)
            continue
    return found


def _final_weights(layout: DataLayout) -> dict[str, torch.Tensor]:
    ends = [c for c in _checkpoints(layout) if c["loop"]["epoch"] == EPOCHS and c["loop"]["batch"] == 0]
    assert len(ends) == 1, f"{len(ends)} checkpoints of the last epoch's end"
    return {**{f"model.{k}": v for k, v in ends[0]["model"].items()},
            **{f"ema.{k}": v for k, v in ends[0]["ema"].items()}}


def _max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _stop_mid_epoch(layout: DataLayout, stop: Callable[[], None], done: threading.Event, stopped: list) -> None:
    """`stop()` once a checkpoint at batch STOP_AT_BATCH or later of the first epoch is persisted."""
    while not done.is_set():
        if any(c["loop"]["epoch"] == 0 and c["loop"]["batch"] >= STOP_AT_BATCH for c in _checkpoints(layout)):
            stop()
            stopped.append(time.time())
            return
        time.sleep(0.2)


def _train_loss(layout: DataLayout, run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(tracking_uri=layout.tracking_uri).get_metric_history(run_id, "train_loss")
    return sorted((m.step, m.value) for m in history)


def _runs(layout: DataLayout) -> list[Any]:
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    return c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])


@pytest.fixture(scope="module")
def uninterrupted(staged_dataset: Path, ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    layout = DataLayout(tmp_path_factory.mktemp("uninterrupted") / "data").ensure()
    result = run_training(_recipe(), staged_dataset, layout)
    return {"weights": _final_weights(layout), "train_loss": _train_loss(layout, result.run_id)}


def _assert_resumed_as_if_uninterrupted(layout: DataLayout, run_id: str, uninterrupted: dict) -> None:
    run = MlflowClient(tracking_uri=layout.tracking_uri).get_run(run_id)
    assert int(run.data.tags[Tags.RESUMED_AT_EPOCH]) == 0 and int(run.data.tags[Tags.RESUMED_AT_BATCH]) > 0, (
        "the job did not resume mid-epoch")
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in _runs(layout)] == [run_id]
    difference = _max_abs_difference(_final_weights(layout), uninterrupted["weights"])
    assert difference <= 1e-6, f"weights differ from the uninterrupted job's by up to {difference:.3g}"
    c = MlflowClient(tracking_uri=layout.tracking_uri)
    for metric in ("train_loss", "minival_top1", "lr"):  # one point per epoch: no gap, no duplicate
        steps = [m.step for m in c.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(EPOCHS)), f"{metric} history is not one point per epoch: {steps}"
    loss, expected = _train_loss(layout, run_id), uninterrupted["train_loss"]
    # The stopped epoch's loss counts every batch once, as the uninterrupted job's does.
    assert [value for _, value in loss] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_a_worker_killed_mid_epoch_resumes_at_its_batch(staged_dataset, data_layout_tmp, ray_cluster,
                                                        uninterrupted) -> None:
    from ray.util.state import list_actors

    def kill_a_worker() -> None:
        actors = list_actors(address=f"http://{ray_cluster.dashboard_url}",
                             filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(int(actors[-1]["pid"]), signal.SIGKILL)

    done, killed = threading.Event(), []
    killer = threading.Thread(target=_stop_mid_epoch, args=(data_layout_tmp, kill_a_worker, done, killed),
                              daemon=True)
    killer.start()
    try:
        result = run_training(_recipe(), staged_dataset, data_layout_tmp)
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "no worker was killed: the job finished before its mid-epoch checkpoint?"
    assert result.epochs_run == EPOCHS
    _assert_resumed_as_if_uninterrupted(data_layout_tmp, result.run_id, uninterrupted)


def test_a_driver_killed_mid_epoch_resumes_at_its_batch_when_run_again(
    staged_dataset, data_layout_tmp, ray_cluster, uninterrupted, tmp_path,
) -> None:
    recipe_file = tmp_path / "every-step.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe().model_dump(mode="json")))
    cmd = [sys.executable, "-m", "cli.effnet", "--data-dir", str(data_layout_tmp.root), "train",
           "--recipe", str(recipe_file), "--data", str(staged_dataset)]
    # The driver joins this session's Ray cluster, as a driver on a real cluster would.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        done, killed = threading.Event(), []
        _stop_mid_epoch_or_fail = threading.Thread(
            target=_stop_mid_epoch, args=(data_layout_tmp, lambda: first.send_signal(signal.SIGKILL), done, killed),
            daemon=True)
        _stop_mid_epoch_or_fail.start()
        try:
            first.wait(timeout=300)
        finally:
            done.set()
            first.kill()
    assert killed, "the driver ended before its mid-epoch checkpoint:\n" + (tmp_path / "first.log").read_text()[-3000:]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads(second.stdout[second.stdout.index("{"):])
    assert result["resumed"] is True and result["epochs_run"] == EPOCHS
    _assert_resumed_as_if_uninterrupted(data_layout_tmp, result["run_id"], uninterrupted)
