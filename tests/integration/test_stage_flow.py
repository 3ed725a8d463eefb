"""The `stage-imagenet` Prefect flow on a real (temporary) Prefect server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.stage_imagenet import stage_imagenet
from pipelines.staging import latest_version

pytestmark = pytest.mark.integration


def test_stage_flow_writes_a_version_and_reuses_it(demo_archives, tmp_path, prefect_server):
    out = tmp_path / "datasets"
    dest = Path(stage_imagenet(str(demo_archives), str(out), tiers=[32, 64], shard_size=8, minival=0.25,
                                max_bad_fraction=0.05))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert latest_version(out) == dest
    assert manifest["splits"]["minival"]["samples"] > 0
    assert len(manifest["bad_files"]) == 1 and manifest["bad_files"][0]["source"].endswith(".JPEG")
    for shard in manifest["shards"]:
        assert (dest / shard["path"]).stat().st_size == shard["bytes"]

    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*.tar")}
    t0 = time.time()
    again = Path(stage_imagenet(str(demo_archives), str(out), tiers=[32, 64], shard_size=8, minival=0.25,
                                max_bad_fraction=0.05))
    assert again == dest
    assert time.time() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.tar")} == mtimes  # nothing rewritten


def test_stage_flow_bad_source_is_a_clear_error(tmp_path, prefect_server):
    from pipelines.imagenet import ImageNetSourceError

    with pytest.raises(ImageNetSourceError, match="nowhere"):
        stage_imagenet(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
