"""A tiny CIFAR-10 or CIFAR-100 in the binary version's exact distributed format: `write_cifar`.

The archive is what https://www.cs.toronto.edu/~kriz/cifar.html distributes (cifar-10-binary.tar.gz /
cifar-100-binary.tar.gz): the same folder and member names, the same record layout (label byte(s), then the red,
green and blue 32x32 planes), the real label-name files (ending in a blank line, as the real ones do), only fewer
records. Records are in a shuffled class order like the real batches'. The archive is byte-identical for the
same arguments: tar metadata and the gzip header are fixed, and every image has its own seeded generator.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.source.cifar import (
    CIFAR10,
    CIFAR100,
    IMAGE_SIDE,
    TEST_PREFIX,
    TRAIN_PREFIX,
    VARIANTS,
    CifarVariant,
)
from pipelines.source.demo import render_image, tarinfo

# The dataset's own class tables, from its download page (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's 20 superclasses in coarse-label order, each with its five classes as the binary version spells
# them. Both name files of the real archive list their names alphabetically, so the fine label of a class is
# its position among all 100 names sorted.
CIFAR100_SUPERCLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("aquatic_mammals", ("beaver", "dolphin", "otter", "seal", "whale")),
    ("fish", ("aquarium_fish", "flatfish", "ray", "shark", "trout")),
    ("flowers", ("orchid", "poppy", "rose", "sunflower", "tulip")),
    ("food_containers", ("bottle", "bowl", "can", "cup", "plate")),
    ("fruit_and_vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper")),
    ("household_electrical_devices", ("clock", "keyboard", "lamp", "telephone", "television")),
    ("household_furniture", ("bed", "chair", "couch", "table", "wardrobe")),
    ("insects", ("bee", "beetle", "butterfly", "caterpillar", "cockroach")),
    ("large_carnivores", ("bear", "leopard", "lion", "tiger", "wolf")),
    ("large_man-made_outdoor_things", ("bridge", "castle", "house", "road", "skyscraper")),
    ("large_natural_outdoor_scenes", ("cloud", "forest", "mountain", "plain", "sea")),
    ("large_omnivores_and_herbivores", ("camel", "cattle", "chimpanzee", "elephant", "kangaroo")),
    ("medium_mammals", ("fox", "porcupine", "possum", "raccoon", "skunk")),
    ("non-insect_invertebrates", ("crab", "lobster", "snail", "spider", "worm")),
    ("people", ("baby", "boy", "girl", "man", "woman")),
    ("reptiles", ("crocodile", "dinosaur", "lizard", "snake", "turtle")),
    ("small_mammals", ("hamster", "mouse", "rabbit", "shrew", "squirrel")),
    ("trees", ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")),
    ("vehicles_1", ("bicycle", "bus", "motorcycle", "pickup_truck", "train")),
    ("vehicles_2", ("lawn_mower", "rocket", "streetcar", "tank", "tractor")),
)
CIFAR100_COARSE_NAMES = tuple(coarse for coarse, _ in CIFAR100_SUPERCLASSES)
CIFAR100_FINE_NAMES = tuple(sorted(fine for _, members in CIFAR100_SUPERCLASSES for fine in members))
# Fine label -> coarse label.
CIFAR100_COARSE_OF = tuple(
    next(c for c, (_, members) in enumerate(CIFAR100_SUPERCLASSES) if fine in members) for fine in CIFAR100_FINE_NAMES
)

_TAR_MTIME = 1_239_000_000  # fixed (2009, the release year): the archive is byte-identical across runs
_README = b"<html><body>CIFAR sample: generated images in the binary version's layout.</body></html>\n"


@dataclass(frozen=True)
class CifarSample:
    """What `write_cifar` wrote; every mapping is keyed by the record's key ('train_00000', 'test_00000')."""

    archive: Path
    dataset: str  # 'cifar10' / 'cifar100'
    class_names: tuple[str, ...]  # label i is class_names[i]
    coarse_names: tuple[str, ...]  # CIFAR-100's superclasses; empty for CIFAR-10
    labels: dict[str, int]  # the fine label
    coarse_labels: dict[str, int]  # CIFAR-100's coarse label; empty for CIFAR-10
    pixel_sha256: dict[str, str]  # sha256 of the record's 3072 pixel bytes, as stored (R, G, B planes)
    batches: dict[str, tuple[str, ...]]  # batch file name -> its keys in record order
    splits: dict[str, list[str]]  # the dataset's own split definition, as the reader records it


