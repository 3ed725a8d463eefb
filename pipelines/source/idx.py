"""The ``idx`` kind: MNIST, Fashion-MNIST and KMNIST as distributed, four idx files (gzipped, or not) per folder.

An idx file is a big-endian header (a magic number whose last byte is the number of dimensions, then each
dimension's size) followed by uint8 values: images are (count, rows, cols), labels (count,). The three datasets
name their files the same, so which one a folder holds is read from the folder's name.

Indexing reads the small label files whole and only the header of each images file (plus its gzip trailer, to
catch a truncated download before staging starts). A unit is a chunk of at most `CHUNK` images of one file,
carrying its labels; reading it opens the file and seeks to the chunk (for a .gz, by decompressing forward:
at 47 MB for the largest file, cheap enough that no index of the stream is worth keeping). Images are grey and
staged as 8-bit grey PNGs.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.source.records import RawImage, Source, SourceError, safe_key

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGES_HEADER = struct.Struct(">IIII")  # magic, count, rows, cols
LABELS_HEADER = struct.Struct(">II")  # magic, count
# The dataset's splits as its files name them; staged train and val come from these.
TRAIN_SPLIT, TEST_SPLIT = "train", "t10k"
SPLITS = (TRAIN_SPLIT, TEST_SPLIT)
GZ = ".gz"
CHUNK = 10_000  # images per unit: 6 + 1 units for the 60,000 + 10,000 of each dataset
_ERRORS = (OSError, EOFError, zlib.error)  # what a broken gzip (or an unreadable file) raises


def images_file(split: str) -> str:
    return f"{split}-images-idx3-ubyte"


def labels_file(split: str) -> str:
    return f"{split}-labels-idx1-ubyte"


def split_definition() -> dict[str, list[str]]:
    """The dataset's own split definition, as a version's manifest records it."""
    return {"train": [TRAIN_SPLIT], "val": [TEST_SPLIT]}


FILE_NAMES = tuple(name(split) for split in SPLITS for name in (images_file, labels_file))
# Where Debian's dataset-fashion-mnist installs the real files (`make setup` installs it as root): the real-data
# tests and benchmarks read it there.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def record_key(split: str, index: int) -> str:
    """The key of a file's `index`-th image ('train_00012'), as staged."""
    return safe_key(f"{split}_{index:05d}")


# --------------------------------------------------------------------------------------------- the datasets

# Each dataset's published class table, label i first to last.
# MNIST (http://yann.lecun.com/exdb/mnist/): "The labels values are 0 to 9", the digit drawn.
MNIST_WORDS = tuple(str(d) for d in range(10))
# Fashion-MNIST: the "Labels" table of https://github.com/zalandoresearch/fashion-mnist (README).
FASHION_MNIST_WORDS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# KMNIST: kmnist_classmap.csv of https://github.com/rois-codh/kmnist (the character), with its romanisation.
KMNIST_WORDS = (
    "\u304a (o)",
    "\u304d (ki)",
    "\u3059 (su)",
    "\u3064 (tsu)",
    "\u306a (na)",
    "\u306f (ha)",
    "\u307e (ma)",
    "\u3084 (ya)",
    "\u308c (re)",
    "\u3092 (wo)",
)
# Dataset -> its class words; the first dataset whose marker the folder's name holds is the one (else MNIST).
DATASETS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": FASHION_MNIST_WORDS,
    "kmnist": KMNIST_WORDS,
    "mnist": MNIST_WORDS,
}
_FOLDER_MARKERS = (("fashion", "fashion-mnist"), ("kmnist", "kmnist"))
DEFAULT_DATASET = "mnist"
CLASSES = tuple(str(d) for d in range(10))  # the class ids: the label itself, for all three
# torchvision keeps the files in <Dataset>/raw/: there the dataset's name is the parent's.
_RAW_FOLDER = "raw"


def dataset_of(root: Path) -> str:
    """Which of the three datasets `root` holds, from the folder's name (the files are named the same)."""
    name = (root.parent.name if root.name.lower() == _RAW_FOLDER else root.name).lower()
    return next((dataset for marker, dataset in _FOLDER_MARKERS if marker in name), DEFAULT_DATASET)


