"""The `wds` backend, the default: a rank's share of a split read from its WebDataset shards and decoded by PIL.

The epoch's stream is the split's shards (of the tier that serves the resolution) one after another, in an order
shuffled per epoch for training; a rank takes the positions of that stream that `sampling.rank_positions` gives
it (for training, which rank takes which position of each block is drawn per epoch too), and DataLoader workers
split the rank's positions further. Each worker reads only its own samples: a shard's index (every version has
one beside each shard; `dataset.shard_index`) gives each sample's offset and size, so a worker reads its images
and labels with one pread each and never parses the tar. For training, a worker's share is cut into windows of
consecutive samples and each window is permuted (the shuffle), and every sample is cropped and flipped with a
generator of its own: the batches of an epoch depend on (seed, epoch, world size, workers) only, so a loader
started at batch k (an exact mid-epoch resume) yields what an uninterrupted one yields from batch k on, and
reads nothing before it. `transforms.decode_crop` decodes at libjpeg's reduced scales when the crop allows. A
sample that fails to decode is counted (`bad_samples`), and in training stood in for by the worker's next good
one, so that every rank still yields its exact share. Workers start from a fork server, not by forking the caller.
"""

from __future__ import annotations

import os
import random
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.dataset import (
    IMAGE_EXT,
    LABEL_EXT,
    DataError,
    SampleSpan,
    ShardInfo,
    parse_index_line,
    read_manifest,
    shard_index,
    split_shards,
    split_tier,
)
from pipelines.loading.sampling import rank_positions
from pipelines.loading.transforms import TrainCrop, center_crop_box, decode_crop, random_resized_crop_box
from pipelines.seeds import Stream, mix_seed


