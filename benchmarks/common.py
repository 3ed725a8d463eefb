"""What the loader and staging benchmarks share: the images they measure on and the host they ran on.

`make_images` writes ImageNet-like JPEGs of 500x375 px (quality 90, about 110 KB: smooth gradients and blobs plus
sensor-like noise, so they cost what a photo costs to decode) in the extracted layout `train/<wnid>/<wnid>_<k>.JPEG`
and `val/<wnid>/...`, 10% of them val, one class per task in worker processes, and reuses them when asked for the
same set again. `machine` describes the host for a report.

Imported as `benchmarks.common` (the scripts put the repository root on sys.path), so that the worker processes
find `_write_class` by that name whatever their start method.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.staging.runners import available_cores

IMAGE_SIZE = (500, 375)  # the most common ImageNet size
NUM_CLASSES = 20
VAL_FRACTION = 0.1
JPEG_QUALITY = 90
_DONE = "images.json"


def render_photo(rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """An image that decodes and compresses like a photo: low-frequency structure plus per-pixel noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        fx, fy = rng.uniform(2, 9, 2)
        img[..., c] = 128 + 60 * np.sin(x / w * fx + p) * np.cos(y / h * fy + a) + 40 * b * (x / w - y / h)
    blobs = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3))
    blobs_img = Image.fromarray(np.clip(128 + 40 * blobs, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    img += np.asarray(blobs_img, np.float32) - 128
    img += rng.normal(0, rng.uniform(17, 25), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_class(root: str, wnid: str, index: int, train: int, val: int, seed: int) -> int:
    total = 0
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        folder = Path(root) / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            rng = np.random.default_rng([seed, index, offset + k])
            buf = io.BytesIO()
            render_photo(rng).save(buf, format="JPEG", quality=JPEG_QUALITY)
            name = f"{wnid}_{offset + k + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{index:03d}{k:05d}.JPEG"
            (folder / name).write_bytes(buf.getvalue())
            total += buf.tell()
    return total


def make_images(root: Path, images: int, workers: int, seed: int = 0) -> dict[str, Any]:
    """Write (or reuse) `images` JPEGs as an extracted ImageNet tree; returns its description."""
    per_class = max(2, round(images / NUM_CLASSES))
    val = max(1, round(per_class * VAL_FRACTION))
    train = per_class - val
    desc = {"classes": NUM_CLASSES, "train_per_class": train, "val_per_class": val, "image_size": list(IMAGE_SIZE),
            "jpeg_quality": JPEG_QUALITY, "seed": seed}
    marker = root / _DONE
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k in desc} == desc:
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    wnids = [f"n{10_000_000 + 7919 * i:08d}" for i in range(NUM_CLASSES)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write_class, [str(root)] * NUM_CLASSES, wnids, range(NUM_CLASSES),
                              [train] * NUM_CLASSES, [val] * NUM_CLASSES, [seed] * NUM_CLASSES))
    n = NUM_CLASSES * per_class
    desc.update(images=n, bytes=sum(sizes), mean_kb=round(sum(sizes) / n / 1000, 1))
    print(f"wrote {n} images ({desc['mean_kb']} KB each) in {time.perf_counter() - t0:.0f} s to {root}")
    marker.write_text(json.dumps(desc, indent=1) + "\n")
    return desc


def machine() -> dict[str, Any]:
    """The host, for a report: platform, CPU model, usable cores, Python, Pillow (with libjpeg-turbo?), load."""
    import PIL

    model = ""
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": model or platform.processor(),
                            "cores": available_cores(), "python": platform.python_version(),
                            "pillow": PIL.__version__}
    try:
        from PIL import features

        info["libjpeg_turbo"] = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # noqa: BLE001 (an optional detail)
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def write_report(path: Path, report: dict, note: str = "") -> None:
    """A benchmark's figures as JSON (`benchmarks/results/*.json`), said on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}{f' ({note})' if note else ''}")


def spread(values: list[float]) -> dict[str, float]:
    """Mean, population standard deviation and range of one figure over the seeds."""
    mean = sum(values) / len(values)
    return {"mean": mean, "std": (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5,
            "min": min(values), "max": max(values)}
