"""A Ray worker killed mid-training: the job restarts from its latest checkpoint and ends with the full
epoch count and one continuous metric history in the same MLflow run."""

from __future__ import annotations

import os
import signal
import threading
import time

from mlflow.tracking import MlflowClient

from pipelines.training.job import run_training
from pipelines.training.recipe import load_recipe

EPOCHS = 6


def _epochs_logged(tracking_uri: str) -> int:
    """Epochs whose metrics reached MLflow: each only after its checkpoint was persisted."""
    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name("efficientnet-family")
    if exp is None:
        return 0
    runs = c.search_runs([exp.experiment_id])
    return max((len(c.get_metric_history(r.info.run_id, "minival_top1")) for r in runs), default=0)


def _kill_a_worker_mid_job(tracking_uri: str, state_api: str, killed: list[int], stop: threading.Event) -> None:
    from ray.util.state import list_actors

    while not stop.is_set():
        if _epochs_logged(tracking_uri) >= 2:
            actors = list_actors(address=state_api,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if actors:
                pid = int(actors[-1]["pid"])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.5)


def test_killed_worker_resumes_same_run(staged_dataset, data_layout_tmp, ray_cluster):
    recipe = load_recipe("demo").with_overrides(
        schedule={"epochs": EPOCHS, "patience": None}, data={"batch_size": 4}, ray={"max_failures": 3},
    )
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_a_worker_mid_job,
        args=(data_layout_tmp.tracking_uri, f"http://{ray_cluster.dashboard_url}", killed, stop), daemon=True,
    )
    killer.start()
    try:
        result = run_training(recipe, staged_dataset, data_layout_tmp)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "no worker was killed: the job finished before its first checkpoint?"

    assert result.epochs_run == EPOCHS
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)
    run = c.get_run(result.run_id)
    assert "resumed_at_epoch" in run.data.tags, "the job did not restart from a checkpoint"
    resumed_at = int(run.data.tags["resumed_at_epoch"])
    assert 1 <= resumed_at < EPOCHS  # Ray registers a reported checkpoint asynchronously: maybe not the newest
    for metric in ("train_loss", "minival_top1", "lr"):
        steps = [m.step for m in c.get_metric_history(result.run_id, metric)]
        assert sorted(steps) == list(range(EPOCHS)), f"{metric} history is not one point per epoch: {steps}"
    experiment = c.get_experiment_by_name("efficientnet-family")
    assert len(c.search_runs([experiment.experiment_id])) == 1
