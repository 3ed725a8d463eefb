"""A small, learnable ImageNet in the exact ILSVRC2012 distribution format, for demos and tests.

Nothing can be downloaded, so the project makes its own ILSVRC2012_img_train.tar (a tar of per-class tars),
ILSVRC2012_img_val.tar (flat) and ILSVRC2012_devkit_t12.tar.gz (meta.mat + val ground truth) with the same
quirks as the real ones: ILSVRC2012_IDs not in sorted-WNID order, non-leaf synsets in meta.mat, non-contiguous
image numbers, varied image sizes, and planted bad files (a PNG named .JPEG, a CMYK JPEG, grayscale JPEGs and a
truncated JPEG) that staging must convert or report.

Each class has its own hue (evenly spaced on the colour wheel) and its own pattern, with per-image jitter, so a
tiny CNN tells them apart at 64 px within a few epochs. The archives are byte-identical for the same arguments:
tar metadata and gzip/MAT headers are fixed, member order is sorted, every image has its own seeded generator.

`extract_to_tree` turns the archives into the extracted and Kaggle layouts, so tests can compare source kinds.
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipelines.atomic import atomic_open, atomic_write_json
from pipelines.source import imagenet

OddityKind = Literal["png_named_jpeg", "cmyk_jpeg", "grayscale_jpeg", "truncated_jpeg"]
TRAIN_ODDITIES: tuple[OddityKind, ...] = ("png_named_jpeg", "cmyk_jpeg", "grayscale_jpeg", "truncated_jpeg")
VAL_ODDITIES: tuple[OddityKind, ...] = ("grayscale_jpeg",)
META_JSON = "demo_meta.json"
_FORMAT = 1  # bump when the generator's output changes, so old demo archives are regenerated
_JPEG_QUALITY = 90
# Fixed tar timestamp (the ILSVRC2012 release year): a constant keeps archives byte-identical across runs.
_TAR_MTIME = 1_335_830_400
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, demo ILSVRC2012 devkit"
_SIZE_JITTER = 0.15  # image sides vary by +-15% around image_size, like the real set's varied sizes
_MIN_SIDE = 16


@dataclass(frozen=True)
class PlantedOddity:
    """A file that is deliberately not a clean RGB JPEG."""

    split: Literal["train", "val"]
    file_name: str  # 'n01234567_42.JPEG' / 'ILSVRC2012_val_00000003.JPEG'
    wnid: str
    kind: OddityKind


@dataclass(frozen=True)
class DemoSummary:
    out_dir: Path
    train_archive: Path
    val_archive: Path
    devkit_archive: Path
    wnids: tuple[str, ...]  # the leaf classes, sorted: class index = position
    ilsvrc_ids: tuple[int, ...]  # ILSVRC2012_ID of each wnid above; deliberately not increasing
    num_train: int  # train files written, oddities included
    num_val: int
    val_wnids: tuple[str, ...]  # ground truth: val_wnids[i] is the class of ILSVRC2012_val_{i + 1:08d}.JPEG
    oddities: tuple[PlantedOddity, ...]
    reused: bool  # True when matching archives already existed and nothing was written


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Synset:
    ilsvrc_id: int
    wnid: str
    words: str
    gloss: str
    children: tuple[int, ...]
    height: int
    num_train_images: int


@dataclass(frozen=True)
class _Plan:
    """Everything about the dataset except pixels; cheap, so a reused dataset's summary is rebuilt from it."""

    wnids: tuple[str, ...]  # sorted leaves
    synsets: tuple[_Synset, ...]  # meta.mat rows in ILSVRC2012_ID order: leaves, then internal nodes
    train_numbers: tuple[tuple[int, ...], ...]  # per class, the K of nXXXXXXXX_K.JPEG
    val_classes: tuple[int, ...]  # class index of val image i + 1
    oddities: dict[tuple[str, int, int], OddityKind]  # (split, class index, number) -> kind

    def id_of(self, wnid: str) -> int:
        return next(s.ilsvrc_id for s in self.synsets if s.wnid == wnid)


