"""The output folder: a file, a path under a file, a folder that cannot be written, or a folder inside the source
is one line (a StagingError) before any unit runs and before anything is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipelines.dataset import MANIFEST, read_manifest
from pipelines.source.demo import extract_to_tree
from pipelines.staging import runners
from pipelines.staging.params import StagingError
from pipelines.staging.stager import find_finished

from helpers import STAGE_PARAMS, stage_directly


@pytest.fixture(scope="module")
def tree(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_to_tree(demo_archives, tmp_path_factory.mktemp("out") / "tree", "tree", devkit="folder")


@pytest.fixture
def no_units(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("a unit ran before the output folder was checked")

    monkeypatch.setattr(runners, "process_unit", refuse)


def _one_line_error(source: Path, out: Path) -> str:
    with pytest.raises(StagingError) as info:
        stage_directly(source, out, STAGE_PARAMS)
    assert "\n" not in str(info.value)
    with pytest.raises(StagingError) as again:  # the CLI's check before it starts the flow says the same
        find_finished(source, out, STAGE_PARAMS)
    assert str(again.value) == str(info.value)
    return str(info.value)


@pytest.mark.usefixtures("no_units")
def test_out_naming_a_file(demo_archives: Path, tmp_path: Path) -> None:
    out = tmp_path / "datasets.tar"
    out.write_bytes(b"not a folder")
    assert _one_line_error(demo_archives, out) == f"{out}: the output folder is a file"
    assert out.read_bytes() == b"not a folder"


@pytest.mark.usefixtures("no_units")
def test_out_under_a_file(demo_archives: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    out = tmp_path / "file" / "datasets"
    expected = f"{out}: the output folder cannot be made: {tmp_path / 'file'} is a file"
    assert _one_line_error(demo_archives, out) == expected


@pytest.mark.usefixtures("no_units")
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits (see the /sys test)")
def test_out_in_a_read_only_folder(demo_archives: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "the output folder is not writable" in _one_line_error(demo_archives, locked / "datasets")
    finally:
        locked.chmod(0o755)
    assert not (locked / "datasets").exists()


@pytest.mark.usefixtures("no_units")
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_out_where_no_folder_can_be_made(demo_archives: Path, tmp_path: Path) -> None:
    # As root, permission bits do not stop a write (the tests run as root here), and a read-only bind needs mount
    # rights; sysfs refuses new folders to everyone, root included, and access(2) cannot tell in advance: this is
    # the case that fails at the first mkdir, still before any unit and in one line.
    out = Path("/sys/kernel/effnet-datasets")
    with pytest.raises(StagingError) as info:
        stage_directly(demo_archives, out, STAGE_PARAMS)
    assert str(info.value).startswith(f"{out}: cannot create the output folder: ") and "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.usefixtures("no_units")
@pytest.mark.parametrize("inside", ["train", "train/n_datasets", "val", "ILSVRC2012_devkit_t12/data"])
def test_out_inside_a_folder_the_source_lists(tree: Path, tmp_path: Path, inside: str) -> None:
    source = Path(shutil.copytree(tree, tmp_path / "tree"))
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    message = _one_line_error(source, source / inside / "datasets")
    folder = source / inside.split("/")[0]
    assert message == (f"{source / inside / 'datasets'}: the output folder is inside the source's {folder}, where "
                       f"the next run would read it as part of the source; choose a folder outside it")
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before


def test_out_beside_the_source_folders_is_fine(tree: Path, tmp_path: Path) -> None:
    # The root of a tree holds train/, val/ and the devkit; a datasets folder next to them breaks nothing.
    source = Path(shutil.copytree(tree, tmp_path / "tree"))
    dest = stage_directly(source, source / "datasets", STAGE_PARAMS)
    assert (dest / MANIFEST).is_file()
    assert read_manifest(dest).source["kind"] == "tree"
    assert stage_directly(source, source / "datasets", STAGE_PARAMS) == dest  # the source is unchanged
