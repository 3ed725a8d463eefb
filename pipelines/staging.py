"""Staging: an ImageNet source -> checked RGB images -> minival hold-out -> WebDataset shards per resolution tier.

The work is split in two kinds of idempotent units so that a killed run resumes where it stopped:

1. `process_unit` (one per class of train, one per chunk of val): decode every image once, convert it to RGB,
   encode it once per tier that needs new pixels, and spool those into `work/units/<unit>.tar` plus a JSON
   index; an original a tier keeps as it is is not copied but recorded where the source holds it. A unit
   whose index exists and whose spool verifies is not redone. Units run `workers` at a time on threads (or
   processes: see `unit_runner`).
2. `write_shard` (one per split x tier x shard): copy the planned samples from the spools and the source into
   a deterministic tar. A shard whose sidecar checksum matches the file is not redone.

Between them `plan_dataset` picks the minival (seeded, stratified), shuffles every split across classes and cuts
it into shards; at the end `build_manifest` records everything. No file carries a timestamp or a path that
depends on the run, so an interrupted-then-resumed stage produces the same bytes as an uninterrupted one.

A source that grew since an earlier version is staged incrementally: the new version has that version as its
`base_version`, hard-links its shards (same files, no disk used), keeps every image's split (so the minival
stays), and decodes only the images the base does not hold. `keys.json.gz` in each version lists its images,
so the next version knows what is new without reading shards.

Each work folder notes (`work.json`) the source path and inputs its spools are for and the versions it backs, so
that a run can remove what a failed run left and no run will reuse (`remove_orphans`).

The flow in `flows/stage_imagenet.py` only sequences these functions.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from pipelines import imagenet
from pipelines.atomic import (
    atomic_open, atomic_write_bytes, atomic_write_json, fsync_files, remove_stale_temporaries, sha256_file,
    start_writeback,
)

SPLITS = ("train", "minival", "val")
MANIFEST = "manifest.json"
KEYS = "keys.json.gz"  # in each version: every image key by split (with its WNID) and the bad files' keys
LATEST = "LATEST"  # under a datasets root: the name of the most recently staged version
WORK = "work"  # under a datasets root: spools and caches, never a version
WORK_META = "work.json"  # in each work folder: the source path and inputs of its spools, the versions it backs
FINGERPRINTS = "fingerprints"  # under WORK: archive fingerprints remembered by finished runs
MANIFEST_FORMAT = 1
# Bump when encode_tiers' output bytes change for the same input: spools and versions of older code are redone.
# 2: resized by torch's antialiased bilinear kernel (PIL's filter, values within 1 of PIL's).
# 3: resized by supersampling (`resize`) and encoded by OpenCV's libjpeg-turbo.
# 4: EXIF orientation applied at decode (an image carrying the tag is re-encoded upright at every tier, never kept);
#    16-bit samples scaled to 8 bits (value * 255 / 65535) instead of clipped; bad-file reasons without addresses.
ENCODING = 4
AUTO = "auto"  # base_version: the latest compatible version under the datasets root, if the source grew from it
# The fewest train images a minival may leave a class it takes from: below this a class is barely learnt and its
# minival images say little. ImageNet keeps >= 707 per class with the default minival; the tests' tiny demo 8.
# `min_train_per_class=0` (`effnet stage --allow-small-train`) turns the check off.
MIN_TRAIN_PER_CLASS = 5
# More unit workers than any host has cores; a typo (--workers 10000) would otherwise start that many processes.
MAX_WORKERS = 512


class StagingError(RuntimeError):
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
    val_chunk: int = 1000
    # Extra files written beside the WebDataset shards, by writers registered in EXTRA_FORMATS.
    formats: tuple[str, ...] = ()
    ffcv_write_mode: str = "jpg"  # FFCV RGBImageField write_mode: 'jpg' | 'raw' | 'proportion'
    ffcv_compress_probability: float = 0.5  # for 'proportion'
    ffcv_jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # Every number is checked here, once, whoever passes it (CLI, flow, Python): one line for inf, nan, a
        # fraction where a count belongs or a value out of range, instead of a failure deep in a run.
        tiers = self.tiers if isinstance(self.tiers, (tuple, list)) else ()
        if not tiers:
            raise ValueError(f"tiers must be a non-empty list of sizes >= 16 px, got {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(sorted({whole_number("tiers", t, 16) for t in tiers})))
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
        object.__setattr__(self, "ffcv_compress_probability",
                           fraction("ffcv_compress_probability", self.ffcv_compress_probability))
        object.__setattr__(self, "ffcv_jpeg_quality", whole_number("ffcv_jpeg_quality", self.ffcv_jpeg_quality, 1, 100))


# --------------------------------------------------------------------------------------------- checked numbers


def whole_number(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]: an int, or a float without a fraction (JSON, YAML and the CLI give
    floats); ValueError (one line naming `name`) for anything else, inf and nan included."""
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer())
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
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"minival must be a number of images (>= 1) or a fraction of each class (< 1), "
                         f"got {value!r}")
    if value < 1:
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"minival {value!r} is neither a fraction < 1 nor a whole number of images")
    return int(value)


def resolve_workers(workers: Any) -> int:
    """Units decoded at once: None is every core; anything else a whole number in 1..MAX_WORKERS (0 is an
    error, not "the default")."""
    if workers is None:
        return available_cores()
    return whole_number("workers", workers, 1, MAX_WORKERS)


# Writers of extra formats, run after the shards and before the manifest, as "module:function" so that
# staging imports FFCV or DALI only when asked for them. A writer is called as
# `fn(plan, shard_entries, work, dest, params) -> list[dict]` and returns manifest entries (each with at least
# path, bytes, sha256); it must be idempotent (reuse its verified outputs) and write atomically.
EXTRA_FORMATS: dict[str, str] = {
    "ffcv": "pipelines.ffcv_backend:write_ffcv_files",
    "dali": "pipelines.dali_backend:write_dali_indexes",
}


def extra_writer(fmt: str) -> Callable[..., list[dict[str, Any]]]:
    import importlib

    module, _, fn = EXTRA_FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module), fn)


# --------------------------------------------------------------------------------------------- images


class BadImage(ValueError):
    """An image that does not decode; the message is the reason recorded in the manifest."""


def _decode(data: bytes, tiers: Sequence[int]) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """(upright BGR pixels (H, W, 3) uint8, original bytes storable as is, upright full size (w, h)).

    JPEGs are decoded at the smallest DCT scale that still covers every tier that needs pixels. The whole file
    is decoded at any scale (every entropy-coded byte is read), so a truncated or corrupt file fails here, not in
    a training job.

    RGB JPEGs (nearly all of ImageNet) are decoded by OpenCV's libjpeg-turbo straight into the BGR array its
    resizer and encoder take (PIL's decode plus the copy out of PIL cost 0.6 ms more per image); 16-bit PNGs by
    OpenCV at 16 bits; everything else (CMYK, grayscale, palette, 16-bit TIFF or PGM...) goes through PIL
    (`_pil_pixels`). 16-bit samples become value * 255 / 65535, rounded (`_to_8_bits`), not PIL's clipping.

    EXIF orientation is applied here, once, as PIL's `ImageOps.exif_transpose` applies it (the EXIF tag, else
    XMP's tiff:Orientation), and no tier carries the tag: decoders that honour it (exif_transpose, OpenCV's
    default IMREAD_COLOR) and decoders that do not then see the same pixels. So an image that carries the tag at
    all is never kept as its original bytes.
    """
    if not data:
        raise BadImage("empty file")
    cv2 = _cv2()
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        fmt, mode, stored = img.format, img.mode, img.size
        orientation = _orientation(img)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"does not decode: {_describe(exc)}") from None
    if stored[0] < 1 or stored[1] < 1:
        raise BadImage("zero-sized image")
    rgb_jpeg = fmt == "JPEG" and mode == "RGB"
    keep = rgb_jpeg and orientation is None
    # IMREAD_IGNORE_ORIENTATION: OpenCV would rotate by the EXIF tag alone, not by XMP; `_upright` does both.
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    if rgb_jpeg:
        # Tier sizes are symmetric in (w, h), so the stored orientation needs the same scale as the upright one.
        needed = [size for size in (tier_size(*stored, t) for t in tiers) if not (keep and size == stored)]
        # Nothing needs pixels when every tier keeps the original bytes: decode at 1/8 only to check the file.
        scale = _dct_scale(stored, needed) if needed else 8
        flags |= cv2.IMREAD_COLOR if scale == 1 else getattr(cv2, f"IMREAD_REDUCED_COLOR_{scale}")
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if pixels is None:  # OpenCV's decoder fails on a truncated or corrupt stream (PIL says why)
            raise BadImage(f"does not decode: {_pil_error(data)}")
    elif fmt == "PNG" and data[_PNG_BIT_DEPTH] == 16:
        # PIL reads 16-bit RGB(A) PNGs as 8-bit by their high bytes and clips 16-bit grey ones in convert("RGB").
        wide = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
        if wide is None:
            raise BadImage(f"does not decode: {_pil_error(data)}")
        pixels = _to_8_bits(wide)
    else:
        pixels = _pil_pixels(img)
    return _upright(pixels, orientation), keep, _upright_size(stored, orientation)