_PATTERNS = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "disc",
    "square",
    "rings",
    "dots",
    "anti-diagonal stripes",
    "cross",
)


def _plan(num_classes: int, train_per_class: int, val_per_class: int, seed: int, plant: bool) -> _Plan:
    # One generator drawn from in a fixed order: the plan is a pure function of the arguments.
    rng = np.random.default_rng([seed, 0])
    num_groups = max(1, num_classes // 5)
    numbers = _unique_ints(rng, num_classes + num_groups + 1, 1_000_000, 16_000_000)
    wnids = tuple(sorted(f"n{n:08d}" for n in numbers[:num_classes]))
    inner_wnids = [f"n{n:08d}" for n in numbers[num_classes:]]

    # Leaves get IDs 1..C like the real devkit, but in an order unrelated to sorted WNIDs.
    perm = rng.permutation(num_classes)
    if np.array_equal(perm, np.arange(num_classes)):
        perm[[0, 1]] = perm[[1, 0]]
    leaf_ids = [int(p) + 1 for p in perm]  # leaf_ids[k] is the ID of wnids[k]

    span = max(100, 25 * train_per_class)  # K spread over a wider range than the count: not contiguous
    train_numbers = tuple(
        tuple(sorted(int(k) + 1 for k in rng.choice(span, size=train_per_class, replace=False)))
        for _ in range(num_classes)
    )
    val_classes = tuple(int(c) for c in rng.permutation(np.repeat(np.arange(num_classes), val_per_class)))

    oddities: dict[tuple[str, int, int], OddityKind] = {}
    if plant:
        # Different classes while there are enough; then the next image of an already used class.
        order = rng.permutation(num_classes)
        for i, kind in enumerate(TRAIN_ODDITIES):
            cls = int(order[i % num_classes])
            oddities[("train", cls, train_numbers[cls][i // num_classes])] = kind
        v = int(rng.integers(len(val_classes)))
        oddities[("val", val_classes[v], v + 1)] = VAL_ODDITIES[0]

    synsets = _synsets(wnids, leaf_ids, inner_wnids, rng, train_per_class)
    return _Plan(wnids, synsets, train_numbers, val_classes, oddities)


def _unique_ints(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    seen: dict[int, None] = {}
    while len(seen) < n:
        for x in rng.integers(low, high, size=n):
            seen.setdefault(int(x))
    return list(seen)[:n]


def _synsets(
    wnids: tuple[str, ...], leaf_ids: list[int], inner_wnids: list[str], rng: np.random.Generator, per_class: int
) -> tuple[_Synset, ...]:
    """Leaves plus a two-level hierarchy above them (groups under one root), as meta.mat rows."""
    num_classes, num_groups = len(wnids), len(inner_wnids) - 1
    group_of = rng.permutation(num_classes) % num_groups
    leaves = []
    for k, wnid in enumerate(wnids):
        words = _words(k, num_classes)
        leaves.append(_Synset(leaf_ids[k], wnid, words, f"demo class {k}: {words}", (), 0, per_class))
    groups = []
    for g in range(num_groups):
        children = tuple(sorted(leaf_ids[k] for k in range(num_classes) if group_of[k] == g))
        groups.append(
            _Synset(
                num_classes + 2 + g,
                inner_wnids[g],
                f"demo group {g}",
                "a group of demo classes",
                children,
                1,
                per_class * len(children),
            )
        )
    root = _Synset(
        num_classes + 1,
        inner_wnids[-1],
        "demo entity",
        "the root of the demo hierarchy",
        tuple(s.ilsvrc_id for s in groups),
        2,
        per_class * num_classes,
    )
    return tuple(sorted([*leaves, root, *groups], key=lambda s: s.ilsvrc_id))


def _words(k: int, num_classes: int) -> str:
    hue_degrees = round(360 * k / num_classes)
    return f"{_PATTERNS[k % len(_PATTERNS)]} at hue {hue_degrees}"


# --------------------------------------------------------------------------------------------- pixels


def render_image(class_index: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB image of a class: the class's hue and pattern, jittered in position, scale, shade and noise."""
    width, height = (max(_MIN_SIDE, round(s * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER))) for s in size)
    # Hue jitter stays within a sixth of the spacing, so neighbouring classes never overlap.
    hue = (class_index + rng.uniform(-1 / 6, 1 / 6)) / num_classes % 1.0
    sat, val = rng.uniform(0.6, 0.95), rng.uniform(0.6, 0.9)
    background = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)
    # The pattern is a dark shade of the same hue: the mean colour stays the class's hue.
    foreground = np.array(colorsys.hsv_to_rgb(hue, sat, val * 0.3), dtype=np.float32)
    mask = _pattern_mask(class_index % len(_PATTERNS), width, height, rng)
    pixels = np.where(mask[..., None], foreground, background) * 255 * rng.uniform(0.85, 1.15)
    pixels += rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _pattern_mask(pattern: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(width, height)
    # Periods of >= ~12 px survive downscaling to 64 px (>= 4 px there).
    period = side / 7 * rng.uniform(0.8, 1.25)
    phase = rng.uniform(0, 2 * np.pi)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    radius = side * rng.uniform(0.22, 0.36)
    dx, dy = xx - cx, yy - cy

    def stripes(coord: np.ndarray) -> np.ndarray:
        return np.sin(2 * np.pi * coord / period + phase) > 0

    masks: dict[int, Callable[[], np.ndarray]] = {
        0: lambda: stripes(yy),
        1: lambda: stripes(xx),
        2: lambda: stripes((xx + yy) / np.sqrt(2)),
        3: lambda: (np.floor(dx / period) + np.floor(dy / period)) % 2 == 0,
        4: lambda: dx**2 + dy**2 < radius**2,
        5: lambda: (np.abs(dx) < radius * 0.9) & (np.abs(dy) < radius * 0.9),
        6: lambda: stripes(np.sqrt(dx**2 + dy**2)),
        7: lambda: ((dx % period) - period / 2) ** 2 + ((dy % period) - period / 2) ** 2 < (period / 4) ** 2,
        8: lambda: stripes((xx - yy) / np.sqrt(2)),
        9: lambda: (
            ((np.abs(dx) < radius / 3) | (np.abs(dy) < radius / 3))
            & (np.maximum(np.abs(dx), np.abs(dy)) < radius * 1.3)
        ),
    }
    return masks[pattern]()


def _encode(image: Image.Image, kind: OddityKind | None) -> bytes:
    buf = io.BytesIO()
    if kind == "png_named_jpeg":
        image.save(buf, format="PNG")
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    elif kind == "grayscale_jpeg":
        image.convert("L").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    data = buf.getvalue()
    # Half a JPEG: the header parses, the scan data ends early, so a full decode fails.
    return data[: len(data) // 2] if kind == "truncated_jpeg" else data


def _image_bytes(plan: _Plan, seed: int, split: str, class_index: int, number: int, size: tuple[int, int]) -> bytes:
    # A generator per image (not one shared stream): any image can be made alone, in any order.
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, class_index, number])
    image = render_image(class_index, len(plan.wnids), size, rng)
    return _encode(image, plan.oddities.get((split, class_index, number)))


# --------------------------------------------------------------------------------------------- archives


def tarinfo(name: str, size: int, directory: bool = False, mtime: int = _TAR_MTIME) -> tarfile.TarInfo:
    """A tar member with fixed metadata (`mtime`, root, no owner names), so a written archive is the same bytes
    every time: the demo's, and the format samples' (`pipelines.source.samples`), each with its release's date."""
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))


def _write_train(f: Any, plan: _Plan, seed: int, size: tuple[int, int]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as outer:
        for cls, wnid in enumerate(plan.wnids):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for name, number in sorted((f"{wnid}_{k}.JPEG", k) for k in plan.train_numbers[cls]):
                    _add(inner, name, _image_bytes(plan, seed, "train", cls, number, size))
            _add(outer, f"{wnid}.tar", inner_buf.getvalue())


def _write_val(f: Any, plan: _Plan, seed: int, size: tuple[int, int]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, cls in enumerate(plan.val_classes, start=1):
            _add(tar, _val_name(i), _image_bytes(plan, seed, "val", cls, i, size))


def _val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def _write_devkit(f: Any, plan: _Plan) -> None:
    top = imagenet.DEVKIT_DIR
    ground_truth = "".join(f"{plan.id_of(plan.wnids[c])}\n" for c in plan.val_classes).encode()
    readme = b"Demo ILSVRC2012 devkit: generated synthetic classes, same file layout as the real devkit.\n"
    # filename='' and mtime=0 keep the gzip header free of names and times.
    with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            tar.addfile(tarinfo(f"{top}/", 0, directory=True))
            _add(tar, f"{top}/readme.txt", readme)
            tar.addfile(tarinfo(f"{top}/data/", 0, directory=True))
            _add(tar, f"{top}/{imagenet.GROUND_TRUTH}", ground_truth)
            _add(tar, f"{top}/{imagenet.META_MAT}", _meta_mat_bytes(plan.synsets))


def _meta_mat_bytes(synsets: tuple[_Synset, ...]) -> bytes:
    """meta.mat as the real devkit has it: a (N, 1) struct array `synsets` with the eight ILSVRC fields."""
    from scipy.io import savemat

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    table = np.empty((len(synsets), 1), dtype=[(name, object) for name in fields])
    for i, s in enumerate(synsets):
        table[i, 0] = (
            np.uint16(s.ilsvrc_id),
            s.wnid,
            s.words,
            s.gloss,
            np.uint16(len(s.children)),
            np.array(s.children, dtype=np.uint16) if s.children else np.zeros((0, 0), dtype=np.uint8),
            np.uint8(s.height),
            np.uint32(s.num_train_images),
        )
    buf = io.BytesIO()
    savemat(buf, {"synsets": table}, format="5", oned_as="row")
    data = bytearray(buf.getvalue())
    # The 116-byte text header carries the creation time; a fixed one keeps the devkit byte-identical.
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    return bytes(data)


# --------------------------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DemoSize:
    """How large the demo ImageNet is by default (`effnet demo-data` and the demo flow take these)."""

    num_classes: int = 10
    train_per_class: int = 40
    val_per_class: int = 10
    seed: int = 0


DEMO_SIZE = DemoSize()


def write_demo_imagenet(
    out_dir: str | os.PathLike[str],
    *,
    num_classes: int = DEMO_SIZE.num_classes,
    train_per_class: int = DEMO_SIZE.train_per_class,
    val_per_class: int = DEMO_SIZE.val_per_class,
    seed: int = DEMO_SIZE.seed,
    image_size: tuple[int, int] = (160, 120),
    plant_oddities: bool = True,
) -> DemoSummary:
    """Write the three ILSVRC2012 archives of a demo ImageNet into `out_dir`, or reuse matching ones.

    `image_size` is (width, height); each image's sides vary by +-15% around it. The archives are written to
    temporary names and renamed; `demo_meta.json` is written last, so its presence with matching parameters
    means the archives are whole.
    """
    params = _checked_params(num_classes, train_per_class, val_per_class, seed, image_size, plant_oddities)
    out = Path(out_dir).expanduser().resolve()
    plan = _plan(num_classes, train_per_class, val_per_class, seed, plant_oddities)
    paths = {name: out / name for name in imagenet.ARCHIVES}
    if _reusable(out, params):
        return _summary(out, plan, reused=True)

    out.mkdir(parents=True, exist_ok=True)
    # A stale meta must not vouch for archives being rewritten: drop it before touching them.
    (out / META_JSON).unlink(missing_ok=True)
    size = (image_size[0], image_size[1])
    # Each archive is on disk (fsynced) before it is renamed, and all of them before the meta that vouches for them.
    with atomic_open(paths[imagenet.TRAIN_ARCHIVE]) as f:
        _write_train(f, plan, seed, size)
    with atomic_open(paths[imagenet.VAL_ARCHIVE]) as f:
        _write_val(f, plan, seed, size)
    with atomic_open(paths[imagenet.DEVKIT_ARCHIVE]) as f:
        _write_devkit(f, plan)
    sizes = {name: p.stat().st_size for name, p in paths.items()}
    atomic_write_json(out / META_JSON, {**params, "archive_sizes": sizes})
    return _summary(out, plan, reused=False)


def _checked_params(
    num_classes: int, train_per_class: int, val_per_class: int, seed: int, image_size: Any, plant: bool
) -> dict[str, Any]:
    def whole(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    whole("num_classes", num_classes, 2)
    whole("train_per_class", train_per_class, 1)
    whole("val_per_class", val_per_class, 1)
    whole("seed", seed, 0)
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}")
    for side in image_size:
        whole("image_size", side, _MIN_SIDE)
    if plant and num_classes * train_per_class < len(TRAIN_ODDITIES):
        raise ValueError(
            f"train_per_class: {num_classes} classes x {train_per_class} images cannot hold the "
            f"{len(TRAIN_ODDITIES)} planted train oddities; raise it or pass plant_oddities=False"
        )
    return {
        "format": _FORMAT,
        "num_classes": int(num_classes),
        "train_per_class": int(train_per_class),
        "val_per_class": int(val_per_class),
        "seed": int(seed),
        "image_size": [int(s) for s in image_size],
        "plant_oddities": bool(plant),
    }


def _reusable(out: Path, params: dict[str, Any]) -> bool:
    try:
        meta = json.loads((out / META_JSON).read_text())
    except (OSError, ValueError):
        return False
    sizes = meta.pop("archive_sizes", {})
    if meta != params:
        return False
    # Sizes catch an archive replaced or damaged after it was written.
    return all((out / name).is_file() and (out / name).stat().st_size == sizes.get(name) for name in imagenet.ARCHIVES)


def _summary(out: Path, plan: _Plan, *, reused: bool) -> DemoSummary:
    oddities = []
    for (split, cls, number), kind in sorted(plan.oddities.items()):
        wnid = plan.wnids[cls]
        name = f"{wnid}_{number}.JPEG" if split == "train" else _val_name(number)
        oddities.append(PlantedOddity(split, name, wnid, kind))  # type: ignore[arg-type]
    return DemoSummary(
        out_dir=out,
        train_archive=out / imagenet.TRAIN_ARCHIVE,
        val_archive=out / imagenet.VAL_ARCHIVE,
        devkit_archive=out / imagenet.DEVKIT_ARCHIVE,
        wnids=plan.wnids,
        ilsvrc_ids=tuple(plan.id_of(w) for w in plan.wnids),
        num_train=sum(len(n) for n in plan.train_numbers),
        num_val=len(plan.val_classes),
        val_wnids=tuple(plan.wnids[c] for c in plan.val_classes),
        oddities=tuple(oddities),
        reused=reused,
    )


# --------------------------------------------------------------------------------------------- other layouts


def extract_to_tree(
    archives_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    layout: Literal["tree", "kaggle"] = "tree",
    *,
    val_per_class: bool = False,
    devkit: Literal["archive", "folder"] = "archive",
) -> Path:
    """Extract the three ILSVRC2012 archives into the extracted-tree or Kaggle layout; returns `out`.

    Reads the archives with plain `tarfile`, independently of `pipelines.source.imagenet`'s readers, so comparing
    source kinds compares two implementations. Labels for a per-class val tree or the Kaggle CSV come from
    the devkit. tree: train/<wnid>/, val/ (flat, or val/<wnid>/ with `val_per_class`), plus the devkit as the
    .tar.gz or (`devkit='folder'`) extracted. kaggle: ILSVRC/Data/CLS-LOC/{train,val}/, LOC_synset_mapping.txt
    and LOC_val_solution.csv. Works on real archives too (streams; needs the disk space).
    """
    if layout not in ("tree", "kaggle"):
        raise ValueError(f"layout must be 'tree' or 'kaggle', got {layout!r}")
    if devkit not in ("archive", "folder"):
        raise ValueError(f"devkit must be 'archive' or 'folder', got {devkit!r}")
    src, out = Path(archives_dir), Path(out)
    kit = imagenet.read_devkit(src / imagenet.DEVKIT_ARCHIVE)
    base = out / imagenet.KAGGLE_DATA if layout == "kaggle" else out
    for wnid, name, data in _iter_train_tar(src / imagenet.TRAIN_ARCHIVE):
        _write_file(base / "train" / wnid / name, data)

    val_labels: dict[str, str] = {}
    for name, data in _iter_tar(src / imagenet.VAL_ARCHIVE):
        number = int(Path(name).stem.rsplit("_", 1)[1])
        wnid = val_labels[Path(name).stem] = kit.leaf_wnids[kit.ground_truth[number - 1]]
        nested = layout == "tree" and val_per_class
        _write_file(base / "val" / (f"{wnid}/{name}" if nested else name), data)

    if layout == "kaggle":
        _write_kaggle_labels(out, kit, val_labels)
    elif devkit == "archive":
        shutil.copyfile(src / imagenet.DEVKIT_ARCHIVE, out / imagenet.DEVKIT_ARCHIVE)
    else:
        with tarfile.open(src / imagenet.DEVKIT_ARCHIVE, "r:gz") as tar:
            for m in tar:
                if m.isfile():
                    reader = tar.extractfile(m)
                    assert reader is not None
                    _write_file(out / _safe_relpath(m.name), reader.read())
    return out


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                reader = tar.extractfile(m)
                assert reader is not None
                yield PurePosixPath(m.name).name, reader.read()


def _iter_train_tar(path: Path) -> Iterator[tuple[str, str, bytes]]:
    with tarfile.open(path, "r:") as outer:
        for m in outer:
            reader = outer.extractfile(m) if m.isfile() else None
            if reader is None:
                continue
            wnid = PurePosixPath(m.name).name.removesuffix(".tar")
            # Stream mode: a real class tar (~140 MB) is never held in memory.
            with tarfile.open(fileobj=reader, mode="r|") as inner:
                for im in inner:
                    data = inner.extractfile(im) if im.isfile() else None
                    if data is not None:
                        yield wnid, PurePosixPath(im.name).name, data.read()


def _safe_relpath(name: str) -> str:
    # Member names never escape the output folder.
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".", "..", "/")]
    return "/".join(parts)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_kaggle_labels(out: Path, kit: imagenet.Devkit, val_labels: dict[str, str]) -> None:
    mapping = "".join(f"{wnid} {kit.words[wnid]}\n" for wnid in kit.wnids)
    (out / imagenet.KAGGLE_SYNSETS).write_text(mapping)
    # Rows grouped by class, not in file order (the real CSV is unordered too); the box is a placeholder.
    rows = sorted(val_labels.items(), key=lambda item: (item[1], item[0]))
    with open(out / imagenet.KAGGLE_VAL_SOLUTION, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for image_id, wnid in rows:
            writer.writerow([image_id, f"{wnid} 0 0 1 1 "])
