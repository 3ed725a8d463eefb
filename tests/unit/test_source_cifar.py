"""CIFAR-10 and CIFAR-100's binary archives read in place: every record once with its label and pixels, the
batch files as units, the python versions and damaged archives refused in one line naming the file.

Expected values come from the generator (`CifarSample`) and the tests' own tar edits, never from the reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.dataset import read_manifest
from pipelines.source import cifar
from pipelines.source.kinds import detect_source_kind, open_source
from pipelines.source.records import RawImage, SourceError
from pipelines.source.samples.cifar import (
    CIFAR10_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    CifarSample,
    write_cifar,
)
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

SIZES = {"cifar10": dict(per_class_train=4, per_class_test=2), "cifar100": dict(per_class_train=2, per_class_test=1)}
SEED = 5


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CifarSample]:
    base = tmp_path_factory.mktemp("cifar")
    return {v: write_cifar(base / v, variant=v, seed=SEED, **SIZES[v]) for v in SIZES}


def _all_records(root: Path) -> list[RawImage]:
    src = open_source(root)
    return [r for unit in [*src.train_units(), *src.val_units()] for r in unit.read()]


def _error(root: Path) -> str:
    with pytest.raises(SourceError) as info:
        _all_records(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def _rewrite(archive: Path, out: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """A copy of a .tar.gz at `out` with each member's bytes passed through `edit` (None drops the member)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(archive, "r:gz") as src, tarfile.open(fileobj=buf, mode="w:gz") as dst:
        for m in src.getmembers():
            if not m.isfile():
                dst.addfile(m)
                continue
            reader = src.extractfile(m)
            assert reader is not None
            data = edit(m.name.rsplit("/", 1)[-1], reader.read())
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
    (out / archive.name).write_bytes(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["cifar-10-binary.tar.gz", "cifar-100-binary.tar.gz"])
