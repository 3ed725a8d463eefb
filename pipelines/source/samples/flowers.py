"""A tiny Oxford Flowers-102 in its exact distributed format: `102flowers.tgz` (jpg/image_00001.jpg ..),
`imagelabels.mat` (`labels`, 1 x N doubles) and `setid.mat` (`trnid`, `valid`, `tstid`, 1 x n doubles).

Image ids are dealt to classes and splits at random, as in the real release, where neither the ids of a class
nor those of a split are contiguous. A smaller release keeps the format: labels run 1..num_classes. The files are
byte-identical for the same arguments (fixed tar, gzip and MAT headers; one seeded generator per image).

The writing helpers (`jpeg_bytes`, `write_tgz`, `mat_bytes`) serve the Stanford Cars generator too.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.source import flowers
from pipelines.source.demo import render_image

# Fixed tar timestamp (the Flowers-102 release year) and MAT header: the same arguments write the same bytes.
_TAR_MTIME = 1_230_768_000
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, sample release"
_MAT_HEADER_BYTES = 116  # the MAT v5 header's text field, which savemat fills with the creation time
_JPEG_QUALITY = 90
_SPLITS = (flowers.TRAIN_IDS, flowers.VAL_IDS, flowers.TEST_IDS)


@dataclass(frozen=True)
class FlowersRelease:
    """What `write_flowers` wrote."""

    out_dir: Path
    labels: dict[str, int]  # key ('image_00001') -> label, 1-based as imagelabels.mat holds it
    splits: dict[str, tuple[str, ...]]  # setid.mat variable ('trnid', 'valid', 'tstid') -> keys, in id order
    bad_keys: tuple[str, ...]  # images written as a JPEG that does not decode (train ones)


def write_flowers(
    out_dir: str | os.PathLike[str],
    *,
    num_classes: int,
    per_class_train: int,
    per_class_val: int,
    per_class_test: int,
    seed: int,
    image_size: tuple[int, int] = (64, 48),
    plant_bad_jpeg: bool = False,
) -> FlowersRelease:
    """Write the three Flowers-102 files into `out_dir` (made if need be); `image_size` is (width, height),
    each image's sides varying around it. `plant_bad_jpeg` writes one train image truncated to half its bytes."""
    if not 1 <= num_classes <= flowers.NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{flowers.NUM_CLASSES}, got {num_classes}")
    per_class = {flowers.TRAIN_IDS: per_class_train, flowers.VAL_IDS: per_class_val, flowers.TEST_IDS: per_class_test}
    if min(per_class.values()) < 0 or per_class_train < 1 or per_class_test < 1:
        raise ValueError(f"need >= 1 train and test and >= 0 val images per class, got {per_class}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([seed, 0])
    slots = [
        (label, split) for label in range(1, num_classes + 1) for split in _SPLITS for _ in range(per_class[split])
    ]
    ids = rng.permutation(len(slots)) + 1  # slot s is image ids[s]
    labels = np.zeros(len(slots), dtype=np.float64)  # doubles, as the real file holds them
    split_ids: dict[str, list[int]] = {split: [] for split in _SPLITS}
    for (label, split), image_id in zip(slots, ids):
        labels[image_id - 1] = label
        split_ids[split].append(int(image_id))
    for split in _SPLITS:
        split_ids[split].sort()
    bad = {int(rng.choice(split_ids[flowers.TRAIN_IDS]))} if plant_bad_jpeg else set()

    def images() -> Iterable[tuple[str, bytes]]:
        for image_id in range(1, len(slots) + 1):
            label = int(labels[image_id - 1])
            image = render_image(label - 1, num_classes, image_size, np.random.default_rng([seed, 1, image_id]))
            yield flowers.member_name(image_id), jpeg_bytes(image, truncated=image_id in bad)

    write_tgz(out / flowers.IMAGES_ARCHIVE, ["jpg/"], images())
    (out / flowers.LABELS_MAT).write_bytes(mat_bytes({flowers.LABELS_VAR: labels.reshape(1, -1)}))
    setid = {split: np.array(split_ids[split], dtype=np.float64).reshape(1, -1) for split in _SPLITS}
    (out / flowers.SPLITS_MAT).write_bytes(mat_bytes(setid))
    return FlowersRelease(
        out_dir=out,
        labels={flowers.image_key(i): int(labels[i - 1]) for i in range(1, len(slots) + 1)},
        splits={split: tuple(flowers.image_key(i) for i in split_ids[split]) for split in _SPLITS},
        bad_keys=tuple(flowers.image_key(i) for i in sorted(bad)),
    )


# --------------------------------------------------------------------------------------------- shared with cars


def jpeg_bytes(image: Image.Image, *, truncated: bool = False) -> bytes:
    """`image` as a JPEG; `truncated`: its first half only (the header parses, the scan data ends early, so a
    full decode fails: a bad file staging must report)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    data = buf.getvalue()
    return data[: len(data) // 2] if truncated else data


def write_tgz(path: Path, folders: Iterable[str], files: Iterable[tuple[str, bytes]]) -> None:
    """A gzipped tar of `folders` (names ending in '/') then `files` in the order given, with fixed metadata and
    a gzip header free of names and times. `files` is consumed as it is written."""
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in folders:
                tar.addfile(_tarinfo(name, 0, tarfile.DIRTYPE))
            for name, data in files:
                tar.addfile(_tarinfo(name, len(data), tarfile.REGTYPE), io.BytesIO(data))


def _tarinfo(name: str, size: int, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = _TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def mat_bytes(variables: dict[str, Any]) -> bytes:
    """A MATLAB v5 file of `variables`, as the releases' .mat files are, with a fixed header text."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, variables, format="5", oned_as="row")
    data = bytearray(buf.getvalue())
    data[:_MAT_HEADER_BYTES] = _MAT_HEADER.ljust(_MAT_HEADER_BYTES, b" ")
    return bytes(data)
