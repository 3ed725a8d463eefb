"""Read ILSVRC2012 (ImageNet-1k classification) in the layouts users have it in, as raw image bytes.

Three source kinds give the same records for the same images:

- ``archives``: a folder holding the three files as distributed (ILSVRC2012_img_train.tar, a tar of one tar per
  class; ILSVRC2012_img_val.tar, flat; ILSVRC2012_devkit_t12.tar.gz). Read in place: nothing is extracted.
- ``tree``: ``train/<wnid>/*.JPEG``, ``val/`` flat or ``val/<wnid>/``, and the devkit (the .tar.gz or the
  extracted ``ILSVRC2012_devkit_t12/`` folder) in the same root.
- ``kaggle``: ``ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}`` with LOC_synset_mapping.txt and LOC_val_solution.csv.

The class index is the position of the WNID among the sorted WNIDs (the torchvision / ImageFolder / Kaggle
convention). The devkit's ILSVRC2012_IDs are in a different order, so val labels map ID -> WNID -> sorted index.

Work is split into picklable units (one per train class, chunks of val files) that carry everything needed to
read them, so a worker process opens the file itself: `read_train_unit` / `read_val_unit` need no source object.
Decoding is not done here; staging decodes, converts and reports bad files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

import numpy as np

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

_HASH_CHUNK = 1 << 20
_IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_WNID = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d+)")
# What a broken tar or gzip raises from tarfile: bad headers, short reads, bad compressed streams.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


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


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC2012 devkit says: the leaf synsets and the val ground truth."""

    path: Path  # the .tar.gz or the extracted folder
    leaf_wnids: dict[int, str]  # ILSVRC2012_ID -> WNID, leaves (num_children == 0) only
    words: dict[str, str]  # WNID -> words, leaves only
    ground_truth: tuple[int, ...]  # ILSVRC2012_ID of val image i+1 (file name order)
    ground_truth_name: str  # for error messages: where the ground truth was read

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(sorted(self.leaf_wnids.values()))


# --------------------------------------------------------------------------------------------- detect, open


def detect_source_kind(path: str | os.PathLike[str]) -> SourceKind:
    """Which layout `path` holds. Checked in order Kaggle, extracted tree, archives.

    A root holding both the archives and a tree extracted next to them (what torchvision's ImageNet class
    leaves behind) is read as a tree: the files are the same and reading loose files is cheaper. Pass `kind`
    to `open_source` to choose.
    """
    root = _existing_dir(path)
    if (root / KAGGLE_DATA).is_dir():
        return "kaggle"
    if (root / "train").is_dir():
        return "tree"
    if any((root / name).exists() for name in ARCHIVES):
        return "archives"
    raise ImageNetSourceError(
        f"{root}: no ILSVRC2012 source found. Looked for the archives ({', '.join(ARCHIVES)}), an extracted "
        f"tree (train/<wnid>/, val/ and {DEVKIT_DIR}/ or {DEVKIT_ARCHIVE}) and the Kaggle layout "
        f"({KAGGLE_DATA}/ with {KAGGLE_SYNSETS} and {KAGGLE_VAL_SOLUTION})"
    )


def open_source(path: str | os.PathLike[str], kind: SourceKind | None = None) -> ImageNetSource:
    """Index the source at `path` (headers and directory listings only) and check it is consistent."""
    root = _existing_dir(path)
    if kind is None:
        kind = detect_source_kind(root)
    if kind == "archives":
        return _open_archives(root)
    if kind == "tree":
        return _open_tree(root)
    if kind == "kaggle":
        return _open_kaggle(root)
    raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {kind!r}")


def _existing_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise ImageNetSourceError(f"{root}: path does not exist")
    if not root.is_dir():
        raise ImageNetSourceError(f"{root}: not a folder (point at the folder holding the ILSVRC2012 files)")
    return root.resolve()


# --------------------------------------------------------------------------------------------- the source


