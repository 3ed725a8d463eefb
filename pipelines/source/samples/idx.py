"""A tiny MNIST, Fashion-MNIST or KMNIST in the exact distributed idx format: `write_idx`.

The four files the three datasets distribute (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; or not gzipped), with the same big-endian headers and
uint8 bodies, only fewer images: 28x28 grey renderings of `render_image`'s ten class patterns, in a shuffled
class order like the real files'. Which dataset it is follows from the folder's name, as for the real files
(`pipelines.source.idx.dataset_of`). Byte-identical for the same arguments (the gzip header holds no name or
time; every image has its own seeded generator).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.source.demo import render_image
from pipelines.source.idx import (
    CLASSES,
    GZ,
    IMAGES_HEADER,
    IMAGES_MAGIC,
    LABELS_HEADER,
    LABELS_MAGIC,
    SPLITS,
    dataset_of,
    images_file,
    labels_file,
    read_split,
    split_definition,
)

IMAGE_SIDE = 28  # all three datasets' images are 28x28


@dataclass(frozen=True)
class IdxSample:
    """What `write_idx` wrote; the mappings are keyed by the record's key ('train_00000', 't10k_00000')."""

    folder: Path
    dataset: str  # 'mnist' / 'fashion-mnist' / 'kmnist', from the folder's name
    files: tuple[Path, ...]  # the four files, train first
    labels: dict[str, int]
    pixel_sha256: dict[str, str]  # sha256 of the image's rows*cols bytes, as stored
    splits: dict[str, list[str]]  # the dataset's own split definition, as the reader records it


def write_idx(
    out_dir: str | os.PathLike[str],
    *,
    per_class_train: int,
    per_class_test: int,
    seed: int = 0,
    gz: bool = True,
) -> IdxSample:
    """Write the four idx files into `out_dir` (whose name says which dataset they are), gzipped or not."""
    if per_class_train < 0 or per_class_test < 0:
        raise ValueError("per_class_train and per_class_test must be >= 0")
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    labels: dict[str, int] = {}
    digests: dict[str, str] = {}
    files: list[Path] = []
    for code, (split, per_class) in enumerate(zip(SPLITS, (per_class_train, per_class_test)), start=1):
        order = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class)).astype(np.uint8)
        images = [_grey(int(c), np.random.default_rng([seed, code, i])) for i, c in enumerate(order)]
        for i, (c, image) in enumerate(zip(order, images)):
            labels[f"{split}_{i:05d}"] = int(c)
            digests[f"{split}_{i:05d}"] = hashlib.sha256(image).hexdigest()
        pixels = IMAGES_HEADER.pack(IMAGES_MAGIC, len(order), IMAGE_SIDE, IMAGE_SIDE) + b"".join(images)
        for name, data in (
            (images_file(split), pixels),
            (labels_file(split), LABELS_HEADER.pack(LABELS_MAGIC, len(order)) + order.tobytes()),
        ):
            files.append(_write(folder / (name + GZ if gz else name), data, gz))
    return IdxSample(
        folder=folder,
        dataset=dataset_of(folder.resolve()),
        files=tuple(files),
        labels=labels,
        pixel_sha256=digests,
        splits=split_definition(),
    )


def write_idx_subset(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, per_class_train: int, per_class_test: int
) -> Path:
    """The first `per_class_train` train and `per_class_test` test images of each class of the idx files in
    `source` (a real MNIST, Fashion-MNIST or KMNIST), in their order, as the four gzipped files of `out_dir` (name
    it after the dataset: the name says which it is). Byte-identical for the same arguments."""
    if per_class_train < 1 or per_class_test < 1:
        raise ValueError("per_class_train and per_class_test must be >= 1")
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in zip(SPLITS, (per_class_train, per_class_test)):
        images, labels = read_split(Path(source), split)
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]))
        _, rows, cols = images.shape
        pixels = IMAGES_HEADER.pack(IMAGES_MAGIC, len(keep), rows, cols) + images[keep].tobytes()
        _write(folder / (images_file(split) + GZ), pixels, gz=True)
        _write(
            folder / (labels_file(split) + GZ),
            LABELS_HEADER.pack(LABELS_MAGIC, len(keep)) + labels[keep].tobytes(),
            gz=True,
        )
    return folder


def _grey(class_index: int, rng: np.random.Generator) -> bytes:
    """One image of a class at exactly 28x28 (render_image jitters the size), grey, as its row-major bytes."""
    image = render_image(class_index, len(CLASSES), (IMAGE_SIDE, IMAGE_SIDE), rng)
    grey = image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR).convert("L")
    return np.asarray(grey, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes, gz: bool) -> Path:
    # filename='' and mtime=0 keep the gzip header free of names and times.
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path