_PNG_BIT_DEPTH = 24  # byte offset of the bit depth in a PNG: 8-byte signature, IHDR length, type, width, height
_ORIENTATION = 0x0112  # the EXIF (TIFF) orientation tag
# EXIF orientation -> the array operation on (H, W, C) pixels that is ImageOps.exif_transpose's Image.Transpose.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (counter-clockwise, i.e. 90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}


def _orientation(img: Image.Image) -> int | None:
    """The orientation tag as exif_transpose reads it (EXIF, else XMP), or None when the image has none.

    EXIF that PIL cannot parse counts as orientation 1: the image is re-encoded without it rather than kept, as
    decoders may disagree on it.
    """
    try:
        value = img.getexif().get(_ORIENTATION)
    except Exception:
        return 1
    return value if isinstance(value, int) or value is None else 1


def _upright(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    turn = _UPRIGHT.get(orientation) if orientation is not None else None
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


def _upright_size(size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _to_8_bits(samples: np.ndarray) -> np.ndarray:
    """16-bit samples as 8-bit ones: value * 255 / 65535, rounded (never a tie: 65535 / 255 = 257 is odd)."""
    return ((samples.astype(np.uint32) * 255 + 65535 // 2) // 65535).astype(np.uint8)


_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _pil_pixels(img: Image.Image) -> np.ndarray:
    """BGR pixels of an image PIL decodes. CMYK, grayscale, palette, RGBA... become RGB by PIL's convert (FFCV and
    the loaders need 3 channels); 16-bit grey (modes I;16*, and I, which is how PIL gives 16-bit PGMs) is scaled
    by `_to_8_bits`; 32-bit samples outside 0..65535 and floating-point ones have no defined 8-bit scale."""
    cv2 = _cv2()
    try:
        img.load()
        if img.mode == "F":
            raise BadImage("floating-point samples (PIL mode F) have no defined 8-bit scale")
        if img.mode in _SIXTEEN_BIT or img.mode == "I":
            samples = np.asarray(img)
            if samples.min() < 0 or samples.max() > 65535:
                raise BadImage("32-bit integer samples outside 0..65535 (PIL mode I) have no defined 8-bit scale")
            return cv2.cvtColor(_to_8_bits(samples.astype(np.uint16)), cv2.COLOR_GRAY2BGR)
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except BadImage:
        raise
    except Exception as exc:
        raise BadImage(f"does not decode: {_describe(exc)}") from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


# A Python object's repr with its memory address, as PIL names the BytesIO it could not read ("cannot identify
# image file <_io.BytesIO object at 0x7f02e010bab0>"), and any other long hex address.
_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{8,}")


def _describe(exc: BaseException) -> str:
    """An exception as a bad file's reason: its type and message without memory addresses, so that every run
    writes the same manifest."""
    text = _ADDRESS.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dct_scale(full: tuple[int, int], needed: Sequence[tuple[int, int]]) -> int:
    """The largest libjpeg scale denominator (1, 2, 4, 8) whose output still covers every needed size."""
    need_w, need_h = max(w for w, _ in needed), max(h for _, h in needed)
    for k in (8, 4, 2):
        if -(-full[0] // k) >= need_w and -(-full[1] // k) >= need_h:
            return k
    return 1


def _pil_error(data: bytes) -> str:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        return _describe(exc)
    return "OpenCV's decoder rejected the stream"


def tier_size(width: int, height: int, tier: int) -> tuple[int, int]:
    """Shorter side scaled down to `tier` (never up), aspect kept."""
    short = min(width, height)
    if short <= tier:
        return width, height
    scale = tier / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_tiers(data: bytes, tiers: Sequence[int], quality: int) -> dict[int, tuple[bytes, int, int]]:
    """JPEG bytes (and size) of the upright image at each tier. Raises BadImage.

    An RGB JPEG without an orientation tag no larger than a tier is stored as it is (no second lossy pass; every
    such tier gets the same bytes object); every other tier is resized with `resize`, from the smallest pixels
    already at hand that are at least twice its size (an octave below a tier costs a 2x2 mean), and encoded by
    OpenCV's libjpeg-turbo (a quarter faster than PIL's encoder on these sizes), without metadata.
    """
    cv2 = _cv2()
    tiers = sorted(tiers, reverse=True)
    decoded, keep, full = _decode(data, tiers)
    out: dict[int, tuple[bytes, int, int]] = {}
    sources = [decoded]  # largest first
    for tier in tiers:
        w, h = tier_size(*full, tier)
        if (w, h) == full and keep:
            out[tier] = (data, w, h)  # already small enough: keep the original bytes
            continue
        src = next((p for p in reversed(sources) if min(p.shape[1] / w, p.shape[0] / h) >= _OCTAVE), decoded)
        resized = src if (src.shape[1], src.shape[0]) == (w, h) else resize(src, (w, h))
        sources.append(resized)
        ok, jpeg = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise BadImage(f"could not encode a {w}x{h} JPEG")
        out[tier] = (jpeg.tobytes(), w, h)
    return out


# A source this much larger than a tier (on both sides) is filtered enough by one more 2x2 mean; a bit below 2
# so that rounded tier sizes (341 -> 171) still count as an octave.
_OCTAVE = 1.95


def _cv2() -> Any:
    import cv2  # only where images are decoded and resized: the CLI's other commands need not pay for it

    return cv2


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale (H, W, 3) uint8 pixels to `size` (w, h) with an antialiased filter.

    Supersampling: bilinear *up* to m x the target (m = the smallest integer >= the downscale factor, at least
    2), then the mean of each m x m block, which OpenCV computes on a fast integer path. Within 1 grey level on
    average of the exact area average (INTER_AREA), at less than half its cost and a third of PIL's BILINEAR;
    torch's antialiased kernel is as fast but costs each worker process two seconds of import.
    """
    cv2 = _cv2()
    w, h = size
    src_h, src_w = pixels.shape[:2]
    m = max(2, math.ceil(max(src_w / w, src_h / h)))
    up = cv2.resize(pixels, (m * w, m * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(up, (w, h), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------- tar


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte header `tarfile` writes for `_deterministic_tarinfo(name, size)` in USTAR format, built
    directly: tarfile's own per-member code was a fifth of the staging time."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        return _deterministic_tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    chksum = sum(head) + _HEADER_TAIL_SUM + 8 * 32  # the checksum counts its own field as 8 spaces
    return head + b"%06o\0 " % chksum + _HEADER_TAIL


# typeflag '0', no link name, 'ustar\0' '00', empty owner names and device numbers, no prefix, padding.
_HEADER_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
_HEADER_TAIL_SUM = sum(_HEADER_TAIL)


class _TarWriter:
    """Writes regular files as a tar with the bytes `tarfile` would write (see `_deterministic_tarinfo`),
    hashing as it goes."""

    def __init__(self, f: Any) -> None:
        self._f, self.offset, self.sha256 = f, 0, hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append one file; returns where its data starts."""
        self._write(_tar_header(name, len(data)))
        start = self.offset
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(b"\0" * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        return start

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), then zeros to a whole record, as tarfile does."""
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._write(b"\0" * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))


# --------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class UnitResult:
    unit_id: str
    split: str  # "train" or "val"
    records: tuple[dict[str, Any], ...]  # key, wnid, label, source, offsets per tier
    bad: tuple[dict[str, str], ...]
    skipped: int = 0  # images left out because the base version holds them


def unit_paths(work: Path, unit_id: str) -> tuple[Path, Path]:
    return work / "units" / f"{unit_id}.tar", work / "units" / f"{unit_id}.json"


def _deterministic_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def process_unit(
    unit: imagenet.TrainUnit | imagenet.ValUnit, split: str, work: Path, params: StageParams,
    skip: frozenset[str] = frozenset(),
) -> UnitResult:
    """Decode, check and encode one unit's images (but those in `skip`) into its spool; reuse a finished spool.

    Needs nothing but its (picklable) arguments, so it runs in any worker process.
    """
    unit_id = unit_identifier(unit, split)
    spool, index = unit_paths(work, unit_id)
    cached = load_unit(work, unit_id, params)
    if cached is not None:
        return cached
    spool.parent.mkdir(parents=True, exist_ok=True)
    tmp = spool.with_name(f".{spool.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            tar = _TarWriter(f)
            records, bad, skipped = _write_spool(tar, unit, split, params, skip)
            tar.close()
            f.flush()
            # Never fsynced (load_unit verifies a spool before reusing it), but written back from now on
            # rather than in one burst when the kernel's dirty-page limits are reached.
            start_writeback(f.fileno())
        os.replace(tmp, spool)
    finally:
        tmp.unlink(missing_ok=True)  # an error or interrupt mid-unit leaves no partial spool
    atomic_write_json(
        index,
        {"unit": unit_id, "split": split, "params": _unit_params(params), "spool_sha256": tar.sha256.hexdigest(),
         "records": records, "bad": bad, "skipped": skipped},
    )
    return UnitResult(unit_id, split, tuple(records), tuple(bad), skipped)


def _write_spool(
    tar: _TarWriter, unit: imagenet.TrainUnit | imagenet.ValUnit, split: str, params: StageParams,
    skip: frozenset[str],
) -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    if isinstance(unit, imagenet.TrainUnit):
        images = imagenet.read_train_unit(unit)
    else:
        images = imagenet.read_val_unit(unit)
    records: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    skipped = 0
    for raw in images:
        if raw.key in skip:
            skipped += 1
            continue
        try:
            encoded = encode_tiers(raw.data, params.tiers, params.jpeg_quality)
        except BadImage as exc:
            bad.append({"source": raw.source_name, "split": split, "wnid": raw.wnid, "reason": str(exc)})
            continue
        # A tier that keeps the original points at the source (offset None: read it at `origin`); the spool
        # holds only re-encoded tiers (without this it held two copies of most ImageNet originals).
        offsets: dict[str, list[int | None]] = {}
        written: dict[int, int | None] = {}  # id(bytes) -> spool offset
        for tier, (jpeg, w, h) in sorted(encoded.items()):
            if id(jpeg) not in written:
                kept = jpeg is raw.data and raw.origin is not None
                written[id(jpeg)] = None if kept else tar.add(f"{raw.key}.{tier}.jpg", jpeg)
            offsets[str(tier)] = [written[id(jpeg)], len(jpeg), w, h]
        record = {"key": raw.key, "wnid": raw.wnid, "label": raw.label, "source": raw.source_name, "tiers": offsets}
        if raw.origin is not None and None in written.values():
            record["origin"] = list(raw.origin)
        records.append(record)
    return records, bad, skipped


def _unit_params(params: StageParams) -> dict[str, Any]:
    # Only what changes a spool's bytes: a new shard size or minival reuses every spool.
    return {"tiers": list(params.tiers), "jpeg_quality": params.jpeg_quality, "encoding": ENCODING}


def load_unit(work: Path, unit_id: str, params: StageParams) -> UnitResult | None:
    """A finished unit if its index and spool agree with `params`, else None (the unit will be redone)."""
    spool, index = unit_paths(work, unit_id)
    if not (spool.exists() and index.exists()):
        return None
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("params") != _unit_params(params) or meta.get("spool_sha256") != sha256_file(spool):
        return None
    return UnitResult(unit_id, meta["split"], tuple(meta["records"]), tuple(meta["bad"]), meta.get("skipped", 0))


def unit_identifier(unit: imagenet.TrainUnit | imagenet.ValUnit, split: str) -> str:
    """A file-safe, stable name for a unit: the class WNID for train, the chunk index for val."""
    if isinstance(unit, imagenet.TrainUnit):
        return f"{split}-{unit.wnid}"
    return f"{split}-{unit.index:05d}"


# --------------------------------------------------------------------------------------------- base versions


@dataclass(frozen=True)
class BaseVersion:
    """A finished version that a new one grows from: its images keep their split and shards."""

    name: str
    manifest: dict[str, Any] = field(repr=False)
    splits: dict[str, dict[str, str]] = field(repr=False)  # split -> key -> wnid
    bad: dict[str, list[str]] = field(repr=False)  # key of a file that did not decode -> [source split, wnid]

    def known(self, split: str) -> dict[str, str]:
        """key -> wnid of every image the base holds (staged or reported bad) from a source split."""
        out: dict[str, str] = {}
        for s in ("train", "minival") if split == "train" else ("val",):
            out.update(self.splits[s])
        out.update((key, wnid) for key, (s, wnid) in self.bad.items() if s == split)
        return out

    def known_by_class(self, split: str) -> dict[str, set[str]]:
        out: dict[str, set[str]] = defaultdict(set)
        for key, wnid in self.known(split).items():
            out[wnid].add(key)
        return out

    @property
    def num_shards(self) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for s in self.manifest["shards"]:
            counts[(s["split"], s["tier"])] += 1
        return counts


def _keys_document(splits: dict[str, dict[str, str]], bad: dict[str, list[str]]) -> bytes:
    doc = {"format": 1, "splits": {s: splits[s] for s in SPLITS}, "bad": bad}
    # Sorted, and gzip with mtime=0 and no file name: the same keys give the same bytes.
    return gzip.compress(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


def read_keys(dataset_dir: str | os.PathLike[str]) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """(split -> key -> wnid, bad key -> [source split, wnid]) of a staged version, from its keys file."""
    path = Path(dataset_dir) / KEYS
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (the version was staged by older code)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt keys file: {exc}") from None
    return {s: doc["splits"][s] for s in SPLITS}, doc["bad"]


def finished_versions(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, manifest) of every finished version under a datasets root, oldest first.

    A folder without a manifest is an unfinished run, never a version.
    """
    found = []
    if not root.is_dir():
        return []
    for d in root.iterdir():
        path = d / MANIFEST
        if d.name == WORK or not path.is_file():
            continue
        try:
            found.append((path.stat().st_mtime_ns, d.name, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return [(name, m) for _, name, m in sorted(found, key=lambda f: (f[0], f[1]))]


def _same_params(manifest: dict[str, Any], params: StageParams) -> bool:
    return manifest.get("params") == json.loads(json.dumps(asdict(params))) and manifest.get("encoding") == ENCODING


def find_staged(
    root: Path, fingerprint: dict[str, Any], params: StageParams, base_version: str | None = AUTO
) -> Path | None:
    """A finished version of exactly this source and these parameters, if any: staged in full, on top of
    `base_version`, or (AUTO) either way."""
    named = dataset_version(fingerprint, params, None if base_version == AUTO else base_version)
    if (root / named / MANIFEST).is_file():
        return root / named
    if base_version != AUTO:
        return None
    for name, manifest in reversed(finished_versions(root)):
        if manifest.get("source", {}).get("fingerprint") == fingerprint and _same_params(manifest, params):
            return root / name
    return None


def _source_keys(src: imagenet.ImageNetSource) -> dict[str, dict[str, str] | None]:
    """Source split ('train', 'val') -> key -> wnid where the source lists its files without reading them
    (trees; val of archives). None for the train split of archives: a class tar must be read to list it."""
    train = None
    if src.kind != "archives":
        train = {Path(n).stem: u.wnid for u in src.train_units() for n in u.names}
    val = {Path(e.source_name).stem: e.wnid for u in src.val_units(max(1, src.num_val)) for e in u.entries}
    return {"train": train, "val": val}


def _base_problem(base: BaseVersion, src: imagenet.ImageNetSource, params: StageParams) -> str | None:
    """Why `base` cannot be grown into this source, or None."""
    if base.manifest.get("classes") != list(src.classes):
        return "its classes differ from the source's"
    if not _same_params(base.manifest, params):
        return "it was staged with other parameters"
    if params.formats:
        return f"extra formats ({', '.join(params.formats)}) are written whole, not incrementally"
    for split, listed in _source_keys(src).items():
        if listed is None:
            continue  # class tars: checked while reading (the units count the base images they saw)
        missing = sorted(k for k, wnid in base.known(split).items() if listed.get(k) != wnid)
        if missing:
            return (f"{len(missing)} of its {split} images are not in the source with the same class "
                    f"(e.g. {missing[0]})")
    return None


def resolve_base(
    root: Path, base_version: str | None, src: imagenet.ImageNetSource, params: StageParams,
    log: Callable[..., None],
) -> BaseVersion | None:
    """The version to grow from: `base_version` by name, the latest compatible one for AUTO, or None."""
    if base_version is None:
        return None
    if base_version != AUTO:
        if not (root / base_version / MANIFEST).is_file():
            raise ValueError(f"{root / base_version}: base version is not a finished staged dataset")
        base = _load_base(root / base_version)
        problem = _base_problem(base, src, params)
        if problem:
            raise ValueError(f"cannot stage incrementally from {base_version}: {problem}")
        return base
    reasons = []
    for name, manifest in reversed(finished_versions(root)):
        if manifest.get("classes") != list(src.classes) or not _same_params(manifest, params):
            continue  # another dataset, or other parameters: not a candidate
        if not (root / name / KEYS).is_file():
            continue
        base = _load_base(root / name)
        problem = _base_problem(base, src, params)
        if problem is None:
            return base
        reasons.append(f"{name}: {problem}")
    if reasons:
        log(f"staging in full: no earlier version is a subset of the source ({'; '.join(reasons[:3])})")
    return None


def _load_base(dataset_dir: Path) -> BaseVersion:
    splits, bad = read_keys(dataset_dir)
    return BaseVersion(dataset_dir.name, read_manifest(dataset_dir), splits, bad)


def _unit_args(
    src: imagenet.ImageNetSource, work: Path, params: StageParams, base: BaseVersion | None
) -> list[tuple[Any, ...]]:
    """Argument tuples for process_unit: every unit, or with a base only what the base lacks."""
    if base is None:
        args: list[tuple[Any, ...]] = [(u, "train", work, params) for u in src.train_units()]
        return args + [(u, "val", work, params) for u in src.val_units(params.val_chunk)]
    known = base.known_by_class("train")
    args = []
    for u in src.train_units():
        skip = frozenset(known.get(u.wnid, ()))
        if u.names:  # a listed folder: read only the new files
            names = tuple(n for n in u.names if Path(n).stem not in skip)
            if names:
                args.append((replace(u, names=names), "train", work, params))
        else:  # a class tar is read whole; the images the base holds are skipped and counted
            args.append((u, "train", work, params, skip))
    known_val = base.known("val")
    (whole,) = src.val_units(max(1, src.num_val)) or [imagenet.ValUnit(0, "", ())]
    new = [e for e in whole.entries if Path(e.source_name).stem not in known_val]
    for i, start in enumerate(range(0, len(new), params.val_chunk)):
        args.append((imagenet.ValUnit(i, whole.path, tuple(new[start:start + params.val_chunk])), "val", work, params))
    return args


def _unit_images(unit: imagenet.TrainUnit | imagenet.ValUnit) -> float:
    """About how many images a unit holds (a class tar's size over ImageNet's ~110 KB per image)."""
    if isinstance(unit, imagenet.ValUnit):
        return len(unit.entries)
    return len(unit.names) if unit.names else max(unit.size, 0) / 110e3


def _check_base_seen(units: Sequence[UnitResult], base: BaseVersion) -> None:
    """Each class tar, read whole, must have held every image its class has in the base (the source only grew)."""
    known = base.known_by_class("train")
    for unit in units:
        if unit.split != "train":
            continue
        wnid = unit.unit_id.removeprefix("train-")
        if unit.skipped != len(known.get(wnid, ())):
            raise StagingError(
                f"class {wnid}: the source holds {unit.skipped} of the {len(known.get(wnid, ()))} images that "
                f"base version {base.name} has: the source did not only grow, so stage it in full (--full)"
            )


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardPlan:
    split: str
    tier: int
    index: int
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def relpath(self) -> str:
        return f"{self.tier}/{self.name}"


@dataclass
class DatasetPlan:
    classes: tuple[str, ...]
    splits: dict[str, list[str]]  # split -> shuffled keys written by this version (a base's are not repeated)
    shards: list[ShardPlan]
    bad: list[dict[str, str]]
    total_seen: int  # the base's images included
    records: dict[str, dict[str, Any]] = field(repr=False)  # key -> record (with its unit id)
    base: BaseVersion | None = None


def _stable_rank(seed: int, key: str) -> str:
    """A per-image sort key that does not depend on processing order, so the minival is stable."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def minival_quota(counts: dict[str, int], minival: int | float, seed: int) -> dict[str, int]:
    """Images per class to hold out: equal per class for a count, proportional for a fraction.

    Every class keeps at least one training image. A count that does not divide by the number of classes
    gives its remainder to classes chosen by the seed.
    """
    classes = sorted(counts)
    if not classes:
        return {}
    if isinstance(minival, float):
        quota = {c: min(counts[c] - 1, round(counts[c] * minival)) if counts[c] > 1 else 0 for c in classes}
        return {c: max(0, q) for c, q in quota.items()}
    base, extra = divmod(int(minival), len(classes))
    lucky = set(sorted(classes, key=lambda c: _stable_rank(seed, c))[:extra])
    return {c: max(0, min(counts[c] - 1, base + (c in lucky))) for c in classes}


def check_minival(
    totals: dict[str, int], held: dict[str, int], minival: int | float, min_train_per_class: int
) -> None:
    """StagingError, in one line, for a minival that asks for more images than there are, or that leaves a class
    it takes from (`held` per class, of `totals`) with fewer than `min_train_per_class` train images."""
    total = sum(totals.values())
    if isinstance(minival, int) and minival > total:
        raise StagingError(f"minival {minival} is more than the {total} train images of the source")
    short = sorted((c for c in totals if held.get(c, 0) and totals[c] - held[c] < min_train_per_class),
                   key=lambda c: (totals[c] - held[c], c))
    if short:
        shown = ", ".join(f"{c}: {totals[c] - held[c]} of {totals[c]}" for c in short[:3])
        raise StagingError(
            f"minival {minival} leaves {len(short)} of {len(totals)} classes with fewer than {min_train_per_class} "
            f"train images ({shown}{', ...' if len(short) > 3 else ''}); hold out fewer, or stage it anyway with "
            f"--allow-small-train (min_train_per_class=0)")


def plan_dataset(
    units: Iterable[UnitResult], classes: Sequence[str], params: StageParams, base: BaseVersion | None = None,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS,
) -> DatasetPlan:
    """Split, shuffle and shard the units' images. With a base, only its new images are planned: the minival
    takes as many of a class's new images as brings the class to its quota over old and new images together
    (the base's minival images stay), and the new shards are numbered after the base's. A minival that leaves a
    class with fewer than `min_train_per_class` train images is refused (`check_minival`)."""
    records: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, str]] = []
    by_split: dict[str, list[str]] = defaultdict(list)
    for unit in units:
        bad.extend(unit.bad)
        for rec in unit.records:
            if rec["key"] in records:
                raise StagingError(f"image key {rec['key']} appears twice in the source")
            records[rec["key"]] = {**rec, "unit": unit.unit_id}
            by_split[unit.split].append(rec["key"])
    base_seen = base.manifest["images_seen"] if base is not None else 0
    base_bad = len(base.manifest["bad_files"]) if base is not None else 0
    total_seen = len(records) + len(bad) + base_seen
    total_bad = len(bad) + base_bad
    if total_seen and total_bad / total_seen > params.max_bad_fraction:
        first = (bad or base.manifest["bad_files"])[0]  # type: ignore[union-attr]
        raise StagingError(
            f"{total_bad} of {total_seen} images do not decode ({total_bad / total_seen:.2%} > "
            f"max_bad_fraction {params.max_bad_fraction:.2%}); first: {first['source']}: {first['reason']}"
        )
    per_class: dict[str, list[str]] = defaultdict(list)
    for key in by_split["train"]:
        per_class[records[key]["wnid"]].append(key)
    old_train = base.manifest["splits"]["train"]["per_class"] if base is not None else {}
    old_minival = base.manifest["splits"]["minival"]["per_class"] if base is not None else {}
    totals = {c: len(per_class.get(c, ())) + old_train.get(c, 0) + old_minival.get(c, 0)
              for c in set(per_class) | set(old_train) | set(old_minival)}
    quota = minival_quota(totals, params.minival, params.seed)
    check_minival(totals, {c: max(quota[c], old_minival.get(c, 0)) for c in totals}, params.minival,
                  min_train_per_class)
    held: set[str] = set()
    for wnid, keys in per_class.items():
        take = max(0, quota[wnid] - old_minival.get(wnid, 0))
        held.update(sorted(keys, key=lambda k: _stable_rank(params.seed, k))[:take])
    splits = {
        "train": sorted(k for k in by_split["train"] if k not in held),
        "minival": sorted(held),
        "val": sorted(by_split["val"]),
    }
    first_index = base.num_shards if base is not None else {}
    shards: list[ShardPlan] = []
    for split_index, (split, keys) in enumerate(splits.items()):
        # Shuffled across classes so that a sequential read of a few shards already mixes labels.
        random.Random(params.seed * 1000 + split_index).shuffle(keys)
        for tier in params.tiers:
            start = first_index.get((split, tier), 0)
            for i in range(0, len(keys), params.shard_size):
                shards.append(ShardPlan(split, tier, start + i // params.shard_size,
                                        tuple(keys[i : i + params.shard_size])))
    return DatasetPlan(tuple(classes), splits, shards, sorted(bad, key=lambda b: b["source"]), total_seen, records,
                       base)


# --------------------------------------------------------------------------------------------- shards


class SampleReader:
    """Reads a planned sample's JPEG at a tier: from its unit's spool, or from the source where an original kept
    as it is lies (`origin`). Keeps the last few files open (spools and archives are read many times)."""

    _OPEN_FILES = 64

    def __init__(self, work: Path) -> None:
        self.work = work
        self._files: dict[str, Any] = {}  # path -> open file, oldest first

    def where(self, rec: dict[str, Any], tier: int) -> tuple[str, int, int]:
        """(file, offset, size) of the sample's bytes at `tier`."""
        offset, size, _, _ = rec["tiers"][str(tier)]
        if offset is None:
            path, offset = rec["origin"]
            return path, offset, size
        return str(unit_paths(self.work, rec["unit"])[0]), offset, size

    def read(self, rec: dict[str, Any], tier: int) -> bytes:
        path, offset, size = self.where(rec, tier)
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= self._OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed by close())
            except OSError as exc:
                raise StagingError(f"{path}: cannot read {rec['key']} back: {exc}") from None
        self._files[path] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise StagingError(f"{path}: {rec['key']} ends past the end of the file: the file changed while staging")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_bytes(plan: DatasetPlan, shard: ShardPlan) -> int:
    return sum(plan.records[key]["tiers"][str(shard.tier)][1] for key in shard.keys)


def write_shard(plan: DatasetPlan, shard: ShardPlan, work: Path, out: Path) -> dict[str, Any]:
    """Write one shard (reusing it if its checksum sidecar verifies); return its manifest entry."""
    path = out / shard.relpath()
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists() and sidecar.exists():
        digest = sha256_file(path)
        if sidecar.read_text().strip() == digest:
            return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
                    "bytes": path.stat().st_size, "sha256": digest}
    # Streamed to the file (a shard of full-size images is ~100 MB); not fsynced one by one: `stage` waits for
    # every shard once, before the manifest commits the version.
    with atomic_open(path, durable=False) as f, SampleReader(work) as reader:
        tar = _TarWriter(f)
        for key in shard.keys:
            rec = plan.records[key]
            jpeg = reader.read(rec, shard.tier)
            meta = json.dumps({"wnid": rec["wnid"], "source": rec["source"]}, sort_keys=True).encode()
            for suffix, payload in (("jpg", jpeg), ("cls", str(rec["label"]).encode()), ("json", meta)):
                tar.add(f"{key}.{suffix}", payload)
        tar.close()
    digest = tar.sha256.hexdigest()
    atomic_write_bytes(sidecar, (digest + "\n").encode(), durable=False)
    return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
            "bytes": tar.offset, "sha256": digest}


def link_base_shards(base_dir: Path, dest: Path, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hard-link a base version's shards (and sidecars) into a new version: the same files, no copy.

    Falls back to a copy where the file system has no hard links. Idempotent; returns the entries unchanged.
    """
    for entry in entries:
        src = base_dir / entry["path"]
        try:
            size = src.stat().st_size
        except FileNotFoundError:
            raise StagingError(f"{src}: shard of base version {base_dir.name} is missing") from None
        if size != entry["bytes"]:
            raise StagingError(f"{src}: {size} bytes, its manifest says {entry['bytes']}")
        for name in (entry["path"], entry["path"] + ".sha256"):
            _link_or_copy(base_dir / name, dest / name)
    return list(entries)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------------------------- manifest


def dataset_version(fingerprint: dict[str, Any], params: StageParams, base_version: str | None = None) -> str:
    """A content address: the same source staged with the same parameters (from the same base) is the same
    version."""
    inputs: dict[str, Any] = {"source": fingerprint, "params": asdict(params), "encoding": ENCODING}
    if base_version is not None:
        inputs["base_version"] = base_version
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return "imagenet-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_manifest(
    plan: DatasetPlan, shards: list[dict[str, Any]], params: StageParams, fingerprint: dict[str, Any],
    source_kind: str, version: str, code_version: str,
) -> dict[str, Any]:
    """The manifest of a version: its own shards and, for an incremental version, the base's too."""
    base = plan.base
    counts: dict[str, dict[str, int]] = {}
    samples: dict[str, int] = {}
    for split, keys in plan.splits.items():
        per_class: dict[str, int] = defaultdict(int)
        if base is not None:
            for wnid, n in base.manifest["splits"][split]["per_class"].items():
                per_class[wnid] += n
        for key in keys:
            per_class[plan.records[key]["wnid"]] += 1
        counts[split] = dict(sorted(per_class.items()))
        samples[split] = len(keys) + (base.manifest["splits"][split]["samples"] if base is not None else 0)
    minival = set(plan.splits["minival"]) | (set(base.manifest["minival_keys"]) if base is not None else set())
    bad = plan.bad + (base.manifest["bad_files"] if base is not None else [])
    return {
        "format": MANIFEST_FORMAT,
        "version": version,
        "base_version": base.name if base is not None else None,
        "classes": list(plan.classes),
        "num_classes": len(plan.classes),
        "splits": {s: {"samples": samples[s], "per_class": counts[s]} for s in plan.splits},
        "minival_keys": sorted(minival),
        "tiers": list(params.tiers),
        "shards": sorted(shards, key=lambda s: (s["tier"], s["split"], s["path"])),
        "bad_files": sorted(bad, key=lambda b: (b["source"], b["split"])),
        "images_seen": plan.total_seen,
        "source": {"kind": source_kind, "fingerprint": fingerprint},
        "params": asdict(params),
        "encoding": ENCODING,
        "code_version": code_version,
    }


def write_keys(dest: Path, plan: DatasetPlan) -> dict[str, Any]:
    """Write the version's keys file (the base's images and the new ones); return its manifest entry."""
    base = plan.base
    splits = {s: dict(base.splits[s]) if base else {} for s in SPLITS}
    bad = dict(base.bad) if base else {}
    for split, keys in plan.splits.items():
        splits[split].update((k, plan.records[k]["wnid"]) for k in keys)
    bad.update((Path(b["source"]).stem, [b["split"], b["wnid"]]) for b in plan.bad)
    data = _keys_document(splits, bad)
    atomic_write_bytes(dest / KEYS, data)
    return {"path": KEYS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST
    atomic_write_json(path, manifest)
    return path


# --------------------------------------------------------------------------------------------- running steps


Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]
# A progress callback: (phase, done, total), phase "units" or "shards"; called from any thread of this process.
Progress = Callable[[str, int, int], None]


def sequential_map(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*a) for a in args]


def thread_map(workers: int) -> Mapper:
    """A mapper running `workers` calls at a time on threads. The first error, whichever call raises it, ends the
    map at once: calls not started are cancelled, those running finish."""

    def run(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        if workers <= 1:
            return sequential_map(fn, args)
        ex = ThreadPoolExecutor(workers, thread_name_prefix="staging")
        try:
            futures = [ex.submit(fn, *a) for a in args]
            for f in as_completed(futures):
                f.result()
            return [f.result() for f in futures]
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    return run


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Tracker:
    """Counts the finished steps of one phase; logs every 5% with an ETA and reports to `progress`."""

    def __init__(self, phase: str, total: int, log: Callable[..., None], progress: Progress | None) -> None:
        self.phase, self.total, self.log, self.progress = phase, total, log, progress
        self.done, self.t0, self.lock = 0, time.monotonic(), threading.Lock()
        self.every = max(1, total // 20)
        if progress is not None:
            progress(phase, 0, total)

    def step(self) -> None:
        with self.lock:
            self.done += 1
            if self.done % self.every == 0 or self.done == self.total:
                eta = (self.total - self.done) * (time.monotonic() - self.t0) / self.done
                self.log(f"{self.phase} {self.done}/{self.total}, ETA {eta:.0f} s")
            if self.progress is not None:
                self.progress(self.phase, self.done, self.total)


class _Counted:
    """`fn` that ticks a tracker when it returns (in the thread that called it)."""

    def __init__(self, fn: Callable[..., Any], tracker: _Tracker) -> None:
        self.fn, self.tracker = fn, tracker

    def __call__(self, *args: Any) -> Any:
        result = self.fn(*args)
        self.tracker.step()
        return result


class _InPool:
    """`fn` run in a process pool; the calling thread waits for it."""

    def __init__(self, pool: ProcessPoolExecutor, fn: Callable[..., Any]) -> None:
        self.pool, self.fn = pool, fn

    def __call__(self, *args: Any) -> Any:
        return self.pool.submit(self.fn, *args).result()


def _worker_init(parent: int) -> None:
    """In each unit worker: exit when the parent dies (even by SIGKILL), so that no orphan keeps writing spools
    beside a rerun; leave Ctrl-C to the parent; one OpenCV thread (the processes are the parallelism)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cv2().setNumThreads(1)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory instead of returning it to the kernel after every image.

    Each image allocates and frees a few MB of pixel buffers; glibc serves such sizes by mmap (or trims its
    heap) and hands them back at once, and the page faults of mapping them again cost a unit worker up to a
    fifth of its time (measured). Process-wide: at most 256 MB of freed memory stays with the process.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


@contextmanager
def unit_runner(workers: int, processes: bool = False) -> Iterator[Callable[..., UnitResult]]:
    """`process_unit`, at most `workers` at a time, on the callers' threads or (`processes`) in worker processes.

    Threads are the default: OpenCV's decode, resize and encode, hashing and file IO release the GIL, so on two
    cores two threads ran the units 1.75x as fast as one, and faster than two processes, which pay their
    start-up and a fresh heap (benchmarks/staging.py). Processes scale further on many cores, where the
    ~5 % of each image spent in Python starts to bind. They are spawned, not forked: the parent may hold
    threads (Prefect's) and their locks, which a fork would copy mid-use.
    """
    # Limited even for one worker: the mapper may call from more threads than `workers` (any mapper may).
    if workers <= 1:
        yield _Limited(process_unit, 1)  # one unit at a time, OpenCV's own threads inside it
        return
    if not processes:
        cv2 = _cv2()
        before = cv2.getNumThreads()
        cv2.setNumThreads(1)  # the units are the parallelism; OpenCV's own threads would only contend
        _keep_freed_memory()
        try:
            yield _Limited(process_unit, workers)
        finally:
            cv2.setNumThreads(before)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        # Limited here too, so that no unit waits in the pool's queue: a failed run has none left to finish.
        yield _Limited(_InPool(pool, process_unit), workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class NotStarted(StagingError):
    """A unit not started because another failed on bad input; `stage` raises that one's error instead."""


class _Limited:
    """`fn` run on the calling thread, by at most `limit` threads at once (a mapper may call from more), and no
    longer started once a call failed on bad input: a corrupt class tar ends the run, rather than every unit
    waiting for a slot behind it running first. Other errors (I/O) are left to the caller's retries."""

    def __init__(self, fn: Callable[..., Any], limit: int) -> None:
        self.fn, self._slots = fn, threading.BoundedSemaphore(limit)
        self.failure: Exception | None = None

    def __call__(self, *args: Any) -> Any:
        with self._slots:
            if self.failure is not None:
                raise NotStarted(f"not started: {self.failure}")
            try:
                return self.fn(*args)
            except (imagenet.ImageNetSourceError, StagingError) as exc:
                self.failure = self.failure or exc
                raise


def progress_bar(file: Any = None) -> Progress:
    """A Progress that draws one tqdm bar per phase (on stderr), with rate and ETA."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    lock = threading.Lock()

    def update(phase: str, done: int, total: int) -> None:
        if total <= 0:
            return
        with lock:
            bar = bars.get(phase)
            if bar is None:
                bar = bars[phase] = tqdm(total=total, desc=f"staging {phase}", unit=phase.rstrip("s"),
                                         file=file or sys.stderr, dynamic_ncols=True, leave=True)
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return update


# --------------------------------------------------------------------------------------------- the sequence


def work_dir(
    root: Path, fingerprint: dict[str, Any], params: StageParams, base_version: str | None = None
) -> Path:
    """Spools shared by every version staged from the same source with the same encoding parameters.

    A rerun with another shard size, minival or bad-file limit is a new version but decodes nothing again. An
    incremental version's spools (its new images only) are kept apart, by base.
    """
    blob = json.dumps(_work_inputs(fingerprint, params, base_version), sort_keys=True, default=str)
    return root / WORK / hashlib.sha256(blob.encode()).hexdigest()[:12]


def _work_inputs(fingerprint: dict[str, Any], params: StageParams, base_version: str | None) -> dict[str, Any]:
    """What a work folder's spools depend on (its name hashes it)."""
    inputs: dict[str, Any] = {"source": fingerprint, "unit": _unit_params(params)}
    if base_version is not None:
        inputs["base_version"] = base_version
    return inputs


def source_fingerprint(src: imagenet.ImageNetSource, root: Path) -> dict[str, Any]:
    """`src.fingerprint()`, cached for archives (where it hashes every byte: minutes on the real ~145 GB).

    The cache is keyed by each archive's path, size, modification time and inode, the test `make` and `rsync`
    use, so rerunning a finished stage is quick. It is written only by a stage that finished.
    """
    if src.kind != "archives":
        return src.fingerprint()
    path = _fingerprint_cache(src, root)
    try:
        return json.loads(path.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return src.fingerprint()


def _fingerprint_cache(src: imagenet.ImageNetSource, root: Path) -> Path:
    stats = []
    for name in imagenet.ARCHIVES:
        st = (src.root / name).stat()
        stats.append([str(src.root / name), st.st_size, st.st_mtime_ns, st.st_ino])
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    return root / WORK / FINGERPRINTS / f"{key}.json"


def find_finished(
    source_path: str | os.PathLike[str], out: str | os.PathLike[str], params: StageParams,
    base_version: str | None = AUTO, min_train_per_class: int = MIN_TRAIN_PER_CLASS,
) -> Path | None:
    """The finished version that staging this source with these parameters would return at once, or None.

    Checks what `stage` checks before its first unit (the source, the output folder and, when there is no
    finished version, the minival against a listed source), so bad input fails here, in one line.
    """
    src = imagenet.open_source(source_path)
    root = Path(out).resolve()
    check_out(root, src)
    done = find_staged(root, source_fingerprint(src, root), params, base_version)
    if done is None:
        _precheck_minival(src, params, min_train_per_class)
    return done


def check_out(root: Path, src: imagenet.ImageNetSource) -> None:
    """StagingError, in one line, for an output folder that cannot hold versions: a file, under a file, not
    writable, or inside a folder the source lists (its train/ or val/: the next run would read the versions as
    classes or images). Before any work, so that a run does not fail at its first write.

    Writability is what access(2) says: it sees permission bits (but as root), read-only mounts and ACLs; what
    only a write can tell (a file system that refuses folders, such as sysfs) fails at `stage`'s first mkdir.
    """
    if root.exists() and not root.is_dir():
        raise StagingError(f"{root}: the output folder is a file")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise StagingError(f"{root}: the output folder cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StagingError(f"{root}: the output folder is not writable ({existing} is not)")
    for folder in src.folders:
        folder = folder.resolve()
        if root == folder or folder in root.parents:
            raise StagingError(f"{root}: the output folder is inside the source's {folder}, where the next run "
                               f"would read it as part of the source; choose a folder outside it")


def _listed_train_counts(src: imagenet.ImageNetSource) -> dict[str, int] | None:
    """Train files per class where the source lists them without reading (trees), else None (class tars)."""
    if src.kind == "archives":
        return None
    return {u.wnid: len(u.names) for u in src.train_units()}


def _precheck_minival(src: imagenet.ImageNetSource, params: StageParams, min_train_per_class: int) -> None:
    """`check_minival` on the listed file counts, before any unit is decoded: bad files only lower the counts,
    and fewer images never leave a class more train images, so what fails here fails after decoding too."""
    counts = _listed_train_counts(src)
    if counts is not None:
        check_minival(counts, minival_quota(counts, params.minival, params.seed), params.minival,
                      min_train_per_class)


def _largest_first(
    mapper: Mapper, fn: Callable[..., Any], args: list[tuple[Any, ...]], size: Callable[[tuple[Any, ...]], float]
) -> list[Any]:
    """`mapper(fn, args)` with the largest arguments submitted first, so that no big one is left running alone
    at the end; results in the order of `args`."""
    order = sorted(range(len(args)), key=lambda i: -size(args[i]))
    done = mapper(fn, [args[i] for i in order])
    return [r for _, r in sorted(zip(order, done), key=lambda pair: pair[0])]


def stage(
    source_path: str | os.PathLike[str], out: str | os.PathLike[str], params: StageParams,
    map_units: Mapper | None = None, map_shards: Mapper | None = None, log: Callable[..., None] = print, *,
    progress: Progress | None = None, workers: int = 1, base_version: str | None = AUTO, processes: bool = False,
    min_train_per_class: int = MIN_TRAIN_PER_CLASS,
) -> Path:
    """Stage a source into `out/<version>`; returns that directory. Idempotent and resumable.

    `map_units` / `map_shards` run a function over argument tuples and return results in order (on threads
    of this process; default: `workers` threads); the Prefect flow passes mappers that submit tasks to its task
    runner. At most `workers` units decode at once, on those threads or, with `processes`, in that many worker
    processes (see `unit_runner`). `progress(phase, done, total)`
    is called as units and shards finish (the same events that are logged with an ETA).

    `base_version`: AUTO grows the latest finished version under `out` that holds a subset of this source's
    images (same classes and parameters); a version name grows that one (an error if it cannot); None stages
    everything afresh.

    One run at a time per source and encoding: a second one fails at once with a StagingError (the lock is the
    work folder's flock, released when the first run ends or dies).

    Bad input fails before any unit runs where it can be seen without decoding: the source (`open_source`), the
    output folder (`check_out`), the parameters, and a minival that leaves a class fewer than
    `min_train_per_class` train images (for archives, whose class tars must be read to count them, after the
    units; `plan_dataset`).
    """
    workers = resolve_workers(workers)
    min_train_per_class = whole_number("min_train_per_class", min_train_per_class, 0)
    src = imagenet.open_source(source_path)
    root = Path(out).resolve()
    check_out(root, src)
    fingerprint = source_fingerprint(src, root)
    done = find_staged(root, fingerprint, params, base_version)
    if done is not None:
        log(f"dataset {done.name} is already staged at {done}: reusing it")
        _finish(root, done.name, src, fingerprint)
        return done
    _precheck_minival(src, params, min_train_per_class)
    base = resolve_base(root, base_version, src, params, log)
    version = dataset_version(fingerprint, params, base.name if base else None)
    dest = root / version
    work = work_dir(root, fingerprint, params, base.name if base else None)
    created = [p for p in (root, root / WORK, work, dest) if not p.exists()]
    try:
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StagingError(f"{root}: cannot create the output folder: {exc.strerror or exc}") from None
        with _exclusive(work):
            _record_work(work, src.root, _work_inputs(fingerprint, params, base.name if base else None), version)
            # Only this run's folders (it holds their lock); elsewhere under the root only what is clearly stale
            # (LATEST and fingerprint caches are rewritten in a blink by whichever run finishes).
            removed = (remove_stale_temporaries(work) + remove_stale_temporaries(dest)
                       + remove_stale_temporaries(root, recursive=False, older_than_s=3600)
                       + remove_stale_temporaries(root / WORK / FINGERPRINTS, older_than_s=3600))
            if removed:
                log(f"removed {removed} partial files left by an interrupted run")
            orphans = remove_orphans(root, work, src.root, version)
            if orphans:
                log(f"removed what failed runs left and no run will reuse: {', '.join(orphans)}")
            units = _unit_args(src, work, params, base)
            log(f"staging {source_path} ({src.kind} source, {len(src.classes)} classes) as {version}"
                f"{f' on top of {base.name}' if base else ''}: {len(units)} units, tiers {list(params.tiers)}, "
                f"{workers} worker(s)")
            with unit_runner(workers, processes) as run_unit:
                tracker = _Tracker("units", len(units), log, progress)
                try:
                    results = _largest_first(map_units or thread_map(workers), _Counted(run_unit, tracker), units,
                                             lambda a: _unit_images(a[0]))
                except NotStarted:
                    raise run_unit.failure from None  # the unit that failed, not one stopped behind it
            if base is not None and src.kind == "archives":
                _check_base_seen(results, base)
            plan = plan_dataset(results, src.classes, params, base, min_train_per_class)
            log(f"plan: {({k: len(v) for k, v in plan.splits.items()})} new images, {len(plan.bad)} bad files, "
                f"{len(plan.shards)} shards to write")
            inherited = link_base_shards(root / base.name, dest, base.manifest["shards"]) if base else []
            tracker = _Tracker("shards", len(plan.shards), log, progress)
            entries = _largest_first(map_shards or thread_map(workers), _Counted(write_shard, tracker),
                                     [(plan, shard, work, dest) for shard in plan.shards],
                                     lambda a: _shard_bytes(plan, a[1]))
            extras = {fmt: extra_writer(fmt)(plan, entries, work, dest, params) for fmt in params.formats}
            fsync_files(dest / e["path"] for e in entries)
            keys = write_keys(dest, plan)
            manifest = build_manifest(plan, inherited + entries, params, fingerprint, src.kind, version, code_version())
            write_manifest(dest, {**manifest, "keys": keys, "extra": extras})
            _finish(root, version, src, fingerprint)
            return dest
    except BaseException:
        # Finished spools and shards stay for a rerun to reuse; folders this run made and left empty go (a work
        # folder holding nothing but its note counts as empty).
        if work in created and not (work / "units").exists():
            (work / WORK_META).unlink(missing_ok=True)
        for p in reversed(created):
            _remove_empty_tree(p)
        raise


@contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on a work folder (flock on the directory itself: released when the process dies,
    even by SIGKILL). Two runs staging the same source would otherwise write the same spools and shards and
    delete each other's temporary files."""
    with _locked(work) as held:
        if not held:
            raise StagingError(f"{work}: another staging run of this source is in progress; let it finish (or "
                               f"stop it) and run again")
        yield


@contextmanager
def _locked(work: Path) -> Iterator[bool]:
    """Try to lock a work folder (see `_exclusive`); yields whether this process holds it."""
    import fcntl

    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _work_meta(work: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((work / WORK_META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _record_work(work: Path, source: Path, inputs: dict[str, Any], version: str) -> None:
    """Note in a work folder the source path and inputs of its spools and every version it was used for, the
    facts `remove_orphans` decides by. Sorted and free of times, like every file staging writes."""
    old = _work_meta(work) or {}
    meta = {"source": str(source), "inputs": inputs, "versions": sorted({*old.get("versions", []), version})}
    if meta != old:
        atomic_write_json(work / WORK_META, meta)


def _spool_encoding(work: Path) -> int | None:
    """The ENCODING of a work folder's spools, from a unit index (folders of code older than WORK_META)."""
    for index in sorted((work / "units").glob("*.json"))[:1]:
        try:
            return json.loads(index.read_text())["params"]["encoding"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def remove_orphans(root: Path, work: Path, source: Path, version: str) -> list[str]:
    """Remove what failed runs left under a datasets root that no run will reuse; returns the names removed.

    A work folder is named by its inputs (source fingerprint, tiers, JPEG quality, ENCODING, base version), so
    a failed run's spools are reused only by a run with those very inputs. Removed, where no run holds them:

    - this run's work folder's unfinished versions but its own (a failed run with another shard size, minival
      or bad-file limit; their shards are cheap to write again from the spools);
    - work folders of this source path that back no finished version: a failed run of this source with other
      inputs (the source changed since, or other tiers or quality were asked for), which only those inputs
      again would reuse; with their unfinished versions;
    - work folders of another ENCODING, whoever's: no run of this code reads their spools.

    Work folders of other sources that failed are kept until a run of that source (their own rerun reuses them).
    """
    removed: list[str] = []

    def remove_unfinished(names: Iterable[str], but: str | None = None) -> None:
        for name in names:
            path = root / name
            if name != but and path.is_dir() and not (path / MANIFEST).exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)

    remove_unfinished((_work_meta(work) or {}).get("versions", []), but=version)
    others = sorted(p for p in (root / WORK).iterdir() if p.is_dir() and p not in (work, root / WORK / FINGERPRINTS))
    for other in others:
        meta = _work_meta(other)
        encoding = meta.get("inputs", {}).get("unit", {}).get("encoding") if meta else _spool_encoding(other)
        stale = encoding is not None and encoding != ENCODING
        failed = meta is not None and meta.get("source") == str(source) and not any(
            (root / v / MANIFEST).is_file() for v in meta.get("versions", []))
        if not (stale or failed):
            continue
        try:
            with _locked(other) as held:
                if not held:
                    continue  # a run is using it
                remove_unfinished(meta.get("versions", []) if meta else ())
                shutil.rmtree(other, ignore_errors=True)
        except FileNotFoundError:
            continue  # another run removed it first
        removed.append(f"{WORK}/{other.name}")
    return removed


def _finish(root: Path, version: str, src: imagenet.ImageNetSource, fingerprint: dict[str, Any]) -> None:
    """Point LATEST at a finished version; remember an archive source's fingerprint for the next run."""
    mark_latest(root, version)
    if src.kind == "archives":
        atomic_write_json(_fingerprint_cache(src, root), {"fingerprint": fingerprint})


def _remove_empty_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def mark_latest(root: str | os.PathLike[str], version: str) -> None:
    """Make a finished version the one `latest_version` returns."""
    if not (Path(root) / version / MANIFEST).is_file():
        raise StagingError(f"{Path(root) / version}: not a finished version (no {MANIFEST})")
    atomic_write_bytes(Path(root) / LATEST, (version + "\n").encode())


def latest_version(out: str | os.PathLike[str]) -> Path:
    """The most recently staged version under a datasets root."""
    marker = Path(out) / LATEST
    if not marker.exists():
        raise FileNotFoundError(f"{out}: no staged dataset (no {LATEST} file); run `effnet stage` first")
    return Path(out) / marker.read_text().strip()


def read_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a staged dataset version, with a clear error when there is none."""
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no staged dataset here (run `effnet stage` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt manifest: {exc}") from None


def version_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file a version's manifest lists (shards, keys, FFCV/DALI extras), each with its `path` and, where
    recorded, `bytes` and `sha256`."""
    extras = [e for entries in manifest.get("extra", {}).values() for e in entries]
    return [*manifest["shards"], *([manifest["keys"]] if manifest.get("keys") else []), *extras]


def damaged_files(dataset_dir: str | os.PathLike[str], checksums: bool = False) -> list[str]:
    """What is wrong with a staged version's files against its manifest: missing files and wrong sizes (a stat
    each), and with `checksums` every recorded sha256 (reads every byte). Empty when the version is whole."""
    root = Path(dataset_dir)
    problems = []
    for entry in version_files(read_manifest(root)):
        path = root / entry["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry['path']} is missing")
            continue
        if "bytes" in entry and size != entry["bytes"]:
            problems.append(f"{entry['path']} has {size} bytes, the manifest says {entry['bytes']}")
        elif checksums and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256")
    return problems


def check_version(dataset_dir: str | os.PathLike[str], checksums: bool = False) -> None:
    """Raise StagingError naming the damaged files of a staged version and how to stage it again."""
    problems = damaged_files(dataset_dir, checksums)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StagingError(
            f"{dataset_dir}: the staged version is damaged ({shown}); remove {dataset_dir} and run `effnet stage` "
            "again with the same source and options (finished spools in work/ are reused)")


def manifest_hash(dataset_dir: str | os.PathLike[str]) -> str:
    return sha256_file(Path(dataset_dir) / MANIFEST)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("effnet-family")
    except PackageNotFoundError:
        ver = "0+unknown"
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{ver}+g{ref[:10]}"
    except OSError:
        return ver
