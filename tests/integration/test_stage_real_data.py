"""The real Fashion-MNIST (Debian's dataset-fashion-mnist: 60,000 + 10,000 photos of Zalando's articles in idx
files) staged by `effnet stage` as a user runs it: read through the idx kind, named after the dataset, its ten
class names and its own split in the manifest, 6,000 train and 1,000 test images in every class."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dataset import read_manifest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is not installed (make setup installs it as root)",
)


def test_effnet_stage_reads_the_real_fashion_mnist(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "ph")}
    run = subprocess.run(
        [sys.executable, "-m", "cli.effnet", "--data-dir", str(tmp_path / "data"), "stage", "--source",
         str(FASHION_MNIST), "--out", str(tmp_path / "datasets"), "--tiers", "32", "--minival", "0.05"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    dest = Path(run.stdout.strip().splitlines()[-1])
    manifest = read_manifest(dest)
    assert dest.name.startswith("fashion-mnist-")
    assert manifest.source["kind"] == "idx" and manifest.source["dataset"] == "fashion-mnist"
    assert manifest.source["class_names"][0] == "T-shirt/top" and manifest.source["class_names"][9] == "Ankle boot"
    assert manifest.source["splits"] == {"train": ["train"], "val": ["t10k"]}
    assert manifest.classes == tuple(str(i) for i in range(10))
    train, minival = manifest.splits["train"].per_class, manifest.splits["minival"].per_class
    assert {c: train[c] + minival[c] for c in manifest.classes} == {c: 6000 for c in manifest.classes}
    assert minival == {c: 300 for c in manifest.classes}
    assert manifest.splits["val"].per_class == {c: 1000 for c in manifest.classes}
    assert manifest.bad_files == ()
