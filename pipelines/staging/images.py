"""One source image -> checked, upright RGB pixels -> a JPEG per resolution tier (`encode_tiers`).

Decoding reads every byte (a truncated or corrupt file raises `BadImage` here, with a reason free of memory
addresses, rather than in a training job), applies EXIF orientation, and converts CMYK, grayscale, palette and
16-bit images to 8-bit RGB. Each tier is the image with its shorter side scaled down to the tier (never up,
`tier_size`), resized by supersampling (`resize`) and encoded by OpenCV's libjpeg-turbo; an RGB JPEG without an
orientation tag that is already small enough is kept as it is. What this module writes for a given input is
versioned by `params.ENCODING`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image


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
    cv2 = opencv()
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
    cv2 = opencv()
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
    cv2 = opencv()
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


def opencv() -> Any:
    """The cv2 module, imported on first use (also by `runners`, which sets its thread count)."""
    import cv2  # only where images are decoded and resized: the CLI's other commands need not pay for it

    return cv2


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale (H, W, 3) uint8 pixels to `size` (w, h) with an antialiased filter.

    Supersampling: bilinear *up* to m x the target (m = the smallest integer >= the downscale factor, at least
    2), then the mean of each m x m block, which OpenCV computes on a fast integer path. Within 1 grey level on
    average of the exact area average (INTER_AREA), at less than half its cost and a third of PIL's BILINEAR;
    torch's antialiased kernel is as fast but costs each worker process two seconds of import.
    """
    cv2 = opencv()
    w, h = size
    src_h, src_w = pixels.shape[:2]
    m = max(2, math.ceil(max(src_w / w, src_h / h)))
    up = cv2.resize(pixels, (m * w, m * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(up, (w, h), interpolation=cv2.INTER_AREA)
