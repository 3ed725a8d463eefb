"""Loaders over a staged dataset version: one interface for training and evaluation.

`make_loader(dataset_dir, split, resolution, batch_size, rank, world_size, epoch, backend="wds")` returns an
iterable of `(images uint8 [N, 3, H, W], labels int64 [N])` batches. Images travel as uint8 and are normalised on
the device by `normalize` (4x less to copy than float32).

Distributed semantics (the same for every backend):
- train: each epoch is a permutation of the split that depends only on (seed, epoch); rank r takes every
  world_size-th sample of it. Ranks whose share is one short are padded with the epoch's first samples, as
  torch's DistributedSampler does, so every rank yields exactly ceil(N / world_size) samples and the same
  number of batches (a rank with fewer batches would hang DDP). The last partial batch is dropped.
- eval (minival, val): every sample exactly once across ranks, no padding, partial last batch kept; callers
  sum correct counts across ranks.

The `wds` backend reads the WebDataset tars sequentially (shard order shuffled per epoch, then a seeded
shuffle buffer), decodes with libjpeg's DCT scaling when the crop allows, and picks the smallest staged tier
that still serves the requested resolution.
"""

from __future__ import annotations

import io
import math
import random
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.staging import read_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKENDS = ("wds", "ffcv", "dali")
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("minival", "val")


class DataError(RuntimeError):
    """A shard is missing or unreadable."""


