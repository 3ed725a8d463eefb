"""The wds backend reads only the samples of its rank's share (a shard's index says where each lies), and the
ranks' shares together are the split, each sample once (plus the padding that evens out the ranks)."""

from __future__ import annotations

import errno
import json
from collections import Counter
from pathlib import Path

import pytest

from pipelines import dataset as dataset_module
from pipelines.dataset import MANIFEST, DataError, read_manifest, split_shards, split_tier
from pipelines.loading import make_loader
from pipelines.loading.wds import WdsDataset


def read_chars() -> int:
    """Bytes this process has read through read(2) and pread(2) so far, as the kernel counts them."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def split_bytes(dataset: Path, split: str, tier: int) -> int:
    return sum(s["bytes"] for s in read_manifest(dataset).shards if (s["split"], s["tier"]) == (split, tier))


def rank_dataset(dataset: Path, rank: int, world: int, epoch: int = 0) -> WdsDataset:
    manifest = read_manifest(dataset)
    train, tier = split_tier(manifest, "train", 64, 0.875)
    return WdsDataset(split_shards(dataset, manifest, "train", tier), train, 64, rank, world, epoch, 0, 0.875)


@pytest.mark.parametrize("world", [1, 8])
def test_rank_zero_reads_about_its_share_of_the_split(staged_dataset: Path, world: int) -> None:
    manifest = read_manifest(staged_dataset)
    _, tier = split_tier(manifest, "train", 64, 0.875)
    list(make_loader(staged_dataset, "train", 64, 2, 0, world, epoch=1))  # imports and decoders warmed up
    loader = make_loader(staged_dataset, "train", 64, 2, 0, world, epoch=0)
    before = read_chars()
    batches = list(loader)
    read = read_chars() - before
    assert batches
    share = split_bytes(staged_dataset, "train", tier) / world
    assert read <= 1.3 * share, f"rank 0 of {world} read {read} bytes for a share of {share:.0f}"


@pytest.mark.parametrize("world", [1, 3, 8])
def test_the_ranks_shares_are_the_split_once_each(staged_dataset: Path, world: int) -> None:
    keys: Counter[str] = Counter()
    for rank in range(world):
        ds = rank_dataset(staged_dataset, rank, world)
        positions = ds.positions()  # padding repeats a position: it is read once and yielded twice
        got = dict((pos, key) for pos, key, _ in ds._stream(set(positions)))
        keys.update(got[p] for p in positions)
    n = read_manifest(staged_dataset).splits["train"].samples
    per_rank = -(-n // world)
    assert len(keys) == n and sum(keys.values()) == per_rank * world  # every sample; only the padding twice


def test_the_order_depends_on_seed_and_epoch_only(staged_dataset: Path) -> None:
    def keys(epoch: int) -> list[str]:
        ds = rank_dataset(staged_dataset, 0, 2, epoch)
        return [key for _, key, _ in ds._stream(ds.positions())]

    assert keys(0) == keys(0) and keys(0) != keys(1)


def _as_staged_before_indexes(dataset: Path) -> None:
    """What a version staged before every shard had an index looks like: no .idx files, no `indexes` entry."""
    for idx in dataset.rglob("*.idx"):
        idx.unlink()
    manifest = read_manifest(dataset).to_dict()
    manifest.pop("indexes")
    (dataset / MANIFEST).write_text(json.dumps(manifest))


def test_a_version_staged_before_indexes_gets_them_on_first_use(copy_staged: Path, staged_dataset: Path) -> None:
    _as_staged_before_indexes(copy_staged)
    first = [labels.tolist() for _, labels in make_loader(copy_staged, "val", 32, 4)]
    assert first == [labels.tolist() for _, labels in make_loader(staged_dataset, "val", 32, 4)]
    written = sorted(p.relative_to(copy_staged) for p in copy_staged.rglob("*.idx"))
    assert written and all((staged_dataset / p).read_bytes() == (copy_staged / p).read_bytes() for p in written)


def test_a_read_only_version_without_indexes_says_what_to_do(copy_staged: Path, monkeypatch) -> None:
    _as_staged_before_indexes(copy_staged)

    def read_only(path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(dataset_module, "atomic_write_bytes", read_only)
    with pytest.raises(DataError, match="no shard index and none can be written.*stage the version again"):
        list(make_loader(copy_staged, "val", 32, 4))
