"""Bad input through the `stage-imagenet` flow (a real Prefect test server) and `effnet stage`: one line, a
non-zero exit or a Failed run with the message, before any work where it can be seen; `workers` units at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stage_imagenet import stage_imagenet
from pipelines.dataset import LATEST, MANIFEST
from pipelines.source.demo import extract_to_tree
from pipelines.source.imagenet import ImageNetSourceError
from pipelines.staging import runners
from pipelines.staging.params import StagingError
from pipelines.staging.spools import process_unit

from helpers import ConcurrencyProbe, damage_class_tar

KNOBS = dict(tiers=[32, 64], shard_size=8, minival=0.25, max_bad_fraction=0.05)


@pytest.fixture(scope="module")
def tree(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_to_tree(demo_archives, tmp_path_factory.mktemp("flow_input") / "tree", "tree")


@pytest.mark.parametrize("workers", [1, 2])
def test_flow_decodes_workers_units_at_once(
    tree: Path, tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    probe = ConcurrencyProbe(process_unit, pause=0.2)
    monkeypatch.setattr(runners, "process_unit", probe)
    dest = Path(stage_imagenet(str(tree), str(tmp_path / "datasets"), **{**KNOBS, "minival": 0.25},
                               workers=workers))
    assert (dest / MANIFEST).is_file()
    assert len(probe.starts) == 5 and probe.most == workers  # 4 classes + 1 val chunk


def test_flow_corrupt_class_tar_mid_run_ends_the_run_at_once(
    demo_archives: Path, tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Path(shutil.copytree(demo_archives, tmp_path / "archives"))
    train = source / "ILSVRC2012_img_train.tar"
    victim = damage_class_tar(train, 0, member=4)  # inside the class tar: found when its unit reads it
    probe = ConcurrencyProbe(process_unit)
    monkeypatch.setattr(runners, "process_unit", probe)
    state = stage_imagenet(str(source), str(tmp_path / "datasets"), **KNOBS, workers=1, return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"{victim.name} in {train}: corrupt or truncated class tar: bad member header")
    assert probe.failed_at is not None and probe.started_after_failure() == 0
    with pytest.raises(ImageNetSourceError, match=f"{victim.name} in"):
        state.result()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(out="FILE"), StagingError, "the output folder is a file"),
        (dict(out="SOURCE/train/datasets"), StagingError, "the output folder is inside the source's"),
        (dict(minival=1.5), ValueError, "minival 1.5 is neither a fraction < 1 nor a whole number"),
        (dict(minival=44), StagingError, "minival 44 leaves 4 of 4 classes with fewer than"),
        (dict(workers=0), ValueError, "workers must be a whole number in 1..512, got 0"),
        (dict(tiers=[]), ValueError, "tiers must be a non-empty list"),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_flow_bad_input_is_a_failed_run_with_the_message_before_any_unit(
    tree: Path, tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch, change: dict, error: type,
    match: str,
) -> None:
    source = Path(shutil.copytree(tree, tmp_path / "tree"))
    (tmp_path / "FILE").write_bytes(b"")
    probe = ConcurrencyProbe(process_unit)
    monkeypatch.setattr(runners, "process_unit", probe)
    kwargs = {**KNOBS, **change}
    out = str(kwargs.pop("out", "datasets")).replace("SOURCE", str(source))
    state = stage_imagenet(str(source), str(tmp_path / out), **kwargs, return_state=True)
    assert state.is_failed() and match in state.message and "\n" not in state.message
    with pytest.raises(error, match=match):
        state.result()
    assert probe.starts == []


# --------------------------------------------------------------------------------------------- the CLI


def _effnet_stage(tmp_path: Path, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "ph")}
    return subprocess.run(
        [sys.executable, "-m", "cli.effnet", "--data-dir", str(tmp_path / "data"), "stage", "--source",
         str(source), "--out", str(out), "--tiers", "32", "64", "--shard-size", "8", "--minival", "0.25",
         "--max-bad-fraction", "0.05", *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )


def _one_error_line(run: subprocess.CompletedProcess[str], before_prefect: bool = True) -> str:
    """The error of a failed `effnet stage`: its last line, and (`before_prefect`) the only thing it printed."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "usage:" not in run.stderr, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    if before_prefect:
        assert len(lines) == 1 and "Starting temporary server" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith("effnet stage: error: "), run.stderr[-3000:]
    return lines[-1].removeprefix("effnet stage: error: ")


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--minival", "1.5"], "minival 1.5 is neither a fraction < 1 nor a whole number of images"),
        (["--minival", "inf"], "minival must be a number of images"),
        (["--minival", "nan"], "minival must be a number of images"),
        (["--minival", "-3"], "minival must be a number of images"),
        (["--minival", "44"], "minival 44 leaves 4 of 4 classes with fewer than 5 train images"),
        (["--minival", "44", "--min-train-per-class", "0.5"], "--min-train-per-class must be a whole number"),
        (["--minival", "1000", "--allow-small-train"], "minival 1000 is more than the 48 train images"),
        (["--workers", "0"], "workers must be a whole number in 1..512, got 0"),
        (["--workers", "1.5"], "workers must be a whole number in 1..512, got 1.5"),
        (["--shard-size", "inf"], "shard_size must be a whole number >= 1, got inf"),
        (["--shard-size", "0"], "shard_size must be a whole number >= 1, got 0"),
        (["--tiers", "nan"], "tiers must be a whole number >= 16, got nan"),
        (["--jpeg-quality", "0"], "jpeg_quality must be a whole number in 1..100, got 0"),
        (["--max-bad-fraction", "nan"], "max_bad_fraction must be a number in [0, 1], got nan"),
        (["--seed", "-1"], "seed must be a whole number >= 0, got -1"),
    ],
)
def test_cli_bad_numbers_are_one_line_before_any_work(tree: Path, tmp_path: Path, extra: list[str], says: str) -> None:
    out = tmp_path / "datasets"
    message = _one_error_line(_effnet_stage(tmp_path, tree, out, *extra))
    assert message.startswith(says), message
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under a file", "inside train", "under /sys"])
def test_cli_bad_out_is_one_line_before_any_work(tree: Path, tmp_path: Path, prefect_server: None,
                                                 where: str) -> None:
    source = Path(shutil.copytree(tree, tmp_path / "tree"))
    (tmp_path / "file").write_bytes(b"")
    if where == "under /sys" and not Path("/sys/kernel").is_dir():
        pytest.skip("needs Linux sysfs")
    out = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "datasets",
           "inside train": source / "train" / "datasets", "under /sys": Path("/sys/kernel/effnet-datasets")}[where]
    # The first three are seen by `check_out` before Prefect starts; sysfs only refuses at the first mkdir, in
    # the flow, whose failure the CLI reports in the same one line.
    message = _one_error_line(_effnet_stage(tmp_path, source, out), before_prefect=where != "under /sys")
    assert message.startswith(f"{out}: "), message
    assert not list(tmp_path.rglob("units"))


def test_cli_corrupt_class_tar_mid_run_is_one_line(demo_archives: Path, tmp_path: Path, prefect_server: None) -> None:
    source = Path(shutil.copytree(demo_archives, tmp_path / "archives"))
    train = source / "ILSVRC2012_img_train.tar"
    victim = damage_class_tar(train, 2, member=5)
    out = tmp_path / "datasets"
    message = _one_error_line(_effnet_stage(tmp_path, source, out, "--workers", "1"), before_prefect=False)
    assert message.startswith(f"{victim.name} in {train}: corrupt or truncated class tar: bad member header")
    assert not (out / LATEST).exists() and not list(out.rglob(MANIFEST))
