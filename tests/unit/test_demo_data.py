"""The demo ImageNet generator writes the ILSVRC2012 archives as distributed, deterministically and learnably."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from pipelines.source import demo as demo_data
from pipelines.source import imagenet
from pipelines.source.demo import DemoSummary, write_demo_imagenet

SMALL = dict(num_classes=4, train_per_class=6, val_per_class=3, seed=1, image_size=(64, 48))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return write_demo_imagenet(tmp_path_factory.mktemp("demo"), **SMALL)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _train_images(demo: DemoSummary) -> dict[str, dict[str, bytes]]:
    """wnid -> {file name: bytes}, read from the tar of tars."""
    return {name.removesuffix(".tar"): _members_of(data) for name, data in _members(demo.train_archive).items()}


def _members_of(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _devkit(demo: DemoSummary) -> dict[str, bytes]:
    return _members(demo.devkit_archive)


def _synsets(demo: DemoSummary) -> np.ndarray:
    meta = _devkit(demo)[f"{imagenet.DEVKIT_DIR}/{imagenet.META_MAT}"]
    return loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_archive_is_a_tar_of_class_tars(demo: DemoSummary) -> None:
    outer = _members(demo.train_archive)
    assert list(outer) == [f"{w}.tar" for w in demo.wnids]
    assert all(re.fullmatch(r"n\d{8}", w) for w in demo.wnids)
    images = _train_images(demo)
    for wnid, files in images.items():
        assert len(files) == SMALL["train_per_class"]
        matches = [re.fullmatch(rf"{wnid}_(\d+)\.JPEG", name) for name in files]
        numbers = sorted(int(m.group(1)) for m in matches if m)
        assert len(numbers) == len(files)
        assert numbers != list(range(numbers[0], numbers[0] + len(numbers)))  # not contiguous, like the real set
    assert demo.num_train == sum(len(f) for f in images.values())


def test_val_archive_is_flat_and_numbered_from_one(demo: DemoSummary) -> None:
    names = list(_members(demo.val_archive))
    assert names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, demo.num_val + 1)]
    assert demo.num_val == SMALL["num_classes"] * SMALL["val_per_class"]


def test_meta_mat_has_leaf_and_internal_synsets(demo: DemoSummary) -> None:
    synsets = _synsets(demo)
    assert synsets.dtype.names == ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                   "wordnet_height", "num_train_images")
    leaves = [r for r in synsets if r["num_children"] == 0]
    inner = [r for r in synsets if r["num_children"] > 0]
    assert sorted(str(r["WNID"]) for r in leaves) == list(demo.wnids)
    assert inner, "meta.mat must also hold internal nodes"
    ids = {int(r["ILSVRC2012_ID"]) for r in synsets}
    for r in inner:
        children = np.atleast_1d(r["children"])
        assert len(children) == r["num_children"] and set(int(c) for c in children) <= ids
    assert {int(r["ILSVRC2012_ID"]) for r in leaves} == set(range(1, len(leaves) + 1))


def test_ilsvrc_ids_are_not_in_sorted_wnid_order(demo: DemoSummary, tmp_path: Path) -> None:
    rows = sorted(_synsets(demo), key=lambda r: int(r["ILSVRC2012_ID"]))
    by_id = [str(r["WNID"]) for r in rows if r["num_children"] == 0]
    assert by_id != sorted(by_id)
    assert list(demo.ilsvrc_ids) != sorted(demo.ilsvrc_ids)
    # Guaranteed even for two classes, whatever the seed.
    for seed in range(6):
        s = write_demo_imagenet(tmp_path / str(seed), num_classes=2, train_per_class=1, val_per_class=1, seed=seed,
                                image_size=(16, 16), plant_oddities=False)
        assert s.ilsvrc_ids == (2, 1)


def test_ground_truth_has_one_id_per_val_image(demo: DemoSummary) -> None:
    lines = _devkit(demo)[f"{imagenet.DEVKIT_DIR}/{imagenet.GROUND_TRUTH}"].decode().split()
    assert len(lines) == demo.num_val
    wnid_of_id = dict(zip(demo.ilsvrc_ids, demo.wnids))
    assert tuple(wnid_of_id[int(x)] for x in lines) == demo.val_wnids
    assert sorted(demo.val_wnids) == sorted(w for w in demo.wnids for _ in range(SMALL["val_per_class"]))


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = write_demo_imagenet(tmp_path / "a", **SMALL)
    b = write_demo_imagenet(tmp_path / "b", **SMALL)
    c = write_demo_imagenet(tmp_path / "c", **{**SMALL, "seed": 2})
    for name in imagenet.ARCHIVES:
        assert _sha256(a.out_dir / name) == _sha256(b.out_dir / name)
        assert _sha256(a.out_dir / name) != _sha256(c.out_dir / name)


def test_planted_oddities_are_what_they_say(demo: DemoSummary) -> None:
    train = {name: data for files in _train_images(demo).values() for name, data in files.items()}
    val = _members(demo.val_archive)
    kinds = {(o.split, o.kind) for o in demo.oddities}
    assert kinds == {("train", k) for k in demo_data.TRAIN_ODDITIES} | {("val", "grayscale_jpeg")}
    train_odd = [o for o in demo.oddities if o.split == "train"]
    assert len({o.wnid for o in train_odd}) == len(train_odd)  # in different classes
    for odd in demo.oddities:
        data = (train if odd.split == "train" else val)[odd.file_name]
        assert odd.file_name.endswith(".JPEG")
        assert odd.file_name.startswith(odd.wnid if odd.split == "train" else "ILSVRC2012_val_")
        image = Image.open(io.BytesIO(data))
        if odd.kind == "truncated_jpeg":
            with pytest.raises(OSError):
                image.load()
            continue
        image.load()
        expected = {"png_named_jpeg": ("PNG", "RGB"), "cmyk_jpeg": ("JPEG", "CMYK"), "grayscale_jpeg": ("JPEG", "L")}
        assert (image.format, image.mode) == expected[odd.kind]


def test_normal_images_are_rgb_jpegs_of_varied_size(demo: DemoSummary) -> None:
    odd = {o.file_name for o in demo.oddities}
    sizes = set()
    for files in _train_images(demo).values():
        for name, data in files.items():
            if name in odd:
                continue
            image = Image.open(io.BytesIO(data))
            image.load()
            assert (image.format, image.mode) == ("JPEG", "RGB")
            sizes.add(image.size)
    assert len(sizes) > 3


def _mean_colour(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))
    return np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0)


def test_classes_are_told_apart_by_mean_colour(demo: DemoSummary) -> None:
    # The weakest possible classifier (nearest class-mean colour) must already separate the classes.
    odd = {o.file_name for o in demo.oddities}
    means = np.stack([
        np.mean([_mean_colour(d) for n, d in files.items() if n not in odd], axis=0)
        for _, files in sorted(_train_images(demo).items())
    ])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(means), dtype=bool)].min() > 20
    val = _members(demo.val_archive)
    correct = 0
    for i, name in enumerate(sorted(val)):
        if name in odd:
            continue
        predicted = int(np.argmin(np.linalg.norm(means - _mean_colour(val[name]), axis=1)))
        correct += demo.wnids[predicted] == demo.val_wnids[i]
    assert correct >= 0.9 * (len(val) - 1)


def test_second_call_reuses_matching_archives(tmp_path: Path) -> None:
    first = write_demo_imagenet(tmp_path, **SMALL)
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in imagenet.ARCHIVES}
    again = write_demo_imagenet(tmp_path, **SMALL)
    assert again.reused and not first.reused
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in imagenet.ARCHIVES} == stamps
    assert again.oddities == first.oddities and again.val_wnids == first.val_wnids
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    changed = write_demo_imagenet(tmp_path, **{**SMALL, "val_per_class": 2})
    assert not changed.reused and changed.num_val == 2 * SMALL["num_classes"]


def test_damaged_archive_is_regenerated(tmp_path: Path) -> None:
    first = write_demo_imagenet(tmp_path, **SMALL)
    digest = _sha256(first.val_archive)
    with open(first.val_archive, "ab") as f:
        f.write(b"junk")
    again = write_demo_imagenet(tmp_path, **SMALL)
    assert not again.reused and _sha256(again.val_archive) == digest


@pytest.mark.parametrize(
    ("argument", "value"),
    [("num_classes", 1), ("train_per_class", 0), ("val_per_class", 0), ("seed", -1), ("image_size", (8, 48)),
     ("image_size", (64,))],
)
def test_bad_arguments_name_the_argument(tmp_path: Path, argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=argument):
        write_demo_imagenet(tmp_path, **{**SMALL, argument: value})  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_too_few_images_for_the_oddities(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_per_class"):
        write_demo_imagenet(tmp_path, num_classes=3, train_per_class=1)
    write_demo_imagenet(tmp_path, num_classes=3, train_per_class=1, val_per_class=1, plant_oddities=False,
                        image_size=(16, 16))
