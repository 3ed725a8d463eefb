"""Which samples of a split each rank reads in an epoch: the distributed semantics every backend shares.

`rank_positions` strides an epoch's positions over the ranks (padded for training, as torch's DistributedSampler
pads), optionally drawing from a seed which rank takes which position of each block; the `wds` backend applies
it to its stream of shards. `rank_epoch_indices` applies it to an epoch's permutation of the split (the `ffcv`
and `dali` backends, which read samples by index). `batches_per_epoch` is how many train batches each rank gets.
"""

from __future__ import annotations

import math
import random

import numpy as np

from pipelines.seeds import Stream, mix_seed


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


def rank_epoch_indices(n: int, train: bool, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """Indices (into a split's planned order) that `rank` reads this epoch, in reading order.

    train: a permutation that depends only on (seed, epoch), strided over ranks and padded as DistributedSampler
    does (every rank gets ceil(n / world_size)). eval: the planned order, strided, every sample exactly once.
    The ffcv and dali backends feed these indices to their readers, so both give a rank the same samples.
    """
    positions = np.asarray(rank_positions(n, rank, world_size, pad=train), dtype=np.int64)
    if not train:
        return positions
    order = np.random.Generator(np.random.PCG64(mix_seed(seed, Stream.EPOCH_ORDER, epoch))).permutation(n)
    return order[positions]


def batches_per_epoch(samples: int, batch_size: int, world_size: int, num_workers: int = 0) -> int:
    """Train batches each rank gets per epoch: equal on every rank, since every rank gets ceil(n / world).

    Each DataLoader worker batches its own share and drops its own partial batch.
    """
    per_rank = math.ceil(samples / world_size)
    workers = max(1, num_workers)
    return sum(len(range(w, per_rank, workers)) // batch_size for w in range(workers))
