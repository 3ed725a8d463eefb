"""The ``cars`` kind: Stanford Cars as distributed (ai.stanford.edu/~jkrause/cars), read in place:
`cars_train.tgz` (cars_train/00001.jpg ..), `cars_test.tgz` (cars_test/00001.jpg ..), `car_devkit.tgz`
(devkit/cars_meta.mat: the 196 `class_names`; devkit/cars_train_annos.mat: the struct array `annotations` with
bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname) and `cars_test_annos_withlabels.mat` (the test annotations
with their classes, as released after the challenge).

Staged train is cars_train, staged val cars_test. Class ids are the labels as "001".."196", with the devkit's
names as their words. Both archives number their files from 00001.jpg, so keys say the split: "train_00001",
"test_00001". The bounding box each annotation gives goes in the record's meta.

As for Flowers-102 (whose .tgz reading this kind shares), indexing lists each archive's members in one pass and
a unit streams its archive from the start, stopping after its last member; annotations are in file order, so
a train archive of 5 units is decompressed about 3 times in all.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipelines.source.flowers import (
    Member,
    TgzUnit,
    class_id,
    even_chunks,
    own_test_split,
    read_mat,
    tgz_member_names,
    whole_numbers,
)
from pipelines.source.records import ARCHIVE_ERRORS, Source, SourceError, safe_key

DATASET = "cars"
TRAIN_ARCHIVE = "cars_train.tgz"
TEST_ARCHIVE = "cars_test.tgz"
DEVKIT_ARCHIVE = "car_devkit.tgz"
TEST_LABELS_MAT = "cars_test_annos_withlabels.mat"
FILES = (TRAIN_ARCHIVE, TEST_ARCHIVE, DEVKIT_ARCHIVE, TEST_LABELS_MAT)
# The archives' top folders: the members are <folder>/<fname>.
TRAIN_DIR, TEST_DIR, DEVKIT_DIR = "cars_train", "cars_test", "devkit"
META_MAT = f"{DEVKIT_DIR}/cars_meta.mat"
TRAIN_ANNOS_MAT = f"{DEVKIT_DIR}/cars_train_annos.mat"
TEST_ANNOS_MAT = f"{DEVKIT_DIR}/cars_test_annos.mat"  # without classes; the labelled file beside it is read
CLASS_NAMES_VAR = "class_names"
ANNOTATIONS_VAR = "annotations"
BBOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
CLASS_FIELD, FNAME_FIELD = "class", "fname"
NUM_CLASSES = 196
SPLITS: dict[str, Any] = {"train": ["train"], "val": ["test"], "test_labels": TEST_LABELS_MAT}
UNIT_IMAGES = 2000  # as Flowers-102's: 5 units per archive on the real set


@dataclass(frozen=True)
class Annotation:
    """One row of an `annotations` struct array."""

    fname: str
    label: int  # 1-based, as the .mat holds it
    bbox: tuple[int, int, int, int]


def matches(root: Path) -> bool:
    """Whether `root` holds any of Stanford Cars' three archives (names no other dataset uses);
    `open_source` names whichever file is missing."""
    return any((root / name).is_file() for name in (TRAIN_ARCHIVE, TEST_ARCHIVE, DEVKIT_ARCHIVE))


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index Stanford Cars under `root`: the devkit and test labels, and each image archive's member names."""
    own_test_split(DATASET, val_per_class)
    paths = {name: root / name for name in FILES}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise SourceError(
            f"{root}: Stanford Cars file(s) missing: {', '.join(missing)} (need all of {', '.join(FILES)})"
        )
    devkit = _devkit_members(paths[DEVKIT_ARCHIVE], (META_MAT, TRAIN_ANNOS_MAT))
    where_meta, where_train = (
        f"{META_MAT} in {paths[DEVKIT_ARCHIVE]}",
        f"{TRAIN_ANNOS_MAT} in {paths[DEVKIT_ARCHIVE]}",
    )
    names = _class_names(read_mat(devkit[META_MAT], CLASS_NAMES_VAR, where=where_meta)[CLASS_NAMES_VAR], where_meta)
    classes = tuple(class_id(label) for label in range(1, len(names) + 1))
    train = _annotations(read_mat(devkit[TRAIN_ANNOS_MAT], ANNOTATIONS_VAR, where=where_train), where_train, names)
    test_where = str(paths[TEST_LABELS_MAT])
    test = _annotations(read_mat(paths[TEST_LABELS_MAT], ANNOTATIONS_VAR), test_where, names)
    return Source(
        kind="cars",
        dataset=DATASET,
        root=root,
        classes=classes,
        class_words=dict(zip(classes, names)),
        train_units=_units(paths[TRAIN_ARCHIVE], TRAIN_DIR, "train", train, where_train),
        val_units=_units(paths[TEST_ARCHIVE], TEST_DIR, "test", test, test_where),
        archives=(paths[TRAIN_ARCHIVE], paths[TEST_ARCHIVE]),
        label_files=(paths[DEVKIT_ARCHIVE], paths[TEST_LABELS_MAT]),
        splits=dict(SPLITS),
    )


