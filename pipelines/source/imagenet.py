"""Read ILSVRC2012 (ImageNet-1k classification) in the layouts users have it in, as raw image bytes: the entry
that finds and opens a source, and the names callers use (`from pipelines.source import imagenet`).

Three source kinds give the same records for the same images:

- ``archives``: a folder holding the three files as distributed (ILSVRC2012_img_train.tar, a tar of one tar per
  class; ILSVRC2012_img_val.tar, flat; ILSVRC2012_devkit_t12.tar.gz). Read in place: nothing is extracted.
- ``tree``: ``train/<wnid>/*.JPEG``, ``val/`` flat or ``val/<wnid>/``, and the devkit (the .tar.gz or the
  extracted ``ILSVRC2012_devkit_t12/`` folder) in the same root.
- ``kaggle``: ``ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}`` with LOC_synset_mapping.txt and LOC_val_solution.csv.

The class index is the position of the WNID among the sorted WNIDs (the torchvision / ImageFolder / Kaggle
convention). The devkit's ILSVRC2012_IDs are in a different order, so val labels map ID -> WNID -> sorted index.

Each layout is indexed by its own module (`archives`, `tree`, `kaggle`; the devkit by `devkit`) into the one
source type of `records`, whose picklable units `read_train_unit` / `read_val_unit` read in any worker process.
Decoding is not done here; staging decodes, converts and reports bad files.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.source.archives import open_archives
from pipelines.source.devkit import Devkit, read_devkit
from pipelines.source.kaggle import open_kaggle
from pipelines.source.records import (
    ARCHIVES,
    DEFAULT_VAL_CHUNK,
    DEVKIT_ARCHIVE,
    DEVKIT_DIR,
    GROUND_TRUTH,
    KAGGLE_DATA,
    KAGGLE_SYNSETS,
    KAGGLE_VAL_SOLUTION,
    META_MAT,
    SOURCE_KINDS,
    TRAIN_ARCHIVE,
    VAL_ARCHIVE,
    ImageNetSource,
    ImageNetSourceError,
    RawImage,
    SourceKind,
    TrainUnit,
    ValEntry,
    ValUnit,
    read_train_unit,
    read_val_unit,
)
from pipelines.source.tree import open_tree

__all__ = [
    "ARCHIVES",
    "DEFAULT_VAL_CHUNK",
    "DEVKIT_ARCHIVE",
    "DEVKIT_DIR",
    "GROUND_TRUTH",
    "KAGGLE_DATA",
    "KAGGLE_SYNSETS",
    "KAGGLE_VAL_SOLUTION",
    "META_MAT",
    "SOURCE_KINDS",
    "TRAIN_ARCHIVE",
    "VAL_ARCHIVE",
    "Devkit",
    "ImageNetSource",
    "ImageNetSourceError",
    "RawImage",
    "SourceKind",
    "TrainUnit",
    "ValEntry",
    "ValUnit",
    "detect_source_kind",
    "open_source",
    "read_devkit",
    "read_train_unit",
    "read_val_unit",
]


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
        return open_archives(root)
    if kind == "tree":
        return open_tree(root)
    if kind == "kaggle":
        return open_kaggle(root)
    raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {kind!r}")


def _existing_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise ImageNetSourceError(f"{root}: path does not exist")
    if not root.is_dir():
        raise ImageNetSourceError(f"{root}: not a folder (point at the folder holding the ILSVRC2012 files)")
    return root.resolve()
