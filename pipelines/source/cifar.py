"""The ``cifar`` kind: CIFAR-10 and CIFAR-100 in their BINARY versions as Alex Krizhevsky distributes them
(https://www.cs.toronto.edu/~kriz/cifar.html), read from the .tar.gz in place: nothing is extracted.

A batch file is a run of fixed-size records: the label byte(s), then 32x32 pixels as 1024 red, 1024 green and
1024 blue bytes, each plane row-major. CIFAR-100's records carry the coarse (superclass) label before the fine
one; the fine label is the class and the coarse one goes in `RawImage.meta`. Label names come from the
archive's text files, label i on line i.

A .tar.gz cannot be seeked, so a unit is a whole batch file (six for CIFAR-10, two for CIFAR-100): each streams
the archive from its start to its member, and staging decompresses the archive a few times over in all. Indexing
streams it once, checking every member is there, holds whole records and labels within range, so a damaged
archive fails before staging starts.

The python versions hold pickled batches, and nothing is ever unpickled here: they are detected only to say
which binary archive to download instead. An extracted ``cifar-10-batches-bin/`` is refused too: the archive as
downloaded is what a version's fingerprint identifies, so the same images always name the same version.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from pipelines.source.records import ARCHIVE_ERRORS, RawImage, Source, SourceError, safe_key

DOWNLOAD_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_SIDE = 32
CHANNELS = 3
PIXEL_BYTES = IMAGE_SIDE * IMAGE_SIDE * CHANNELS
# Records checked per read while indexing: ~3 MB at a time, so a batch file is never held whole.
_SCAN_RECORDS = 1000


@dataclass(frozen=True)
class CifarVariant:
    """One CIFAR dataset's files as distributed."""

    dataset: str  # what versions are named after
    archive: str  # the binary .tar.gz
    folder: str  # the folder inside it that holds every member
    train_batches: tuple[str, ...]  # batch files of the train split, in key order
    test_batch: str
    names_file: str  # label names of the classes (fine labels for CIFAR-100), one per line
    num_classes: int
    coarse_names_file: str | None  # CIFAR-100's superclass names; its records carry the coarse label first
    num_coarse: int
    python_archive: str  # the pickled version, refused
    python_folder: str  # what the pickled version extracts to, refused

    @property
    def label_columns(self) -> tuple[tuple[str, int], ...]:
        """What each label byte at the start of a record is, with its number of values."""
        fine = ("label", self.num_classes)
        return (("coarse label", self.num_coarse), fine) if self.coarse_names_file else (fine,)

    @property
    def record_bytes(self) -> int:
        return len(self.label_columns) + PIXEL_BYTES

    @property
    def batches(self) -> tuple[str, ...]:
        return (*self.train_batches, self.test_batch)

    @property
    def text_files(self) -> tuple[str, ...]:
        return (self.names_file, *([self.coarse_names_file] if self.coarse_names_file else []))

    def member(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def splits(self) -> dict[str, Any]:
        """The dataset's own split definition: the batch files (by stem) that make train and val."""
        return {"train": [_stem(b) for b in self.train_batches], "val": [_stem(self.test_batch)]}


CIFAR10 = CifarVariant(
    dataset="cifar10",
    archive="cifar-10-binary.tar.gz",
    folder="cifar-10-batches-bin",
    train_batches=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_batch="test_batch.bin",
    names_file="batches.meta.txt",
    num_classes=10,
    coarse_names_file=None,
    num_coarse=0,
    python_archive="cifar-10-python.tar.gz",
    python_folder="cifar-10-batches-py",
)
CIFAR100 = CifarVariant(
    dataset="cifar100",
    archive="cifar-100-binary.tar.gz",
    folder="cifar-100-binary",
    train_batches=("train.bin",),
    test_batch="test.bin",
    names_file="fine_label_names.txt",
    num_classes=100,
    coarse_names_file="coarse_label_names.txt",
    num_coarse=20,
    python_archive="cifar-100-python.tar.gz",
    python_folder="cifar-100-python",
)
VARIANTS: dict[str, CifarVariant] = {v.dataset: v for v in (CIFAR10, CIFAR100)}
# Key prefix of each split's records: 'train_00000', 'test_00000'.
TRAIN_PREFIX, TEST_PREFIX = "train", "test"


def _stem(name: str) -> str:
    return PurePosixPath(name).stem


# --------------------------------------------------------------------------------------------- detection


def matches(root: Path) -> bool:
    """Whether `root` holds a CIFAR archive, binary or python (so the python one is refused with a reason)."""
    return any((root / name).exists() for v in VARIANTS.values() for name in _names_of(v))


def _names_of(variant: CifarVariant) -> tuple[str, ...]:
    return (variant.archive, variant.folder, variant.python_archive, variant.python_folder)


def _variant_at(root: Path) -> CifarVariant:
    """The variant whose binary archive `root` holds, or SourceError saying what to put there instead."""
    found = [v for v in VARIANTS.values() if (root / v.archive).is_file()]
    if len(found) > 1:
        raise SourceError(
            f"{root}: holds both {' and '.join(v.archive for v in found)}; put each in its own folder "
            f"(a source is one dataset)"
        )
    if found:
        return found[0]
    for v in VARIANTS.values():
        for name in (v.python_archive, v.python_folder):
            if (root / name).exists():
                raise SourceError(
                    f"{root / name}: CIFAR's python version holds pickled batches, which are never unpickled "
                    f"here; download the binary version {v.archive} from {DOWNLOAD_PAGE} and put it in {root}"
                )
        if (root / v.folder).exists():
            raise SourceError(
                f"{root / v.folder}: an extracted archive is not read (a version identifies the archive as "
                f"downloaded); put {v.archive} itself in {root}"
            )
    raise SourceError(f"{root}: no CIFAR archive ({', '.join(v.archive for v in VARIANTS.values())})")


# --------------------------------------------------------------------------------------------- the unit


@dataclass(frozen=True)
class CifarBatch:
    """One batch file of the archive: its records in file order, keyed from `first` on."""

    archive: str  # the .tar.gz
    variant: CifarVariant
    batch: str  # the batch file's name: 'data_batch_1.bin'
    key_prefix: str  # 'train' / 'test'
    first: int  # the number in the key of the batch's first record (train keys run on across batches)
    count: int
    classes: tuple[str, ...]
    coarse_names: tuple[str, ...]  # CIFAR-100's superclasses; empty for CIFAR-10

    @property
    def member(self) -> str:
        return self.variant.member(self.batch)

    def read(self) -> Iterator[RawImage]:
        return read_batch(self)

    def ident(self, split: str) -> str:
        return f"{split}-{safe_key(_stem(self.batch))}"

    def estimated_images(self) -> float:
        return self.count


def read_batch(unit: CifarBatch) -> Iterator[RawImage]:
    """The records of one batch file, streamed from the archive's start; needs only the unit (any process)."""
    where = f"{unit.archive}: {unit.member}"
    record_bytes = unit.variant.record_bytes
    try:
        with tarfile.open(unit.archive, mode="r|gz") as tar:
            for m in tar:
                if _member_name(m) != unit.member:
                    continue
                if m.size != unit.count * record_bytes:
                    raise SourceError(f"{where}: {m.size} bytes, indexed as {unit.count} records (archive changed?)")
                reader = tar.extractfile(m)
                assert reader is not None  # a regular file, as indexed
                for i, record in enumerate(_records(reader, unit.count, record_bytes, where)):
                    yield _raw_image(unit, i, record, where)
                return
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{where}: corrupt or truncated archive: {exc}") from None
    raise SourceError(f"{where}: member missing (archive changed since it was indexed?)")


def _records(reader: IO[bytes], count: int, record_bytes: int, where: str) -> Iterator[bytes]:
    for _ in range(count):
        record = reader.read(record_bytes)
        if len(record) != record_bytes:
            raise SourceError(f"{where}: truncated record")
        yield record


def _raw_image(unit: CifarBatch, i: int, record: bytes, where: str) -> RawImage:
    labels = _check_labels(np.frombuffer(record, np.uint8), unit.variant, where, i)[0]  # the label byte(s)
    fine = int(labels[-1])
    meta = None
    if unit.coarse_names:
        coarse = int(labels[0])
        meta = {"coarse_label": coarse, "coarse_name": unit.coarse_names[coarse]}
    pixels = record_pixels(np.frombuffer(record, np.uint8, PIXEL_BYTES, len(labels)))
    key = safe_key(f"{unit.key_prefix}_{unit.first + i:05d}")
    return RawImage(key, f"{unit.batch}#{i}", unit.classes[fine], fine, png_rgb(pixels), None, meta)


def _check_labels(records: np.ndarray, variant: CifarVariant, where: str, first: int) -> np.ndarray:
    """The label bytes of whole records (flat bytes), (n, label bytes); SourceError at the first out of range."""
    columns = variant.label_columns
    labels = records.reshape(-1, variant.record_bytes)[:, : len(columns)]
    for column, (what, limit) in enumerate(columns):
        bad = np.flatnonzero(labels[:, column] >= limit)
        if bad.size:
            value = labels[bad[0], column]
            raise SourceError(f"{where}: record {first + int(bad[0])} has {what} {value}, out of range 0-{limit - 1}")
    return labels


def record_pixels(planes: np.ndarray) -> np.ndarray:
    """A record's 3072 pixel bytes (red, green, blue planes) as a (32, 32, 3) RGB image."""
    return planes.reshape(CHANNELS, IMAGE_SIDE, IMAGE_SIDE).transpose(1, 2, 0)


def png_rgb(pixels: np.ndarray) -> bytes:
    """(H, W, 3) RGB uint8 pixels as a lossless PNG."""
    import cv2  # imported on first use: detecting a kind need not load OpenCV

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]))  # OpenCV writes BGR
    assert ok  # encoding uint8 pixels cannot fail
    return bytes(encoded)