def _devkit_members(archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named members of the devkit .tgz (small: ~330 KB in all), read in one stream."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for info in tar:
                if info.isfile() and info.name in names:
                    reader = tar.extractfile(info)
                    assert reader is not None
                    found[info.name] = reader.read()
    except ARCHIVE_ERRORS as exc:
        raise SourceError(f"{archive}: corrupt or truncated archive: {exc}") from None
    absent = [n for n in names if n not in found]
    if absent:
        raise SourceError(f"{archive}: member(s) missing: {', '.join(absent)}")
    return found


def _class_names(value: Any, where: str) -> tuple[str, ...]:
    """cars_meta.mat's class_names (a 1 x n cell array of strings), checked: 1..196 non-empty strings."""
    names = np.atleast_1d(np.asarray(value, dtype=object))
    if names.ndim != 1 or not all(isinstance(n, str) and n for n in names):
        raise SourceError(f"{where}: '{CLASS_NAMES_VAR}' is not a cell array of names")
    if not 1 <= len(names) <= NUM_CLASSES:
        raise SourceError(f"{where}: {len(names)} class names; Stanford Cars has 1..{NUM_CLASSES}")
    return tuple(str(n) for n in names)


def _annotations(mat: dict[str, Any], where: str, names: tuple[str, ...]) -> list[Annotation]:
    """An `annotations` struct array as rows, each file once with a class in 1..len(names)."""
    table = np.atleast_1d(mat[ANNOTATIONS_VAR])
    fields = (*BBOX_FIELDS, CLASS_FIELD, FNAME_FIELD)
    absent = [f for f in fields if table.dtype.names is None or f not in table.dtype.names]
    if absent or table.ndim != 1:
        raise SourceError(f"{where}: '{ANNOTATIONS_VAR}' is not a struct array with fields {', '.join(fields)}")
    column = {f: whole_numbers(table[f], where, f"{ANNOTATIONS_VAR}.{f}") for f in (*BBOX_FIELDS, CLASS_FIELD)}
    x1, y1, x2, y2 = (column[f] for f in BBOX_FIELDS)
    rows = [
        Annotation(str(fname), column[CLASS_FIELD][i], (x1[i], y1[i], x2[i], y2[i]))
        for i, fname in enumerate(table[FNAME_FIELD])
    ]
    out_of_range = [r for r in rows if not 1 <= r.label <= len(names)]
    if out_of_range:
        r = out_of_range[0]
        raise SourceError(
            f"{where}: {len(out_of_range)} annotation(s) with a class outside 1..{len(names)} "
            f"(e.g. {r.fname}: {r.label})"
        )
    fnames = [r.fname for r in rows]
    if len(set(fnames)) != len(fnames):
        raise SourceError(f"{where}: file {next(f for f in fnames if fnames.count(f) > 1)} is annotated twice")
    return sorted(rows, key=lambda r: r.fname)


def _units(archive: Path, folder: str, split: str, rows: list[Annotation], annotated_in: str) -> list[TgzUnit]:
    """The archive's images in chunks, after checking that its images and the annotations match one to one."""
    found = set(tgz_member_names(archive))
    members = [
        Member(
            f"{folder}/{r.fname}",
            safe_key(f"{split}_{PurePosixPath(r.fname).stem}"),
            class_id(r.label),
            r.label - 1,
            r.bbox,
        )
        for r in rows
    ]
    missing = [m.name for m in members if m.name not in found]
    if missing:
        raise SourceError(
            f"{archive}: {len(missing)} annotated image(s) of {annotated_in} are not in the archive (e.g. {missing[0]})"
        )
    unannotated = sorted(found - {m.name for m in members})
    if unannotated:
        raise SourceError(
            f"{archive}: {len(unannotated)} image(s) without an annotation in {annotated_in} (e.g. {unannotated[0]})"
        )
    return [TgzUnit(str(archive), n, chunk) for n, chunk in enumerate(even_chunks(members, UNIT_IMAGES))]