def test_binary_archives_are_detected(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    assert cifar.matches(tmp_path)
    assert detect_source_kind(tmp_path) == "cifar"


@pytest.mark.parametrize(
    "name, folder, binary",
    [
        ("cifar-10-python.tar.gz", False, "cifar-10-binary.tar.gz"),
        ("cifar-10-batches-py", True, "cifar-10-binary.tar.gz"),
        ("cifar-100-python.tar.gz", False, "cifar-100-binary.tar.gz"),
        ("cifar-100-python", True, "cifar-100-binary.tar.gz"),
    ],
)
def test_python_versions_are_refused_naming_the_binary_archive(
    tmp_path: Path, name: str, folder: bool, binary: str
) -> None:
    (tmp_path / name).mkdir() if folder else (tmp_path / name).write_bytes(b"not read")
    assert detect_source_kind(tmp_path) == "cifar"  # so the refusal, not "no dataset found", is what users see
    message = _error(tmp_path)
    assert name in message and binary in message and "pickled" in message


def test_both_archives_in_one_folder_are_refused(tmp_path: Path, samples: dict[str, CifarSample]) -> None:
    for sample in samples.values():
        (tmp_path / sample.archive.name).write_bytes(sample.archive.read_bytes())
    message = _error(tmp_path)
    assert "cifar-10-binary.tar.gz" in message and "cifar-100-binary.tar.gz" in message and "own folder" in message


def test_an_extracted_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-bin").mkdir()
    assert "cifar-10-binary.tar.gz" in _error(tmp_path)


def test_val_per_class_is_refused(samples: dict[str, CifarSample]) -> None:
    with pytest.raises(ValueError, match="^cifar10 has its own test split; --val-per-class is for sources without"):
        open_source(samples["cifar10"].archive.parent, val_per_class=5)


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("variant", list(SIZES))
def test_every_record_once_with_its_label_and_pixels(samples: dict[str, CifarSample], variant: str) -> None:
    sample = samples[variant]
    records = _all_records(sample.archive.parent)
    assert len(records) == len({r.key for r in records}) == len(sample.labels)
    assert {r.key: r.label for r in records} == sample.labels
    for r in records:
        assert r.wnid == sample.class_names[r.label]
        image = Image.open(io.BytesIO(r.data))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        planes = np.asarray(image).transpose(2, 0, 1).tobytes()  # back to the file's R, G, B planes
        assert hashlib.sha256(planes).hexdigest() == sample.pixel_sha256[r.key]
        assert r.origin is None  # the bytes are a PNG made here, not a span of the file
        if variant == "cifar100":
            coarse = sample.coarse_labels[r.key]
            assert r.meta == {"coarse_label": coarse, "coarse_name": CIFAR100_COARSE_NAMES[coarse]}
        else:
            assert r.meta is None


def test_units_are_the_batch_files(samples: dict[str, CifarSample]) -> None:
    sample = samples["cifar10"]
    src = open_source(sample.archive.parent)
    assert (src.kind, src.dataset, src.classes) == ("cifar", "cifar10", CIFAR10_NAMES)
    assert src.class_words == {n: n for n in CIFAR10_NAMES}
    assert (
        src.splits
        == sample.splits
        == {
            "train": [f"data_batch_{i}" for i in range(1, 6)],
            "val": ["test_batch"],
        }
    )
    assert src.archives == (sample.archive,)
    train, val = src.train_units(), src.val_units()
    assert [u.ident("train") for u in train] == [f"train-data_batch_{i}" for i in range(1, 6)]
    assert [u.ident("val") for u in val] == ["val-test_batch"]
    # Train keys run on across the batches in order; each batch's records in file order.
    for unit, (batch, keys) in zip([*train, *val], sample.batches.items()):
        records = list(pickle.loads(pickle.dumps(unit)).read())  # read in a worker process: picklable
        assert [r.key for r in records] == list(keys)
        assert [r.source_name for r in records] == [f"{batch}#{i}" for i in range(len(keys))]
        assert unit.estimated_images() == len(keys)


def test_cifar100_classes_are_the_fine_labels(samples: dict[str, CifarSample]) -> None:
    sample = samples["cifar100"]
    src = open_source(sample.archive.parent)
    assert (src.dataset, src.classes, src.splits) == (
        "cifar100",
        CIFAR100_FINE_NAMES,
        {"train": ["train"], "val": ["test"]},
    )
    assert len(src.classes) == 100 and src.classes[:3] == ("apple", "aquarium_fish", "baby")
    assert [u.ident("train") for u in src.train_units()] == ["train-train"]
    assert Counter(sample.labels.values()) == {c: 3 for c in range(100)}


def test_the_generator_is_deterministic(tmp_path: Path, samples: dict[str, CifarSample]) -> None:
    again = write_cifar(tmp_path, variant="cifar10", seed=SEED, **SIZES["cifar10"])
    assert again.archive.read_bytes() == samples["cifar10"].archive.read_bytes()


# --------------------------------------------------------------------------------------------- damage


def _cut(name: str, drop: int) -> Callable[[str, bytes], bytes | None]:
    return lambda member, data: data[:-drop] if member == name else data


def _set_byte(name: str, offset: int, value: int) -> Callable[[str, bytes], bytes | None]:
    return lambda member, data: data[:offset] + bytes([value]) + data[offset + 1 :] if member == name else data


def _drop(name: str) -> Callable[[str, bytes], bytes | None]:
    return lambda member, data: None if member == name else data


RECORD10, RECORD100 = cifar.CIFAR10.record_bytes, cifar.CIFAR100.record_bytes


@pytest.mark.parametrize(
    "variant, edit, member, says",
    [
        pytest.param(
            "cifar10",
            _cut("data_batch_2.bin", 100),
            "data_batch_2.bin",
            "not a whole number of 3073-byte records",
            id="truncated-batch",
        ),
        pytest.param(
            "cifar10",
            _set_byte("test_batch.bin", RECORD10, 10),
            "test_batch.bin",
            "record 1 has label 10",
            id="label-out-of-range",
        ),
        pytest.param("cifar10", _drop("data_batch_3.bin"), "data_batch_3.bin", "missing", id="missing-batch"),
        pytest.param("cifar10", _drop("batches.meta.txt"), "batches.meta.txt", "missing", id="missing-names"),
        pytest.param(
            "cifar10",
            _cut("batches.meta.txt", 8),
            "batches.meta.txt",
            "9 label names, cifar10 has 10",
            id="too-few-names",
        ),
        pytest.param(
            "cifar100",
            _set_byte("train.bin", 2 * RECORD100, 20),
            "train.bin",
            "record 2 has coarse label 20",
            id="coarse-label-out-of-range",
        ),
        pytest.param(
            "cifar100",
            _set_byte("test.bin", 1, 100),
            "test.bin",
            "record 0 has label 100",
            id="fine-label-out-of-range",
        ),
        pytest.param(
            "cifar100",
            _cut("train.bin", RECORD100 - 1),
            "train.bin",
            "not a whole number of 3074-byte records",
            id="truncated-cifar100-batch",
        ),
        pytest.param(
            "cifar100", _drop("coarse_label_names.txt"), "coarse_label_names.txt", "missing", id="missing-coarse-names"
        ),
    ],
)
def test_a_damaged_archive_fails_naming_it_and_the_member(
    tmp_path: Path,
    samples: dict[str, CifarSample],
    variant: str,
    edit: Callable[[str, bytes], bytes | None],
    member: str,
    says: str,
) -> None:
    archive = samples[variant].archive
    message = _error(_rewrite(archive, tmp_path, edit))
    assert str(tmp_path / archive.name) in message and member in message and says in message


def test_a_truncated_download_fails_naming_the_archive(tmp_path: Path, samples: dict[str, CifarSample]) -> None:
    data = samples["cifar10"].archive.read_bytes()
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(data[: len(data) // 2])
    message = _error(tmp_path)
    assert str(tmp_path / "cifar-10-binary.tar.gz") in message and "truncated" in message


def test_fewer_data_batches_name_the_missing_ones(tmp_path: Path) -> None:
    write_cifar(tmp_path, variant="cifar10", per_class_train=2, per_class_test=1, num_batches=2)
    message = _error(tmp_path)
    assert all(f"data_batch_{i}.bin" in message for i in (3, 4, 5)) and "data_batch_2" not in message


def test_an_archive_changed_after_indexing_fails_at_read(tmp_path: Path, samples: dict[str, CifarSample]) -> None:
    root = _rewrite(samples["cifar10"].archive, tmp_path, lambda _, data: data)
    src = open_source(root)
    _rewrite(samples["cifar10"].archive, tmp_path, _set_byte("test_batch.bin", 0, 200))
    with pytest.raises(SourceError, match="test_batch.bin: record 0 has label 200"):
        list(src.val_units()[0].read())


# --------------------------------------------------------------------------------------------- staging


@pytest.mark.parametrize("variant", list(SIZES))
def test_stage_end_to_end(tmp_path: Path, variant: str) -> None:
    per_class_train, per_class_test = 7, 2
    sample = write_cifar(
        tmp_path / "src", variant=variant, per_class_train=per_class_train, per_class_test=per_class_test, seed=1
    )
    version = stage(
        tmp_path / "src",
        tmp_path / "out",
        StageParams(tiers=(32,), shard_size=64, minival=0.25),
        log=lambda *_: None,
    )
    manifest = read_manifest(version)
    assert version.name.startswith(f"{variant}-") and manifest.version == version.name
    assert manifest.source["dataset"] == variant and manifest.source["kind"] == "cifar"
    assert manifest.source["splits"] == sample.splits
    assert manifest.source["class_names"] == list(sample.class_names)
    assert manifest.bad_files == ()
    train, minival, val = (manifest.splits[s].per_class for s in ("train", "minival", "val"))
    for name in sample.class_names:
        assert train[name] + minival.get(name, 0) == per_class_train
        assert val[name] == per_class_test
    if variant == "cifar100":
        metas = _shard_metas(version)
        assert set(metas) == set(sample.labels)
        for key, meta in metas.items():
            coarse = sample.coarse_labels[key]
            assert (meta["coarse_label"], meta["coarse_name"]) == (coarse, CIFAR100_COARSE_NAMES[coarse])


def _shard_metas(version: Path) -> dict[str, dict[str, object]]:
    """Each sample's `.json` member, by key, from every shard of the version."""
    metas = {}
    for shard in version.rglob("*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    reader = tar.extractfile(m)
                    assert reader is not None
                    metas[m.name.removesuffix(".json")] = json.loads(reader.read())
    return metas
