"""The `wds` loader over the staged tiny demo: shapes, labels, exact-once eval, equal train shares, errors."""

from __future__ import annotations

import math
import random
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipelines.dataset import DataError, read_manifest, select_tier
from pipelines.loading import make_loader
from pipelines.loading.sampling import batches_per_epoch, rank_positions
from pipelines.loading.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop_box,
    normalize,
    random_resized_crop_box,
)
from pipelines.loading.wds import WdsDataset, _collate

from helpers import STAGE_PARAMS, read_samples, shard_paths

# --------------------------------------------------------------------------------------------- keyed loading


class _KeyedWds(WdsDataset):
    """The real dataset, decoding as usual, with each sample's key appended (to check who reads what)."""

    def _decode(self, key: str, parts: dict[str, bytes], rng: random.Random) -> tuple[Any, ...] | None:
        sample = super()._decode(key, parts, rng)
        return None if sample is None else (*sample, key)


def _collate_keys(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels = _collate([(b[0], b[1]) for b in batch])
    return images, labels, [b[2] for b in batch]


def keyed_loader(dataset: Path, split: str, resolution: int, batch_size: int, **kwargs: Any) -> DataLoader:
    """`make_loader`'s DataLoader, rebuilt around `_KeyedWds` with the same dataset arguments."""
    base = make_loader(dataset, split, resolution, batch_size, **kwargs)
    ds = base.dataset
    assert isinstance(ds, WdsDataset)
    keyed = _KeyedWds(ds.shards, ds.train, ds.resolution, ds.rank, ds.world_size, ds.epoch, ds.seed,
                      ds.crop_ratio, batch_size=ds.batch_size, start_batch=ds.start_batch,
                      shuffle_window=ds.shuffle_window, context=base.multiprocessing_context)
    return DataLoader(keyed, batch_size=batch_size, num_workers=base.num_workers, drop_last=base.drop_last,
                      collate_fn=_collate_keys, multiprocessing_context=base.multiprocessing_context)


def _keys(loader: DataLoader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


def _labels_by_key(dataset: Path, split: str) -> dict[str, int]:
    return {k: int(p["cls"]) for k, p in read_samples(dataset, split, STAGE_PARAMS.tiers[0]).items()}


def _samples(dataset: Path, split: str) -> int:
    return read_manifest(dataset).splits[split].samples


# --------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("split, resolution", [("train", 32), ("train", 64), ("minival", 32), ("val", 64)])
def test_batches_are_uint8_nchw_with_int64_labels(staged_dataset: Path, split: str, resolution: int) -> None:
    images, labels = next(iter(make_loader(staged_dataset, split, resolution, batch_size=4)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, resolution, resolution)
    assert images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert labels.min() >= 0 and labels.max() < 4
    assert images.float().std() > 1  # real pixels, not a constant fill


@pytest.mark.parametrize("split", ["minival", "val"])
def test_eval_labels_match_the_manifest(staged_dataset: Path, split: str) -> None:
    manifest = read_manifest(staged_dataset)
    loader = make_loader(staged_dataset, split, 32, batch_size=5)
    labels = torch.cat([lab for _, lab in loader]).tolist()
    expected = {manifest.classes.index(w): n for w, n in manifest.splits[split].per_class.items()}
    assert Counter(labels) == expected
    sizes = [len(lab) for _, lab in make_loader(staged_dataset, split, 32, batch_size=5)]
    n = manifest.splits[split].samples
    assert sizes == [5] * (n // 5) + ([n % 5] if n % 5 else [])  # the partial last batch is kept


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("split", ["minival", "val"])
def test_eval_reads_every_sample_exactly_once_over_two_ranks(
    staged_dataset: Path, split: str, num_workers: int
) -> None:
    truth = _labels_by_key(staged_dataset, split)
    seen: list[list[str]] = []
    for rank in (0, 1):
        loader = keyed_loader(staged_dataset, split, 32, 3, rank=rank, world_size=2, num_workers=num_workers)
        keys = []
        for _, labels, batch_keys in loader:
            assert labels.tolist() == [truth[k] for k in batch_keys]
            keys += batch_keys
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(truth)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_ranks_get_equal_shares_covering_the_split(staged_dataset: Path, num_workers: int) -> None:
    truth = _labels_by_key(staged_dataset, "train")
    n = len(truth)
    assert n % 2 == 1  # 35: one rank is padded
    per_rank: list[list[str]] = []
    for rank in (0, 1):
        loader = keyed_loader(staged_dataset, "train", 32, 1, rank=rank, world_size=2, num_workers=num_workers)
        keys = []
        for _, labels, batch_keys in loader:
            assert labels.tolist() == [truth[k] for k in batch_keys]
            keys += batch_keys
        per_rank.append(keys)
    assert [len(k) for k in per_rank] == [math.ceil(n / 2)] * 2
    assert set(per_rank[0]) | set(per_rank[1]) == set(truth)
    assert sum(Counter(per_rank[0] + per_rank[1]).values()) - n == 1  # exactly one padding sample
    counts = [len(list(make_loader(staged_dataset, "train", 32, 4, rank=r, world_size=2, num_workers=num_workers)))
              for r in (0, 1)]
    assert counts[0] == counts[1] == batches_per_epoch(n, 4, 2, num_workers) > 0


def test_train_order_depends_only_on_seed_and_epoch(staged_dataset: Path) -> None:
    def epoch(e: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
        batches = list(keyed_loader(staged_dataset, "train", 32, 5, epoch=e, seed=seed))
        return [k for *_, keys in batches for k in keys], torch.cat([b[0] for b in batches])

    keys0, images0 = epoch(0)
    keys0_again, images0_again = epoch(0)
    assert keys0 == keys0_again and torch.equal(images0, images0_again)  # the crops too
    keys1, _ = epoch(1)
    assert keys1 != keys0 and sorted(keys1) == sorted(keys0)
    assert epoch(0, seed=1)[0] != keys0


def test_eval_order_and_pixels_are_fixed(staged_dataset: Path) -> None:
    a = list(keyed_loader(staged_dataset, "val", 32, 4, epoch=0))
    b = list(keyed_loader(staged_dataset, "val", 32, 4, epoch=3))
    assert [x[2] for x in a] == [x[2] for x in b]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_resolution_can_change_between_epochs(staged_dataset: Path) -> None:
    for epoch, resolution in enumerate((32, 64, 32)):
        loader = make_loader(staged_dataset, "train", resolution, 4, epoch=epoch)
        assert {s.path.parent.name for s in loader.dataset.shards} == {str(resolution)}  # the fitting tier
        shapes = {tuple(images.shape[1:]) for images, _ in loader}
        assert shapes == {(3, resolution, resolution)}
    # Eval at 32 px with crop 0.875 needs 36.6 px of source: the 64 tier.
    eval_loader = make_loader(staged_dataset, "val", 32, 4)
    assert {s.path.parent.name for s in eval_loader.dataset.shards} == {"64"}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (4, 1), (3, 2), (4, 2), (7, 2), (16, 2), (40, 1)])
def test_batches_per_epoch_is_the_real_count(
    staged_dataset: Path, batch_size: int, world_size: int, num_workers: int
) -> None:
    n = _samples(staged_dataset, "train")
    predicted = batches_per_epoch(n, batch_size, world_size, num_workers)
    for rank in range(world_size):
        loader = make_loader(staged_dataset, "train", 32, batch_size, rank=rank, world_size=world_size,
                             num_workers=num_workers)
        sizes = [len(labels) for _, labels in loader]
        assert len(sizes) == predicted, (rank, sizes)
        assert set(sizes) <= {batch_size}  # partial batches dropped


def test_normalize() -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = 255
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected = [(255 - 255 * m) / (255 * s) if c == 0 else -m / s
                for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-5)
    assert normalize(images, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_unknown_split_or_backend(staged_dataset: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        make_loader(staged_dataset, "test", 32, 4)
    with pytest.raises(ValueError, match="unknown loader backend 'tfrecord'"):
        make_loader(staged_dataset, "train", 32, 4, backend="tfrecord")


# --------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "tiers, resolution, crop_ratio, expected",
    [
        ((32, 64), 32, None, 32),
        ((64, 32), 32, None, 32),  # order of the manifest's list does not matter
        ((32, 64), 33, None, 64),
        ((32, 64), 64, None, 64),
        ((32, 64), 100, None, 64),  # nothing big enough: the largest
        ((32, 64), 32, 0.875, 64),  # needs 36.6
        ((32, 64), 28, 0.875, 32),  # needs exactly 32
        ((32, 64), 56, 0.875, 64),
        ((32, 64), 57, 0.875, 64),
        ((128, 192, 256, 320, 384, 480), 224, 0.875, 256),
        ((128, 192, 256, 320, 384, 480), 224, None, 256),
        ((128, 192, 256, 320, 384, 480), 300, 0.875, 384),
        ((128, 192, 256, 320, 384, 480), 600, 0.875, 480),
    ],
)
def test_select_tier(tiers: tuple[int, ...], resolution: int, crop_ratio: float | None, expected: int) -> None:
    assert select_tier(tiers, resolution, crop_ratio) == expected


@pytest.mark.parametrize(
    "n, rank, world_size, pad, expected",
    [
        (10, 0, 3, False, [0, 3, 6, 9]),
        (10, 1, 3, False, [1, 4, 7]),
        (10, 2, 3, False, [2, 5, 8]),
        (10, 0, 3, True, [0, 3, 6, 9]),
        (10, 1, 3, True, [1, 4, 7, 0]),
        (10, 2, 3, True, [2, 5, 8, 1]),  # padded with the epoch's second sample, not the first again
        (2, 3, 4, True, [1]),
        (2, 3, 4, False, []),
        (0, 0, 2, True, []),
        (5, 0, 1, True, [0, 1, 2, 3, 4]),
    ],
)
def test_rank_positions(n: int, rank: int, world_size: int, pad: bool, expected: list[int]) -> None:
    assert rank_positions(n, rank, world_size, pad) == expected


@pytest.mark.parametrize("n", [1, 2, 5, 7, 10, 35, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_rank_positions_match_distributed_sampler(n: int, world_size: int) -> None:
    padded = [rank_positions(n, r, world_size, pad=True) for r in range(world_size)]
    sampler = [list(DistributedSampler(range(n), world_size, r, shuffle=False)) for r in range(world_size)]
    assert padded == sampler
    exact = [rank_positions(n, r, world_size, pad=False) for r in range(world_size)]
    assert sorted(p for ps in exact for p in ps) == list(range(n))


@pytest.mark.parametrize("rank, world_size", [(-1, 2), (2, 2), (0, 0)])
def test_rank_positions_rejects_a_bad_rank(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        rank_positions(10, rank, world_size, pad=True)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (1000, 200), (64, 48)])
def test_random_resized_crop_box_stays_inside_and_in_bounds(size: tuple[int, int]) -> None:
    width, height = size
    rng = random.Random(0)
    scales = []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(width, height, rng)
        assert 0 <= left and 0 <= top and 0 < w and 0 < h
        assert left + w <= width and top + h <= height
        # w and h are rounded to whole pixels: the drawn area and aspect are within half a pixel of them.
        assert (w + 0.5) * (h + 0.5) >= 0.08 * width * height
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        scales.append(w * h / (width * height))
    if max(size) / min(size) <= 4 / 3:  # the draws span the range, they are not stuck at one size
        assert min(scales) < 0.1 and max(scales) > 0.9


def test_random_resized_crop_box_is_seeded() -> None:
    a = [random_resized_crop_box(300, 200, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


@pytest.mark.parametrize(
    "size, expected",
    [((1000, 10), (493, 0, 13, 10)), ((10, 1000), (0, 493, 10, 13)), ((1, 1), (0, 0, 1, 1))],
)
def test_random_resized_crop_box_falls_back_to_a_clamped_centre_crop(
    size: tuple[int, int], expected: tuple[int, int, int, int]
) -> None:
    # Such extreme shapes fail all ten tries for any seed: the fallback is the centre, clamped to the ratio.
    assert random_resized_crop_box(*size, random.Random(0), scale=(0.9, 1.0)) == expected


@pytest.mark.parametrize(
    "size, resolution, crop_ratio, expected",
    [
        ((100, 80), 64, 0.875, (15, 5, 70, 70)),
        ((80, 100), 64, 0.875, (5, 15, 70, 70)),
        ((64, 64), 56, 0.875, (4, 4, 56, 56)),
        ((300, 200), 224, 1.0, (50, 0, 200, 200)),
        ((2, 2), 224, 0.1, (0, 0, 1, 1)),
    ],
)
def test_center_crop_box(
    size: tuple[int, int], resolution: int, crop_ratio: float, expected: tuple[int, int, int, int]
) -> None:
    assert center_crop_box(*size, resolution, crop_ratio) == expected


# --------------------------------------------------------------------------------------------- broken data


def test_missing_shard_is_named(copy_staged: Path) -> None:
    victim = shard_paths(copy_staged, "train", 32)[2]
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim.name}.*missing"):
        make_loader(copy_staged, "train", 32, 4)
    make_loader(copy_staged, "train", 64, 4)  # other tiers are unaffected


def _member_offsets(path: Path) -> list[tuple[str, int]]:
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset) for m in tar]


# Only in-process: DataLoader re-raises a worker's DataError with its message, but torch then waits
# 2 x 5 s for the workers to exit, which a unit test cannot afford.
@pytest.mark.parametrize("cut", ["half", "between samples", "before a .cls"])
def test_truncated_shard_is_named(copy_staged: Path, cut: str) -> None:
    victim = shard_paths(copy_staged, "train", 32)[1]
    data = victim.read_bytes()
    members = _member_offsets(victim)
    at = {
        "half": len(data) // 2,
        "between samples": members[9][1],  # a tar cut at a member boundary reads as a valid shorter tar
        "before a .cls": next(off for name, off in reversed(members) if name.endswith(".cls")),
    }[cut]
    victim.write_bytes(data[:at])
    loader = make_loader(copy_staged, "train", 32, 4)
    with pytest.raises(DataError, match=victim.name):
        list(loader)


def _spoil_jpegs(path: Path, count: int) -> list[str]:
    """Overwrite the bytes of the first `count` JPEGs of a shard with zeros (the tar stays valid)."""
    data = bytearray(path.read_bytes())
    spoiled = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.name.endswith(".jpg") and len(spoiled) < count:
                data[m.offset_data:m.offset_data + m.size] = bytes(m.size)
                spoiled.append(m.name[:-4])
    path.write_bytes(bytes(data))
    return spoiled


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_samples_are_counted_and_ranks_keep_equal_batches(copy_staged: Path, num_workers: int) -> None:
    reads: Counter[str] = Counter()  # key -> decodes this epoch over both ranks (a padded position reads twice)
    for rank in range(2):
        ds = make_loader(copy_staged, "train", 32, 4, rank=rank, world_size=2).dataset
        keyed = _KeyedWds(ds.shards, ds.train, ds.resolution, ds.rank, ds.world_size, ds.epoch, ds.seed,
                          ds.crop_ratio, shuffle_window=ds.shuffle_window)
        reads.update(sample[2] for sample in keyed)
    spoiled = [key for shard in shard_paths(copy_staged, "train", 32)[:2] for key in _spoil_jpegs(shard, 2)]
    n = _samples(copy_staged, "train")
    counts = []
    for rank in range(2):
        loader = make_loader(copy_staged, "train", 32, 4, rank=rank, world_size=2, num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(loader) == batches_per_epoch(n, 4, 2, num_workers)
        counts.append(loader.dataset.bad_samples)  # type: ignore[attr-defined]
    # Every read of a spoiled sample counted once, in whichever worker process decoded it.
    assert sum(counts) == sum(reads[key] for key in spoiled) >= len(spoiled) == 4
    # Eval skips them (counted), and keeps every other sample exactly once.
    eval_shard = shard_paths(copy_staged, "val", select_tier(STAGE_PARAMS.tiers, 32, 0.875))[0]
    _spoil_jpegs(eval_shard, 1)
    loader = make_loader(copy_staged, "val", 32, 4, num_workers=num_workers)
    assert sum(len(labels) for _, labels in loader) == _samples(copy_staged, "val") - 1
    assert loader.dataset.bad_samples == 1  # type: ignore[attr-defined]