def write_cifar(
    out_dir: str | os.PathLike[str],
    *,
    variant: str,
    per_class_train: int,
    per_class_test: int,
    seed: int = 0,
    num_batches: int | None = None,
) -> CifarSample:
    """Write the binary archive of `variant` ('cifar10' / 'cifar100') into `out_dir`.

    `num_batches`: how many of CIFAR-10's five data batches to write (train records spread over them evenly);
    None writes them all. Fewer makes an archive with members missing, as a truncated download has.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    written = len(spec.train_batches) if num_batches is None else num_batches
    if not 1 <= written <= len(spec.train_batches):
        raise ValueError(f"num_batches must be 1-{len(spec.train_batches)} for {variant}, got {num_batches!r}")
    if per_class_train < 0 or per_class_test < 0:
        raise ValueError("per_class_train and per_class_test must be >= 0")

    rng = np.random.default_rng([seed, 0])
    train_order = _shuffled_labels(rng, spec.num_classes, per_class_train)
    test_order = _shuffled_labels(rng, spec.num_classes, per_class_test)
    parts = np.array_split(train_order, written)
    names = _names(spec)

    labels: dict[str, int] = {}
    digests: dict[str, str] = {}
    batches: dict[str, tuple[str, ...]] = {}
    members: dict[str, bytes] = {}
    # Train keys run on across the data batches; the test batch's start again from 0.
    starts = np.cumsum([0, *(len(p) for p in parts)])
    plan = [(b, p, TRAIN_PREFIX, int(start)) for b, p, start in zip(spec.train_batches, parts, starts)]
    for name, part, prefix, first in [*plan, (spec.test_batch, test_order, TEST_PREFIX, 0)]:
        records = []
        for i, fine in enumerate(int(c) for c in part):
            key = f"{prefix}_{first + i:05d}"
            image = render_image(fine, spec.num_classes, (IMAGE_SIDE, IMAGE_SIDE), _rng(seed, prefix, first + i))
            planes = _planes(image)
            records.append(_record(spec, fine, planes))
            labels[key], digests[key] = fine, hashlib.sha256(planes).hexdigest()
        members[name] = b"".join(records)
        batches[name] = tuple(f"{prefix}_{first + i:05d}" for i in range(len(part)))

    coarse_labels = {k: CIFAR100_COARSE_OF[v] for k, v in labels.items()} if spec is CIFAR100 else {}
    archive = Path(out_dir).expanduser() / spec.archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(_archive_bytes(spec, members, names))
    return CifarSample(
        archive=archive,
        dataset=spec.dataset,
        class_names=names[spec.names_file],
        coarse_names=names.get(spec.coarse_names_file or "", ()),
        labels=labels,
        coarse_labels=coarse_labels,
        pixel_sha256=digests,
        batches=batches,
        splits=spec.splits(),
    )


def _names(spec: CifarVariant) -> dict[str, tuple[str, ...]]:
    """Each label-name file of the variant -> its names."""
    if spec is CIFAR10:
        return {spec.names_file: CIFAR10_NAMES}
    assert spec.coarse_names_file is not None
    return {spec.names_file: CIFAR100_FINE_NAMES, spec.coarse_names_file: CIFAR100_COARSE_NAMES}


def _shuffled_labels(rng: np.random.Generator, num_classes: int, per_class: int) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _rng(seed: int, prefix: str, number: int) -> np.random.Generator:
    # One generator per image: any image can be drawn alone, in any order.
    return np.random.default_rng([seed, 1 if prefix == TRAIN_PREFIX else 2, number])


def _planes(image: Image.Image) -> bytes:
    """A rendered image at exactly 32x32 (render_image jitters the size) as the R, G and B planes."""
    pixels = np.asarray(image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR).convert("RGB"))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()


def _record(spec: CifarVariant, fine: int, planes: bytes) -> bytes:
    label_bytes = [CIFAR100_COARSE_OF[fine], fine] if spec is CIFAR100 else [fine]
    return bytes(label_bytes) + planes


def _archive_bytes(spec: CifarVariant, batches: dict[str, bytes], names: dict[str, tuple[str, ...]]) -> bytes:
    files: list[tuple[str, bytes]] = list(batches.items())
    files += [(name, _names_text(values)) for name, values in names.items()]
    if spec is CIFAR10:
        files.append(("readme.html", _README))
    buf = io.BytesIO()
    # filename='' and mtime=0 keep the gzip header free of names and times.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.addfile(tarinfo(f"{spec.folder}/", 0, directory=True, mtime=_TAR_MTIME))
            for name, data in files:
                tar.addfile(tarinfo(spec.member(name), len(data), mtime=_TAR_MTIME), io.BytesIO(data))
    return buf.getvalue()


def _names_text(names: Sequence[str]) -> bytes:
    # The real files end with a blank line after the last name.
    return ("".join(f"{n}\n" for n in names) + "\n").encode()