class ImageNetSource:
    """An indexed ILSVRC2012 source. Build it with `open_source`."""

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
        self._labels = {wnid: i for i, wnid in enumerate(classes)}
        self._train_units = train_units
        self._val_dir = val_dir
        self._val_entries = val_entries
        self._label_files = label_files  # small files the labels come from; hashed in full by fingerprint()
        # The folders whose listings are the source (train/, val/, an extracted devkit): whatever is written
        # inside them becomes part of the source. Empty for archives, which are read by name.
        self.folders = folders

    def __repr__(self) -> str:
        return (f"ImageNetSource(kind={self.kind!r}, root={str(self.root)!r}, classes={len(self.classes)}, "
                f"val_images={self.num_val})")

    @property
    def num_val(self) -> int:
        return len(self._val_entries)

    def label_of(self, wnid: str) -> int:
        try:
            return self._labels[wnid]
        except KeyError:
            raise KeyError(f"{wnid!r} is not one of the {len(self.classes)} classes of {self.root}") from None

    def train_units(self) -> list[TrainUnit]:
        return list(self._train_units)

    def val_units(self, chunk: int = DEFAULT_VAL_CHUNK) -> list[ValUnit]:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        entries = self._val_entries
        return [
            ValUnit(i, str(self._val_dir), tuple(entries[start:start + chunk]))
            for i, start in enumerate(range(0, len(entries), chunk))
        ]

    def iter_train_unit(self, unit: TrainUnit) -> Iterator[RawImage]:
        return read_train_unit(unit)

    def iter_val_unit(self, unit: ValUnit) -> Iterator[RawImage]:
        return read_val_unit(unit)

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
            members = sorted(_image_members(tar.getmembers()), key=lambda m: PurePosixPath(m.name).name)
            _check_end_of_members(tar, where)
            for m in members:
                reader = tar.extractfile(m)
                assert reader is not None  # regular files always have a reader
                data = reader.read()
                name = PurePosixPath(m.name).name
                yield RawImage(Path(name).stem, name, unit.wnid, unit.label, data,
                               (unit.path, unit.offset + m.offset_data))
    except _ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{where}: corrupt or truncated class tar: {exc}") from None


def _check_end_of_members(tar: tarfile.TarFile, where: str) -> None:
    """After `getmembers`: tarfile stops quietly at a damaged header past the first one, reading the tar as a
    shorter, valid one; what follows the last member must be the end-of-archive zeros (or nothing)."""
    assert tar.fileobj is not None
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if block.count(0) != len(block):
        raise ImageNetSourceError(f"{where}: corrupt or truncated class tar: bad member header at byte {tar.offset} "
                                  f"(the members from there on cannot be read)")


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


def _is_image_name(name: str) -> bool:
    base = PurePosixPath(name).name
    # Hidden files ('._x.JPEG' from macOS copies) are metadata, not images.
    return not base.startswith(".") and PurePosixPath(base).suffix.lower() in _IMAGE_SUFFIXES


