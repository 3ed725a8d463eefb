"""A killed `effnet` command leaves no process of its own behind: its temporary Prefect server, its local Ray
instance (GCS, raylet, agents, workers) all go within 10 s of a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from mlflow.tracking import MlflowClient

from pipelines.registry.tracking import EXPERIMENT
from pipelines.source.demo import write_demo_imagenet
from pipelines.training.recipe import load_recipe


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_"))}
    return {**env, "EFFNET_DATA_DIR": str(root)}


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _kill_and_check_nothing_left(proc: subprocess.Popen, tree: list[psutil.Process]) -> None:
    assert len(tree) >= 2, tree  # the command had started its own servers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, left = psutil.wait_procs(tree, timeout=10)
    left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"alive 10 s after the SIGKILL: {[(p.pid, p.name()) for p in left]}"


def test_a_killed_training_leaves_no_ray_process(staged_dataset, data_layout_tmp, tmp_path):
    recipe = load_recipe("demo").with_overrides(schedule={"epochs": 500, "patience": None})
    recipe_file = tmp_path / "long.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.effnet", "train", "--variant", "phi=-9", "--recipe", str(recipe_file),
         "--data", str(staged_dataset)],
        env=_env(data_layout_tmp.root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = MlflowClient(tracking_uri=data_layout_tmp.tracking_uri)
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        exp = c.get_experiment_by_name(EXPERIMENT)
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs and c.get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        time.sleep(1)
    _kill_and_check_nothing_left(proc, _tree(proc.pid))


def test_a_killed_staging_leaves_no_prefect_server(tmp_path):
    archives = write_demo_imagenet(tmp_path / "archives", num_classes=20, train_per_class=60, val_per_class=5,
                                   seed=3).out_dir
    root = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.effnet", "stage", "--source", str(archives), "--out", str(root / "datasets"),
         "--tiers", "64", "--minival", "0.1", "--max-bad-fraction", "0.1", "--workers", "1", "--no-progress"],
        env=_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    tree: list[psutil.Process] = []
    while not any("prefect" in " ".join(p.cmdline()) or "uvicorn" in " ".join(p.cmdline()) for p in tree):
        assert proc.poll() is None and time.time() < deadline, "no temporary Prefect server seen"
        time.sleep(0.5)
        try:
            tree = _tree(proc.pid)
        except psutil.NoSuchProcess:
            tree = []
    time.sleep(2)  # staging under way
    _kill_and_check_nothing_left(proc, _tree(proc.pid))