# --------------------------------------------------------------------------------------------- detection


def matches(root: Path) -> bool:
    """Whether `root` holds any of the four idx files, gzipped or not (a missing one is then reported by name)."""
    return any(_present(root / name) for name in FILE_NAMES)


def _present(plain: Path) -> bool:
    return plain.with_name(plain.name + GZ).is_file() or plain.is_file()


def _find(root: Path, name: str) -> Path:
    """The file as distributed (.gz) when there, else the uncompressed one (a gunzip that kept the original
    leaves both, with the same content)."""
    for candidate in (root / (name + GZ), root / name):
        if candidate.is_file():
            return candidate
    raise SourceError(f"{root}: {name}{GZ} missing (need all of {', '.join(n + GZ for n in FILE_NAMES)})")


def _open(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(GZ):
        return gzip.GzipFile(path, "rb")
    return open(path, "rb")


# --------------------------------------------------------------------------------------------- the unit


@dataclass(frozen=True)
class IdxChunk:
    """Images [start, start + len(labels)) of one images file, with their labels."""

    images: str  # the images file's path
    split: str  # 'train' / 't10k': the key prefix
    start: int
    labels: bytes  # one byte per image, from the labels file
    shape: tuple[int, int]  # (rows, cols) of every image

    def read(self) -> Iterator[RawImage]:
        return read_chunk(self)

    def ident(self, split: str) -> str:
        return f"{split}-{self.split}_{self.start:05d}"

    def estimated_images(self) -> float:
        return len(self.labels)


def read_chunk(unit: IdxChunk) -> Iterator[RawImage]:
    """The chunk's images as grey PNGs; needs only the unit (any process)."""
    path = Path(unit.images)
    rows, cols = unit.shape
    size = rows * cols
    try:
        with _open(path) as f:
            f.seek(IMAGES_HEADER.size + unit.start * size)
            data = f.read(len(unit.labels) * size)
    except _ERRORS as exc:
        raise SourceError(f"{path}: corrupt or truncated: {exc}") from None
    if len(data) != len(unit.labels) * size:
        raise SourceError(f"{path}: truncated: images {unit.start}-{unit.start + len(unit.labels) - 1} end early")
    pixels = np.frombuffer(data, np.uint8).reshape(-1, rows, cols)
    for i, (label, image) in enumerate(zip(unit.labels, pixels)):
        n = unit.start + i
        yield RawImage(record_key(unit.split, n), f"{path.name}#{n}", CLASSES[label], label, png_grey(image))


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N x rows x cols uint8) and labels (N,) as numpy arrays, checked as staging checks
    them: what classical baselines and subsets read."""
    labels_path, images = _find(root, labels_file(split)), _find(root, images_file(split))
    labels = read_labels(labels_path)
    count, rows, cols = _images_header_for(images, labels_path, labels)
    data = _read_whole(images)[IMAGES_HEADER.size :]
    if len(data) != count * rows * cols:
        raise SourceError(f"{images}: {len(data)} bytes of pixels, the header says {count * rows * cols}")
    return np.frombuffer(data, np.uint8).reshape(count, rows, cols), np.frombuffer(labels, np.uint8)


def png_grey(pixels: np.ndarray) -> bytes:
    """(H, W) uint8 pixels as a lossless 8-bit grey PNG."""
    import cv2  # imported on first use: detecting a kind need not load OpenCV

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels))
    assert ok  # encoding uint8 pixels cannot fail
    return bytes(encoded)


# --------------------------------------------------------------------------------------------- indexing


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index the four idx files in `root` (label files whole, image headers) and check they agree."""
    dataset = dataset_of(root)
    if val_per_class is not None:
        raise ValueError(f"{dataset} has its own test split; --val-per-class is for sources without one")
    found = {name: _find(root, name) for name in FILE_NAMES}
    units = {split: _split_units(found[images_file(split)], found[labels_file(split)], split) for split in SPLITS}
    return Source(
        kind="idx",
        dataset=dataset,
        root=root,
        classes=CLASSES,
        class_words=dict(zip(CLASSES, DATASETS[dataset])),
        train_units=units[TRAIN_SPLIT],
        val_units=units[TEST_SPLIT],
        archives=tuple(found[images_file(s)] for s in SPLITS),
        label_files=tuple(found[labels_file(s)] for s in SPLITS),
        splits=split_definition(),
    )


