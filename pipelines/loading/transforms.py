"""Per-image transforms of the loaders: crop boxes, decoding, normalisation.

`random_resized_crop_box` is the Inception-style training crop (area and aspect drawn from a given generator)
and `center_crop_box` evaluation's centre crop; the `dali` backend draws from the same ranges and cuts the same
centre crop with its own operators.
`decode_crop` decodes a JPEG, crops and resizes it, letting libjpeg decode at 1/2, 1/4 or 1/8 scale when the
crop allows (the `wds` backend's decoder). `normalize` turns uint8 batches into normalised floats on the device,
with ImageNet's mean and std.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainCrop:
    """The random-resized crop's ranges: the area fraction kept (`scale`) and the aspect ratio (`ratio`, drawn
    log-uniformly), and whether half the crops are mirrored left to right (`flip`). Every backend draws from
    these."""

    scale: tuple[float, float] = (0.08, 1.0)  # Inception's (Szegedy et al. 2015), as every EfficientNet trains
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # Off where a mirror image is another class or no image of the data (digits, text, left/right signs).
    flip: bool = True


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = TrainCrop.scale,
    ratio: tuple[float, float] = TrainCrop.ratio,
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


def decode_crop(data: bytes, box_fn: Any, resolution: int, flip: bool = False) -> np.ndarray:
    """Decode a JPEG, crop the box that `box_fn(w, h)` picks, resize to a square; returns HWC uint8.

    When the crop is at least twice the output size, libjpeg decodes at 1/2, 1/4 or 1/8 scale (draft), which
    skips most of the IDCT work: the main reason to read small tiers and small crops.
    """
    img: Image.Image = Image.open(io.BytesIO(data))
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
