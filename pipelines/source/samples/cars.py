"""A tiny Stanford Cars in its exact distributed format: `cars_train.tgz` (cars_train/00001.jpg ..),
`cars_test.tgz` (cars_test/00001.jpg ..), `car_devkit.tgz` (devkit/ with cars_meta.mat, cars_train_annos.mat,
cars_test_annos.mat, train_perfect_preds.txt, eval_train.m, README.txt) and `cars_test_annos_withlabels.mat`.

The .mat files hold what the real ones do: `class_names` a 1 x C cell array of strings, `annotations` a 1 x N
struct array with bbox_x1, bbox_y1, bbox_x2, bbox_y2 (uint16, 1-based pixels), class (uint8) and fname, the
devkit's test annotations without class. Classes are dealt to file numbers at random, as in the real release.
A smaller release keeps the format: classes run 1..num_classes. Byte-identical for the same arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.source import cars
from pipelines.source.demo import render_image
from pipelines.source.samples.flowers import jpeg_bytes, mat_bytes, write_tgz

_BODIES = ("Sedan", "Coupe", "Convertible", "SUV", "Hatchback", "Wagon", "Minivan", "Cab")
# split -> (its archive, the archive's folder, the generator stream its images draw from)
_ARCHIVES = {"train": (cars.TRAIN_ARCHIVE, cars.TRAIN_DIR, 1), "test": (cars.TEST_ARCHIVE, cars.TEST_DIR, 2)}
_README = b"""Sample Stanford Cars devkit: generated classes and images in the layout of the real devkit.
cars_meta.mat: class_names; cars_train_annos.mat, cars_test_annos.mat: annotations (bbox_x1, bbox_y1, bbox_x2,
bbox_y2, class (train only), fname); train_perfect_preds.txt: the train classes, one a line, as eval_train.m reads.
"""
_EVAL_TRAIN = b"""function [accuracy, confusion] = eval_train(pred_file)
% Accuracy of the predictions in pred_file (one class a line) on the training images.
load('cars_train_annos.mat');
truth = [annotations.class]';
preds = load(pred_file);
accuracy = mean(preds == truth);
confusion = accumarray([truth, preds], 1);
end
"""


@dataclass(frozen=True)
class CarImage:
    """One written image: its file name, class (1-based) and box (x1, y1, x2, y2; 1-based pixels)."""

    fname: str
    label: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class CarsRelease:
    """What `write_cars` wrote."""

    out_dir: Path
    class_names: tuple[str, ...]  # label - 1 -> name
    labels: dict[str, int]  # key ('train_00001', 'test_00001') -> class, 1-based as the annotations hold it
    splits: dict[str, tuple[str, ...]]  # 'train' / 'test' -> keys, in file order
    bboxes: dict[str, tuple[int, int, int, int]]  # key -> the annotation's box
    bad_keys: tuple[str, ...]  # images written as a JPEG that does not decode (a train one)


def write_cars(
    out_dir: str | os.PathLike[str],
    *,
    num_classes: int,
    per_class_train: int,
    per_class_test: int,
    seed: int,
    image_size: tuple[int, int] = (64, 48),
    plant_bad_jpeg: bool = False,
) -> CarsRelease:
    """Write the four Stanford Cars files into `out_dir` (made if need be); `image_size` is (width, height), each
    image's sides varying around it. `plant_bad_jpeg` writes one train image truncated to half its bytes."""
    if not 1 <= num_classes <= cars.NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{cars.NUM_CLASSES}, got {num_classes}")
    if per_class_train < 1 or per_class_test < 1:
        raise ValueError(f"need >= 1 train and test images per class, got {per_class_train}, {per_class_test}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    per_class = {"train": per_class_train, "test": per_class_test}
    labels = {
        s: [int(c) + 1 for c in rng.permutation(np.repeat(np.arange(num_classes), n))] for s, n in per_class.items()
    }
    bad_number = int(rng.integers(len(labels["train"]))) + 1 if plant_bad_jpeg else None
    names = tuple(_class_name(k) for k in range(num_classes))

    written: dict[str, list[CarImage]] = {}
    for split, (archive, folder, stream) in _ARCHIVES.items():
        rendered = _render(
            labels[split], num_classes, image_size, [seed, stream], bad_number if split == "train" else None
        )
        write_tgz(out / archive, [f"{folder}/"], ((f"{folder}/{im.fname}", data) for im, data in rendered))
        written[split] = [im for im, _ in rendered]

    train, test = written["train"], written["test"]
    devkit = {
        cars.META_MAT: mat_bytes({cars.CLASS_NAMES_VAR: np.array(names, dtype=object).reshape(1, -1)}),
        cars.TRAIN_ANNOS_MAT: _annotations_mat(train, with_class=True),
        cars.TEST_ANNOS_MAT: _annotations_mat(test, with_class=False),
        f"{cars.DEVKIT_DIR}/train_perfect_preds.txt": "".join(f"{im.label}\n" for im in train).encode(),
        f"{cars.DEVKIT_DIR}/eval_train.m": _EVAL_TRAIN,
        f"{cars.DEVKIT_DIR}/README.txt": _README,
    }
    write_tgz(out / cars.DEVKIT_ARCHIVE, [f"{cars.DEVKIT_DIR}/"], sorted(devkit.items()))
    (out / cars.TEST_LABELS_MAT).write_bytes(_annotations_mat(test, with_class=True))

    def key(split: str, im: CarImage) -> str:
        return f"{split}_{Path(im.fname).stem}"

    return CarsRelease(
        out_dir=out,
        class_names=names,
        labels={key(s, im): im.label for s, ims in written.items() for im in ims},
        splits={s: tuple(key(s, im) for im in ims) for s, ims in written.items()},
        bboxes={key(s, im): im.bbox for s, ims in written.items() for im in ims},
        bad_keys=(key("train", train[bad_number - 1]),) if bad_number is not None else (),
    )


def _render(
    labels: list[int], num_classes: int, size: tuple[int, int], stream: list[int], bad_number: int | None
) -> list[tuple[CarImage, bytes]]:
    """Each file of a split (numbered from 1, of class `labels[number - 1]`) with its JPEG bytes; image `bad_number`
    truncated. Each image draws from its own generator, `stream` + [number]."""
    rendered = []
    for number, label in enumerate(labels, start=1):
        rng = np.random.default_rng([*stream, number])
        image = render_image(label - 1, num_classes, size, rng)
        record = CarImage(_fname(number), label, _bbox(image.size, rng))
        rendered.append((record, jpeg_bytes(image, truncated=number == bad_number)))
    return rendered


def _fname(number: int) -> str:
    return f"{number:05d}.jpg"


def _class_name(k: int) -> str:
    """A make, model, body and year, like the real 'Acura TL Sedan 2012'."""
    return f"Sample Make{k // 7 + 1} Model{k + 1} {_BODIES[k % len(_BODIES)]} {1998 + k % 15}"


def _bbox(size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box inside an image of `size` (w, h), covering its middle, in 1-based pixels as the annotations give."""
    w, h = size
    x1, y1 = (int(rng.integers(1, side // 4 + 1)) for side in (w, h))
    x2, y2 = (int(rng.integers(3 * side // 4, side + 1)) for side in (w, h))
    return x1, y1, x2, y2


def _annotations_mat(images: list[CarImage], *, with_class: bool) -> bytes:
    """An `annotations` 1 x N struct array, fields in the real files' order."""
    fields = [*cars.BBOX_FIELDS, *([cars.CLASS_FIELD] if with_class else []), cars.FNAME_FIELD]
    table = np.empty((1, len(images)), dtype=[(f, object) for f in fields])
    for i, im in enumerate(images):
        label = [np.uint8(im.label)] if with_class else []
        table[0, i] = (*(np.uint16(v) for v in im.bbox), *label, im.fname)
    return mat_bytes({cars.ANNOTATIONS_VAR: table})
