"""The ``folders`` kind: a plain class-folder tree, the layout torchvision's ImageFolder reads.

``train/<class>/...`` and ``val/<class>/...`` (or ``test/<class>/...``), any class names, images at any depth
inside a class folder; file names may repeat across classes and splits (``train/roses/0.jpg`` and
``train/tulips/0.jpg``), so a key is the split, the class and the path together (`records.safe_key`). Classes
are the sorted train folder names (ImageFolder's order), each folder's name its class name. Without a val or
test folder, staging holds `val_per_class` images of each class out of train as val.

A ``train/`` tree of WNID folders with the ILSVRC2012 devkit (or a val/ of WNID folders) is ILSVRC2012's own
``tree`` layout (`is_imagenet_tree`), read by `tree`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipelines.source.records import (
    DEFAULT_VAL_PER_CLASS,
    DEVKIT_ARCHIVE,
    DEVKIT_DIR,
    Source,
    SourceError,
    TrainUnit,
    ValEntry,
    is_image_name,
    safe_key,
)
from pipelines.source.tree import list_class_dirs

TRAIN_DIR = "train"
VAL_DIRS = ("val", "test")  # the first that exists is the split models are scored on

_WNID = re.compile(r"n\d{8}")


def matches(root: Path) -> bool:
    return (root / TRAIN_DIR).is_dir() and not is_imagenet_tree(root)


def is_imagenet_tree(root: Path) -> bool:
    """Whether a train/ tree is ILSVRC2012's: its devkit beside it, or WNID class folders with a val/ folder."""
    if (root / DEVKIT_DIR).exists() or (root / DEVKIT_ARCHIVE).exists():
        return True
    classes = list_class_dirs(root / TRAIN_DIR)
    return bool(classes) and all(_WNID.fullmatch(c) for c in classes) and (root / "val").is_dir()


def dataset_name(root: Path) -> str:
    """What a class-folder tree's versions are named after: its folder's name, lower-case and file-safe."""
    name = re.sub(r"[^a-z0-9]+", "-", root.name.lower()).strip("-")
    return name or "folders"


def list_tree_images(folder: Path) -> list[str]:
    """The image files at any depth under `folder`, as sorted POSIX paths relative to it (hidden folders skipped)."""
    found: list[str] = []

    def fail(exc: OSError) -> None:
        raise SourceError(f"{exc.filename}: cannot list: {exc.strerror or exc}")

    for here, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(folder)
        found.extend((rel / f).as_posix() for f in files if is_image_name(f) and (Path(here) / f).is_file())
    return sorted(found)


def open_source(root: Path, *, val_per_class: int | None = None) -> Source:
    """Index a class-folder tree (listings only): its classes, a unit per train class, the val or test files."""
    train_dir = root / TRAIN_DIR
    names = list_class_dirs(train_dir)
    if not names:
        raise SourceError(f"{train_dir}: holds no class folders (expected train/<class>/<images>)")
    ids = _class_ids(names, train_dir)
    labels = {name: i for i, name in enumerate(names)}
    units = []
    for name, cid in zip(names, ids, strict=True):
        files = list_tree_images(train_dir / name)
        if not files:
            raise SourceError(f"{train_dir / name}: class folder holds no images")
        folder = str(train_dir / name)
        units.append(TrainUnit(cid, labels[name], folder, names=tuple(files), key_prefix=f"train_{name}_"))
    val_dir = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
    if val_dir is not None and val_per_class is not None:
        raise ValueError(
            f"{val_dir}: the tree has its own {val_dir.name} split; --val-per-class is for a tree without one"
        )
    entries = _val_entries(val_dir, labels, ids) if val_dir is not None else []
    split = {"train": [TRAIN_DIR], "val": [val_dir.name] if val_dir is not None else ["held out of train"]}
    return Source(
        kind="folders",
        dataset=dataset_name(root),
        root=root,
        classes=tuple(ids),
        class_words=dict(zip(ids, names, strict=True)),
        train_units=units,
        val_dir=val_dir,
        val_entries=entries,
        folders=(train_dir, *([val_dir] if val_dir is not None else [])),
        val_per_class=0 if val_dir is not None else (val_per_class or DEFAULT_VAL_PER_CLASS),
        splits=split,
    )


def _class_ids(names: list[str], train_dir: Path) -> list[str]:
    """File-safe class ids, one per folder name (`safe_key`), checked unique."""
    ids = [safe_key(n) for n in names]
    if len(set(ids)) != len(ids):  # only if two names differ by case on a case-insensitive comparison elsewhere
        raise SourceError(f"{train_dir}: class folder names give the same id twice: {sorted(names)[:5]}")
    return ids


def _val_entries(val_dir: Path, labels: dict[str, int], ids: list[str]) -> list[ValEntry]:
    """The files of a val/ or test/ tree, each labelled by its class folder (which must be a train class)."""
    dirs = list_class_dirs(val_dir)
    if not dirs:
        raise SourceError(f"{val_dir}: holds no class folders (expected {val_dir.name}/<class>/<images>)")
    unknown = sorted(set(dirs) - labels.keys())
    if unknown:
        raise SourceError(f"{val_dir}: class folders not among the train classes: {unknown[:5]}")
    entries = [
        ValEntry(f"{name}/{file}", ids[labels[name]], labels[name], key_prefix=f"{val_dir.name}_{name}_")
        for name in dirs
        for file in list_tree_images(val_dir / name)
    ]
    if not entries:
        raise SourceError(f"{val_dir}: holds no images")
    return entries
