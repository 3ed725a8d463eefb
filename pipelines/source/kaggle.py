"""The ``kaggle`` layout: ``ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}`` with LOC_synset_mapping.txt (the classes
and their words) and, for a flat val/, LOC_val_solution.csv (its labels). train/ and val/ are read as a tree's
(`tree`'s folder helpers); only where the labels come from differs.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from pipelines.source.records import (
    KAGGLE_DATA,
    KAGGLE_SYNSETS,
    KAGGLE_VAL_SOLUTION,
    ImageNetSource,
    ImageNetSourceError,
    ValEntry,
    check_same_classes,
)
from pipelines.source.tree import list_class_dirs, per_class_val, tree_train_units, val_layout

_WNID = re.compile(r"n\d{8}")


def open_kaggle(root: Path) -> ImageNetSource:
    """Index Kaggle's layout under `root` (listings and the two label files) and check they agree."""
    data = root / KAGGLE_DATA
    train_dir, val_dir = data / "train", data / "val"
    mapping_path = root / KAGGLE_SYNSETS
    words = _read_synset_mapping(mapping_path)
    if not train_dir.is_dir():
        raise ImageNetSourceError(f"{train_dir}: train folder missing")
    check_same_classes(words, list_class_dirs(train_dir), str(mapping_path), str(train_dir))
    classes = tuple(sorted(words))
    labels = {wnid: i for i, wnid in enumerate(classes)}
    flat, dirs = val_layout(val_dir)
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
        val = per_class_val(val_dir, dirs, labels)
    val.sort(key=lambda e: (e.source_name, e.name))
    return ImageNetSource(
        kind="kaggle",
        root=root,
        classes=classes,
        class_words={w: words[w] for w in classes},
        train_units=tree_train_units(train_dir, classes),
        val_dir=val_dir,
        val_entries=val,
        label_files=label_files,
        folders=(train_dir, val_dir),
    )


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