# --------------------------------------------------------------------------------------------- transforms


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of an Inception-style crop: area fraction in `scale`, log-uniform aspect in `ratio`.

    Ten tries as in the reference implementation, then a centre crop clamped to `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, resolution: int, crop_ratio: float) -> tuple[int, int, int, int]:
    """The region that `resize shorter side to resolution/crop_ratio, centre crop resolution` keeps."""
    side = min(width, height) * crop_ratio
    w = h = max(1, int(round(side)))
    return (width - w) // 2, (height - h) // 2, w, h


def decode_crop(
    data: bytes, box_fn: Any, resolution: int, flip: bool = False
) -> np.ndarray:
    """Decode a JPEG, crop the box that `box_fn(w, h)` picks, resize to a square; returns HWC uint8.

    When the crop is at least twice the output size, libjpeg decodes at 1/2, 1/4 or 1/8 scale (draft), which
    skips most of the IDCT work: the main reason to read small tiers and small crops.
    """
    img = Image.open(io.BytesIO(data))
    full_w, full_h = img.size
    left, top, w, h = box_fn(full_w, full_h)
    if img.format == "JPEG":
        reduce = min(w, h) / resolution
        if reduce >= 2:
            img.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
    img = img.convert("RGB")
    sx, sy = img.width / full_w, img.height / full_h
    region = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=region)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float normalised with ImageNet statistics, on whatever device `images` is on."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


# --------------------------------------------------------------------------------------------- sharding math


def rank_positions(n: int, rank: int, world_size: int, pad: bool, shuffle_seed: int | None = None) -> list[int]:
    """Positions (into the epoch order) that `rank` reads: strided, padded to ceil(n/world) when `pad`.

    With `shuffle_seed`, which rank takes which position of each block of `world_size` consecutive positions
    is drawn from the seed (the same on every rank): a sequential reader's ranks then see different samples
    every epoch instead of the same residue class, with the same exact-once and equal-count guarantees.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if shuffle_seed is not None and world_size > 1:
        rng = random.Random(shuffle_seed)
        order = list(range(world_size))
        out = []
        for block in range(math.ceil(n / world_size)):
            rng.shuffle(order)
            p = block * world_size + order[rank]
            if p < n:
                out.append(p)
            elif pad:
                out.append(p % n)
        return out
    if pad and n:
        # As DistributedSampler: the order is extended by its own start to ceil(n/world) x world, then strided.
        return [p % n for p in range(rank, math.ceil(n / world_size) * world_size, world_size)]
    return list(range(rank, n, world_size))


# --------------------------------------------------------------------------------------------- wds backend


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int


def rank_epoch_indices(n: int, train: bool, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices (into a split's planned order) that `rank` reads this epoch, in reading order.

    train: a permutation that depends only on (seed, epoch), strided over ranks and padded as DistributedSampler
    does (every rank gets ceil(n / world_size)). eval: the planned order, strided, every sample exactly once.
    The ffcv and dali backends feed these indices to their readers, so both give a rank the same samples.
    """
    positions = np.asarray(rank_positions(n, rank, world_size, pad=train), dtype=np.int64)
    if not train:
        return positions
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    return order[positions]


def select_tier(tiers: Sequence[int], resolution: int, crop_ratio: float | None = None) -> int:
    """Smallest staged tier whose images still serve `resolution` (eval needs resolution / crop_ratio)."""
    need = resolution / crop_ratio if crop_ratio else resolution
    fitting = [t for t in sorted(tiers) if t >= need]
    return fitting[0] if fitting else max(tiers)


def split_tier(manifest: dict[str, Any], split: str, resolution: int, crop_ratio: float) -> tuple[bool, int]:
    """(whether `split` is trained on, the staged tier that serves it at `resolution`): training crops at any
    scale, evaluation needs the resize before the centre crop (resolution / crop_ratio)."""
    train = split in TRAIN_SPLITS
    return train, select_tier(manifest["tiers"], resolution, None if train else crop_ratio)


def split_shards(dataset_dir: Path, manifest: dict[str, Any], split: str, tier: int) -> list[ShardInfo]:
    shards = [
        ShardInfo(dataset_dir / s["path"], s["samples"])
        for s in manifest["shards"]
        if s["split"] == split and s["tier"] == tier
    ]
    for s in shards:
        if not s.path.exists():
            raise DataError(f"{s.path}: shard listed in the manifest is missing")
    return sorted(shards, key=lambda s: s.path.name)


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of a WebDataset tar, with a clear error for a broken shard."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                f = tar.extractfile(member)
                parts[suffix] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable or truncated shard ({exc})") from exc
    if current is not None:
        yield current, parts


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
        random.Random(self.seed * 7_919 + self.epoch).shuffle(order)
        return order

    def positions(self) -> list[int]:
        shuffle = self.seed * 1_000_003 + self.epoch if self.train else None
        return rank_positions(self.total, self.rank, self.world_size, pad=self.train, shuffle_seed=shuffle)

    def __len__(self) -> int:
        return len(self.positions())

    def _stream(self) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """(position in epoch stream, key, parts) over the shards in this epoch's order."""
        pos = 0
        for shard in self._shard_order():
            count = 0
            for key, parts in iter_tar_samples(shard.path):
                if "jpg" not in parts or "cls" not in parts:
                    raise DataError(f"{shard.path}: sample {key} lacks its .jpg or .cls (truncated shard?)")
                yield pos, key, parts
                pos += 1
                count += 1
            # tarfile reads a tar cut at a member boundary or inside a header as a shorter valid tar: without
            # this check ranks would silently get different numbers of samples (and batches), which hangs DDP.
            if count != shard.samples:
                raise DataError(
                    f"{shard.path}: {count} samples, the manifest says {shard.samples} (truncated shard?)")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        wanted: dict[int, int] = {}  # stream position -> how many times this worker yields it (padding)
        for j, p in enumerate(self.positions()):
            if j % workers == worker:
                wanted[p] = wanted.get(p, 0) + 1
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank * 64 + worker)
        buffer: list[tuple[torch.Tensor, int]] = []
        # Train: a sample that fails to decode is counted and stood in for by this worker's next good one, so
        # that every rank still yields its exact share (equal batches: no DDP hang). Eval skips it (counted).
        owed, last = 0, None
        for pos, key, parts in self._stream():
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
            label = int(parts["cls"])
            if self.train:
                box = lambda w, h: random_resized_crop_box(w, h, rng)  # noqa: E731
                hwc = decode_crop(parts["jpg"], box, self.resolution, flip=rng.random() < 0.5)
            else:
                box = lambda w, h: center_crop_box(w, h, self.resolution, self.crop_ratio)  # noqa: E731
                hwc = decode_crop(parts["jpg"], box, self.resolution)
        except Exception:  # a sample that fails to decode is counted, not fatal (see __iter__)
            with self._bad.get_lock():
                self._bad.value += 1
            return None
        return torch.from_numpy(hwc).permute(2, 0, 1).contiguous(), label


def make_loader(
    dataset_dir: str | Path, split: str, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
    epoch: int = 0, backend: str = "wds", seed: int = 0, crop_ratio: float = 0.875, num_workers: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader of (uint8 NCHW images, int64 labels) for one rank of one epoch of a staged split."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if split not in TRAIN_SPLITS + EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(TRAIN_SPLITS + EVAL_SPLITS)}")
    if backend in ("ffcv", "dali"):  # imported here: FFCV pulls in numba and OpenCV, DALI its own runtime
        if backend == "ffcv":
            from pipelines.ffcv_backend import make_ffcv_loader as make_backend_loader
        else:
            from pipelines.dali_backend import make_dali_loader as make_backend_loader
        return make_backend_loader(dataset_dir, split, resolution, batch_size, rank, world_size, epoch, seed,
                                   crop_ratio, num_workers)
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
    ctx.set_forkserver_preload(["pipelines.loaders"])
    return ctx


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels


def batches_per_epoch(samples: int, batch_size: int, world_size: int, num_workers: int = 0) -> int:
    """Train batches each rank gets per epoch: equal on every rank, since every rank gets ceil(n / world).

    Each DataLoader worker batches its own share and drops its own partial batch.
    """
    per_rank = math.ceil(samples / world_size)
    workers = max(1, num_workers)
    return sum(len(range(w, per_rank, workers)) // batch_size for w in range(workers))
