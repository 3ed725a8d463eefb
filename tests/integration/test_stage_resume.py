"""Staging as users run it, in separate processes: killed with SIGKILL and rerun, rerun when finished, and
pointed at bad input through `effnet stage`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from pipelines.atomic import sha256_file, sidecar_path
from pipelines.dataset import LATEST, MANIFEST, read_manifest
from pipelines.source.demo import write_demo_imagenet
from pipelines.staging import stager
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

from helpers import BAD_INPUTS, STAGE_PARAMS, damaged_source, stage_directly

EFFNET = [sys.executable, "-m", "cli.effnet"]

# Stages argv[1] into argv[2] with two worker processes (whose exit with the killed parent is checked too).
# Shards are written a little slower than they would be, so that a kill lands among them reliably; the code
# version is pinned, so a commit made meanwhile does not change the manifest.
STAGE_SCRIPT = """
import sys, time
from pipelines.staging import stager
from pipelines.staging.params import StageParams
params = StageParams(tiers=(64, 128), shard_size=16, minival=0.1, seed=0)
write_shard = stager.write_shard
def slow_write_shard(*args):
    time.sleep(0.03)
    return write_shard(*args)
stager.write_shard = slow_write_shard
stager.code_version = lambda: "pinned"
stager.stage(sys.argv[1], sys.argv[2], params, log=print, workers=2, base_version=None, processes=True)
"""
RESUME_PARAMS = StageParams(tiers=(64, 128), shard_size=16, minival=0.1, seed=0)


@pytest.fixture(scope="module")
def bigger_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes x 60 train images of ~320x240 px: a few seconds to stage, long enough to be killed midway."""
    return write_demo_imagenet(tmp_path_factory.mktemp("bigger_demo"), num_classes=8, train_per_class=60,
                               val_per_class=5, seed=3, image_size=(320, 240)).out_dir


def _group_alive(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies waiting to be reaped do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        fields = rest.rsplit(") ", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(pid)
    return alive


def _kill_when(source: Path, out: Path, ready: Callable[[], bool], log: Path, timeout: float = 60) -> None:
    """Start staging in a new process group, SIGKILL its main process once `ready()`, and check that its
    worker processes exit too."""
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(source), str(out)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"staging ended (rc {proc.returncode}) before it could be killed: " \
                                        f"{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "staging never got there"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, f"worker processes outlived the killed stager: {_group_alive(proc.pid)}"
        time.sleep(0.1)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_killed_twice_then_rerun_gives_the_bytes_of_an_uninterrupted_run(
    bigger_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, log = tmp_path / "killed", tmp_path / "stage.log"
    # Killed while decoding (a unit's spool is finished, others are not)...
    _kill_when(bigger_demo, out, lambda: any(out.glob("work/*/units/*.tar")), log)
    assert not list(out.glob("*/manifest.json"))
    # ...then, rerun, killed while writing shards.
    _kill_when(bigger_demo, out, lambda: any(out.glob("imagenet-*/*/*.tar")), log)
    assert not list(out.glob("*/manifest.json"))
    assert not (out / LATEST).exists()
    done = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(bigger_demo), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial files left by an interrupted run" in done.stdout or not list(out.rglob("*.tmp"))

    # The same source staged in one go, in this process, by one worker.
    monkeypatch.setattr(stager, "code_version", lambda: "pinned")
    clean = tmp_path / "clean"
    dest = stage(bigger_demo, clean, RESUME_PARAMS, log=lambda *_: None, workers=1, base_version=None)

    killed, uninterrupted = _files(out), _files(clean)
    assert (out / dest.name / MANIFEST).read_bytes() == (dest / MANIFEST).read_bytes()
    assert sorted(killed) == sorted(uninterrupted)  # spools, shards, sidecars, keys, manifest, LATEST
    assert [name for name in killed if killed[name] != uninterrupted[name]] == []
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    shards = [p for p in (out / dest.name).rglob("*.tar")]
    assert len(shards) == len(read_manifest(dest).shards)
    for shard in shards:
        sidecar = sidecar_path(shard)
        assert sidecar.exists(), f"{shard} has no checksum sidecar"
        assert sidecar.read_text().strip() == sha256_file(shard)


def test_rerunning_a_finished_stage_from_the_cli_is_a_quick_no_op(demo_archives: Path, tmp_path: Path) -> None:
    out = tmp_path / "datasets"
    dest = stage_directly(demo_archives, out, STAGE_PARAMS)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LATEST}
    t0 = time.monotonic()
    run = subprocess.run(
        [*EFFNET, "--data-dir", str(tmp_path / "data"), "stage", "--source", str(demo_archives), "--out", str(out),
         "--tiers", "32", "64", "--shard-size", "8", "--minival", "0.25", "--max-bad-fraction", "0.05"],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(dest)
    assert f"already staged: {dest.name}" in run.stderr
    assert "Starting temporary server" not in run.stderr  # no Prefect started for nothing
    assert elapsed < 20, f"a finished stage took {elapsed:.1f} s to confirm"
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_cli_bad_input_is_one_line_and_a_non_zero_exit(demo_archives: Path, tmp_path: Path, kind: str) -> None:
    source, name = damaged_source(demo_archives, tmp_path, kind)
    out = tmp_path / "out"
    run = subprocess.run(
        [*EFFNET, "--data-dir", str(tmp_path / "data"), "stage", "--source", str(source), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    (line,) = [ln for ln in run.stderr.splitlines() if "error" in ln.lower()]
    assert line.startswith("effnet stage: error: ") and name in line, run.stderr
    assert not out.exists()
