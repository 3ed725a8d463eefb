"""A small ImageNet-21k release in its exact format: one whole-set tar (``fall11_whole.tar``, or gzipped as
``winter21_whole.tar.gz``) of per-synset tars ``<wnid>.tar``, each holding ``<wnid>_<n>.JPEG``. Synsets hold
different numbers of images, as the real ones do. The WNIDs are the caller's, so a test can share some with a
demo ILSVRC2012 (whose classes are a subset of 21k's).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.atomic import atomic_open
from pipelines.source.demo import render_image, tarinfo


@dataclass(frozen=True)
class Release:
    path: Path
    wnids: tuple[str, ...]  # sorted: the staged classes
    images: dict[str, int]  # wnid -> images in its synset tar


_MTIME = 1_300_000_000  # fall 2011


def _synset_tar(wnid: str, label: int, num_classes: int, count: int, seed: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng([seed, label])
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n in range(count):
            jpeg = io.BytesIO()
            render_image(label, num_classes, size, rng).save(jpeg, format="JPEG", quality=90)
            tar.addfile(tarinfo(f"{wnid}_{n}.JPEG", jpeg.tell(), mtime=_MTIME), io.BytesIO(jpeg.getvalue()))
    return buf.getvalue()


def write_imagenet21k(
    out_dir: str | Path,
    wnids: tuple[str, ...],
    *,
    per_class: int | tuple[int, ...] = 12,
    gz: bool = False,
    seed: int = 0,
    image_size: tuple[int, int] = (64, 48),
) -> Release:
    """Write the whole-set tar into `out_dir` (atomically); `per_class` one count for all synsets or one each.
    Synset tars go in sorted WNID order, as the release lists them; an image's look depends on its WNID's rank."""
    ordered = tuple(sorted(wnids))
    counts = per_class if isinstance(per_class, tuple) else (per_class,) * len(ordered)
    if len(counts) != len(ordered) or len(set(ordered)) != len(ordered):
        raise ValueError("wnids must be distinct, with one count each")
    path = Path(out_dir) / ("winter21_whole.tar.gz" if gz else "fall11_whole.tar")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        stream = gzip.GzipFile(fileobj=f, mode="wb", mtime=0) if gz else f
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as outer:
            for label, (wnid, count) in enumerate(zip(ordered, counts, strict=True)):
                data = _synset_tar(wnid, label, len(ordered), count, seed, image_size)
                outer.addfile(tarinfo(f"{wnid}.tar", len(data), mtime=_MTIME), io.BytesIO(data))
        if gz:
            stream.close()
    return Release(path, ordered, dict(zip(ordered, counts, strict=True)))
