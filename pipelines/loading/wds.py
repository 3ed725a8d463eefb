"""The `wds` backend, the default: a rank's share of a split read from its WebDataset shards and decoded by PIL.

The epoch's stream is the split's shards (of the tier that serves the resolution) one after another, in an order
shuffled per epoch for training; a rank takes the positions of that stream that `sampling.rank_positions` gives
it (for training, which rank takes which position of each block is drawn per epoch too), and DataLoader workers
split the rank's positions further. Each worker reads only its own samples: a shard's index (every version has
one beside each shard; `dataset.shard_index`) gives each sample's offset and size, so a worker reads its images
and labels with one pread each and never parses the tar. Training samples are cropped and flipped with a
generator per (seed, epoch, rank, worker) and pass through a shuffle buffer; `transforms.decode_crop` decodes at
libjpeg's reduced scales when the crop allows. A sample that fails to decode is counted (`bad_samples`), and in
training stood in for by the worker's next good one, so that every rank still yields its exact share. Workers
start from a fork server, not by forking the caller.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

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
from pipelines.loading.transforms import center_crop_box, decode_crop, random_resized_crop_box
from pipelines.seeds import Stream, mix_seed


class WdsDataset(IterableDataset):
    """One rank's view of a split; DataLoader workers split that view further, keeping the seeded order."""

    def __init__(
        self, shards: list[ShardInfo], train: bool, resolution: int, rank: int, world_size: int, epoch: int,
        seed: int, crop_ratio: float, shuffle_buffer: int = 512, context: Any = None,
    ) -> None:
        self.shards, self.train, self.resolution = shards, train, resolution
        self.rank, self.world_size, self.epoch, self.seed = rank, world_size, epoch, seed
        self.crop_ratio, self.shuffle_buffer = crop_ratio, shuffle_buffer
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
        """(position in the epoch's stream, key, parts) of the wanted positions, in stream order. The stream is the
        shards in this epoch's order, each in its stored order; a shard's index says where each sample's members
        lie, so only the wanted samples' images and labels are read (one pread each), not the whole shard."""
        todo, i, start = sorted(wanted), 0, 0
        for shard in self._shard_order():
            end = start + shard.samples
            if i < len(todo) and todo[i] < end:
                lines = shard_index(shard)
                with open(shard.path, "rb", buffering=0) as f:
                    while i < len(todo) and todo[i] < end:
                        span = parse_index_line(lines[todo[i] - start])
                        yield todo[i], span.key, _read_members(f.fileno(), shard.path, span)
                        i += 1
            start = end

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        wanted: dict[int, int] = {}  # stream position -> how many times this worker yields it (padding)
        for j, p in enumerate(self.positions()):
            if j % workers == worker:
                wanted[p] = wanted.get(p, 0) + 1
        rng = random.Random(mix_seed(self.seed, Stream.WDS_WORKER, self.epoch, self.rank, worker))
        buffer: list[tuple[torch.Tensor, int]] = []
        # Train: a sample that fails to decode is counted and stood in for by this worker's next good one, so
        # that every rank still yields its exact share (equal batches: no DDP hang). Eval skips it (counted).
        owed, last = 0, None
        for pos, key, parts in self._stream(wanted):
            for _ in range(wanted.get(pos, 0)):
                sample = self._decode(key, parts, rng)
                if sample is None:
                    owed += self.train
                    continue
                if not self.train:
                    yield sample
                    continue
                for _ in range(1 + owed):
                    buffer.append(sample)
                    if len(buffer) >= self.shuffle_buffer:
                        yield buffer.pop(rng.randrange(len(buffer)))
                owed, last = 0, sample
        if owed and last is not None:  # bad samples after this worker's last good one
            buffer.extend([last] * owed)
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, key: str, parts: dict[str, bytes], rng: random.Random) -> tuple[torch.Tensor, int] | None:
        try:
            label = int(parts[LABEL_EXT])
            if self.train:
                box = lambda w, h: random_resized_crop_box(w, h, rng)  # noqa: E731
                hwc = decode_crop(parts[IMAGE_EXT], box, self.resolution, flip=rng.random() < 0.5)
            else:
                box = lambda w, h: center_crop_box(w, h, self.resolution, self.crop_ratio)  # noqa: E731
                hwc = decode_crop(parts[IMAGE_EXT], box, self.resolution)
        except Exception:  # a sample that fails to decode is counted, not fatal (see __iter__)
            with self._bad.get_lock():
                self._bad.value += 1
            return None
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous(), label


def _read_members(fd: int, path: Path, span: SampleSpan) -> dict[str, bytes]:
    """The image and label of one sample, read where the shard's index says they are."""
    parts = {}
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in span.members:
            raise DataError(f"{path}: sample {span.key} lacks its .{ext} (damaged shard index?)")
        offset, size = span.members[ext]
        parts[ext] = os.pread(fd, size, offset)
        if len(parts[ext]) != size:
            raise DataError(f"{path}: sample {span.key} ends early ({len(parts[ext])} of {size} bytes of its .{ext}: "
                            "truncated shard?)")
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
    dataset_dir: str | Path, split: str, resolution: int, batch_size: int, rank: int, world_size: int, epoch: int,
    seed: int, crop_ratio: float, num_workers: int,
) -> DataLoader:
    """`make_loader(..., backend="wds")`: num_workers DataLoader worker processes (0: decode in this one)."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    train, tier = split_tier(manifest, split, resolution, crop_ratio)
    shards = split_shards(dataset_dir, manifest, split, tier)
    # Workers start from a clean fork server, not by forking this process: a Ray worker (or any process holding
    # gRPC, Prefect or numba threads) forks children that die at start-up (measured: exit code 1).
    context = _worker_context() if num_workers > 0 else None
    dataset = WdsDataset(shards, train, resolution, rank, world_size, epoch, seed, crop_ratio, context=context)
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, drop_last=train,
        persistent_workers=False, collate_fn=_collate, multiprocessing_context=context,
    )
