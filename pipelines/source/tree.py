"""The ``tree`` layout: ``train/<wnid>/*.JPEG``, ``val/`` flat or ``val/<wnid>/``, and the devkit (the .tar.gz or
the extracted ``ILSVRC2012_devkit_t12/`` folder) in the same root; a flat val/ takes its labels from the devkit.

`open_tree` lists folders and reads no image. The folder helpers here (class folders, image listings, the two
val layouts) are the Kaggle layout's too, whose train/ and val/ are the same shape under another root.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.source.devkit import read_devkit, val_wnids_from_devkit
from pipelines.source.records import (
    DEVKIT_ARCHIVE,
    DEVKIT_DIR,
    GROUND_TRUTH,
    META_MAT,
    ImageNetSource,
    ImageNetSourceError,
    TrainUnit,
    ValEntry,
    check_same_classes,
    is_image_name,
)


def open_tree(root: Path) -> ImageNetSource:
    """Index an extracted tree under `root` (listings only) and check it against its devkit, if any."""
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise ImageNetSourceError(f"{train_dir}: train folder missing")
    folders = tuple(list_class_dirs(train_dir))
    if not folders:
        raise ImageNetSourceError(f"{train_dir}: holds no class folders")
    flat, dirs = val_layout(val_dir)
    devkit_path = _find_devkit(root)
    if devkit_path is None and flat:
        raise ImageNetSourceError(
            f"{root}: {DEVKIT_DIR}/ or {DEVKIT_ARCHIVE} missing (a flat val/ folder takes its labels from it)"
        )
    devkit = read_devkit(devkit_path) if devkit_path is not None else None
    if devkit is not None:
        check_same_classes(devkit.wnids, folders, f"{devkit.path} ({META_MAT})", str(train_dir))
    classes = folders
    labels = {wnid: i for i, wnid in enumerate(classes)}
    if flat:
        assert devkit is not None
        wnid_of = val_wnids_from_devkit(devkit, flat, str(val_dir))
        val = [ValEntry(name, wnid_of[name], labels[wnid_of[name]]) for name in flat]
    else:
        val = per_class_val(val_dir, dirs, labels)
    val.sort(key=lambda e: (e.source_name, e.name))
    return ImageNetSource(
        kind="tree",
        root=root,
        classes=classes,
        class_words=devkit.words if devkit is not None else {wnid: "" for wnid in classes},
        train_units=tree_train_units(train_dir, classes),
        val_dir=val_dir,
        val_entries=val,
        label_files=_devkit_label_files(devkit_path) if devkit_path is not None else [],
        folders=(train_dir, val_dir, *([devkit_path] if devkit_path is not None and devkit_path.is_dir() else [])),
    )


def list_images(folder: Path) -> list[str]:
    """The image file names in a folder, sorted."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))
    except OSError as exc:
        raise ImageNetSourceError(f"{folder}: cannot list: {exc}") from None


def list_class_dirs(folder: Path) -> list[str]:
    """The (not hidden) sub-folders of a folder, sorted: the class folders of train/ or of a per-class val/."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise ImageNetSourceError(f"{folder}: cannot list: {exc}") from None


def tree_train_units(train_dir: Path, classes: tuple[str, ...]) -> list[TrainUnit]:
    """One unit per class folder of `train_dir`, labelled by the class's position in `classes`."""
    units = []
    for label, wnid in enumerate(classes):
        names = list_images(train_dir / wnid)
        if not names:
            raise ImageNetSourceError(f"{train_dir / wnid}: class folder holds no images")
        units.append(TrainUnit(wnid, label, str(train_dir / wnid), names=tuple(names)))
    return units


def val_layout(val_dir: Path) -> tuple[list[str], list[str]]:
    """(flat image names, per-class folders) of a val folder; exactly one of the two is non-empty."""
    if not val_dir.is_dir():
        raise ImageNetSourceError(f"{val_dir}: val folder missing")
    flat, dirs = list_images(val_dir), list_class_dirs(val_dir)
    if flat and dirs:
        raise ImageNetSourceError(f"{val_dir}: holds both images and class folders; use one layout")
    if not flat and not dirs:
        raise ImageNetSourceError(f"{val_dir}: holds no images")
    return flat, dirs


def per_class_val(val_dir: Path, dirs: list[str], labels: dict[str, int]) -> list[ValEntry]:
    """The entries of a val folder laid out by class (`val/<wnid>/`), each labelled by its folder."""
    unknown = sorted(set(dirs) - labels.keys())
    if unknown:
        raise ImageNetSourceError(f"{val_dir}: class folders not among the train classes: {unknown[:5]}")
    return [ValEntry(f"{wnid}/{name}", wnid, labels[wnid]) for wnid in dirs for name in list_images(val_dir / wnid)]


def _find_devkit(root: Path) -> Path | None:
    for candidate in (root / DEVKIT_DIR, root / DEVKIT_ARCHIVE):
        if candidate.exists():
            return candidate
    return None


def _devkit_label_files(devkit: Path) -> list[Path]:
    return [devkit / META_MAT, devkit / GROUND_TRUTH] if devkit.is_dir() else [devkit]
