"""The pure halves of the ffcv and dali backends: which samples each rank reads, DALI's index files, and the
clear refusal of a version staged without the format. Nothing here imports FFCV or DALI; the backends reading
real files are tested in tests/integration/test_backends.py."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipelines.dataset import DataError, damaged_files, index_lines, index_text, read_manifest
from pipelines.loading import make_loader
from pipelines.loading.sampling import rank_epoch_indices, rank_positions

# --------------------------------------------------------------------------------------------- per-rank indices


@pytest.mark.parametrize("n, world_size", [(35, 1), (35, 2), (35, 3), (12, 4), (2, 3), (0, 2)])
def test_rank_epoch_indices_train_is_a_padded_permutation(n: int, world_size: int) -> None:
    shares = [rank_epoch_indices(n, True, r, world_size, seed=0, epoch=3) for r in range(world_size)]
    assert {len(s) for s in shares} == {math.ceil(n / world_size)}
    seen = np.concatenate(shares) if n else np.zeros(0, np.int64)
    assert set(seen.tolist()) == set(range(n))
    assert len(seen) - n == (-n) % world_size if n else len(seen) == 0  # only DistributedSampler's padding
    again = [rank_epoch_indices(n, True, r, world_size, seed=0, epoch=3) for r in range(world_size)]
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))


def test_rank_epoch_indices_depend_on_seed_and_epoch_only() -> None:
    base = rank_epoch_indices(100, True, 0, 1, seed=0, epoch=0)
    assert not np.array_equal(base, np.arange(100))
    assert not np.array_equal(base, rank_epoch_indices(100, True, 0, 1, seed=0, epoch=1))
    assert not np.array_equal(base, rank_epoch_indices(100, True, 0, 1, seed=1, epoch=0))
    # Strided over the same permutation: rank r of 2 reads positions r, r + 2, ... of the one-rank order.
    assert np.array_equal(rank_epoch_indices(100, True, 1, 2, seed=0, epoch=0), base[1::2])


@pytest.mark.parametrize("n, world_size", [(16, 2), (17, 2), (5, 3), (2, 4)])
def test_rank_epoch_indices_eval_is_exactly_once_in_planned_order(n: int, world_size: int) -> None:
    shares = [rank_epoch_indices(n, False, r, world_size, seed=5, epoch=7) for r in range(world_size)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    assert [s.tolist() for s in shares] == [rank_positions(n, r, world_size, pad=False) for r in range(world_size)]


# --------------------------------------------------------------------------------------------- DALI index files


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a/dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)


def test_index_lines_follow_the_wds2idx_format(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    _tar(path, [("k1.jpg", b"x" * 700), ("k1.cls", b"3"), ("d/k2.seg.png", b"yy"), ("d/k2.cls", b"12"),
                (".hidden.txt", b"z")])
    lines = index_lines(path)
    with tarfile.open(path) as tar:
        at = {m.name: m.offset_data for m in tar}
    assert lines == [
        f"jpg {at['k1.jpg']} 700 k1.jpg cls {at['k1.cls']} 1 k1.cls",
        f"seg.png {at['d/k2.seg.png']} 2 d/k2.seg.png cls {at['d/k2.cls']} 2 d/k2.cls",
    ]
    assert all(int(x) % 512 == 0 for line in lines for x in line.split()[1::4])
    assert index_text(lines).startswith("v1.2 2\n")


def test_index_of_a_broken_shard_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="s.tar"):
        index_lines(path)


# --------------------------------------------------------------------------------------------- missing formats


# The session's staged version has WebDataset shards (and their indexes) only.
def test_a_dataset_without_ffcv_files_is_refused_clearly(staged_dataset: Path) -> None:
    with pytest.raises(DataError, match="formats including 'ffcv'"):
        list(make_loader(staged_dataset, "val", 32, 4, backend="ffcv"))


def test_every_version_has_shard_indexes_listed_in_its_manifest(staged_dataset: Path) -> None:
    """The indexes the wds and dali backends read are part of every version, checked by `effnet verify`."""
    manifest = read_manifest(staged_dataset)
    indexed = {e["shard"] for e in manifest.indexes}
    assert indexed == {s["path"] for s in manifest.shards}
    for entry in manifest.indexes:
        shard = staged_dataset / entry["shard"]
        assert (staged_dataset / entry["path"]).read_bytes() == index_text(index_lines(shard)).encode()
    assert not damaged_files(staged_dataset, checksums=True)
