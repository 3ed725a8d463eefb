"""What a failed staging run leaves (spools under work/<inputs>/, a version folder with some shards) is reused by
the next run with the same inputs or removed by the next run of the source that cannot reuse it; never left in a
folder no run reads."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipelines.dataset import MANIFEST
from pipelines.source.demo import extract_to_tree
from pipelines.staging import runners, spools, stager
from pipelines.staging.params import ENCODING, FINGERPRINTS, WORK, WORK_META, StageParams, StagingError
from pipelines.staging.shards import write_shard
from pipelines.staging.stager import _exclusive, stage

from helpers import STAGE_PARAMS, stage_directly, work_of

# The demo's truncated JPEG is 1 bad file in 64: refused by the plan, after every unit was spooled, the way a
# run fails hours in on ImageNet.
FAILING = dataclasses.replace(STAGE_PARAMS, max_bad_fraction=0.0)


def _work_folders(root: Path) -> set[str]:
    return {p.name for p in (root / WORK).iterdir() if p.is_dir() and p.name != FINGERPRINTS}


def _failed_run(source: Path, root: Path, params: StageParams = FAILING) -> Path:
    """Stage until the plan refuses; returns the work folder the run left."""
    before = _work_folders(root) if (root / WORK).is_dir() else set()
    with pytest.raises(StagingError, match="1 of 64 images do not decode"):
        stage_directly(source, root, params)
    (left,) = _work_folders(root) - before
    assert list((root / WORK / left / "units").glob("*.tar"))  # spools: hours of work on ImageNet
    return root / WORK / left


def _logs(source: Path, root: Path, params: StageParams) -> tuple[Path, list[str]]:
    logs: list[str] = []
    return stage(source, root, params, log=logs.append), logs


def test_the_next_run_with_the_same_encoding_reuses_a_failed_runs_spools(
    demo_archives: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "datasets"
    left = _failed_run(demo_archives, root)
    meta = json.loads((left / WORK_META).read_text())
    assert meta["source"] == str(demo_archives.resolve()) and len(meta["versions"]) == 1

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a spooled unit was decoded again")

    monkeypatch.setattr(spools, "encode_tiers", no_decoding)
    dest = stage_directly(demo_archives, root, STAGE_PARAMS)  # the limit raised: same tiers and quality
    assert work_of(dest, STAGE_PARAMS) == left and _work_folders(root) == {left.name}
    assert sorted(json.loads((left / WORK_META).read_text())["versions"]) == sorted(
        [meta["versions"][0], dest.name])


def test_the_next_run_of_the_source_with_other_inputs_removes_a_failed_runs_spools(
    demo_archives: Path, tmp_path: Path
) -> None:
    root = tmp_path / "datasets"
    left = _failed_run(demo_archives, root)
    other = dataclasses.replace(STAGE_PARAMS, tiers=(48,))  # another work folder: `left` would never be read
    dest, logs = _logs(demo_archives, root, other)
    assert not left.exists()
    assert _work_folders(root) == {work_of(dest, other).name}
    assert any("no run will reuse" in line and left.name in line for line in logs)


def test_a_failed_run_whose_source_changed_since_is_removed(demo_archives: Path, tmp_path: Path) -> None:
    tree = extract_to_tree(demo_archives, tmp_path / "tree", "tree")
    root = tmp_path / "datasets"
    left = _failed_run(tree, root)
    victim = sorted((tree / "train").glob("*/*.JPEG"))[5]
    victim.unlink()  # a new fingerprint: same path, other content
    dest = stage_directly(tree, root, STAGE_PARAMS)
    assert not left.exists() and _work_folders(root) == {work_of(dest, STAGE_PARAMS).name}


def test_a_finished_versions_spools_and_another_sources_failed_run_are_kept(
    demo_archives: Path, tmp_path: Path
) -> None:
    root = tmp_path / "datasets"
    finished = stage_directly(demo_archives, root, STAGE_PARAMS)
    kept = work_of(finished, STAGE_PARAMS)  # spools of a finished version: a rerun with another minival reuses them
    other_source = extract_to_tree(demo_archives, tmp_path / "tree", "tree")
    theirs = _failed_run(other_source, root)  # another source's failed run: its own rerun reuses it
    again = stage_directly(demo_archives, root, dataclasses.replace(STAGE_PARAMS, tiers=(48,)))
    assert kept.is_dir() and theirs.is_dir() and (finished / MANIFEST).is_file()
    assert _work_folders(root) == {kept.name, theirs.name, work_of(again, dataclasses.replace(STAGE_PARAMS,
                                                                                              tiers=(48,))).name}


def test_a_work_folder_in_use_by_another_run_is_left_alone(demo_archives: Path, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    left = _failed_run(demo_archives, root)
    with _exclusive(left):  # another run holds it
        stage_directly(demo_archives, root, dataclasses.replace(STAGE_PARAMS, tiers=(48,)))
    assert left.is_dir()


def test_an_unfinished_version_of_another_shard_size_is_removed(
    demo_archives: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "datasets"
    real = write_shard
    written: list[str] = []

    def killed_after_two(*args: object) -> dict:
        if len(written) == 2:
            raise KeyboardInterrupt  # the run dies among its shards
        written.append("x")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(stager, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        stage_directly(demo_archives, root, STAGE_PARAMS)
    monkeypatch.setattr(stager, "write_shard", real)
    (partial,) = [p for p in root.iterdir() if p.name.startswith("imagenet-")]
    assert list(partial.rglob("*.tar")) and not (partial / MANIFEST).exists()
    bigger = dataclasses.replace(STAGE_PARAMS, shard_size=16)  # another version from the same spools
    dest = stage_directly(demo_archives, root, bigger)
    assert not partial.exists() and [p.name for p in root.iterdir() if p.name.startswith("imagenet-")] == [dest.name]


def test_spools_of_another_encoding_are_removed_whoever_left_them(demo_archives: Path, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    finished = stage_directly(demo_archives, root, STAGE_PARAMS)
    work = work_of(finished, STAGE_PARAMS)
    # Older code's folders: one noted (another source, finished), one from before work folders were noted.
    noted, bare = root / WORK / "0123456789ab", root / WORK / "ba9876543210"
    shutil.copytree(work, noted)
    meta = json.loads((noted / WORK_META).read_text())
    meta["source"], meta["inputs"]["unit"]["encoding"] = "/elsewhere", ENCODING - 1
    (noted / WORK_META).write_text(json.dumps(meta))
    shutil.copytree(work, bare)
    (bare / WORK_META).unlink()
    for index in (bare / "units").glob("*.json"):
        unit = json.loads(index.read_text())
        unit["params"]["encoding"] = ENCODING - 1
        index.write_text(json.dumps(unit))
    dest = stage_directly(demo_archives, root, dataclasses.replace(STAGE_PARAMS, shard_size=16))
    assert not noted.exists() and not bare.exists()
    assert work.is_dir() and work_of(dest, STAGE_PARAMS) == work


def test_a_run_that_fails_before_any_unit_leaves_no_work_folder(demo_archives: Path, tmp_path: Path) -> None:
    root = tmp_path / "datasets"

    def fail(*args: object) -> None:
        raise StagingError("stop")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "process_unit", fail)
        with pytest.raises(StagingError, match="stop"):
            stage_directly(demo_archives, root, STAGE_PARAMS)
    assert not root.exists()
