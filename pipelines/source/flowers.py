"""The ``flowers102`` kind: Oxford Flowers-102 as distributed (robots.ox.ac.uk/~vgg/data/flowers/102), read in
place: `102flowers.tgz` (jpg/image_00001.jpg ..), `imagelabels.mat` (`labels`: 1 x N, image i's label at i - 1)
and `setid.mat` (`trnid`, `valid`, `tstid`: the 1-based image ids of each split).

Staged train is the dataset's train + val ids and staged val its test ids: the transfer protocol of the papers
that report Flowers-102 accuracy (EfficientNet's included), which train on 2,040 images and score on 6,149.
The release names no classes: class ids are the labels as "001".."102", with no words.

A .tgz cannot be seeked, so indexing lists its members in one decompression pass (no image is decoded) and a
unit streams the archive from its start, picking its members by name and stopping after its last one. Units are
a few thousand images each, so the 330 MB archive is decompressed a handful of times in all.

The .tgz reading (`TgzUnit`, `Member`, `tgz_member_names`, `read_mat`) serves `cars` too: both datasets are
.tgz archives of JPEGs labelled by .mat files.
"""

from __future__ import annotations

import io
import math
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.source.records import ARCHIVE_ERRORS, RawImage, Source, SourceError, is_image_name, safe_key

DATASET = "flowers102"
IMAGES_ARCHIVE = "102flowers.tgz"
LABELS_MAT = "imagelabels.mat"
SPLITS_MAT = "setid.mat"
FILES = (IMAGES_ARCHIVE, LABELS_MAT, SPLITS_MAT)
LABELS_VAR = "labels"
TRAIN_IDS, VAL_IDS, TEST_IDS = "trnid", "valid", "tstid"  # setid.mat's variables, in the dataset's split order
NUM_CLASSES = 102
# Staged split -> the dataset's splits it is made of (the transfer protocol: train on train + val, score on test).
STAGED_SPLITS: dict[str, tuple[str, ...]] = {"train": (TRAIN_IDS, VAL_IDS), "val": (TEST_IDS,)}
# Images per unit: each unit decompresses the archive once, so few units (6 on the real set), yet enough to
# decode on a few workers at once.
UNIT_IMAGES = 2000

_MEMBER = re.compile(r"jpg/image_(\d+)\.jpg")


def member_name(image_id: int) -> str:
    """The archive member of a 1-based image id: 'jpg/image_00001.jpg'."""
    return f"jpg/image_{image_id:05d}.jpg"


def image_key(image_id: int) -> str:
    """The sample key of an image: the member's stem, unique in the set."""
    return safe_key(f"image_{image_id:05d}")


def class_id(label: int) -> str:
    """The class id of a 1-based label: '001' .. '102' (file-safe, sorting in label order)."""
    return f"{label:03d}"


def own_test_split(dataset: str, val_per_class: int | None) -> None:
    """ValueError where a val hold-out is asked of a dataset that defines its own test split (nothing is
    ignored silently)."""
    if val_per_class is not None:
        raise ValueError(f"{dataset} has its own test split; --val-per-class is for sources without one")


