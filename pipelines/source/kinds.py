"""Which kind of source a folder holds, and opening it: `detect_source_kind`, `open_source`.

Each kind is a module beside this one that knows its dataset's files as distributed: `matches(root)` says, from
file names alone, whether a folder holds them, and `open_source(root, val_per_class=...)` indexes them into a
`records.Source`. They import nothing heavy (OpenCV and SciPy are imported when a unit is read). Kinds are
tried in `_DETECTION_ORDER`; the ILSVRC2012 layouts keep their own detection (`detect_layout`), and a `train/`
folder that is not an ILSVRC2012 tree is a plain class-folder tree (`folders`).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from pipelines.source import cars, cifar, flowers, folders, idx, imagenet21k
from pipelines.source.archives import open_archives
from pipelines.source.kaggle import open_kaggle
from pipelines.source.records import (
    ARCHIVES,
    DEVKIT_DIR,
    IMAGENET_KINDS,
    KAGGLE_DATA,
    SOURCE_KINDS,
    Source,
    SourceError,
    SourceKind,
)
from pipelines.source.tree import open_tree

# Kind -> the module that reads it (ILSVRC2012's three layouts: `detect_layout`, `open_layout` here).
_MODULES: dict[str, ModuleType] = {
    "folders": folders,
    "imagenet21k": imagenet21k,
    "cifar": cifar,
    "flowers102": flowers,
    "cars": cars,
    "idx": idx,
}

# Distinctive file names first: a folder that holds a dataset's archives and also a train/ folder someone made
# beside them is read as the archives.
_DETECTION_ORDER: tuple[SourceKind, ...] = ("cifar", "flowers102", "cars", "idx", "imagenet21k")


def existing_dir(path: str | os.PathLike[str]) -> Path:
    """`path` resolved, or SourceError when it is missing or a file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise SourceError(f"{root}: path does not exist")
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder (point at the folder holding the dataset's files)")
    return root.resolve()


def detect_layout(root: Path) -> SourceKind | None:
    """Which ILSVRC2012 layout `root` holds, or None. Checked in order Kaggle, extracted tree, archives.

    A root holding both the archives and a tree extracted next to them (what torchvision's ImageNet class
    leaves behind) is read as a tree: the files are the same and reading loose files is cheaper. Pass `kind`
    to `open_source` to choose. A `train/` folder is a tree here; `detect_source_kind` tells an ILSVRC2012 tree
    from a plain class-folder tree.
    """
    if (root / KAGGLE_DATA).is_dir():
        return "kaggle"
    if (root / "train").is_dir():
        return "tree"
    if any((root / name).exists() for name in ARCHIVES):
        return "archives"
    return None


def open_layout(root: Path, kind: SourceKind) -> Source:
    """Index the ILSVRC2012 layout `kind` at `root` (headers and directory listings only) and check it."""
    if kind == "archives":
        return open_archives(root)
    if kind == "tree":
        return open_tree(root)
    if kind == "kaggle":
        return open_kaggle(root)
    raise ValueError(f"not an ILSVRC2012 layout: {kind!r}")


def detect_source_kind(path: str | os.PathLike[str]) -> SourceKind:
    """Which kind of source `path` holds, from its file and folder names (nothing is read)."""
    root = existing_dir(path)
    for kind in _DETECTION_ORDER:
        if _MODULES[kind].matches(root):
            return kind
    found = detect_layout(root)
    if found == "tree" and not folders.is_imagenet_tree(root):
        return "folders"
    if found is not None:
        return found
    raise SourceError(
        f"{root}: no dataset found. Looked for ILSVRC2012 (the archives {', '.join(ARCHIVES)}; an extracted tree "
        f"train/<wnid>/, val/ and {DEVKIT_DIR}/; the Kaggle layout {KAGGLE_DATA}/), "
        f"a class-folder tree (train/<class>/ with val/ or test/), ImageNet-21k's whole tar (fall11_whole.tar, "
        f"winter21_whole.tar.gz), the CIFAR binary archives (cifar-10-binary.tar.gz, cifar-100-binary.tar.gz), "
        f"Flowers-102 (102flowers.tgz, imagelabels.mat, setid.mat), Stanford Cars (cars_train.tgz, cars_test.tgz, "
        f"car_devkit.tgz) and MNIST-style idx files (*-images-idx3-ubyte.gz with *-labels-idx1-ubyte.gz)"
    )


def open_source(
    path: str | os.PathLike[str], kind: SourceKind | None = None, *, val_per_class: int | None = None
) -> Source:
    """Index the source at `path` (headers and listings only, or the small label files) and check it.

    `kind` forces a kind instead of detecting it; `val_per_class` is how many images of each class to hold out
    as val where the dataset has no val split (None: the kind's default).
    """
    root = existing_dir(path)
    if kind is None:
        kind = detect_source_kind(root)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
    if val_per_class is not None and (isinstance(val_per_class, bool) or val_per_class < 1):
        raise ValueError(f"val_per_class must be a whole number >= 1, got {val_per_class!r}")
    if kind in IMAGENET_KINDS:
        return open_layout(root, kind)
    src: Source = _MODULES[kind].open_source(root, val_per_class=val_per_class)
    return src
