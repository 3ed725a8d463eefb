"""What a staging run is asked for, checked once: `StageParams` and the checks its numbers go through.

StageParams holds everything that determines a version's bytes (its fields are hashed into the version's name);
the `stage-imagenet` flow and `effnet stage` take their defaults from it. Beside it: the numbers that say which
code's output a spool or a version is (`ENCODING`, `SHARD_LAYOUT`: bumping one makes staging redo what older
code wrote), the names of staging's own files under a datasets root, and `StagingError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.dataset import EXTRA_FORMATS, DataError
from pipelines.source.imagenet import DEFAULT_VAL_CHUNK

WORK = "work"  # under a datasets root: spools and caches, never a version


WORK_META = "work.json"  # in each work folder: the source path and inputs of its spools, the versions it backs


UNITS = "units"  # in each work folder: a spool (.tar) and its index (.json) per unit


FINGERPRINTS = "fingerprints"  # under WORK: archive fingerprints remembered by finished runs


# Bump when encode_tiers' output bytes change for the same input: spools and versions of older code are redone.
# 2: resized by torch's antialiased bilinear kernel (PIL's filter, values within 1 of PIL's).
# 3: resized by supersampling (`resize`) and encoded by OpenCV's libjpeg-turbo.
# 4: EXIF orientation applied at decode (an image carrying the tag is re-encoded upright at every tier, never kept);
#    16-bit samples scaled to 8 bits (value * 255 / 65535) instead of clipped; bad-file reasons without addresses.
ENCODING = 4


# Bump when `plan_dataset` puts the same images in other shards or another order for the same inputs (the FFCV
# files follow that order). A version's name hashes it, so a run resumed under new code stages a new version
# rather than keep the old order's shards, whose sidecars still verify, beside shards of the new one; the old
# partial version is removed as an orphan. Spools do not depend on it (nor do work folders' names): they are
# reused.
# 2: splits shuffled from `mix_seed(seed, Stream.SHARD_PLAN, split index)`, not random.Random(seed * 1000 +
#    split index); FFCV's per-sample draws seeded from `mix_seed` too.
SHARD_LAYOUT = 2


AUTO = "auto"  # base_version: the latest compatible version under the datasets root, if the source grew from it


# The fewest train images a minival may leave a class it takes from: below this a class is barely learnt and its
# minival images say little. ImageNet keeps >= 707 per class with the default minival; the tests' tiny demo 8.
# `min_train_per_class=0` (`effnet stage --allow-small-train`) turns the check off.
MIN_TRAIN_PER_CLASS = 5


# The smallest tier staging writes: a stored short side, not a model resolution (models.MIN_RESOLUTION, 32, is
# the network's floor; a loader reads the smallest tier at least the size it needs). Staging's own fact: it runs
# in worker processes that never import models or torch.
MIN_TIER = 16


class StagingError(DataError):
    """Staging cannot finish: too many bad files, inconsistent units, ..."""


@dataclass(frozen=True)
class StageParams:
    """Everything that determines the staged bytes; hashed into the dataset version."""

    # Shorter sides, one octave apart: 128 serves the first stages of progressive learning, 256 the middle
    # ones and B0/B1 (eval 224/0.875 = 256), 512 keeps nearly every ImageNet original as it is (short side
    # <= 500) for the larger sizes. A 384 tier would hold the same originals again; more steps (192, 320)
    # make the mid stages' decoding cheaper but cost staging ~0.6 ms a tier per image (measured).
    tiers: tuple[int, ...] = (128, 256, 512)
    shard_size: int = 1024
    # An int is a number of images (25,000 = 25 per class on ImageNet); a float < 1 a fraction of each class.
    minival: int | float = 25_000
    seed: int = 0
    jpeg_quality: int = 90
    max_bad_fraction: float = 0.01
    val_chunk: int = DEFAULT_VAL_CHUNK
    # Extra files written beside the WebDataset shards (EXTRA_FORMATS), by the writers `stager.extra_writer` names.
    formats: tuple[str, ...] = ()
    ffcv_write_mode: str = "jpg"  # FFCV RGBImageField write_mode: 'jpg' | 'raw' | 'proportion'
    ffcv_compress_probability: float = 0.5  # for 'proportion'
    ffcv_jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Every number is checked here, once, whoever passes it (CLI, flow, Python): one line for inf, nan, a
        # fraction where a count belongs or a value out of range, instead of a failure deep in a run.
        tiers = self.tiers if isinstance(self.tiers, (tuple, list)) else ()
        if not tiers:
            raise ValueError(f"tiers must be a non-empty list of sizes >= {MIN_TIER} px, got {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(sorted({whole_number("tiers", t, MIN_TIER) for t in tiers})))
        object.__setattr__(self, "shard_size", whole_number("shard_size", self.shard_size, 1))
        object.__setattr__(self, "minival", _checked_minival(self.minival))
        object.__setattr__(self, "seed", whole_number("seed", self.seed, 0))
        object.__setattr__(self, "jpeg_quality", whole_number("jpeg_quality", self.jpeg_quality, 1, 100))
        object.__setattr__(self, "max_bad_fraction", fraction("max_bad_fraction", self.max_bad_fraction))
        object.__setattr__(self, "val_chunk", whole_number("val_chunk", self.val_chunk, 1))
        object.__setattr__(self, "formats", tuple(self.formats))
        unknown = set(self.formats) - set(EXTRA_FORMATS)
        if unknown:
            raise ValueError(f"unknown formats {sorted(unknown)}; known: {sorted(EXTRA_FORMATS)}")
        if self.ffcv_write_mode not in ("jpg", "raw", "proportion"):
            raise ValueError(f"ffcv_write_mode must be jpg, raw or proportion, got {self.ffcv_write_mode!r}")
        object.__setattr__(
            self, "ffcv_compress_probability", fraction("ffcv_compress_probability", self.ffcv_compress_probability)
        )
        object.__setattr__(self, "ffcv_jpeg_quality", whole_number("ffcv_jpeg_quality", self.ffcv_jpeg_quality, 1, 100))


def whole_number(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]: an int, or a float without a fraction (JSON, YAML and the CLI give
    floats); ValueError (one line naming `name`) for anything else, inf and nan included."""
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
    )
    if integral and not isinstance(value, bool) and low <= value and (high is None or value <= high):
        return int(value)
    bounds = f">= {low}" if high is None else f"in {low}..{high}"
    raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")


def fraction(name: str, value: Any) -> float:
    """`value` as a float in [0, 1]; ValueError (one line naming `name`) for anything else, nan included."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _checked_minival(value: Any) -> int | float:
    """StageParams' minival: an int is a number of images, a float a fraction in [0, 1) (see `minival_value`)."""
    if isinstance(value, float) and not 0 <= value < 1:
        raise ValueError(f"minival as a fraction must be in [0, 1) (a number of images is an int), got {value!r}")
    if isinstance(value, float):
        return value
    return whole_number("minival (a number of images)", value, 0)


def minival_value(value: Any) -> int | float:
    """A minival as the flow and the CLI take it, for StageParams: below 1 a fraction of each class, from 1 a
    whole number of images (1.5 is an error, not 1); inf, nan and negative values are errors."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"minival must be a number of images (>= 1) or a fraction of each class (< 1), got {value!r}")
    if value < 1:
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"minival {value!r} is neither a fraction < 1 nor a whole number of images")
    return int(value)


# What a run that names no parameters stages; the flow and the CLI show and pass these.
DEFAULTS = StageParams()