def _split_units(images: Path, labels_path: Path, split: str) -> list[IdxChunk]:
    labels = read_labels(labels_path)
    count, rows, cols = _images_header_for(images, labels_path, labels)
    _check_data_size(images, count * rows * cols)
    return [
        IdxChunk(str(images), split, start, labels[start : start + CHUNK], (rows, cols))
        for start in range(0, count, CHUNK)
    ]


def _images_header_for(images: Path, labels_path: Path, labels: bytes) -> tuple[int, int, int]:
    """(count, rows, cols) of an images file whose count its labels file agrees with."""
    count, rows, cols = read_images_header(images)
    if count != len(labels):
        raise SourceError(f"{images}: {count} images, but {labels_path.name} has {len(labels)} labels")
    return count, rows, cols


def read_labels(path: Path) -> bytes:
    """A labels file's labels, checked: magic, count against the bytes there, each a class."""
    data = _read_whole(path)
    magic, count = _header(data, LABELS_HEADER, path)
    if magic != LABELS_MAGIC:
        raise SourceError(f"{path}: bad magic number {magic:#010x}, not an idx labels file ({LABELS_MAGIC:#010x})")
    labels = data[LABELS_HEADER.size :]
    if len(labels) != count:
        raise SourceError(f"{path}: header says {count} labels, the file holds {len(labels)} (truncated?)")
    bad = np.flatnonzero(np.frombuffer(labels, np.uint8) >= len(CLASSES))
    if bad.size:
        raise SourceError(f"{path}: label {labels[bad[0]]} at {int(bad[0])}, out of range 0-{len(CLASSES) - 1}")
    return labels


def read_images_header(path: Path) -> tuple[int, int, int]:
    """(count, rows, cols) from an images file's header, checked."""
    try:
        with _open(path) as f:
            head = f.read(IMAGES_HEADER.size)
    except _ERRORS as exc:
        raise SourceError(f"{path}: corrupt or truncated: {exc}") from None
    magic, count, rows, cols = _header(head, IMAGES_HEADER, path)
    if magic != IMAGES_MAGIC:
        raise SourceError(f"{path}: bad magic number {magic:#010x}, not an idx images file ({IMAGES_MAGIC:#010x})")
    if rows < 1 or cols < 1:
        raise SourceError(f"{path}: header says images of {rows}x{cols} pixels")
    return count, rows, cols


def _header(data: bytes, header: struct.Struct, path: Path) -> tuple[int, ...]:
    if len(data) < header.size:
        raise SourceError(f"{path}: {len(data)} bytes, shorter than an idx header ({header.size})")
    return header.unpack_from(data)


def _read_whole(path: Path) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except _ERRORS as exc:
        raise SourceError(f"{path}: corrupt or truncated: {exc}") from None


def _check_data_size(path: Path, expected: int) -> None:
    """The pixel bytes after the header are exactly what the header says.

    For a .gz the uncompressed size is in the gzip trailer (mod 2**32), so a truncated download is caught
    without decompressing; only where the trailer disagrees (a file of several gzip members, or a damaged one)
    is the stream decompressed to count.
    """
    total = IMAGES_HEADER.size + expected
    if path.name.endswith(GZ):
        if _gzip_trailer_size(path) == total % 2**32:
            return
        size = _decompressed_size(path)
    else:
        size = path.stat().st_size
    if size != total:
        raise SourceError(
            f"{path}: {size - IMAGES_HEADER.size} bytes of pixels, the header says {expected} (truncated?)"
        )


def _gzip_trailer_size(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 4:
            return -1
        f.seek(-4, 2)
        return int.from_bytes(f.read(4), "little")


def _decompressed_size(path: Path) -> int:
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
    except _ERRORS as exc:
        raise SourceError(f"{path}: corrupt or truncated: {exc}") from None
    return size
