"""The `stage-imagenet` Prefect flow on a real (temporary) Prefect server."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema

from flows.stage_imagenet import stage_imagenet, stage_params
from pipelines.dataset import latest_version, read_manifest
from pipelines.source.demo import extract_to_tree
from pipelines.staging.params import StageParams

from helpers import add_images


def test_the_flow_shows_the_defaults_a_run_gets() -> None:
    # Prefect renders a flow's parameters (the UI's form, a deployment's defaults) from its signature.
    shown = {name: prop.get("default") for name, prop in parameter_schema(stage_imagenet).properties.items()}
    fields = {f.name for f in dataclasses.fields(StageParams)} & set(shown)
    assert fields >= {"tiers", "shard_size", "minival", "seed", "jpeg_quality", "max_bad_fraction", "formats"}
    assert stage_params(**{name: shown[name] for name in fields}) == StageParams()


def test_stage_flow_writes_a_version_and_reuses_it(demo_archives, tmp_path, prefect_server):
    out = tmp_path / "datasets"
    dest = Path(stage_imagenet(str(demo_archives), str(out), tiers=[32, 64], shard_size=8, minival=0.25,
                                max_bad_fraction=0.05))
    manifest = read_manifest(dest)
    assert latest_version(out) == dest
    assert manifest.splits["minival"].samples > 0
    assert len(manifest.bad_files) == 1 and manifest.bad_files[0]["source"].endswith(".JPEG")
    for shard in manifest.shards:
        assert (dest / shard["path"]).stat().st_size == shard["bytes"]

    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*.tar")}
    t0 = time.time()
    again = Path(stage_imagenet(str(demo_archives), str(out), tiers=[32, 64], shard_size=8, minival=0.25,
                                max_bad_fraction=0.05))
    assert again == dest
    assert time.time() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.tar")} == mtimes  # nothing rewritten


def test_stage_flow_bad_source_is_a_clear_error(tmp_path, prefect_server):
    from pipelines.source.imagenet import ImageNetSourceError

    with pytest.raises(ImageNetSourceError, match="nowhere"):
        stage_imagenet(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an `effnet` subprocess that reports to this session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "ph")}


def _effnet_stage(tmp_path: Path, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.effnet", "--data-dir", str(tmp_path / "data"), "stage", "--source",
         str(source), "--out", str(out), "--tiers", "32", "64", "--shard-size", "8", "--minival", "0.25",
         "--max-bad-fraction", "0.05", *extra],
        capture_output=True, text=True, timeout=300, env=_cli_env(tmp_path),
    )


def test_cli_runs_the_flow_with_a_progress_bar(demo_archives, tmp_path, prefect_server):
    out = tmp_path / "datasets"
    run = _effnet_stage(tmp_path, demo_archives, out, "--progress")
    assert run.returncode == 0, run.stderr[-3000:]
    dest = Path(run.stdout.strip().splitlines()[-1])
    assert latest_version(out) == dest and (dest / "manifest.json").exists()
    manifest = read_manifest(dest)
    bars = run.stderr.replace("\r", "\n")
    assert "staging units: 100%" in bars
    assert f"staging shards: 100%|██████████| {len(manifest.shards)}/{len(manifest.shards)}" in bars
    assert "Task run" not in run.stderr  # the bar replaces per-task lines on the terminal


def test_cli_corrupt_class_tar_fails_the_flow_in_one_line(demo_archives, tmp_path, prefect_server):
    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    train = source / "ILSVRC2012_img_train.tar"
    with tarfile.open(train, "r:") as tar:
        victim = [m for m in tar if m.isfile()][1]
    data = bytearray(train.read_bytes())
    data[victim.offset_data : victim.offset_data + 512] = b"\xff" * 512  # the class tar's first header
    train.write_bytes(bytes(data))
    out = tmp_path / "datasets"
    run = _effnet_stage(tmp_path, source, out)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"effnet stage: error: {victim.name} in {train}: corrupt")
    assert not (out / "LATEST").exists() and not list(out.rglob("manifest.json"))


def test_stage_flow_stages_a_grown_source_on_top_of_the_last_version(demo_archives, demo_summary, tmp_path,
                                                                     prefect_server):
    tree = extract_to_tree(demo_archives, tmp_path / "tree", "tree")
    out = tmp_path / "datasets"
    kwargs = dict(tiers=[32, 64], shard_size=8, minival=0.25, max_bad_fraction=0.05)
    first = Path(stage_imagenet(str(tree), str(out), **kwargs))
    new = add_images(tree, demo_summary.wnids, {demo_summary.wnids[1]: 4})
    second = Path(stage_imagenet(str(tree), str(out), **kwargs))
    manifest = read_manifest(second)
    assert manifest.base_version == first.name and latest_version(out) == second
    old = read_manifest(first)
    assert set(old.minival_keys) <= set(manifest.minival_keys)
    staged = sum(manifest.splits[s].samples for s in ("train", "minival"))
    assert staged == sum(old.splits[s].samples for s in ("train", "minival")) + len(new)
