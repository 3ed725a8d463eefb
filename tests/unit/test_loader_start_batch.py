"""A `wds` train loader started at batch k yields exactly the batches of an uninterrupted epoch from k on (the
exact mid-epoch resume), whatever the number of DataLoader worker processes, the shuffle window or bad samples."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.loading import make_loader
from pipelines.loading.sampling import batches_per_epoch
from pipelines.loading.wds import WdsDataset

from helpers import shard_paths

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _batches(dataset: Path, start: int, workers: int, shuffle_window: int | None = None) -> Batches:
    """Rank 1 of 2, epoch 3, batches of 3, through `make_loader`'s DataLoader (its dataset rebuilt with another
    shuffle window when one is given)."""
    loader = make_loader(dataset, "train", 32, 3, 1, 2, epoch=3, seed=7, num_workers=workers, start_batch=start)
    if shuffle_window is not None:
        ds = loader.dataset
        windowed = WdsDataset(ds.shards, ds.train, ds.resolution, ds.rank, ds.world_size, ds.epoch, ds.seed,
                              ds.crop_ratio, batch_size=ds.batch_size, start_batch=ds.start_batch,
                              shuffle_window=shuffle_window, context=loader.multiprocessing_context)
        loader = DataLoader(windowed, batch_size=3, num_workers=workers, drop_last=True,
                            collate_fn=loader.collate_fn, multiprocessing_context=loader.multiprocessing_context)
    return list(loader)


def _same(a: Batches, b: Batches) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_started_at_batch_k_is_the_epoch_from_batch_k(staged_dataset: Path, workers: int) -> None:
    whole = _batches(staged_dataset, 0, workers)
    assert whole and len(whole) == batches_per_epoch(36, 3, 2, workers)
    for start in sorted({1, 2, len(whole) // 2 + 1, len(whole) - 1, len(whole)}):
        assert _same(_batches(staged_dataset, start, workers), whole[start:]), f"started at batch {start}"


def test_a_small_shuffle_window_is_another_order_and_still_resumes_exactly(staged_dataset: Path) -> None:
    whole = _batches(staged_dataset, 0, 2)
    small = _batches(staged_dataset, 0, 2, shuffle_window=4)
    assert not _same(small, whole)
    assert sorted(y for _, labels in small for y in labels.tolist()) == sorted(
        y for _, labels in whole for y in labels.tolist())
    for start in (1, 3):
        assert _same(_batches(staged_dataset, start, 2, shuffle_window=4), small[start:])


def _spoil_first_jpeg(path: Path) -> None:
    """Overwrite the bytes of a shard's first JPEG with zeros (the tar and its index stay valid)."""
    data = bytearray(path.read_bytes())
    with tarfile.open(path, "r:") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    data[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    path.write_bytes(bytes(data))


def test_stand_ins_for_bad_samples_do_not_depend_on_where_the_loader_started(copy_staged: Path) -> None:
    for shard in shard_paths(copy_staged, "train", 32):
        _spoil_first_jpeg(shard)
    whole = _batches(copy_staged, 0, 2)
    assert len(whole) == batches_per_epoch(36, 3, 2, 2)  # every bad sample stood in for: the rank's full share
    for start in (1, 2, len(whole) - 1):
        assert _same(_batches(copy_staged, start, 2), whole[start:]), f"started at batch {start}"


def test_only_a_train_loader_starts_part_way(staged_dataset: Path) -> None:
    with pytest.raises(ValueError, match="only a train loader starts part-way"):
        make_loader(staged_dataset, "minival", 32, 3, start_batch=1)
