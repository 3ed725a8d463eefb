"""The ``flowers102`` kind reads Oxford Flowers-102 as distributed: every image once with its label, the
dataset's own splits (staged train = trnid + valid, staged val = tstid), damage as one line naming the file, and
staging end to end.

Expected values come from the generator (`FlowersRelease`) and from the archive read with plain `tarfile`.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat

from pipelines.dataset import read_manifest
from pipelines.source import flowers
from pipelines.source.kinds import detect_source_kind, open_source
from pipelines.source.records import RawImage, Source, SourceError
from pipelines.source.samples.flowers import FlowersRelease, mat_bytes, write_flowers, write_tgz
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

SIZE = dict(num_classes=4, per_class_train=4, per_class_val=3, per_class_test=3, seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> FlowersRelease:
    return write_flowers(tmp_path_factory.mktemp("flowers"), **SIZE, plant_bad_jpeg=True)  # type: ignore[arg-type]


@pytest.fixture
def copy(release: FlowersRelease, tmp_path: Path) -> Path:
    """A copy of the release a test may damage."""
    return Path(shutil.copytree(release.out_dir, tmp_path / "flowers"))


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


# --------------------------------------------------------------------------------------------- reading


def test_detected_by_its_file_names(release: FlowersRelease, tmp_path: Path) -> None:
    assert detect_source_kind(release.out_dir) == "flowers102"
    assert not flowers.matches(tmp_path)


def test_every_image_once_with_its_label_in_the_transfer_splits(release: FlowersRelease) -> None:
    src = open_source(release.out_dir)
    assert (src.kind, src.dataset) == ("flowers102", "flowers102")
    assert src.classes == ("001", "002", "003", "004")
    assert src.class_words == {c: "" for c in src.classes}  # the release names no classes
    assert src.splits == {"train": ["trnid", "valid"], "val": ["tstid"], "ids": "setid.mat"}

    train, val = _read_all(src.train_units()), _read_all(src.val_units())
    assert sorted(r.key for r in train) == sorted(release.splits["trnid"] + release.splits["valid"])
    assert sorted(r.key for r in val) == sorted(release.splits["tstid"])
    members = _archive(release.out_dir / flowers.IMAGES_ARCHIVE)
    for r in train + val:
        label = release.labels[r.key]
        assert (r.wnid, r.label) == (f"{label:03d}", label - 1)
        assert r.source_name == f"jpg/{r.key}.jpg"
        assert r.data == members[r.source_name]  # the JPEG as it is, the planted bad one included
        assert r.origin is None and r.meta is None  # nothing lies verbatim in a .tgz; no boxes
    assert set(release.bad_keys) <= {r.key for r in train}


def test_units_split_the_images_and_each_is_read_alone(
    release: FlowersRelease, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flowers, "UNIT_IMAGES", 6)
    src = open_source(release.out_dir)
    units = src.train_units()
    sizes = [u.estimated_images() for u in units]
    assert len(sizes) == 5 and sum(sizes) == 28 and max(sizes) - min(sizes) <= 1  # 28 in five near-equal chunks
    assert len({u.ident("train") for u in units}) == len(units)
    keys = [r.key for r in _read_all(units)]
    assert len(keys) == len(set(keys)) == 28


def test_val_per_class_is_refused_for_its_own_test_split(release: FlowersRelease) -> None:
    with pytest.raises(ValueError, match="^flowers102 has its own test split; --val-per-class is for"):
        open_source(release.out_dir, val_per_class=2)


def test_same_seed_same_bytes(release: FlowersRelease, tmp_path: Path) -> None:
    again = write_flowers(tmp_path, **SIZE, plant_bad_jpeg=True)  # type: ignore[arg-type]
    for name in flowers.FILES:
        assert (tmp_path / name).read_bytes() == (release.out_dir / name).read_bytes(), name
    assert again == FlowersRelease(tmp_path, release.labels, release.splits, release.bad_keys)


def test_mat_files_have_the_real_variables_and_shapes(release: FlowersRelease) -> None:
    labels = loadmat(release.out_dir / flowers.LABELS_MAT)["labels"]
    assert labels.shape == (1, 40) and labels.dtype == np.float64
    setid = loadmat(release.out_dir / flowers.SPLITS_MAT)
    assert [setid[v].shape for v in ("trnid", "valid", "tstid")] == [(1, 16), (1, 12), (1, 12)]


# --------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("name", flowers.FILES)
def test_a_missing_file_is_named(copy: Path, name: str) -> None:
    (copy / name).unlink()
    _one_line_error(copy, name)


def test_a_truncated_archive_is_named(copy: Path) -> None:
    path = copy / flowers.IMAGES_ARCHIVE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "corrupt or truncated" in _one_line_error(copy, flowers.IMAGES_ARCHIVE)


def test_an_id_without_an_image_is_named(copy: Path, release: FlowersRelease) -> None:
    path = copy / flowers.IMAGES_ARCHIVE
    gone = f"jpg/{release.splits['tstid'][0]}.jpg"
    write_tgz(path, ["jpg/"], [(n, d) for n, d in _archive(path).items() if n != gone])
    assert gone in _one_line_error(copy, flowers.IMAGES_ARCHIVE)


def test_an_id_in_two_splits_is_named(copy: Path) -> None:
    setid = {k: v for k, v in loadmat(copy / flowers.SPLITS_MAT).items() if not k.startswith("__")}
    setid["tstid"] = np.concatenate([setid["tstid"], setid["trnid"][:, :1]], axis=1)
    (copy / flowers.SPLITS_MAT).write_bytes(mat_bytes(setid))
    assert "listed twice" in _one_line_error(copy, flowers.SPLITS_MAT)


def test_an_id_without_a_label_is_named(copy: Path) -> None:
    setid = {k: v for k, v in loadmat(copy / flowers.SPLITS_MAT).items() if not k.startswith("__")}
    setid["trnid"] = np.concatenate([setid["trnid"], [[41.0]]], axis=1)  # the labels cover ids 1..40
    (copy / flowers.SPLITS_MAT).write_bytes(mat_bytes(setid))
    assert "no label" in _one_line_error(copy, flowers.SPLITS_MAT)


@pytest.mark.parametrize("label", [0, 103])
def test_a_label_out_of_range_is_named(copy: Path, label: int) -> None:
    labels = loadmat(copy / flowers.LABELS_MAT)["labels"]
    labels[0, 5] = label
    (copy / flowers.LABELS_MAT).write_bytes(mat_bytes({"labels": labels}))
    assert f"image 6 has {label}" in _one_line_error(copy, flowers.LABELS_MAT)


def test_an_image_in_no_split_is_named(copy: Path) -> None:
    path = copy / flowers.IMAGES_ARCHIVE
    extra = flowers.member_name(41)
    write_tgz(path, ["jpg/"], [*_archive(path).items(), (extra, b"\xff\xd8")])
    assert extra in _one_line_error(copy, flowers.IMAGES_ARCHIVE)


@pytest.mark.parametrize("damage", ["not a mat file", "no variable"])
def test_an_unreadable_label_file_is_named(copy: Path, damage: str) -> None:
    path = copy / flowers.LABELS_MAT
    if damage == "not a mat file":
        path.write_bytes(b"<html>404 Not Found</html>")
    else:
        path.write_bytes(mat_bytes({"lbls": np.ones((1, 40))}))
    _one_line_error(copy, flowers.LABELS_MAT)


def test_a_member_gone_after_indexing_fails_its_unit(copy: Path) -> None:
    src: Source = open_source(copy)
    path = copy / flowers.IMAGES_ARCHIVE
    write_tgz(path, ["jpg/"], list(_archive(path).items())[:-1])
    with pytest.raises(SourceError, match=f"{flowers.IMAGES_ARCHIVE}: 1 member.* gone since it was indexed"):
        _read_all(src.train_units() + src.val_units())


def test_mat_bytes_are_read_as_scipy_writes_them() -> None:
    """The MAT header the generator fixes is text only: scipy reads the file back."""
    mat = loadmat(io.BytesIO(mat_bytes({"x": np.arange(3.0).reshape(1, 3)})))
    assert mat["x"].tolist() == [[0.0, 1.0, 2.0]]


# --------------------------------------------------------------------------------------------- staging


def test_staged_end_to_end(release: FlowersRelease, tmp_path: Path) -> None:
    params = StageParams(tiers=(32,), shard_size=64, minival=4, max_bad_fraction=0.05)
    version = stage(release.out_dir, tmp_path / "datasets", params, log=lambda *_: None)
    manifest = read_manifest(version)
    assert version.name.startswith("flowers102-")
    assert manifest.source["dataset"] == "flowers102"
    assert manifest.classes == ("001", "002", "003", "004")

    def per_class(keys: tuple[str, ...]) -> Counter[str]:
        return Counter(f"{release.labels[k]:03d}" for k in keys if k not in release.bad_keys)

    train = per_class(release.splits["trnid"] + release.splits["valid"])
    staged = Counter(manifest.splits["train"].per_class) + Counter(manifest.splits["minival"].per_class)
    assert staged == train
    assert manifest.splits["minival"].samples == 4
    assert manifest.splits["val"].per_class == per_class(release.splits["tstid"])
    assert [b["source"] for b in manifest.bad_files] == [f"jpg/{k}.jpg" for k in release.bad_keys]