def matches(root: Path) -> bool:
    """Whether `root` holds Flowers-102's image archive or split file (the label file's name is too plain to
    tell alone); `open_source` names whichever of the three is missing."""
    return (root / IMAGES_ARCHIVE).is_file() or (root / SPLITS_MAT).is_file()


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index Flowers-102 under `root`: the two .mat files, and the archive's member names (one pass)."""
    own_test_split(DATASET, val_per_class)
    paths = {name: root / name for name in FILES}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise SourceError(f"{root}: Flowers-102 file(s) missing: {', '.join(missing)} (need all of {', '.join(FILES)})")
    labels = _labels(paths[LABELS_MAT])
    split_ids = _split_ids(paths[SPLITS_MAT], len(labels))
    _check_members(paths[IMAGES_ARCHIVE], split_ids)
    num_classes = max(labels)  # a smaller release of the same format numbers its classes 1..n too
    classes = tuple(class_id(label) for label in range(1, num_classes + 1))
    archive = str(paths[IMAGES_ARCHIVE])

    def units(split: str) -> list[TgzUnit]:
        ids = sorted(i for name in STAGED_SPLITS[split] for i in split_ids[name])
        members = [Member(member_name(i), image_key(i), class_id(labels[i - 1]), labels[i - 1] - 1) for i in ids]
        return [TgzUnit(archive, n, chunk) for n, chunk in enumerate(even_chunks(members, UNIT_IMAGES))]

    return Source(
        kind="flowers102",
        dataset=DATASET,
        root=root,
        classes=classes,
        class_words={c: "" for c in classes},
        train_units=units("train"),
        val_units=units("val"),
        archives=(paths[IMAGES_ARCHIVE],),
        label_files=(paths[LABELS_MAT], paths[SPLITS_MAT]),
        splits={split: list(names) for split, names in STAGED_SPLITS.items()} | {"ids": SPLITS_MAT},
    )


def _labels(path: Path) -> list[int]:
    """imagelabels.mat's labels, image id - 1 -> label, each checked to be in 1..102."""
    labels = whole_numbers(read_mat(path, LABELS_VAR)[LABELS_VAR], path, LABELS_VAR)
    if not labels:
        raise SourceError(f"{path}: '{LABELS_VAR}' is empty")
    bad = [(i + 1, label) for i, label in enumerate(labels) if not 1 <= label <= NUM_CLASSES]
    if bad:
        raise SourceError(
            f"{path}: {len(bad)} label(s) outside 1..{NUM_CLASSES} (e.g. image {bad[0][0]} has {bad[0][1]})"
        )
    return labels


def _split_ids(path: Path, num_labels: int) -> dict[str, list[int]]:
    """setid.mat's ids per split, checked: each labelled (1..num_labels) and in one split only, once."""
    names = (TRAIN_IDS, VAL_IDS, TEST_IDS)
    mat = read_mat(path, *names)
    ids = {name: whole_numbers(mat[name], path, name) for name in names}
    unlabelled = sorted({i for split in ids.values() for i in split if not 1 <= i <= num_labels})
    if unlabelled:
        raise SourceError(
            f"{path}: {len(unlabelled)} image id(s) have no label in {LABELS_MAT}, which labels 1..{num_labels} "
            f"(e.g. {unlabelled[:3]})"
        )
    seen: dict[int, str] = {}
    for name in names:
        for i in ids[name]:
            if i in seen:
                raise SourceError(f"{path}: image id {i} is listed twice (in '{seen[i]}' and '{name}')")
            seen[i] = name
    return ids


def _check_members(archive: Path, split_ids: Mapping[str, Sequence[int]]) -> None:
    """Every id of a split has its image in the archive, and every image of the archive is in a split.

    tarfile stops quietly at a damaged header past the first, reading a damaged tar as a shorter one; the
    images it then lacks are found missing here."""
    found: set[int] = set()
    for name in tgz_member_names(archive):
        match = _MEMBER.fullmatch(name)
        if match is not None:
            found.add(int(match[1]))
    listed = {i for ids in split_ids.values() for i in ids}
    missing = sorted(listed - found)
    if missing:
        raise SourceError(
            f"{archive}: {len(missing)} image(s) that {SPLITS_MAT} lists are not in the archive "
            f"(e.g. {member_name(missing[0])}): incomplete or damaged"
        )
    unlisted = sorted(found - listed)
    if unlisted:
        raise SourceError(
            f"{archive}: {len(unlisted)} image(s) in no split of {SPLITS_MAT} (e.g. {member_name(unlisted[0])}): "
            f"the archive and the split file do not match"
        )


# --------------------------------------------------------------------------------------------- shared with cars


