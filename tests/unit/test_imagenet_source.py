"""Archives, extracted trees and the Kaggle layout give the same records; bad sources fail naming the file."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from pipelines.source import imagenet
from pipelines.source.demo import DemoSummary, extract_to_tree, write_demo_imagenet
from pipelines.source.imagenet import ImageNetSourceError, RawImage, open_source

from helpers import damage_class_tar

SMALL = dict(num_classes=4, train_per_class=6, val_per_class=3, seed=3, image_size=(64, 48))
GT_REL = f"{imagenet.DEVKIT_DIR}/{imagenet.GROUND_TRUTH}"
META_REL = f"{imagenet.DEVKIT_DIR}/{imagenet.META_MAT}"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    archives = base / "archives"
    write_demo_imagenet(archives, **SMALL)
    return {
        "archives": archives,
        "tree": extract_to_tree(archives, base / "tree"),
        "tree_per_class_val": extract_to_tree(archives, base / "tree2", val_per_class=True, devkit="folder"),
        "kaggle": extract_to_tree(archives, base / "kaggle", layout="kaggle"),
    }


@pytest.fixture(scope="module")
def demo(layouts: dict[str, Path]) -> DemoSummary:
    summary = write_demo_imagenet(layouts["archives"], **SMALL)
    assert summary.reused
    return summary


def _records(images: list[RawImage]) -> list[tuple[str, str, str, int, str]]:
    return [(r.key, r.source_name, r.wnid, r.label, hashlib.sha256(r.data).hexdigest()) for r in images]


def _copy(layouts: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layouts[name], tmp_path / name))


def _error(path: Path) -> str:
    with pytest.raises(ImageNetSourceError) as info:
        src = open_source(path)
        list(src.iter_train())
        list(src.iter_val())
    return str(info.value)


# --------------------------------------------------------------------------------------------- same records


@pytest.mark.parametrize(
    ("layout", "kind"),
    [("archives", "archives"), ("tree", "tree"), ("tree_per_class_val", "tree"), ("kaggle", "kaggle")],
)
def test_detects_each_layout(layouts: dict[str, Path], layout: str, kind: str) -> None:
    assert imagenet.detect_source_kind(layouts[layout]) == kind
    assert open_source(layouts[layout]).kind == kind


def test_all_layouts_give_the_same_records_in_the_same_order(layouts: dict[str, Path], demo: DemoSummary) -> None:
    sources = {name: open_source(path) for name, path in layouts.items()}
    reference = sources.pop("archives")
    train, val = _records(list(reference.iter_train())), _records(list(reference.iter_val()))
    assert len(train) == demo.num_train and len(val) == demo.num_val
    for name, src in sources.items():
        assert src.classes == reference.classes == demo.wnids, name
        assert _records(list(src.iter_train())) == train, name
        assert _records(list(src.iter_val())) == val, name
        assert src.class_words == reference.class_words, name


def test_labels_follow_sorted_wnids_not_ilsvrc_ids(layouts: dict[str, Path], demo: DemoSummary) -> None:
    src = open_source(layouts["archives"])
    assert list(demo.ilsvrc_ids) != sorted(demo.ilsvrc_ids)  # the mapping below is not the identity
    for image in src.iter_train():
        assert image.key.startswith(image.wnid + "_") and image.label == demo.wnids.index(image.wnid)
    val = list(src.iter_val())
    assert [r.key for r in val] == [f"ILSVRC2012_val_{i:08d}" for i in range(1, demo.num_val + 1)]
    assert tuple(r.wnid for r in val) == demo.val_wnids
    assert all(r.label == src.classes.index(r.wnid) == demo.wnids.index(r.wnid) for r in val)


def test_oddities_pass_through_as_bytes(layouts: dict[str, Path], demo: DemoSummary) -> None:
    names = {r.source_name for r in open_source(layouts["archives"]).iter_train()}
    assert {o.file_name for o in demo.oddities if o.split == "train"} <= names


def test_units_are_picklable_and_read_in_another_process(layouts: dict[str, Path]) -> None:
    for name in ("archives", "tree"):
        src = open_source(layouts[name])
        units = pickle.loads(pickle.dumps(src.train_units()))
        val_units = pickle.loads(pickle.dumps(src.val_units(chunk=5)))
        with ProcessPoolExecutor(max_workers=2) as pool:
            train = [r for batch in pool.map(_read_train, units) for r in batch]
            val = [r for batch in pool.map(_read_val, val_units) for r in batch]
        assert train == _records(list(src.iter_train()))
        assert val == _records(list(src.iter_val()))


def _read_train(unit: imagenet.TrainUnit) -> list[tuple[str, str, str, int, str]]:
    return _records(list(imagenet.read_train_unit(unit)))


def _read_val(unit: imagenet.ValUnit) -> list[tuple[str, str, str, int, str]]:
    return _records(list(imagenet.read_val_unit(unit)))


def test_units_are_sorted_and_chunked(layouts: dict[str, Path], demo: DemoSummary) -> None:
    src = open_source(layouts["archives"])
    assert [u.wnid for u in src.train_units()] == list(demo.wnids)
    assert [u.label for u in src.train_units()] == list(range(len(demo.wnids)))
    chunks = src.val_units(chunk=5)
    assert [len(u.entries) for u in chunks] == [5, 5, 2] and [u.index for u in chunks] == [0, 1, 2]
    assert [r for u in chunks for r in imagenet.read_val_unit(u)] == list(src.iter_val())
    with pytest.raises(ValueError, match="chunk"):
        src.val_units(chunk=0)


def test_archive_unit_is_a_byte_span_of_the_outer_tar(layouts: dict[str, Path]) -> None:
    unit = open_source(layouts["archives"]).train_units()[0]
    with open(unit.path, "rb") as f:
        f.seek(unit.offset)
        inner = tarfile.open(fileobj=io.BytesIO(f.read(unit.size)), mode="r:")
    assert all(name.startswith(unit.wnid + "_") for name in inner.getnames())


def test_fingerprints(layouts: dict[str, Path], tmp_path: Path) -> None:
    fp = open_source(layouts["archives"]).fingerprint()
    assert [f["name"] for f in fp["files"]] == list(imagenet.ARCHIVES)
    for f in fp["files"]:
        data = (layouts["archives"] / f["name"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()

    tree = _copy(layouts, "tree", tmp_path)
    before = open_source(tree).fingerprint()
    assert before == open_source(tree).fingerprint()
    assert before["num_classes"] == SMALL["num_classes"]
    assert before["num_val_files"] == SMALL["num_classes"] * SMALL["val_per_class"]
    assert before["num_train_files"] == SMALL["num_classes"] * SMALL["train_per_class"]
    some_image = next((tree / "train").rglob("*.JPEG"))
    some_image.write_bytes(some_image.read_bytes() + b"\0")
    assert open_source(tree).fingerprint()["tree_sha256"] != before["tree_sha256"]
    assert open_source(layouts["kaggle"]).fingerprint()["kind"] == "kaggle"


# --------------------------------------------------------------------------------------------- bad sources


def test_missing_path_and_unknown_layout(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nowhere")
    message = _error(tmp_path)
    for looked_for in (imagenet.TRAIN_ARCHIVE, "train/", imagenet.KAGGLE_DATA):
        assert looked_for in message


@pytest.mark.parametrize("name", imagenet.ARCHIVES)
def test_missing_archive_is_named(layouts: dict[str, Path], tmp_path: Path, name: str) -> None:
    root = _copy(layouts, "archives", tmp_path)
    (root / name).unlink()
    message = _error(root)
    assert f"missing: {name}" in message


@pytest.mark.parametrize("name", imagenet.ARCHIVES)
def test_corrupt_archive_is_named(layouts: dict[str, Path], tmp_path: Path, name: str) -> None:
    root = _copy(layouts, "archives", tmp_path)
    (root / name).write_bytes(b"this is not an archive" * 100)
    assert name in _error(root)


@pytest.mark.parametrize("name", [imagenet.TRAIN_ARCHIVE, imagenet.VAL_ARCHIVE, imagenet.DEVKIT_ARCHIVE])
def test_truncated_archive_is_named(layouts: dict[str, Path], tmp_path: Path, name: str) -> None:
    root = _copy(layouts, "archives", tmp_path)
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    assert name in _error(root)


def test_tar_cut_between_members_is_truncated(layouts: dict[str, Path], tmp_path: Path) -> None:
    # tarfile alone reads such a tar as a valid, shorter one.
    root = _copy(layouts, "archives", tmp_path)
    path = root / imagenet.TRAIN_ARCHIVE
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset])
    message = _error(root)
    assert imagenet.TRAIN_ARCHIVE in message and "truncated" in message


def _rewrite_train(root: Path, edit: dict[str, bytes]) -> None:
    """Replace (or add) class tars of the train archive, written with plain `tarfile`."""
    members = {}
    with tarfile.open(root / imagenet.TRAIN_ARCHIVE) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()  # type: ignore[union-attr]
    members.update(edit)
    with tarfile.open(root / imagenet.TRAIN_ARCHIVE, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_class_tar_is_named_when_the_archive_is_opened(
    layouts: dict[str, Path], tmp_path: Path, demo: DemoSummary
) -> None:
    # Each class tar's first header is read with the index (one block each), not when its unit's turn comes.
    root = _copy(layouts, "archives", tmp_path)
    broken = f"{demo.wnids[1]}.tar"
    _rewrite_train(root, {broken: b"garbage" * 1000})
    with pytest.raises(ImageNetSourceError, match=rf"^{broken} in .*{imagenet.TRAIN_ARCHIVE}: corrupt"):
        open_source(root)


def test_empty_class_tar_is_named_when_the_archive_is_opened(
    layouts: dict[str, Path], tmp_path: Path, demo: DemoSummary
) -> None:
    # Like a tree's empty class folder: a class without a train image is not a dataset.
    root = _copy(layouts, "archives", tmp_path)
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    _rewrite_train(root, {f"{demo.wnids[2]}.tar": empty.getvalue()})
    with pytest.raises(ImageNetSourceError, match=rf"{demo.wnids[2]}.tar in .*: holds no images"):
        open_source(root)


def test_class_tar_damaged_inside_is_named_when_read_not_read_shorter(
    layouts: dict[str, Path], tmp_path: Path, demo: DemoSummary
) -> None:
    # tarfile alone stops quietly at a bad header past the first and yields the members before it.
    root = _copy(layouts, "archives", tmp_path)
    victim = damage_class_tar(root / imagenet.TRAIN_ARCHIVE, 1, member=2)
    src = open_source(root)  # the first header is whole: opening succeeds
    unit = src.train_units()[1]
    assert f"{unit.wnid}.tar" == victim.name
    with pytest.raises(ImageNetSourceError, match=rf"{victim.name} in .*: corrupt.*bad member header"):
        list(imagenet.read_train_unit(unit))
    assert len(list(imagenet.read_train_unit(src.train_units()[0]))) == SMALL["train_per_class"]  # others read whole


def test_outer_tar_damaged_inside_is_named_not_read_shorter(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "archives", tmp_path)
    path = root / imagenet.VAL_ARCHIVE
    with tarfile.open(path) as tar:
        third = tar.getmembers()[2]
    data = bytearray(path.read_bytes())
    data[third.offset : third.offset + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    message = _error(root)
    assert message.startswith(f"{path}: corrupt: bad member header at byte {third.offset}"), message


def _rewrite_devkit(root: Path, edit: dict[str, bytes]) -> None:
    """Replace members of the devkit .tar.gz."""
    path = root / imagenet.DEVKIT_ARCHIVE
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]  # type: ignore[union-attr]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for m, data in members:
            data = edit.get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if m.isfile() else None)
    path.write_bytes(buf.getvalue())


def test_ground_truth_count_mismatch_names_the_file(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "archives", tmp_path)
    with tarfile.open(root / imagenet.DEVKIT_ARCHIVE, "r:gz") as tar:
        lines = tar.extractfile(GT_REL).read().splitlines(keepends=True)  # type: ignore[union-attr]
    _rewrite_devkit(root, {GT_REL: b"".join(lines[:-1])})
    message = _error(root)
    assert imagenet.DEVKIT_ARCHIVE in message and "ILSVRC2012_validation_ground_truth.txt" in message


def test_ground_truth_id_not_a_leaf_names_the_file(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "tree_per_class_val", tmp_path)
    gt = root / GT_REL
    lines = gt.read_text().splitlines()
    lines[2] = str(SMALL["num_classes"] + 1)  # the ID of an internal node
    gt.write_text("\n".join(lines) + "\n")
    message = _error(root)
    assert str(gt) in message and "line 3" in message


def test_flat_val_count_mismatch_in_tree(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "tree", tmp_path)
    next((root / "val").iterdir()).unlink()
    assert "ILSVRC2012_validation_ground_truth.txt" in _error(root)


def test_devkit_classes_must_match_train(layouts: dict[str, Path], tmp_path: Path, demo: DemoSummary) -> None:
    root = _copy(layouts, "tree_per_class_val", tmp_path)
    shutil.rmtree(root / "train" / demo.wnids[0])
    message = _error(root)
    assert str(root / "train") in message and "meta.mat" in message and demo.wnids[0] in message

    archives = _copy(layouts, "archives", tmp_path)
    with tarfile.open(archives / imagenet.TRAIN_ARCHIVE) as tar:
        dropped = f"{demo.wnids[0]}.tar"
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name != dropped]  # type: ignore[union-attr]
    with tarfile.open(archives / imagenet.TRAIN_ARCHIVE, "w") as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))
    assert imagenet.TRAIN_ARCHIVE in _error(archives)


def test_flat_val_tree_needs_the_devkit(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "tree", tmp_path)
    (root / imagenet.DEVKIT_ARCHIVE).unlink()
    assert imagenet.DEVKIT_ARCHIVE in _error(root)


def test_kaggle_label_files_are_checked(layouts: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(layouts, "kaggle", tmp_path)
    csv_path = root / imagenet.KAGGLE_VAL_SOLUTION
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-1]))
    assert imagenet.KAGGLE_VAL_SOLUTION in _error(root)

    root = _copy(layouts, "kaggle", tmp_path / "b")
    mapping = root / imagenet.KAGGLE_SYNSETS
    mapping.write_text("".join(mapping.read_text().splitlines(keepends=True)[1:]))
    assert imagenet.KAGGLE_SYNSETS in _error(root)


def test_errors_are_value_errors() -> None:
    assert issubclass(ImageNetSourceError, ValueError)
