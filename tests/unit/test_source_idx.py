"""MNIST-family idx files read in place: which dataset from the folder's name, every image once with its label
and pixels, chunked units, damaged files refused in one line naming the file, and the real Fashion-MNIST.

Expected values come from the generator (`IdxSample`) and from parsing the files here with numpy, never from
the reader.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.dataset import read_manifest
from pipelines.source import idx
from pipelines.source.kinds import detect_source_kind, open_source
from pipelines.source.idx import DEBIAN_FASHION_MNIST
from pipelines.source.records import RawImage, SourceError
from pipelines.source.samples.idx import IdxSample, write_idx
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage

PER_CLASS_TRAIN, PER_CLASS_TEST, SEED = 4, 2, 3
IMAGES = {"train": "train-images-idx3-ubyte", "t10k": "t10k-images-idx3-ubyte"}
LABELS = {"train": "train-labels-idx1-ubyte", "t10k": "t10k-labels-idx1-ubyte"}


def _write(folder: Path, gz: bool = True) -> IdxSample:
    return write_idx(folder, per_class_train=PER_CLASS_TRAIN, per_class_test=PER_CLASS_TEST, seed=SEED, gz=gz)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> IdxSample:
    return _write(tmp_path_factory.mktemp("idx") / "fashion-mnist")


def _all_records(root: Path) -> list[RawImage]:
    src = open_source(root)
    return [r for unit in [*src.train_units(), *src.val_units()] for r in unit.read()]


def _error(root: Path) -> str:
    with pytest.raises(SourceError) as info:
        _all_records(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def _copy(sample: IdxSample, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sample.folder, tmp_path / sample.folder.name))


def _grey_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.mode) == ("PNG", "L")  # 8-bit grey, as the files hold it
    return np.asarray(image)


# --------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", [*IMAGES.values(), *LABELS.values()])
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_any_idx_file_is_detected(tmp_path: Path, name: str, suffix: str) -> None:
    (tmp_path / (name + suffix)).write_bytes(b"")
    assert idx.matches(tmp_path)
    assert detect_source_kind(tmp_path) == "idx"


@pytest.mark.parametrize(
    "folder, dataset",
    [
        ("fashion-mnist", "fashion-mnist"),
        ("Fashion_MNIST", "fashion-mnist"),
        ("FashionMNIST/raw", "fashion-mnist"),  # torchvision's layout
        ("kmnist", "kmnist"),
        ("KMNIST/raw", "kmnist"),
        ("mnist", "mnist"),
        ("MNIST/raw", "mnist"),
        ("digits", "mnist"),
    ],
)
def test_the_dataset_is_the_folders_name(tmp_path: Path, folder: str, dataset: str) -> None:
    assert idx.dataset_of(tmp_path / folder) == dataset


@pytest.mark.parametrize(
    "folder, first, last",
    [("mnist", "0", "9"), ("fashion-mnist", "T-shirt/top", "Ankle boot"), ("kmnist", "\u304a (o)", "\u3092 (wo)")],
)
def test_class_words_are_the_datasets_own(tmp_path: Path, folder: str, first: str, last: str) -> None:
    _write(tmp_path / folder)
    src = open_source(tmp_path / folder)
    assert (src.kind, src.dataset, src.classes) == ("idx", folder, tuple("0123456789"))
    assert (src.class_words["0"], src.class_words["9"]) == (first, last)
    assert src.splits == {"train": ["train"], "val": ["t10k"]}


def test_val_per_class_is_refused(sample: IdxSample) -> None:
    with pytest.raises(ValueError, match="^fashion-mnist has its own test split; --val-per-class is for sources"):
        open_source(sample.folder, val_per_class=5)


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("gz", [True, False])
def test_every_image_once_with_its_label_and_pixels(tmp_path: Path, gz: bool) -> None:
    sample = _write(tmp_path / "mnist", gz=gz)
    records = _all_records(sample.folder)
    assert len(records) == len({r.key for r in records}) == len(sample.labels) == 10 * (4 + 2)
    assert {r.key: r.label for r in records} == sample.labels
    for r in records:
        assert r.wnid == str(r.label) and r.origin is None and r.meta is None
        pixels = _grey_pixels(r.data)
        assert pixels.shape == (28, 28)
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == sample.pixel_sha256[r.key]
    src = open_source(sample.folder)
    assert src.archives == tuple(sample.folder / (IMAGES[s] + (".gz" if gz else "")) for s in ("train", "t10k"))
    assert src.splits == sample.splits


def test_units_are_chunks_of_one_file(sample: IdxSample, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "CHUNK", 7)
    src = open_source(sample.folder)
    train, val = src.train_units(), src.val_units()
    assert [u.estimated_images() for u in train] == [7, 7, 7, 7, 7, 5]
    assert [u.ident("val") for u in val] == ["val-t10k_00000", "val-t10k_00007", "val-t10k_00014"]
    assert len({u.ident("train") for u in train}) == len(train)
    records = [r for u in train for r in pickle.loads(pickle.dumps(u)).read()]  # read in a worker: picklable
    assert [r.key for r in records] == [f"train_{i:05d}" for i in range(40)]
    assert [r.source_name for r in records[6:8]] == ["train-images-idx3-ubyte.gz#6", "train-images-idx3-ubyte.gz#7"]
    assert {r.key: r.label for r in records} == {k: v for k, v in sample.labels.items() if k.startswith("train")}


def test_the_generator_is_deterministic(tmp_path: Path, sample: IdxSample) -> None:
    again = _write(tmp_path / sample.folder.name)
    assert [f.read_bytes() for f in again.files] == [f.read_bytes() for f in sample.files]


# --------------------------------------------------------------------------------------------- damage


def _edit(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Rewrite a .gz file's content through `edit`."""
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes())), mtime=0))


