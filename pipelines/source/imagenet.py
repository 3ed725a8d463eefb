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

from pipelines.source.devkit import Devkit, read_devkit
from pipelines.source.kinds import detect_layout, detect_source_kind, open_layout, open_source
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
    "detect_layout",
    "detect_source_kind",
    "open_layout",
    "open_source",
    "read_devkit",
    "read_train_unit",
    "read_val_unit",
]
