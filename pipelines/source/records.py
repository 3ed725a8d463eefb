"""What every source kind gives: the indexed source (`Source`), its units, the records read from them, and the
readers of a unit, which need no source object.

The file and folder names of ILSVRC2012's three layouts are here too, with the checks the kinds share (which names
are images, what a broken tar raises, which keys are safe). The kinds themselves are modules beside this one
(`archives`, `tree`, `kaggle` for ILSVRC2012; `folders`, `imagenet21k`, `cifar`, `flowers`, `cars`, `idx`);
`pipelines.source.open_source` opens whichever a path holds.

Work is split into picklable units (a train class, a chunk of val files, a batch file...) that carry everything
needed to read them, so a worker process opens the file itself: every unit has `read()` (its `RawImage`s),
`ident(split)` (a file-safe, stable name) and `estimated_images()` (for scheduling the largest first). Decoding is
not done here; staging decodes, converts and reports bad files.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal, Protocol

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

SourceKind = Literal["archives", "tree", "kaggle", "folders", "imagenet21k", "cifar", "flowers102", "cars", "idx"]
SOURCE_KINDS: tuple[SourceKind, ...] = (
    "archives",
    "tree",
    "kaggle",
    "folders",
    "imagenet21k",
    "cifar",
    "flowers102",
    "cars",
    "idx",
)
IMAGENET_KINDS: tuple[SourceKind, ...] = ("archives", "tree", "kaggle")
# Kinds a source of which can grow (files added to folders, class tars to an archive), so that a new version is
# staged on top of an earlier one; the others are fixed releases, staged whole.
GROWING_KINDS: tuple[SourceKind, ...] = ("archives", "tree", "kaggle", "folders")
DEFAULT_VAL_CHUNK = 1000
# Val images held out of each class where a dataset defines no val split (ImageNet-21k; a class-folder tree
# without val/ or test/): 50, as in the processed ImageNet-21k-P release.
DEFAULT_VAL_PER_CLASS = 50

# What a broken tar or gzip raises from tarfile: bad headers, short reads, bad compressed streams.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

_HASH_CHUNK = 1 << 20
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})


class SourceError(ValueError):
    """The data at a path is not a usable source; the message names the file and what is wrong."""


ImageNetSourceError = SourceError  # the name callers of the ILSVRC2012-only code used


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(text: str) -> str:
    """`text` as a sample key or file name part: only [A-Za-z0-9_-] (a key ends at the first dot of a member name,
    and a space or newline would break a shard's index line). Text with other characters gets them replaced and
    a short hash of the original appended, so two names never meet in one key."""
    cleaned = _UNSAFE.sub("-", text)
    if cleaned == text and text:
        return text
    return f"{cleaned}-{hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


@dataclass(frozen=True)
class RawImage:
    """One image's undecoded bytes and its label."""

    key: str  # unique in the source and file-safe: 'n01440764_10026', 'ILSVRC2012_val_00000001', 'train_00001'
    source_name: str  # where it came from, for reports: 'n01440764_10026.JPEG', 'data_batch_1.bin[17]'
    wnid: str  # the class id (a WNID for ImageNet; `Source.classes` holds them)
    label: int  # position of the class id in `Source.classes`
    data: bytes
    # The file and offset where `data` lies verbatim (a tree's image file, or inside an archive), so that staging
    # can copy an original it keeps as it is from there instead of spooling a second copy.
    origin: tuple[str, int] | None = None
    # What the dataset says beside the label, kept in the sample's metadata (CIFAR-100's coarse label).
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainUnit:
    """All training images of one class. For archives, a byte span of the outer tar that is the class's tar."""

    wnid: str
    label: int
    path: str  # archives: the outer train tar; tree/kaggle: the class folder
    offset: int = -1  # archives: where the inner <wnid>.tar starts in the outer tar
    size: int = -1  # archives: the inner tar's size in bytes
    names: tuple[str, ...] = ()  # tree/kaggle/folders: the image file names in the folder, sorted
    # Put before each file's stem to make its key (folders: names repeat across classes and splits).
    key_prefix: str = ""

    def key(self, name: str) -> str:
        """The key of the file `name` (a path inside the folder: its suffix dropped, the prefix put before)."""
        return safe_key(self.key_prefix + str(PurePosixPath(name).with_suffix("")))

    def read(self) -> Iterator[RawImage]:
        return read_train_unit(self)

    def ident(self, split: str) -> str:
        return f"{split}-{safe_key(self.wnid)}"

    def estimated_images(self) -> float:
        """The listed files, or a class tar's size over ImageNet's ~110 KB per image."""
        return len(self.names) if self.names else max(self.size, 0) / 110e3


@dataclass(frozen=True)
class ValEntry:
    """One validation image: its name (a tar member or a path relative to the val folder) and label."""

    name: str
    wnid: str
    label: int
    offset: int = -1  # archives: where the member's bytes start in the val tar
    size: int = -1  # archives: the member's size
    key_prefix: str = ""  # as TrainUnit's

    @property
    def source_name(self) -> str:
        return PurePosixPath(self.name).name

    @property
    def key(self) -> str:
        """The key of the file (its name without suffix, after the prefix: a folders tree's class and path)."""
        stem = PurePosixPath(self.name).with_suffix("") if self.key_prefix else PurePosixPath(self.name).stem
        return safe_key(self.key_prefix + str(stem))


@dataclass(frozen=True)
class ValUnit:
    """A chunk of validation images, so validation can be read in parallel too."""

    index: int
    path: str  # archives: the val tar; tree/kaggle: the val folder
    entries: tuple[ValEntry, ...]

    def read(self) -> Iterator[RawImage]:
        return read_val_unit(self)

    def ident(self, split: str) -> str:
        return f"{split}-{self.index:05d}"

    def estimated_images(self) -> float:
        return len(self.entries)


class Unit(Protocol):
    """What staging needs of a unit of any source kind (picklable: it is read in a worker process)."""

    def read(self) -> Iterator[RawImage]: ...

    def ident(self, split: str) -> str: ...

    def estimated_images(self) -> float: ...


# --------------------------------------------------------------------------------------------- the source


class Source:
    """An indexed source of any kind. Build it with `pipelines.source.open_source`.

    Val comes one of three ways: `val_entries` (files listed one by one, read in chunks of `val_units(chunk)`),
    `val_units` (units the kind built itself: a test batch file), or none, with `val_per_class` images of each
    class held out of train by staging (`staging.plan`).
    """

    def __init__(
        self,
        *,
        kind: SourceKind,
        root: Path,
        classes: tuple[str, ...],
        class_words: dict[str, str],
        train_units: Sequence[Unit],
        val_dir: Path | None = None,
        val_entries: Sequence[ValEntry] = (),
        label_files: Sequence[Path] = (),
        folders: tuple[Path, ...] = (),
        dataset: str = "imagenet",
        archives: tuple[Path, ...] = (),
        val_units: Sequence[Unit] | None = None,
        val_per_class: int = 0,
        splits: dict[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.root = root
        self.classes = classes  # class ids; a label is a position in them
        self.class_words = class_words  # class id -> the dataset's own name for it
        self.dataset = dataset  # what its versions are named after: '<dataset>-<hash>'
        self._train_units = list(train_units)
        self._val_dir = val_dir
        self._val_entries = list(val_entries)
        self._val_units = list(val_units) if val_units is not None else None
        self.label_files = tuple(label_files)  # small files the labels come from; hashed in full by fingerprint()
        # Files read in place and hashed whole by fingerprint() (ILSVRC2012's three archives, CIFAR's tar.gz...);
        # staging caches their fingerprint by path, size and mtime.
        self.archives = archives
        # The folders whose listings are the source (train/, val/, an extracted devkit): whatever is written
        # inside them becomes part of the source. Empty for archives, which are read by name.
        self.folders = folders
        self.val_per_class = val_per_class
        # The dataset's own split definition, as the manifest records it: which of its splits make train and val.
        self.splits = splits or {"train": ["train"], "val": ["val"]}

    def __repr__(self) -> str:
        return (
            f"Source(kind={self.kind!r}, dataset={self.dataset!r}, root={str(self.root)!r}, "
            f"classes={len(self.classes)}, val_images={self.num_val})"
        )

    @property
    def num_val(self) -> int:
        if self._val_units is not None:
            return round(sum(u.estimated_images() for u in self._val_units))
        return len(self._val_entries)

    @property
    def listed(self) -> bool:
        """Whether every train image is a listed file (trees), so it can be counted and named without reading."""
        return all(isinstance(u, TrainUnit) and u.names for u in self._train_units)

    def train_units(self) -> list[Unit]:
        return list(self._train_units)

    @property
    def val_path(self) -> str:
        """The val folder or archive that `val_entries` name their files in ("" where there is none)."""
        return str(self._val_dir) if self._val_dir is not None else ""

    def val_entries(self) -> list[ValEntry]:
        """The val files listed one by one (empty where the kind reads val in its own units, or has none)."""
        return list(self._val_entries)

    def val_units(self, chunk: int = DEFAULT_VAL_CHUNK) -> list[Unit]:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if self._val_units is not None:
            return list(self._val_units)
        entries = self._val_entries
        return [
            ValUnit(i, str(self._val_dir), tuple(entries[start : start + chunk]))
            for i, start in enumerate(range(0, len(entries), chunk))
        ]

    def manifest_record(self) -> dict[str, Any]:
        """What a version's manifest says of its source beside the fingerprint: the dataset, its class names and
        its own split definition."""
        record: dict[str, Any] = {"dataset": self.dataset, "splits": self.splits}
        if any(self.class_words.get(c) for c in self.classes):
            record["class_names"] = [self.class_words.get(c, "") for c in self.classes]
        return record

    # The whole source in one pass, in unit order. Staging reads units in parallel instead; the tests read
    # whole sources to compare the layouts record by record.
    def iter_train(self) -> Iterator[RawImage]:
        for unit in self._train_units:
            yield from unit.read()

    def iter_val(self) -> Iterator[RawImage]:
        for unit in self.val_units():
            yield from unit.read()

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source's content, for the dataset manifest.

        Cost: for archives, every byte is read and hashed once (sha256, 1 MiB chunks): for the real ~145 GB that
        is minutes at disk speed, so callers should compute it once per staging run. For trees, one stat per
        image and no reads (1.33 M stats: seconds on a local disk, longer on network file systems); the small
        label files (devkit, CSV, synset mapping) are hashed in full. A val held out per class is part of it.
        """
        fingerprint: dict[str, Any]
        if self.archives:
            files = [_file_digest(p, p.relative_to(self.root).as_posix()) for p in self.archives]
            fingerprint = {"kind": self.kind, "files": files}
            if self.label_files:
                fingerprint["label_files"] = [
                    _file_digest(p, p.relative_to(self.root).as_posix()) for p in self.label_files
                ]
        else:
            lines = [f"{rel}\t{size}\n" for rel, size in sorted(self._image_files_with_sizes())]
            tree_hash = hashlib.sha256("".join(lines).encode()).hexdigest()
            num_val = len(self._val_entries)
            fingerprint = {
                "kind": self.kind,
                "tree_sha256": tree_hash,
                "num_classes": len(self.classes),
                "num_train_files": len(lines) - num_val,
                "num_val_files": num_val,
                "label_files": [_file_digest(p, p.relative_to(self.root).as_posix()) for p in self.label_files],
            }
        if self.val_per_class:
            fingerprint["val_per_class"] = self.val_per_class
        return fingerprint

    def _image_files_with_sizes(self) -> Iterator[tuple[str, int]]:
        for unit in self._train_units:
            assert isinstance(unit, TrainUnit)  # a source without archives is a listed tree
            folder = Path(unit.path)
            for name in unit.names:
                yield (folder / name).relative_to(self.root).as_posix(), (folder / name).stat().st_size
        for entry in self._val_entries:
            assert self._val_dir is not None
            path = self._val_dir / entry.name
            yield path.relative_to(self.root).as_posix(), path.stat().st_size


ImageNetSource = Source  # the name callers of the ILSVRC2012-only code used


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
            yield RawImage(unit.key(name), name, unit.wnid, unit.label, _read_file(path), (str(path), 0))
        return
    yield from _read_inner_tar(unit)


def read_val_unit(unit: ValUnit) -> Iterator[RawImage]:
    """The images of one val chunk in file-name order."""
    path = Path(unit.path)
    if path.is_dir():
        for e in unit.entries:
            file = path / e.name
            yield RawImage(e.key, e.source_name, e.wnid, e.label, _read_file(file), (str(file), 0))
        return
    try:
        with open(path, "rb") as f:
            for e in unit.entries:
                f.seek(e.offset)
                data = f.read(e.size)
                if len(data) != e.size:
                    raise ImageNetSourceError(f"{path}: truncated: member {e.name} ends past the end of the file")
                yield RawImage(e.key, e.source_name, e.wnid, e.label, data, (str(path), e.offset))
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
                origin = (unit.path, unit.offset + m.offset_data)
                yield RawImage(unit.key(name), name, unit.wnid, unit.label, data, origin)
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
