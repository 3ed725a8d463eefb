"""Loaders over a staged dataset version: one interface for training and evaluation, three backends.

`make_loader(dataset_dir, split, resolution, batch_size, rank, world_size, epoch, backend="wds")` returns an
iterable of `(images uint8 [N, 3, H, W], labels int64 [N])` batches, read from the smallest staged tier that still
serves the resolution. Images travel as uint8 and are normalised on the device by `transforms.normalize` (4x less
to copy than float32). Training and evaluation (minival and val) read through the backend the recipe names
(`data.backend`: wds, ffcv or dali); `backend` defaults to `wds`.

Distributed semantics (the same for every backend):
- train: in each epoch every rank reads ceil(N / world_size) samples: every sample once across ranks, and the
  ranks whose share is one short padded with samples of the epoch's start, as torch's DistributedSampler pads,
  so that every rank yields the same number of batches (a rank with fewer would hang DDP). Which samples each
  rank reads depends on (seed, epoch) and the world size only; the last partial batch is dropped. An epoch's
  batches (samples, order, crops) are a pure function of (seed, epoch, world size, loader workers), so a loader
  started at batch k (`start_batch`, an exact mid-epoch resume) yields the uninterrupted epoch's batches from k on.
- eval (minival, val): every sample exactly once across ranks, no padding, partial last batch kept; callers
  sum correct counts across ranks.

Modules, in the order a batch is made:
- `sampling`: which positions of a split each rank reads in an epoch (the semantics above).
- `transforms`: crop boxes, JPEG decode-crop-resize, and normalisation with ImageNet's mean and std.
- `wds`: the default backend: each DataLoader worker process reads its own samples of the WebDataset shards
  through their indexes, shuffled window by window.
- `ffcv`: the `ffcv` backend, over the `.beton` files staged with the "ffcv" format.
- `dali`: the `dali` backend, over the shards and the indexes staged with the "dali" format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pipelines.dataset import BACKENDS, EVAL_SPLITS, TRAIN_SPLITS
from pipelines.loading.transforms import TrainCrop

# The eval centre crop when a caller names none: B0's, 224 / (224 + 32), the V1 rule of `models` (this package may
# not import models; tests/unit/test_models.py holds the two equal). Every evaluation of a model passes its
# variant's own ratio; train splits take random crops and never use it.
DEFAULT_CROP_RATIO = 0.875


def make_loader(
    dataset_dir: str | Path,
    split: str,
    resolution: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    backend: str = "wds",
    seed: int = 0,
    crop_ratio: float = DEFAULT_CROP_RATIO,
    num_workers: int = 0,
    start_batch: int = 0,
    train_crop: TrainCrop = TrainCrop(),
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader of (uint8 NCHW images, int64 labels) for one rank of one epoch of a staged split; a train
    loader started at `start_batch` yields the batches an uninterrupted one yields from that batch on. Train
    crops are random-resized within `train_crop`'s ranges; eval takes the centre crop of `crop_ratio`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if split not in TRAIN_SPLITS + EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(TRAIN_SPLITS + EVAL_SPLITS)}")
    if start_batch < 0 or (start_batch and split not in TRAIN_SPLITS):
        raise ValueError(f"start_batch {start_batch}: only a train loader starts part-way, at a batch >= 0")
    # Each backend is imported when asked for: FFCV pulls in numba and OpenCV, DALI its own runtime.
    make_backend_loader: Callable[..., Iterable[tuple[torch.Tensor, torch.Tensor]]]
    if backend == "ffcv":
        from pipelines.loading.ffcv import make_ffcv_loader as make_backend_loader
    elif backend == "dali":
        from pipelines.loading.dali import make_dali_loader as make_backend_loader
    else:
        from pipelines.loading.wds import make_wds_loader as make_backend_loader
    return make_backend_loader(
        dataset_dir,
        split,
        resolution,
        batch_size,
        rank,
        world_size,
        epoch,
        seed,
        crop_ratio,
        num_workers,
        start_batch,
        train_crop=train_crop,
    )
