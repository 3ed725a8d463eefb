"""A class-folder tree as users keep one (torchvision's ImageFolder layout): ``train/<class>/<n>.jpg`` and, when
asked, ``val/<class>/<n>.jpg`` or ``test/<class>/<n>.jpg``. File names repeat across classes and splits (``0.jpg``
in every class folder), and class names may hold spaces, as real trees' do.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.source.demo import render_image

# Flower names with a space and capitals among them: class ids are made file-safe, the names kept.
CLASS_NAMES = ("daisy", "Garden rose", "sunflower", "tulip", "water lily", "iris", "lotus", "poppy")


@dataclass(frozen=True)
class TreeSummary:
    root: Path
    classes: tuple[str, ...]  # the folder names, sorted (the labels' order)
    files: dict[str, dict[str, list[str]]]  # split folder -> class -> file paths relative to the split folder


def write_class_folders(
    out_dir: str | Path,
    *,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 2,
    val_name: str = "val",
    seed: int = 0,
    image_size: tuple[int, int] = (48, 40),
) -> TreeSummary:
    """Write the tree under `out_dir` (no val folder when `val_per_class` is 0); JPEGs drawn by the demo's
    learnable renderer, deterministic for a seed. Every class folder names its files 0.jpg, 1.jpg, ..."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}")
    root = Path(out_dir)
    names = tuple(sorted(CLASS_NAMES[:num_classes]))
    files: dict[str, dict[str, list[str]]] = {}
    for split, per_class in (("train", train_per_class), (val_name, val_per_class)):
        if per_class == 0:
            continue
        files[split] = {}
        for label, name in enumerate(names):
            rng = np.random.default_rng([seed, label, len(split)])
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            files[split][name] = []
            for n in range(per_class):
                buf = io.BytesIO()
                render_image(label, num_classes, image_size, rng).save(buf, format="JPEG", quality=90)
                (folder / f"{n}.jpg").write_bytes(buf.getvalue())
                files[split][name].append(f"{n}.jpg")
    return TreeSummary(root, names, files)