@dataclass(frozen=True)
class Member:
    """One image of a .tgz: its member name, the record's key, class id and label, and the dataset's bounding
    box (x1, y1, x2, y2) where it ships one."""

    name: str
    key: str
    wnid: str
    label: int
    bbox: tuple[int, int, int, int] | None = None

    def meta(self) -> dict[str, Any] | None:
        return {"bbox": list(self.bbox)} if self.bbox is not None else None


@dataclass(frozen=True)
class TgzUnit:
    """Named members of a .tgz, read in one stream from the archive's start (a gzip stream cannot be seeked)."""

    archive: str
    index: int  # position among its split's units
    members: tuple[Member, ...]

    def read(self) -> Iterator[RawImage]:
        return read_tgz_unit(self)

    def ident(self, split: str) -> str:
        return f"{split}-{self.index:03d}"

    def estimated_images(self) -> float:
        return len(self.members)


def read_tgz_unit(unit: TgzUnit) -> Iterator[RawImage]:
    """The unit's images in archive order, their bytes as they are (an image that does not decode is staging's
    to report). Stops after the last one it wants; a member gone since indexing is a SourceError."""
    wanted = {m.name: m for m in unit.members}
    try:
        with tarfile.open(unit.archive, mode="r|gz") as tar:
            for info in tar:
                m = wanted.pop(info.name, None) if info.isfile() else None
                if m is None:
                    continue
                reader = tar.extractfile(info)
                assert reader is not None  # regular files always have a reader
                yield RawImage(m.key, m.name, m.wnid, m.label, reader.read(), meta=m.meta())
                if not wanted:
                    return
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{unit.archive}: corrupt or truncated archive: {exc}") from None
    first = min(wanted)
    raise SourceError(f"{unit.archive}: {len(wanted)} member(s) gone since it was indexed (e.g. {first})")


def tgz_member_names(archive: Path) -> list[str]:
    """The image members of a .tgz, by name, in archive order: one decompression pass, nothing kept but names."""
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            names = [info.name for info in tar if info.isfile() and is_image_name(info.name)]
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{archive}: corrupt or truncated archive: {exc}") from None
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SourceError(f"{archive}: member {twice} appears twice")
    return names


def read_mat(source: Path | bytes, *variables: str, where: str | None = None) -> dict[str, Any]:
    """The named variables of a MATLAB v5 file (a path, or the bytes of an archive member named by `where`),
    squeezed (a 1 x n array reads as n values). SourceError for a file scipy cannot read or a variable it lacks."""
    from scipy.io import loadmat

    name = where or str(source)
    try:
        mat = loadmat(io.BytesIO(source) if isinstance(source, bytes) else source, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, OSError... for broken files
        raise SourceError(f"{name}: not a readable MATLAB file: {exc}") from None
    absent = [v for v in variables if v not in mat]
    if absent:
        raise SourceError(f"{name}: variable(s) missing: {', '.join(absent)}")
    return {v: mat[v] for v in variables}


def whole_numbers(value: Any, where: Path | str, variable: str) -> list[int]:
    """A .mat numeric vector (doubles in Flowers-102, uint8/uint16 in Cars' structs) as ints; SourceError where
    it is not one."""
    array = np.atleast_1d(np.asarray(value))
    if array.dtype == object:  # a struct array's field: one value per element, each a squeezed 1 x 1 array
        try:
            array = np.array(array.tolist())
        except ValueError:  # ragged: some element is not one number
            pass
    if array.ndim != 1 or array.dtype.kind not in "iuf" or not np.array_equal(array, np.round(array)):
        raise SourceError(f"{where}: '{variable}' is not a vector of whole numbers (shape {array.shape})")
    return [int(x) for x in array]


def even_chunks(items: Sequence[Member], size: int) -> Iterable[tuple[Member, ...]]:
    """`items` in as few chunks of at most `size` as can be, of sizes differing by one at most."""
    count = math.ceil(len(items) / size)
    bounds = [round(k * len(items) / count) for k in range(count + 1)]
    return [tuple(items[a:b]) for a, b in zip(bounds, bounds[1:])]
