"""What every ILSVRC2012 layout gives: the indexed source (`ImageNetSource`), its units, the records read from
them, and the readers of a unit, which need no source object.

The file and folder names of the three layouts are here too, with the checks the layouts share (which names are
images, what a broken tar raises). The layouts themselves are `archives`, `tree` and `kaggle`; `imagenet` opens
whichever a path holds.

Work is split into picklable units (one per train class, chunks of val files) that carry everything needed to
read them, so a worker process opens the file itself: `read_train_unit` / `read_val_unit`. Decoding is not done
here; staging decodes, converts and reports bad files.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT_ARCHIVE)
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"

SourceKind = Literal["archives", "tree", "kaggle"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("archives", "tree", "kaggle")
DEFAULT_VAL_CHUNK = 1000

# What a broken tar or gzip raises from tarfile: bad headers, short reads, bad compressed streams.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

_HASH_CHUNK = 1 << 20
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


class ImageNetSourceError(ValueError):
    """The data at a path is not a usable ILSVRC2012 source; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RawImage:
    """One image's undecoded bytes and its label."""

    key: str  # file stem: 'n01440764_10026', 'ILSVRC2012_val_00000001'
    source_name: str  # original file name: 'n01440764_10026.JPEG'
    wnid: str
    label: int  # position of wnid in the sorted WNIDs
    data: bytes
    # The file and offset where `data` lies verbatim (a tree's image file, or inside an archive), so that staging
    # can copy an original it keeps as it is from there instead of spooling a second copy.
    origin: tuple[str, int] | None = None


@dataclass(frozen=True)
class TrainUnit:
    """All training images of one class. For archives, a byte span of the outer tar that is the class's tar."""

    wnid: str
    label: int
    path: str  # archives: the outer train tar; tree/kaggle: the class folder
    offset: int = -1  # archives: where the inner <wnid>.tar starts in the outer tar
    size: int = -1  # archives: the inner tar's size in bytes
    names: tuple[str, ...] = ()  # tree/kaggle: the image file names in the folder, sorted


@dataclass(frozen=True)
class ValEntry:
    """One validation image: its name (a tar member or a path relative to the val folder) and label."""

    name: str
    wnid: str
    label: int
    offset: int = -1  # archives: where the member's bytes start in the val tar
    size: int = -1  # archives: the member's size

    @property
    def source_name(self) -> str:
        return PurePosixPath(self.name).name


@dataclass(frozen=True)
class ValUnit:
    """A chunk of validation images, so validation can be read in parallel too."""

    index: int
    path: str  # archives: the val tar; tree/kaggle: the val folder
    entries: tuple[ValEntry, ...]


# --------------------------------------------------------------------------------------------- the source


