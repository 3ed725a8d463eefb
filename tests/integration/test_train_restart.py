"""`effnet train` killed mid-job and run again with the same arguments: it resumes the same Ray run and the same
MLflow run, and ends with the full epoch count and one metric point per epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from mlflow.tracking import MlflowClient

from pipelines.training.recipe import load_recipe

EPOCHS = 6


def _logged_epochs(tracking_uri: str) -> int:
    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name("efficientnet-family")
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return max((len(c.get_metric_history(r.info.run_id, "minival_top1")) for r in runs), default=0)


def test_killed_driver_resumes_on_rerun(staged_dataset, data_layout_tmp, ray_cluster, tmp_path):
    recipe = load_recipe("demo").with_overrides(schedule={"epochs": EPOCHS, "patience": None})
    recipe_file = tmp_path / "no-early-stop.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "flows.cli", "--data-dir", str(data_layout_tmp.root), "train",
           "--variant", "phi=-9", "--recipe", str(recipe_file), "--data", str(staged_dataset)]
    # The driver joins this session's Ray cluster, as a driver on a real cluster would.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while _logged_epochs(data_layout_tmp.tracking_uri) < 2:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the job logged no epochs in time"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads(second.stdout[second.stdout.index("{"):])
    assert result["resumed"] is True and result["epochs_run"] == EPOCHS

    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)
    exp = c.get_experiment_by_name("efficientnet-family")
    assert [r.info.run_id for r in c.search_runs([exp.experiment_id])] == [result["run_id"]]
    steps = sorted(m.step for m in c.get_metric_history(result["run_id"], "train_loss"))
    assert steps == list(range(EPOCHS))
    assert c.get_run(result["run_id"]).info.status == "FINISHED"