def _image_members(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
    return (m for m in members if m.isfile() and _is_image_name(m.name))


# --------------------------------------------------------------------------------------------- archives


def _open_archives(root: Path) -> ImageNetSource:
    paths = {name: root / name for name in ARCHIVES}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise ImageNetSourceError(
            f"{root}: archive(s) missing: {', '.join(missing)} (need all of {', '.join(ARCHIVES)})"
        )
    devkit = read_devkit(paths[DEVKIT_ARCHIVE])
    train_tar, val_tar = paths[TRAIN_ARCHIVE], paths[VAL_ARCHIVE]

    spans = _index_class_tars(train_tar)
    classes = devkit.wnids
    _check_same_classes(classes, spans.keys(), f"{devkit.path} ({META_MAT})", str(train_tar))
    labels = {wnid: i for i, wnid in enumerate(classes)}
    units = [
        TrainUnit(wnid, labels[wnid], str(train_tar), offset, size) for wnid, (offset, size) in sorted(spans.items())
    ]

    members = _index_tar(val_tar, _image_members)
    flat = [(PurePosixPath(m.name).name, m) for m in members]
    wnid_of = _val_wnids_from_devkit(devkit, [name for name, _ in flat], str(val_tar))
    val = [ValEntry(m.name, wnid_of[name], labels[wnid_of[name]], m.offset_data, m.size) for name, m in flat]
    val.sort(key=lambda e: e.source_name)
    return ImageNetSource(kind="archives", root=root, classes=classes, class_words=devkit.words,
                          train_units=units, val_dir=val_tar, val_entries=val, label_files=[])


def _index_tar(
    path: Path, select: Callable[[list[tarfile.TarInfo]], Iterable[tarfile.TarInfo]]
) -> list[tarfile.TarInfo]:
    """The selected members of an uncompressed tar, reading headers only, checked for truncation."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = list(select(tar.getmembers()))
            end_of_members = tar.offset
            assert tar.fileobj is not None
            tar.fileobj.seek(end_of_members)
            after = tar.fileobj.read(tarfile.BLOCKSIZE)
    except _ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{path}: not a readable tar archive: {exc}") from None
    if after.count(0) != len(after):  # tarfile stops quietly at a damaged header past the first
        raise ImageNetSourceError(f"{path}: corrupt: bad member header at byte {end_of_members} (the members from "
                                  f"there on cannot be read)")
    # tarfile reads a tar cut between members as a shorter, valid one, and may read one cut inside a member
    # as if the member were whole; the end-of-archive blocks and the member ends show both.
    file_size = path.stat().st_size
    for m in members:
        if m.offset_data + m.size > file_size:
            raise ImageNetSourceError(f"{path}: truncated: member {m.name} ends past the end of the file")
    if file_size - end_of_members < tarfile.BLOCKSIZE:
        raise ImageNetSourceError(f"{path}: truncated: no end-of-archive marker after the last member")
    if not members:
        raise ImageNetSourceError(f"{path}: holds no images")
    return members


def _index_class_tars(path: Path) -> dict[str, tuple[int, int]]:
    """WNID -> (offset, size) of each per-class tar inside the train tar."""

    def class_tars(members: Iterable[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
        for m in members:
            if not m.isfile():
                continue
            name = PurePosixPath(m.name).name
            if not name.endswith(".tar"):
                raise ImageNetSourceError(f"{path}: member {m.name} is not a per-class tar (expected <wnid>.tar)")
            yield m

    spans: dict[str, tuple[int, int]] = {}
    members = _index_tar(path, class_tars)
    for m in members:
        wnid = PurePosixPath(m.name).name[: -len(".tar")]
        if wnid in spans:
            raise ImageNetSourceError(f"{path}: class tar {m.name} appears twice")
        spans[wnid] = (m.offset_data, m.size)
    _check_class_tar_headers(path, members)
    return spans


def _check_class_tar_headers(path: Path, members: Iterable[tarfile.TarInfo]) -> None:
    """The first header of every class tar, read now (one 512-byte block each, 1000 on ImageNet: a blink), so
    that a damaged class tar fails before staging starts rather than when its unit's turn comes, hours in.
    Damage further inside a class tar is found when its unit reads it (`_check_end_of_members`)."""
    with open(path, "rb") as f:
        for m in members:
            where = f"{PurePosixPath(m.name).name} in {path}"
            f.seek(m.offset_data)
            try:
                tarfile.TarInfo.frombuf(f.read(min(m.size, tarfile.BLOCKSIZE)), tarfile.ENCODING, "surrogateescape")
            except tarfile.EOFHeaderError:
                raise ImageNetSourceError(f"{where}: holds no images (an empty class tar)") from None
            except tarfile.HeaderError as exc:
                raise ImageNetSourceError(f"{where}: corrupt or truncated class tar: {exc}") from None


# --------------------------------------------------------------------------------------------- devkit


def read_devkit(path: str | os.PathLike[str]) -> Devkit:
    """Leaf synsets and val ground truth from ILSVRC2012_devkit_t12.tar.gz or its extracted folder."""
    path = Path(path)
    if path.is_dir():
        meta_path, gt_path = path / META_MAT, path / GROUND_TRUTH
        for p in (meta_path, gt_path):
            if not p.is_file():
                raise ImageNetSourceError(f"{p}: devkit file missing")
        meta, gt = meta_path.read_bytes(), gt_path.read_bytes()
        meta_name, gt_name = str(meta_path), str(gt_path)
    elif path.is_file():
        meta, gt = _read_devkit_archive(path)
        meta_name, gt_name = f"{path} ({META_MAT})", f"{path} ({GROUND_TRUTH})"
    else:
        raise ImageNetSourceError(f"{path}: devkit missing")
    leaf_wnids, words = _parse_meta_mat(meta, meta_name)
    ground_truth = _parse_ground_truth(gt, gt_name, leaf_wnids)
    return Devkit(path, leaf_wnids, words, ground_truth, gt_name)


def _read_devkit_archive(path: Path) -> tuple[bytes, bytes]:
    wanted = {tuple(META_MAT.split("/")): b"", tuple(GROUND_TRUTH.split("/")): b""}
    found: dict[tuple[str, ...], bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for m in tar:
                tail = PurePosixPath(m.name).parts[-2:]
                if m.isfile() and tail in wanted:
                    reader = tar.extractfile(m)
                    assert reader is not None
                    found[tail] = reader.read()
    except _ARCHIVE_ERRORS as exc:
        raise ImageNetSourceError(f"{path}: not a readable .tar.gz devkit: {exc}") from None
    for tail in wanted:
        if tail not in found:
            raise ImageNetSourceError(f"{path}: devkit has no {'/'.join(tail)}")
    return found[tuple(META_MAT.split("/"))], found[tuple(GROUND_TRUTH.split("/"))]


def _parse_meta_mat(data: bytes, name: str) -> tuple[dict[int, str], dict[str, str]]:
    from scipy.io import loadmat  # scipy is heavy; only devkit readers pay for it

    try:
        synsets = np.atleast_1d(loadmat(io.BytesIO(data), squeeze_me=True)["synsets"])
        rows = [(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]), int(r["num_children"])) for r in synsets]
    except KeyError:
        raise ImageNetSourceError(f"{name}: no 'synsets' struct") from None
    except (ValueError, TypeError, IndexError, NotImplementedError) as exc:
        raise ImageNetSourceError(
            f"{name}: not a readable meta.mat (need struct array 'synsets' with ILSVRC2012_ID, WNID, words, "
            f"num_children): {exc}"
        ) from None
    leaves = [(i, wnid, words) for i, wnid, words, children in rows if children == 0]
    if not leaves:
        raise ImageNetSourceError(f"{name}: no leaf synsets (num_children == 0)")
    leaf_wnids = {i: wnid for i, wnid, _ in leaves}
    if len(leaf_wnids) != len(leaves) or len(set(leaf_wnids.values())) != len(leaves):
        raise ImageNetSourceError(f"{name}: leaf synsets repeat an ILSVRC2012_ID or a WNID")
    return leaf_wnids, {wnid: words for _, wnid, words in leaves}


def _parse_ground_truth(data: bytes, name: str, leaf_wnids: dict[int, str]) -> tuple[int, ...]:
    ids: list[int] = []
    for lineno, line in enumerate(data.decode("ascii", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise ImageNetSourceError(f"{name}: line {lineno} is not an ILSVRC2012_ID: {text!r}") from None
        if ids[-1] not in leaf_wnids:
            raise ImageNetSourceError(
                f"{name}: line {lineno}: ILSVRC2012_ID {ids[-1]} is not a leaf class of meta.mat "
                f"(leaf IDs {min(leaf_wnids)}..{max(leaf_wnids)})"
            )
    return tuple(ids)


def _val_wnids_from_devkit(devkit: Devkit, names: list[str], where: str) -> dict[str, str]:
    """File name -> WNID for flat val files ILSVRC2012_val_<n>.JPEG, whose label is ground-truth line n."""
    gt = devkit.ground_truth
    if len(gt) != len(names):
        raise ImageNetSourceError(
            f"{devkit.ground_truth_name}: has {len(gt)} labels but {where} holds {len(names)} val images"
        )
    out: dict[str, str] = {}
    for name in names:
        match = _VAL_NAME.fullmatch(Path(name).stem)
        n = int(match.group(1)) if match else 0
        if not 1 <= n <= len(gt):
            raise ImageNetSourceError(
                f"{where}: val file {name} is not named ILSVRC2012_val_<n> with n in 1..{len(gt)}"
            )
        out[name] = devkit.leaf_wnids[gt[n - 1]]
    return out


def _check_same_classes(expected: Iterable[str], found: Iterable[str], expected_from: str, found_in: str) -> None:
    expected, found = set(expected), set(found)
    if expected == found:
        return
    missing, extra = sorted(expected - found), sorted(found - expected)
    raise ImageNetSourceError(
        f"{found_in}: classes do not match {expected_from}: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
    )


# --------------------------------------------------------------------------------------------- trees


def _list_images(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and _is_image_name(e.name))
    except OSError as exc:
        raise ImageNetSourceError(f"{folder}: cannot list: {exc}") from None


def _list_class_dirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise ImageNetSourceError(f"{folder}: cannot list: {exc}") from None


def _tree_train_units(train_dir: Path, classes: tuple[str, ...]) -> list[TrainUnit]:
    units = []
    for label, wnid in enumerate(classes):
        names = _list_images(train_dir / wnid)
        if not names:
            raise ImageNetSourceError(f"{train_dir / wnid}: class folder holds no images")
        units.append(TrainUnit(wnid, label, str(train_dir / wnid), names=tuple(names)))
    return units


def _val_layout(val_dir: Path) -> tuple[list[str], list[str]]:
    """(flat image names, per-class folders) of a val folder; exactly one of the two is non-empty."""
    if not val_dir.is_dir():
        raise ImageNetSourceError(f"{val_dir}: val folder missing")
    flat, dirs = _list_images(val_dir), _list_class_dirs(val_dir)
    if flat and dirs:
        raise ImageNetSourceError(f"{val_dir}: holds both images and class folders; use one layout")
    if not flat and not dirs:
        raise ImageNetSourceError(f"{val_dir}: holds no images")
    return flat, dirs


def _per_class_val(val_dir: Path, dirs: list[str], labels: dict[str, int]) -> list[ValEntry]:
    unknown = sorted(set(dirs) - labels.keys())
    if unknown:
        raise ImageNetSourceError(f"{val_dir}: class folders not among the train classes: {unknown[:5]}")
    return [ValEntry(f"{wnid}/{name}", wnid, labels[wnid]) for wnid in dirs for name in _list_images(val_dir / wnid)]


def _find_devkit(root: Path) -> Path | None:
    for candidate in (root / DEVKIT_DIR, root / DEVKIT_ARCHIVE):
        if candidate.exists():
            return candidate
    return None


def _devkit_label_files(devkit: Path) -> list[Path]:
    return [devkit / META_MAT, devkit / GROUND_TRUTH] if devkit.is_dir() else [devkit]


def _open_tree(root: Path) -> ImageNetSource:
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise ImageNetSourceError(f"{train_dir}: train folder missing")
    folders = tuple(_list_class_dirs(train_dir))
    if not folders:
        raise ImageNetSourceError(f"{train_dir}: holds no class folders")
    flat, dirs = _val_layout(val_dir)
    devkit_path = _find_devkit(root)
    if devkit_path is None and flat:
        raise ImageNetSourceError(
            f"{root}: {DEVKIT_DIR}/ or {DEVKIT_ARCHIVE} missing (a flat val/ folder takes its labels from it)"
        )
    devkit = read_devkit(devkit_path) if devkit_path is not None else None
    if devkit is not None:
        _check_same_classes(devkit.wnids, folders, f"{devkit.path} ({META_MAT})", str(train_dir))
    classes = folders
    labels = {wnid: i for i, wnid in enumerate(classes)}
    if flat:
        assert devkit is not None
        wnid_of = _val_wnids_from_devkit(devkit, flat, str(val_dir))
        val = [ValEntry(name, wnid_of[name], labels[wnid_of[name]]) for name in flat]
    else:
        val = _per_class_val(val_dir, dirs, labels)
    val.sort(key=lambda e: (e.source_name, e.name))
    return ImageNetSource(
        kind="tree", root=root, classes=classes,
        class_words=devkit.words if devkit is not None else {wnid: "" for wnid in classes},
        train_units=_tree_train_units(train_dir, classes), val_dir=val_dir, val_entries=val,
        label_files=_devkit_label_files(devkit_path) if devkit_path is not None else [],
        folders=(train_dir, val_dir, *([devkit_path] if devkit_path is not None and devkit_path.is_dir() else [])),
    )


# --------------------------------------------------------------------------------------------- Kaggle


def _read_synset_mapping(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ImageNetSourceError(f"{path}: synset mapping missing")
    words: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, text = line.strip().partition(" ")
        if not _WNID.fullmatch(wnid) or wnid in words:
            raise ImageNetSourceError(f"{path}: line {lineno}: expected '<new wnid> <words>', got {line!r}")
        words[wnid] = text.strip()
    if not words:
        raise ImageNetSourceError(f"{path}: no synsets")
    return words


def _read_val_solution(path: Path, classes: set[str]) -> dict[str, str]:
    """ImageId -> WNID from LOC_val_solution.csv (the first token of PredictionString is the WNID)."""
    if not path.is_file():
        raise ImageNetSourceError(f"{path}: val solution missing")
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ImageNetSourceError(f"{path}: expected header 'ImageId,PredictionString', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) >= 2 else []
            if not tokens or tokens[0] not in classes:
                raise ImageNetSourceError(f"{path}: line {lineno}: no known WNID first in PredictionString: {row}")
            out[row[0].strip()] = tokens[0]
    return out


def _open_kaggle(root: Path) -> ImageNetSource:
    data = root / KAGGLE_DATA
    train_dir, val_dir = data / "train", data / "val"
    mapping_path = root / KAGGLE_SYNSETS
    words = _read_synset_mapping(mapping_path)
    if not train_dir.is_dir():
        raise ImageNetSourceError(f"{train_dir}: train folder missing")
    _check_same_classes(words, _list_class_dirs(train_dir), str(mapping_path), str(train_dir))
    classes = tuple(sorted(words))
    labels = {wnid: i for i, wnid in enumerate(classes)}
    flat, dirs = _val_layout(val_dir)
    label_files = [mapping_path]
    if flat:
        solution_path = root / KAGGLE_VAL_SOLUTION
        solution = _read_val_solution(solution_path, set(classes))
        stems = {Path(name).stem: name for name in flat}
        missing = sorted(stems.keys() - solution.keys())
        extra = sorted(solution.keys() - stems.keys())
        if missing or extra:
            raise ImageNetSourceError(
                f"{solution_path}: does not match {val_dir}: {len(missing)} val images without a label "
                f"(e.g. {missing[:3]}), {len(extra)} labels without an image (e.g. {extra[:3]})"
            )
        val = [ValEntry(name, solution[stem], labels[solution[stem]]) for stem, name in stems.items()]
        label_files.append(solution_path)
    else:
        val = _per_class_val(val_dir, dirs, labels)
    val.sort(key=lambda e: (e.source_name, e.name))
    return ImageNetSource(
        kind="kaggle", root=root, classes=classes, class_words={w: words[w] for w in classes},
        train_units=_tree_train_units(train_dir, classes), val_dir=val_dir, val_entries=val,
        label_files=label_files, folders=(train_dir, val_dir),
    )
