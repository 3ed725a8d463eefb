"""Files written whole or not at all, and the checksum sidecars that let a rerun reuse what is whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.atomic import (
    TEMPORARY_PATTERN,
    atomic_open,
    atomic_path,
    remove_stale_temporaries,
    sha256_file,
    sidecar_path,
    verified_digest,
    write_sidecar,
)


@pytest.mark.parametrize("durable", [True, False])
def test_a_finished_block_renames_and_leaves_no_temporary(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "sub" / "shard.tar"
    with atomic_path(target, durable=durable) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and not target.exists()
        assert list(target.parent.glob(TEMPORARY_PATTERN)) == [tmp]  # what a killed writer leaves is found
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(tmp_path.rglob("*")) == [target.parent, target]
    assert remove_stale_temporaries(tmp_path) == 0


def test_a_failed_block_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "shard.tar"
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_files_get_the_mode_open_gives_them(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_open(tmp_path / "a") as f:
        f.write(b"x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_sidecar_vouches_only_for_the_file_it_was_written_for(tmp_path: Path) -> None:
    path = tmp_path / "train.beton"
    path.write_bytes(b"samples")
    assert verified_digest(path) is None  # no sidecar: not known to be whole
    write_sidecar(path, sha256_file(path))
    assert sidecar_path(path) == tmp_path / "train.beton.sha256"
    assert verified_digest(path) == sha256_file(path)
    path.write_bytes(b"samples, then other bytes")
    assert verified_digest(path) is None