def _member_name(m: tarfile.TarInfo) -> str:
    return m.name.removeprefix("./")


# --------------------------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class _Index:
    sizes: dict[str, int]  # batch member -> bytes
    texts: dict[str, str]  # label-name member -> its text


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index the CIFAR binary archive in `root` (one streaming pass) and check it."""
    variant = _variant_at(root)
    if val_per_class is not None:
        raise ValueError(f"{variant.dataset} has its own test split; --val-per-class is for sources without one")
    archive = root / variant.archive
    index = _index_archive(archive, variant)
    names = _label_names(index, archive, variant, variant.names_file, variant.num_classes)
    coarse = (
        _label_names(index, archive, variant, variant.coarse_names_file, variant.num_coarse)
        if variant.coarse_names_file
        else ()
    )
    classes = tuple(safe_key(n) for n in names)

    def batch(name: str, prefix: str, first: int) -> CifarBatch:
        count = index.sizes[variant.member(name)] // variant.record_bytes
        return CifarBatch(str(archive), variant, name, prefix, first, count, classes, coarse)

    train: list[CifarBatch] = []
    for name in variant.train_batches:
        train.append(batch(name, TRAIN_PREFIX, sum(u.count for u in train)))
    return Source(
        kind="cifar",
        dataset=variant.dataset,
        root=root,
        classes=classes,
        class_words=dict(zip(classes, names)),
        train_units=train,
        val_units=[batch(variant.test_batch, TEST_PREFIX, 0)],
        archives=(archive,),
        splits=variant.splits(),
    )


def _index_archive(archive: Path, variant: CifarVariant) -> _Index:
    """Every member's size and the label-name texts, in one pass; batch labels are checked against the counts
    of names the dataset has (the names themselves are checked after)."""
    wanted_batches = {variant.member(b) for b in variant.batches}
    wanted_texts = {variant.member(t) for t in variant.text_files}
    sizes: dict[str, int] = {}
    texts: dict[str, str] = {}
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for m in tar:
                name = _member_name(m)
                if not m.isfile() or name not in wanted_batches | wanted_texts:
                    continue
                reader = tar.extractfile(m)
                assert reader is not None
                if name in wanted_texts:
                    texts[name] = reader.read().decode("utf-8", "replace")
                else:
                    _check_batch(reader, m.size, variant, f"{archive}: {name}")
                    sizes[name] = m.size
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{archive}: corrupt or truncated archive: {exc}") from None
    missing = sorted((wanted_batches | wanted_texts) - sizes.keys() - texts.keys())
    if missing:
        raise SourceError(f"{archive}: member(s) missing: {', '.join(missing)}")
    return _Index(sizes, texts)


def _check_batch(reader: IO[bytes], size: int, variant: CifarVariant, where: str) -> None:
    """A whole number of records, each label within the dataset's number of classes (and superclasses)."""
    record = variant.record_bytes
    if size % record:
        raise SourceError(
            f"{where}: {size} bytes is not a whole number of {record}-byte records (truncated or not a batch file)"
        )
    done = 0
    while done < size // record:
        n = min(_SCAN_RECORDS, size // record - done)
        chunk = reader.read(n * record)
        if len(chunk) != n * record:
            raise SourceError(f"{where}: truncated")
        _check_labels(np.frombuffer(chunk, np.uint8), variant, where, done)
        done += n


def _label_names(index: _Index, archive: Path, variant: CifarVariant, file: str, expected: int) -> tuple[str, ...]:
    """Label i is line i; blank lines at the end (the files end with some) are not labels."""
    member = variant.member(file)
    lines = [line.strip() for line in index.texts[member].splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    where = f"{archive}: {member}"
    if len(lines) != expected:
        raise SourceError(f"{where}: {len(lines)} label names, {variant.dataset} has {expected}")
    if not all(lines):
        raise SourceError(f"{where}: blank label name on line {lines.index('') + 1}")
    return tuple(lines)