class ImageNetSource:
    """An indexed ILSVRC2012 source. Build it with `imagenet.open_source`."""

    def __init__(
        self,
        *,
        kind: SourceKind,
        root: Path,
        classes: tuple[str, ...],
        class_words: dict[str, str],
        train_units: list[TrainUnit],
        val_dir: Path,
        val_entries: list[ValEntry],
        label_files: list[Path],
        folders: tuple[Path, ...] = (),
    ) -> None:
        self.kind = kind
        self.root = root
        self.classes = classes
        self.class_words = class_words
        self._train_units = train_units
        self._val_dir = val_dir
        self._val_entries = val_entries
        self._label_files = label_files  # small files the labels come from; hashed in full by fingerprint()
        # The folders whose listings are the source (train/, val/, an extracted devkit): whatever is written
        # inside them becomes part of the source. Empty for archives, which are read by name.
        self.folders = folders

    def __repr__(self) -> str:
        return (
            f"ImageNetSource(kind={self.kind!r}, root={str(self.root)!r}, classes={len(self.classes)}, "
            f"val_images={self.num_val})"
        )

    @property
    def num_val(self) -> int:
        return len(self._val_entries)

    def train_units(self) -> list[TrainUnit]:
        return list(self._train_units)

    def val_units(self, chunk: int = DEFAULT_VAL_CHUNK) -> list[ValUnit]:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        entries = self._val_entries
        return [
            ValUnit(i, str(self._val_dir), tuple(entries[start : start + chunk]))
            for i, start in enumerate(range(0, len(entries), chunk))
        ]

    # The whole source in one pass, in unit order. Staging reads units in parallel instead; the tests read
    # whole sources to compare the layouts record by record.
    def iter_train(self) -> Iterator[RawImage]:
        for unit in self._train_units:
            yield from read_train_unit(unit)

    def iter_val(self) -> Iterator[RawImage]:
        for unit in self.val_units():
            yield from read_val_unit(unit)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's content, for the dataset manifest.

        Cost: for archives, every byte is read and hashed once (sha256, 1 MiB chunks): for the real ~145 GB that
        is minutes at disk speed, so callers should compute it once per staging run. For trees, one stat per
        image and no reads (1.33 M stats: seconds on a local disk, longer on network file systems); the small
        label files (devkit, CSV, synset mapping) are hashed in full.
        """
        if self.kind == "archives":
            return {"kind": self.kind, "files": [_file_digest(self.root / name, name) for name in ARCHIVES]}
        lines = [f"{rel}\t{size}\n" for rel, size in sorted(self._image_files_with_sizes())]
        tree_hash = hashlib.sha256("".join(lines).encode()).hexdigest()
        num_val = len(self._val_entries)
        return {
            "kind": self.kind,
            "tree_sha256": tree_hash,
            "num_classes": len(self.classes),
            "num_train_files": len(lines) - num_val,
            "num_val_files": num_val,
            "label_files": [_file_digest(p, p.relative_to(self.root).as_posix()) for p in self._label_files],
        }

    def _image_files_with_sizes(self) -> Iterator[tuple[str, int]]:
        for unit in self._train_units:
            folder = Path(unit.path)
            for name in unit.names:
                yield (folder / name).relative_to(self.root).as_posix(), (folder / name).stat().st_size
        for entry in self._val_entries:
            path = self._val_dir / entry.name
            yield path.relative_to(self.root).as_posix(), path.stat().st_size


def _file_digest(path: Path, name: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"name": name, "size": size, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------------------------- reading units


def read_train_unit(unit: TrainUnit) -> Iterator[RawImage]:
    """The images of one class in file-name order. Needs only the unit, so it runs in any worker process."""
    if unit.offset < 0:
        folder = Path(unit.path)
        for name in unit.names:
            path = folder / name
            yield RawImage(Path(name).stem, name, unit.wnid, unit.label, _read_file(path), (str(path), 0))
        return
    yield from _read_inner_tar(unit)


def read_val_unit(unit: ValUnit) -> Iterator[RawImage]:
    """The images of one val chunk in file-name order."""
    path = Path(unit.path)
    if path.is_dir():
        for e in unit.entries:
            file = path / e.name
            yield RawImage(Path(e.source_name).stem, e.source_name, e.wnid, e.label, _read_file(file), (str(file), 0))
        return
    try:
        with open(path, "rb") as f:
            for e in unit.entries:
                f.seek(e.offset)
                data = f.read(e.size)
                if len(data) != e.size:
                    raise ImageNetSourceError(f"{path}: truncated: member {e.name} ends past the end of the file")
                yield RawImage(Path(e.source_name).stem, e.source_name, e.wnid, e.label, data, (str(path), e.offset))
    except OSError as exc:
        raise ImageNetSourceError(f"{path}: cannot read: {exc}") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageNetSourceError(f"{path}: cannot read: {exc}") from None


def _read_inner_tar(unit: TrainUnit) -> Iterator[RawImage]:
    where = f"{unit.wnid}.tar in {unit.path}"
    try:
        with open(unit.path, "rb") as f, tarfile.open(fileobj=_FileSpan(f, unit.offset, unit.size), mode="r:") as tar:
            # Headers first (cheap seeks), then data in name order, so the order does not depend on how
            # the tar was written.
            members = sorted(image_members(tar.getmembers()), key=lambda m: PurePosixPath(m.name).name)
            _check_end_of_members(tar, where)
            for m in members:
                reader = tar.extractfile(m)
                assert reader is not None  # regular files always have a reader
                data = reader.read()
                name = PurePosixPath(m.name).name
                yield RawImage(
                    Path(name).stem, name, unit.wnid, unit.label, data, (unit.path, unit.offset + m.offset_data)
                )
    except ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{where}: corrupt or truncated class tar: {exc}") from None


def _check_end_of_members(tar: tarfile.TarFile, where: str) -> None:
    """After `getmembers`: tarfile stops quietly at a damaged header past the first one, reading the tar as a
    shorter, valid one; what follows the last member must be the end-of-archive zeros (or nothing)."""
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if block.count(0) != len(block):
        raise ImageNetSourceError(
            f"{where}: corrupt or truncated class tar: bad member header at byte {tar.offset} "
            f"(the members from there on cannot be read)"
        )


class _FileSpan(io.RawIOBase):
    """A read-only, seekable window [offset, offset + size) of an open file: one member of a tar of tars."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# --------------------------------------------------------------------------------------------- shared checks


def is_image_name(name: str) -> bool:
    """Whether a file or tar member name is an image of the source (by suffix; hidden files are not)."""
    base = PurePosixPath(name).name
    # Hidden files ('._x.JPEG' from macOS copies) are metadata, not images.
    return not base.startswith(".") and PurePosixPath(base).suffix.lower() in _IMAGE_SUFFIXES


def image_members(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of a tar that are images."""
    return (m for m in members if m.isfile() and is_image_name(m.name))


def check_same_classes(expected: Iterable[str], found: Iterable[str], expected_from: str, found_in: str) -> None:
    """ImageNetSourceError naming the classes missing and unexpected when two lists of WNIDs differ."""
    expected, found = set(expected), set(found)
    if expected == found:
        return
    missing, extra = sorted(expected - found), sorted(found - expected)
    raise ImageNetSourceError(
        f"{found_in}: classes do not match {expected_from}: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
    )