class WdsDataset(IterableDataset):
    """One rank's view of a split; DataLoader workers split that view further, keeping the seeded order.

    A train epoch is a pure function of (seed, epoch, rank, worker): which samples a worker yields, in which
    order (its share of the stream cut into windows of `shuffle_window` samples, each window permuted), and each
    sample's crop and flip (a generator per sample). So a loader started at `start_batch` yields exactly the
    batches an uninterrupted one yields from that batch on, without reading the samples before it.
    """

    def __init__(
        self,
        shards: list[ShardInfo],
        train: bool,
        resolution: int,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        crop_ratio: float,
        batch_size: int = 1,
        start_batch: int = 0,
        shuffle_window: int = 512,
        context: Any = None,
        train_crop: TrainCrop = TrainCrop(),
    ) -> None:
        if start_batch and not train:
            raise ValueError("only a train loader starts part-way through its epoch")
        self.shards, self.train, self.resolution = shards, train, resolution
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.crop_ratio, self.batch_size, self.start_batch = crop_ratio, batch_size, start_batch
        self.shuffle_window, self.train_crop = shuffle_window, train_crop
        self.total = sum(s.samples for s in shards)
        # Samples that failed to decode, counted in whichever process decodes them: a shared counter when
        # DataLoader workers (started from `context`) do.
        self._bad = context.Value("q", 0) if context is not None else _Count()

    @property
    def bad_samples(self) -> int:
        return int(self._bad.value)

    def _shard_order(self) -> list[ShardInfo]:
        if not self.train:
            return list(self.shards)
        order = list(self.shards)
        random.Random(mix_seed(self.seed, Stream.SHARD_ORDER, self.epoch)).shuffle(order)
        return order

    def positions(self) -> list[int]:
        shuffle = mix_seed(self.seed, Stream.RANK_ORDER, self.epoch) if self.train else None
        return rank_positions(self.total, self.rank, self.world_size, pad=self.train, shuffle_seed=shuffle)

    def __len__(self) -> int:
        return len(self.positions())

    def _stream(self, wanted: Iterable[int]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(position in the epoch's stream, key, parts) of the wanted positions, in the order given. The stream is
        the shards in this epoch's order, each in its stored order; a shard's index says where each sample's
        members lie, so only the wanted samples' images and labels are read (one pread each)."""
        with _ShardReader(self._shard_order()) as reader:
            for p in wanted:
                yield (p, *reader.read(p))

    def worker_slots(self, worker: int, workers: int) -> list[tuple[int, int]]:
        """(index into `positions()`, stream position) of what `worker` of `workers` yields, in yield order.

        The worker takes every `workers`-th of the rank's positions; for training, each window of
        `shuffle_window` of them (a few consecutive shards' worth of the stream) is permuted by a seed.
        """
        mine = [(j, p) for j, p in enumerate(self.positions()) if j % workers == worker]
        if not self.train:
            return mine
        slots = []
        for w, start in enumerate(range(0, len(mine), self.shuffle_window)):
            window = mine[start : start + self.shuffle_window]
            random.Random(mix_seed(self.seed, Stream.WDS_WINDOW, self.epoch, self.rank, worker, w)).shuffle(window)
            slots.extend(window)
        return slots

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batch i from worker process i % workers, so the loader's first batch comes from process
        # 0. Started at batch k, process w plays the part of worker (w + k) % workers of an uninterrupted epoch,
        # and skips that worker's batches before k.
        logical = (worker + self.start_batch) % workers
        skip = len(range(logical, self.start_batch, workers)) * self.batch_size
        slots = self.worker_slots(logical, workers)
        with _ShardReader(self._shard_order()) as reader:
            if self.train:
                yield from self._train_samples(slots, skip, reader)
            else:
                for j, p in slots:  # a sample that does not decode is skipped (counted)
                    sample = self._decode(*reader.read(p), self._sample_rng(j))
                    if sample is not None:
                        yield sample

    def _sample_rng(self, j: int) -> random.Random:
        """The generator of the crop and flip of the rank's j-th sample this epoch (unused in eval)."""
        return random.Random(mix_seed(self.seed, Stream.WDS_SAMPLE, self.epoch, self.rank, j))

    def _train_samples(
        self,
        slots: list[tuple[int, int]],
        skip: int,
        reader: _ShardReader,
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """The worker's samples from slot `skip` on. A sample that fails to decode is counted and stood in for by
        the next slot's that decodes (the previous one's at the end), so that every rank still yields its exact
        share (equal batches: no DDP hang), and the stand-in depends on the data only, not on where a loader
        started."""
        decoded: dict[int, tuple[torch.Tensor, int] | None] = {}

        def sample(t: int) -> tuple[torch.Tensor, int] | None:
            if t not in decoded:
                j, p = slots[t]
                decoded[t] = self._decode(*reader.read(p), self._sample_rng(j))
            return decoded[t]

        for t in range(skip, len(slots)):
            own = sample(t)
            if own is None:
                with self._bad.get_lock():
                    self._bad.value += 1
                good = chain(range(t + 1, len(slots)), range(t - 1, -1, -1))
                own = next((s for s in map(sample, good) if s is not None), None)
                if own is None:
                    raise DataError(f"no sample of rank {self.rank}'s share of this epoch decodes")
            decoded = {u: s for u, s in decoded.items() if u > t}  # what the look-ahead decoded stays
            yield own

    def _decode(self, key: str, parts: dict[str, bytes], rng: random.Random) -> tuple[torch.Tensor, int] | None:
        """A sample as (uint8 CHW, label), or None (counted, in eval) when it does not decode."""
        try:
            label = int(parts[LABEL_EXT])
            if self.train:
                crop = self.train_crop
                box = lambda w, h: random_resized_crop_box(w, h, rng, crop.scale, crop.ratio)  # noqa: E731
                # The coin is tossed with the flip off too: the crops drawn after it stay the same.
                heads = rng.random() < 0.5
                hwc = decode_crop(parts[IMAGE_EXT], box, self.resolution, flip=crop.flip and heads)
            else:
                box = lambda w, h: center_crop_box(w, h, self.resolution, self.crop_ratio)  # noqa: E731
                hwc = decode_crop(parts[IMAGE_EXT], box, self.resolution)
        except Exception:  # a sample that fails to decode is not fatal (see _train_samples)
            if not self.train:
                with self._bad.get_lock():
                    self._bad.value += 1
            return None
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous(), label


class _ShardReader:
    """Reads samples by their position in an epoch's stream of shards, through each shard's index; keeps the
    last few shards open (a window of slots spans a few consecutive shards)."""

    OPEN_SHARDS = 64

    def __init__(self, shards: list[ShardInfo]) -> None:
        self.shards = shards
        self.starts = list(accumulate((s.samples for s in shards), initial=0))
        self.open: OrderedDict[int, tuple[int, list[str]]] = OrderedDict()  # shard -> (fd, index lines)

    def __enter__(self) -> _ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd, _ in self.open.values():
            os.close(fd)
        self.open.clear()

    def read(self, position: int) -> tuple[str, dict[str, bytes]]:
        """(key, {ext: bytes}) of the sample at `position` of the stream."""
        i = bisect_right(self.starts, position) - 1
        shard = self.shards[i]
        if i not in self.open:
            if len(self.open) >= self.OPEN_SHARDS:
                os.close(self.open.popitem(last=False)[1][0])
            self.open[i] = (os.open(shard.path, os.O_RDONLY), shard_index(shard))
        self.open.move_to_end(i)
        fd, lines = self.open[i]
        span = parse_index_line(lines[position - self.starts[i]])
        return span.key, _read_members(fd, shard.path, span)


def _read_members(fd: int, path: Path, span: SampleSpan) -> dict[str, bytes]:
    """The image and label of one sample, read where the shard's index says they are."""
    parts = {}
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in span.members:
            raise DataError(f"{path}: sample {span.key} lacks its .{ext} (damaged shard index?)")
        offset, size = span.members[ext]
        parts[ext] = os.pread(fd, size, offset)
        if len(parts[ext]) != size:
            raise DataError(
                f"{path}: sample {span.key} ends early ({len(parts[ext])} of {size} bytes of its .{ext}: "
                "truncated shard?)"
            )
    return parts


class _Count:
    """The part of a `multiprocessing.Value` that WdsDataset uses, for decoding in this process."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock

    def __getstate__(self) -> int:  # a copy sent to a worker process counts there, unseen (no shared context)
        return self.value

    def __setstate__(self, value: int) -> None:
        self.value, self._lock = value, threading.Lock()


def _worker_context() -> Any:
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # The fork server imports this module (and torch, PIL) once; each epoch's workers then fork from it warm.
    ctx.set_forkserver_preload(["pipelines.loading.wds"])
    return ctx


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels


def make_wds_loader(
    dataset_dir: str | Path,
    split: str,
    resolution: int,
    batch_size: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    crop_ratio: float,
    num_workers: int,
    start_batch: int = 0,
    train_crop: TrainCrop = TrainCrop(),
) -> DataLoader:
    """`make_loader(..., backend="wds")`: num_workers DataLoader worker processes (0: decode in this one)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    train, tier = split_tier(manifest, split, resolution, crop_ratio)
    shards = split_shards(dataset_dir, manifest, split, tier)
    # Workers start from a clean fork server, not by forking this process: a Ray worker (or any process holding
    # gRPC, Prefect or numba threads) forks children that die at start-up (measured: exit code 1).
    context = _worker_context() if num_workers > 0 else None
    dataset = WdsDataset(
        shards,
        train,
        resolution,
        rank,
        world_size,
        epoch,
        seed,
        crop_ratio,
        batch_size=batch_size,
        start_batch=start_batch,
        context=context,
        train_crop=train_crop,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=train,
        persistent_workers=False,
        collate_fn=_collate,
        multiprocessing_context=context,
    )
