"""TODO"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from pipelines.dataset import EVAL_SPLITS, TRAIN_SPLITS

BACKENDS = ("wds", "ffcv", "dali")


def make_loader(
    dataset_dir: str | Path, split: str, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
    epoch: int = 0, backend: str = "wds", seed: int = 0, crop_ratio: float = 0.875, num_workers: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A DataLoader of (uint8 NCHW images, int64 labels) for one rank of one epoch of a staged split."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if split not in TRAIN_SPLITS + EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(TRAIN_SPLITS + EVAL_SPLITS)}")
    # Each backend is imported when asked for: FFCV pulls in numba and OpenCV, DALI its own runtime.
    if backend == "ffcv":
        from pipelines.loading.ffcv import make_ffcv_loader as make_backend_loader
    elif backend == "dali":
        from pipelines.loading.dali import make_dali_loader as make_backend_loader
    else:
        from pipelines.loading.wds import make_wds_loader as make_backend_loader
    return make_backend_loader(dataset_dir, split, resolution, batch_size, rank, world_size, epoch, seed,
                               crop_ratio, num_workers)