@pytest.mark.parametrize(
    "file, edit, named, says",
    [
        pytest.param(
            LABELS["train"], lambda d: d[:-1], LABELS["train"], "header says 40 labels, the file holds 39", id="short"
        ),
        pytest.param(
            LABELS["t10k"],
            lambda d: struct.pack(">II", 0x801, 19) + d[8:-1],
            IMAGES["t10k"],
            "20 images, but t10k-labels-idx1-ubyte.gz has 19 labels",
            id="counts-differ",
        ),
        pytest.param(
            IMAGES["train"],
            lambda d: b"\0\0\x08\x01" + d[4:],
            IMAGES["train"],
            "bad magic number 0x00000801",
            id="magic",
        ),
        pytest.param(
            LABELS["train"],
            lambda d: b"\0\0\x08\x03" + d[4:],
            LABELS["train"],
            "bad magic number 0x00000803",
            id="magic1",
        ),
        pytest.param(
            LABELS["t10k"],
            lambda d: d[:8] + b"\x0a" + d[9:],
            LABELS["t10k"],
            "label 10 at 0, out of range 0-9",
            id="label",
        ),
        pytest.param(
            IMAGES["t10k"], lambda d: d[:-100], IMAGES["t10k"], "15580 bytes of pixels, the header says 15680", id="cut"
        ),
        pytest.param(IMAGES["train"], lambda d: d[:10], IMAGES["train"], "shorter than an idx header", id="no-header"),
    ],
)
def test_a_damaged_file_fails_naming_it(
    tmp_path: Path, sample: IdxSample, file: str, edit: Callable[[bytes], bytes], named: str, says: str
) -> None:
    root = _copy(sample, tmp_path)
    _edit(root / (file + ".gz"), edit)
    message = _error(root)
    assert message.startswith(f"{root / named}.gz: ") and says in message


@pytest.mark.parametrize("name", [IMAGES["t10k"], LABELS["train"]])
def test_a_missing_file_is_named(tmp_path: Path, sample: IdxSample, name: str) -> None:
    root = _copy(sample, tmp_path)
    (root / (name + ".gz")).unlink()
    assert f"{name}.gz missing" in _error(root)


def test_a_truncated_download_fails_naming_it(tmp_path: Path, sample: IdxSample) -> None:
    root = _copy(sample, tmp_path)
    path = root / (IMAGES["train"] + ".gz")
    path.write_bytes(path.read_bytes()[:-200])  # the gzip stream ends early: no trailer, a short stream
    message = _error(root)
    assert str(path) in message and "truncated" in message


def test_a_file_cut_after_indexing_fails_at_read(tmp_path: Path) -> None:
    sample = _write(tmp_path / "mnist", gz=False)
    src = open_source(sample.folder)
    path = sample.folder / IMAGES["t10k"]
    path.write_bytes(path.read_bytes()[: -28 * 28])
    with pytest.raises(SourceError, match="t10k-images-idx3-ubyte: truncated: images 0-19 end early"):
        list(src.val_units()[0].read())


# --------------------------------------------------------------------------------------------- the real set


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason=f"{DEBIAN_FASHION_MNIST} missing (Debian: dataset-fashion-mnist)")
def test_the_real_fashion_mnist() -> None:
    src = open_source(DEBIAN_FASHION_MNIST)
    assert (src.kind, src.dataset) == ("idx", "fashion-mnist")
    assert src.manifest_record()["class_names"] == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    # Every record, PNG-encoded (~6 s): 6,000 train and 1,000 test images per class, each key once.
    spot = {"train": (0, 31_337, 59_999), "t10k": (0, 9_999)}
    spot_keys = {f"{split}_{i:05d}" for split, numbers in spot.items() for i in numbers}
    picked: dict[str, bytes] = {}
    counts: dict[str, Counter[int]] = {}
    for split, units in (("train", src.train_units()), ("t10k", src.val_units())):
        counts[split] = Counter()
        for unit in units:
            for r in unit.read():
                counts[split][r.label] += 1
                if r.key in spot_keys:
                    picked[r.key] = r.data
    assert counts == {"train": {c: 6000 for c in range(10)}, "t10k": {c: 1000 for c in range(10)}}
    # A decoded record is the raw idx pixels, parsed here independently.
    for split, numbers in spot.items():
        raw = np.frombuffer(gzip.decompress((DEBIAN_FASHION_MNIST / f"{IMAGES[split]}.gz").read_bytes()), np.uint8, offset=16)
        images = raw.reshape(-1, 28, 28)
        for i in numbers:
            assert np.array_equal(_grey_pixels(picked[f"{split}_{i:05d}"]), images[i])


# --------------------------------------------------------------------------------------------- staging


def test_stage_end_to_end(tmp_path: Path) -> None:
    sample = write_idx(tmp_path / "kmnist", per_class_train=7, per_class_test=2, seed=1)
    version = stage(
        sample.folder, tmp_path / "out", StageParams(tiers=(32,), shard_size=64, minival=0.25), log=lambda *_: None
    )
    manifest = read_manifest(version)
    assert version.name.startswith("kmnist-") and manifest.version == version.name
    assert manifest.source["dataset"] == "kmnist" and manifest.source["kind"] == "idx"
    assert manifest.source["splits"] == {"train": ["train"], "val": ["t10k"]}
    assert manifest.source["class_names"][0] == "\u304a (o)"
    assert manifest.bad_files == ()
    train, minival, val = (manifest.splits[s].per_class for s in ("train", "minival", "val"))
    for c in manifest.classes:
        assert train[c] + minival.get(c, 0) == 7 and val[c] == 2
