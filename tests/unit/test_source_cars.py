"""The ``cars`` kind reads Stanford Cars as distributed: every image once with its class and box, train from
cars_train.tgz and val from cars_test.tgz (labels from cars_test_annos_withlabels.mat), damage as one line
naming the file, and staging end to end.

Expected values come from the generator (`CarsRelease`) and from the archives read with plain `tarfile`.
"""

from __future__ import annotations

import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.io import loadmat

from pipelines.dataset import read_manifest
from pipelines.source import cars
from pipelines.source.kinds import detect_source_kind, open_source
from pipelines.source.records import RawImage, Source, SourceError
from pipelines.source.samples.cars import CarsRelease, write_cars
from pipelines.source.samples.flowers import mat_bytes, write_tgz
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

SIZE = dict(num_classes=4, per_class_train=7, per_class_test=3, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> CarsRelease:
    return write_cars(tmp_path_factory.mktemp("cars"), **SIZE, plant_bad_jpeg=True)  # type: ignore[arg-type]


@pytest.fixture
def copy(release: CarsRelease, tmp_path: Path) -> Path:
    """A copy of the release a test may damage."""
    return Path(shutil.copytree(release.out_dir, tmp_path / "cars"))


def _read_all(units: list) -> list[RawImage]:
    return [record for unit in units for record in unit.read()]


def _archive(path: Path) -> dict[str, bytes]:
    """Member name -> bytes of every file in a .tgz."""
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _one_line_error(root: Path, naming: str) -> str:
    with pytest.raises(SourceError) as info:
        open_source(root)
    message = str(info.value)
    assert "\n" not in message and naming in message, message
    return message


def _annotations(path: Path) -> Any:
    """The `annotations` struct array (1 x N) of a .mat file, unsqueezed, to damage and write back."""
    return loadmat(path)["annotations"]


# --------------------------------------------------------------------------------------------- reading


def test_detected_by_its_file_names(release: CarsRelease, tmp_path: Path) -> None:
    assert detect_source_kind(release.out_dir) == "cars"
    assert not cars.matches(tmp_path)


def test_every_image_once_with_its_class_and_box(release: CarsRelease) -> None:
    src = open_source(release.out_dir)
    assert (src.kind, src.dataset) == ("cars", "cars")
    assert src.classes == ("001", "002", "003", "004")
    assert [src.class_words[c] for c in src.classes] == list(release.class_names)
    assert src.splits["train"] == ["train"] and src.splits["val"] == ["test"]

    train, val = _read_all(src.train_units()), _read_all(src.val_units())
    assert [r.key for r in train] == list(release.splits["train"])  # file order: 'train_00001' ..
    assert [r.key for r in val] == list(release.splits["test"])
    members = {**_archive(release.out_dir / cars.TRAIN_ARCHIVE), **_archive(release.out_dir / cars.TEST_ARCHIVE)}
    for r in train + val:
        label = release.labels[r.key]
        assert (r.wnid, r.label) == (f"{label:03d}", label - 1)
        split, number = r.key.split("_")
        assert r.source_name == f"cars_{split}/{number}.jpg"
        assert r.data == members[r.source_name]  # the JPEG as it is, the planted bad one included
        assert r.meta == {"bbox": list(release.bboxes[r.key])}
    assert set(release.bad_keys) <= {r.key for r in train}


def test_units_split_each_archive(release: CarsRelease, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cars, "UNIT_IMAGES", 10)
    src = open_source(release.out_dir)
    sizes = [u.estimated_images() for u in src.train_units()]
    assert len(sizes) == 3 and sum(sizes) == 28 and max(sizes) - min(sizes) <= 1  # 28 in three near-equal chunks
    assert [u.ident("val") for u in src.val_units()] == ["val-000", "val-001"]
    assert [r.key for r in _read_all(src.train_units())] == list(release.splits["train"])


def test_val_per_class_is_refused_for_its_own_test_split(release: CarsRelease) -> None:
    with pytest.raises(ValueError, match="^cars has its own test split; --val-per-class is for"):
        open_source(release.out_dir, val_per_class=2)


def test_same_seed_same_bytes(release: CarsRelease, tmp_path: Path) -> None:
    write_cars(tmp_path, **SIZE, plant_bad_jpeg=True)  # type: ignore[arg-type]
    for name in cars.FILES:
        assert (tmp_path / name).read_bytes() == (release.out_dir / name).read_bytes(), name


def test_devkit_has_the_real_files_variables_and_fields(release: CarsRelease, tmp_path: Path) -> None:
    devkit = _archive(release.out_dir / cars.DEVKIT_ARCHIVE)
    names = ("cars_meta.mat", "cars_train_annos.mat", "cars_test_annos.mat", "train_perfect_preds.txt")
    assert set(devkit) == {f"devkit/{n}" for n in (*names, "eval_train.m", "README.txt")}
    for name in names[:3]:
        (tmp_path / name).write_bytes(devkit[f"devkit/{name}"])
    assert loadmat(tmp_path / "cars_meta.mat")["class_names"].shape == (1, 4)
    train = _annotations(tmp_path / "cars_train_annos.mat")
    assert train.shape == (1, 28)
    assert train.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    assert _annotations(tmp_path / "cars_test_annos.mat").dtype.names == train.dtype.names[:4] + ("fname",)
    assert _annotations(release.out_dir / cars.TEST_LABELS_MAT).dtype.names == train.dtype.names


# --------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("name", cars.FILES)
def test_a_missing_file_is_named(copy: Path, name: str) -> None:
    (copy / name).unlink()
    _one_line_error(copy, name)


def test_a_truncated_archive_is_named(copy: Path) -> None:
    path = copy / cars.TRAIN_ARCHIVE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt or truncated" in _one_line_error(copy, cars.TRAIN_ARCHIVE)


def test_an_annotation_without_an_image_is_named(copy: Path) -> None:
    path = copy / cars.TEST_ARCHIVE
    write_tgz(path, ["cars_test/"], [(n, d) for n, d in _archive(path).items() if n != "cars_test/00002.jpg"])
    message = _one_line_error(copy, cars.TEST_ARCHIVE)
    assert "not in the archive" in message and "cars_test/00002.jpg" in message


def test_an_image_without_an_annotation_is_named(copy: Path) -> None:
    path = copy / cars.TEST_LABELS_MAT
    path.write_bytes(mat_bytes({"annotations": _annotations(path)[:, 1:]}))
    message = _one_line_error(copy, cars.TEST_ARCHIVE)
    assert "without an annotation" in message and cars.TEST_LABELS_MAT in message


@pytest.mark.parametrize("label", [0, 5])
def test_a_class_out_of_range_is_named(copy: Path, label: int) -> None:
    path = copy / cars.TEST_LABELS_MAT
    annotations = _annotations(path)
    annotations[0, 2]["class"] = np.array([[label]], dtype=np.uint8)
    path.write_bytes(mat_bytes({"annotations": annotations}))
    assert f"00003.jpg: {label}" in _one_line_error(copy, cars.TEST_LABELS_MAT)


def test_a_file_annotated_twice_is_named(copy: Path) -> None:
    path = copy / cars.TEST_LABELS_MAT
    annotations = _annotations(path)
    path.write_bytes(mat_bytes({"annotations": np.concatenate([annotations, annotations[:, :1]], axis=1)}))
    assert "00001.jpg is annotated twice" in _one_line_error(copy, cars.TEST_LABELS_MAT)


def test_a_devkit_without_its_meta_is_named(copy: Path) -> None:
    path = copy / cars.DEVKIT_ARCHIVE
    write_tgz(path, ["devkit/"], [(n, d) for n, d in _archive(path).items() if n != cars.META_MAT])
    assert cars.META_MAT in _one_line_error(copy, cars.DEVKIT_ARCHIVE)


def test_a_bad_train_class_names_the_devkit_member(copy: Path) -> None:
    path = copy / cars.DEVKIT_ARCHIVE
    members = _archive(path)
    scratch = copy / "annos.mat"
    scratch.write_bytes(members[cars.TRAIN_ANNOS_MAT])
    annotations = _annotations(scratch)
    annotations[0, 0]["class"] = np.array([[9]], dtype=np.uint8)
    members[cars.TRAIN_ANNOS_MAT] = mat_bytes({"annotations": annotations})
    write_tgz(path, ["devkit/"], sorted(members.items()))
    message = _one_line_error(copy, cars.DEVKIT_ARCHIVE)
    assert f"{cars.TRAIN_ANNOS_MAT} in " in message and "outside 1..4" in message


def test_a_member_gone_after_indexing_fails_its_unit(copy: Path) -> None:
    src: Source = open_source(copy)
    path = copy / cars.TRAIN_ARCHIVE
    write_tgz(path, ["cars_train/"], list(_archive(path).items())[:-1])
    with pytest.raises(SourceError, match=f"{cars.TRAIN_ARCHIVE}: 1 member.* gone since it was indexed"):
        _read_all(src.train_units())


# --------------------------------------------------------------------------------------------- staging


def test_staged_end_to_end(release: CarsRelease, tmp_path: Path) -> None:
    params = StageParams(tiers=(32,), shard_size=64, minival=4, max_bad_fraction=0.05)
    version = stage(release.out_dir, tmp_path / "datasets", params, log=lambda *_: None)
    manifest = read_manifest(version)
    assert version.name.startswith("cars-")
    assert manifest.source["dataset"] == "cars"
    assert manifest.source.get("class_names") == list(release.class_names)

    def per_class(keys: tuple[str, ...]) -> Counter[str]:
        return Counter(f"{release.labels[k]:03d}" for k in keys if k not in release.bad_keys)

    staged = Counter(manifest.splits["train"].per_class) + Counter(manifest.splits["minival"].per_class)
    assert staged == per_class(release.splits["train"])
    assert manifest.splits["minival"].samples == 4
    assert manifest.splits["val"].per_class == per_class(release.splits["test"])
    assert [b["source"] for b in manifest.bad_files] == [f"cars_train/{k[6:]}.jpg" for k in release.bad_keys]
