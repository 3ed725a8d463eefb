"""One way to derive a seed from several numbers (the run's seed, an epoch, a rank, a worker, a sample index).

The random streams of staging, the loaders and the training loop (a split's shuffle into shards, an epoch's
sample order, a loader worker's crops, a rank's augmentations) take their seeds from `mix_seed(seed, *parts)`,
so that no module carries its own hand-picked primes. numpy's SeedSequence does the mixing: it hashes the whole
tuple, so (1, 0) and (0, 1), or (seed, epoch) and (seed + 1, epoch - 1), give unrelated seeds.

The streams of the data path put their `Stream` right after the run's seed, so that two of them drawn from the
same numbers (an epoch's shard order and its rank order, say) never coincide; the training loop's global
generators (`pipelines.training.steps.seed_everything`) mix (seed, epoch, rank) untagged, its batch
augmentations draw from the `AUGMENT` stream.
"""

from __future__ import annotations

from enum import IntEnum, unique

import numpy as np

SEED_BITS = 32  # numpy's legacy np.random.seed takes < 2**32; random.Random and torch take any of these


@unique
class Stream(IntEnum):
    """What a seed is for. The values lie far above any epoch, rank, worker or split index, so a tagged stream
    never coincides with an untagged one, whose second part is an epoch."""

    SHARD_PLAN = 0x5EED_0001  # staging.plan: a split's shuffle before it is cut into shards
    FFCV_WRITE = 0x5EED_0002  # staging.ffcv_files: a sample's raw-or-JPEG draw (write_mode 'proportion')
    EPOCH_ORDER = 0x5EED_0003  # loading.sampling: an epoch's permutation of a split (the ffcv and dali backends)
    SHARD_ORDER = 0x5EED_0004  # loading.wds: an epoch's shard order
    RANK_ORDER = 0x5EED_0005  # loading.wds: which rank takes which position of each block of positions
    WDS_SAMPLE = 0x5EED_0006  # loading.wds: one sample's crop and flip (the rank's j-th sample of an epoch)
    FFCV_AUGMENT = 0x5EED_0007  # loading.ffcv: an epoch's crops and flips (the sample index mixed in per sample)
    DALI = 0x5EED_0008  # loading.dali: one rank's pipeline in an epoch
    AUGMENT = 0x5EED_0009  # training.worker: a rank's batch augmentations (RandAugment, AutoAugment, mixup) in a step
    WDS_WINDOW = 0x5EED_000A  # loading.wds: the permutation of one window of a loader worker's share in an epoch
    STEP = 0x5EED_000B  # training.worker: a rank's global generators (dropout, stochastic depth) in one step
    VAL_CARVE = 0x5EED_000C  # staging.plan: which train images of a class are held out as val (no val split)


def mix_seed(*parts: int) -> int:
    """A seed in [0, 2**SEED_BITS) that depends on every part, their order and their number; parts are ints >= 0."""
    if not parts or any(not isinstance(p, (int, np.integer)) or isinstance(p, bool) or p < 0 for p in parts):
        raise ValueError(f"seed parts must be whole numbers >= 0, got {parts!r}")
    # The number of parts goes first: SeedSequence reads its input as if padded with zeros, so (seed, epoch)
    # and (seed, epoch, 0) would otherwise be the same seed (a rank-0 stream the same as its epoch's).
    words = [len(parts), *(int(p) for p in parts)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])
