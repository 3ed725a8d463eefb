"""The ffcv and dali loader backends and their staging writers, beside the wds backend they must agree with.

Everything here stages a dataset with FFCV files and DALI indexes and reads it with the real FFCV and DALI
(about half a minute, most of it importing FFCV and compiling its pipelines). Their pure halves (per-rank indices,
index files, the refusal of a dataset staged without the format) are in tests/unit/test_backend_indices.py.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.atomic import sha256_file
from pipelines.dataset import MANIFEST, SPLITS, DataError, index_lines, index_path, index_text, read_manifest
from pipelines.loading import ffcv as ffcv_loading
from pipelines.loading import make_loader
from pipelines.loading.ffcv import _seeded_crop_decoder_class
from pipelines.loading.sampling import rank_epoch_indices
from pipelines.loading.transforms import TrainCrop

from helpers import STAGE_PARAMS, read_samples, stage_directly

BACKENDS = ("ffcv", "dali")
FORMATS_PARAMS = dataclasses.replace(STAGE_PARAMS, formats=("ffcv", "dali"))


@pytest.fixture(scope="module")
def formats_dataset(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo staged at tiers (32, 64) with FFCV files and DALI indexes (read-only for tests)."""
    return stage_directly(demo_archives, tmp_path_factory.mktemp("formats"), FORMATS_PARAMS)


def _planned_labels(dataset: Path, split: str, tier: int = 32) -> list[int]:
    """Labels in the split's planned order: the shards read in name order (dicts keep insertion order)."""
    return [int(p["cls"]) for p in read_samples(dataset, split, tier).values()]


def _epoch(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole epoch's images and labels, on the CPU: where CUDA is available DALI decodes on the GPU and hands
    over CUDA images, which are compared here with the wds backend's."""
    batches = list(loader)
    return torch.cat([b[0].cpu() for b in batches]), torch.cat([b[1].cpu() for b in batches])


# --------------------------------------------------------------------------------------------- writers


def test_manifest_lists_every_extra_file_with_its_checksum(formats_dataset: Path) -> None:
    manifest = read_manifest(formats_dataset)
    ffcv = manifest.extra["ffcv"]
    assert {(e["tier"], e["split"]) for e in ffcv} == {(t, s) for t in (32, 64) for s in SPLITS}
    for e in ffcv:
        assert e["samples"] == manifest.splits[e["split"]].samples
    dali = manifest.extra["dali"]
    assert sorted(e["shard"] for e in dali) == sorted(s["path"] for s in manifest.shards)
    for e in ffcv + dali:
        path = formats_dataset / e["path"]
        assert path.stat().st_size == e["bytes"]
        assert sha256_file(path) == e["sha256"]


def test_dali_indexes_match_the_wds2idx_tool(formats_dataset: Path) -> None:
    tool = Path(sys.executable).parent / "wds2idx"  # installed with DALI
    if not tool.exists() or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx (or GNU tar, which it runs) is not installed")
    shard = formats_dataset / read_manifest(formats_dataset).extra["dali"][0]["shard"]
    ours = index_path(shard).read_bytes()
    subprocess.run([str(tool), str(shard), str(shard.parent / "reference.idx")], check=True, capture_output=True)
    try:
        assert (shard.parent / "reference.idx").read_bytes() == ours
    finally:
        (shard.parent / "reference.idx").unlink()


def _restage(dataset: Path, source: Path) -> None:
    """Run staging again over a version whose manifest was removed: every writer runs again."""
    (dataset / MANIFEST).unlink()
    assert stage_directly(source, dataset.parent, FORMATS_PARAMS) == dataset


def test_writers_reuse_verified_files_and_replace_damaged_ones(
    formats_dataset: Path, demo_archives: Path, tmp_path: Path
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(formats_dataset.parent, root)  # the whole datasets root: the spools live beside versions
    dataset = root / formats_dataset.name
    manifest = read_manifest(dataset)
    extras = [dataset / e["path"] for fmt in ("ffcv", "dali") for e in manifest.extra[fmt]]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in extras}

    _restage(dataset, demo_archives)
    assert read_manifest(dataset).extra == manifest.extra
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in extras} == before  # nothing rewritten

    beton = dataset / "32" / "val.beton"
    beton.write_bytes(beton.read_bytes()[:-100])  # truncated: its sidecar no longer verifies
    index = index_path(dataset / "64" / "train-000001.tar")
    index.write_text("v1.2 1\njpg 0 1 x.jpg\n")
    _restage(dataset, demo_archives)
    again = read_manifest(dataset)
    for fmt in ("ffcv", "dali"):
        for e in again.extra[fmt]:
            assert sha256_file(dataset / e["path"]) == e["sha256"]
    assert index.read_bytes() == index_text(index_lines(index.with_suffix(".tar"))).encode()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in extras if p not in (beton, index)} == {
        p: v for p, v in before.items() if p not in (beton, index)}


# --------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split, resolution", [("train", 32), ("train", 64), ("minival", 32), ("val", 64)])
def test_batches_are_uint8_nchw_with_int64_labels(
    formats_dataset: Path, backend: str, split: str, resolution: int
) -> None:
    images, labels = next(iter(make_loader(formats_dataset, split, resolution, 4, backend=backend)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, resolution, resolution)
    # FFCV decodes HWC and its batches stay so (NCHW tensors in channels_last memory, as training wants them).
    assert images.is_contiguous(memory_format=torch.channels_last if backend == "ffcv" else torch.contiguous_format)
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert images.float().std() > 1  # real pixels, not a constant fill


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["minival", "val"])
def test_eval_is_exactly_once_over_two_ranks_with_the_manifest_labels(
    formats_dataset: Path, backend: str, split: str
) -> None:
    manifest = read_manifest(formats_dataset)
    planned = _planned_labels(formats_dataset, split)
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(formats_dataset, split, 32, 3, rank=rank, world_size=2, backend=backend)
        sizes = [len(labels) for _, labels in loader]
        share = len(range(rank, len(planned), 2))
        assert sizes == [3] * (share // 3) + ([share % 3] if share % 3 else []) and len(loader) == len(sizes)
        per_rank.append(_epoch(loader)[1].tolist())
    # Each rank reads every other sample of the planned order, in that order: together, each sample once.
    assert per_rank == [planned[0::2], planned[1::2]]
    expected = {manifest.classes.index(w): n for w, n in manifest.splits[split].per_class.items()}
    assert Counter(per_rank[0] + per_rank[1]) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_ranks_get_equal_batch_counts_and_their_share(formats_dataset: Path, backend: str) -> None:
    planned = _planned_labels(formats_dataset, "train")
    n = len(planned)
    assert n % 2 == 1  # 35: one rank is padded
    for batch_size in (3, 4):
        counts = []
        for rank in (0, 1):
            loader = make_loader(formats_dataset, "train", 32, batch_size, rank=rank, world_size=2, backend=backend)
            sizes = [len(labels) for _, labels in loader]
            assert set(sizes) == {batch_size} and len(sizes) == len(loader)
            counts.append(len(sizes))
            if batch_size == 3:  # 18 = 6 x 3: the whole share is read, so its labels are known
                share = rank_epoch_indices(n, True, rank, 2, seed=0, epoch=0)
                assert Counter(_epoch(loader)[1].tolist()) == Counter(planned[i] for i in share)
        assert counts == [math.ceil(n / 2) // batch_size] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epoch_is_deterministic_for_seed_and_epoch(formats_dataset: Path, backend: str) -> None:
    def epoch(e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return _epoch(make_loader(formats_dataset, "train", 32, 5, epoch=e, seed=seed, num_workers=2,
                                  backend=backend))

    images, labels = epoch(0)
    images_again, labels_again = epoch(0)
    assert torch.equal(labels, labels_again) and torch.equal(images, images_again)  # the crops and flips too
    assert not torch.equal(epoch(1)[0], images)
    assert not torch.equal(epoch(0, seed=1)[0], images)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_training_crop_ranges_reach_every_backend(formats_dataset: Path, backend: str) -> None:
    def epoch(crop: TrainCrop) -> tuple[torch.Tensor, torch.Tensor]:
        return _epoch(make_loader(formats_dataset, "train", 32, 5, backend=backend, train_crop=crop))

    default, same_default = epoch(TrainCrop()), epoch(TrainCrop((0.08, 1.0), (3 / 4, 4 / 3)))
    narrow = epoch(TrainCrop((0.3, 0.3), (1.0, 1.0)))
    assert torch.equal(default[0], same_default[0])  # the defaults are the papers' ranges
    assert torch.equal(default[1], narrow[1]) and not torch.equal(default[0], narrow[0])  # same samples, other crops


@pytest.mark.parametrize("backend", ("wds", *BACKENDS))
def test_the_flip_can_be_turned_off_in_every_backend(formats_dataset: Path, backend: str) -> None:
    """Whole images (no crop): with the flip on, some come out mirrored; with it off, none does."""
    def epoch(flip: bool) -> torch.Tensor:
        whole = TrainCrop((1.0, 1.0), (1.0, 1.0), flip=flip)
        return _epoch(make_loader(formats_dataset, "train", 32, 5, backend=backend, train_crop=whole))[0].float()

    on, off = epoch(True), epoch(False)
    mirrored = (on - off.flip(-1)).abs().mean(dim=(1, 2, 3)) < (on - off).abs().mean(dim=(1, 2, 3))
    assert 0 < int(mirrored.sum()) < len(on)  # with the flip on, some images but not all are the mirror of off's
    assert torch.equal(epoch(False), off)  # and off is deterministic (no coin decides anything)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loader_started_at_batch_k_yields_the_epoch_from_batch_k(formats_dataset: Path, backend: str) -> None:
    def batches(start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = make_loader(formats_dataset, "train", 32, 3, 1, 2, epoch=2, seed=5, num_workers=2, backend=backend,
                             start_batch=start)
        return [(images.cpu(), labels) for images, labels in loader]

    whole = batches(0)
    for start in (1, len(whole) - 1, len(whole)):
        resumed = batches(start)
        assert len(resumed) == len(whole) - start
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, whole[start:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resolution_can_change_between_epochs(formats_dataset: Path, backend: str) -> None:
    for epoch, resolution in enumerate((32, 64, 32)):
        loader = make_loader(formats_dataset, "train", resolution, 4, epoch=epoch, backend=backend)
        tiers = ({loader.path.parent.name} if backend == "ffcv" else {p.parent.name for p in loader.shards})
        assert tiers == {str(resolution)}  # the fitting tier
        assert {tuple(images.shape[1:]) for images, _ in loader} == {(3, resolution, resolution)}


def test_ffcv_batches_outlive_its_buffers(formats_dataset: Path) -> None:
    """FFCV recycles a few output buffers: a batch kept while later ones arrive must not change."""
    loader = make_loader(formats_dataset, "train", 32, 2, backend="ffcv")
    kept = list(loader)
    copied_on_arrival = [images.clone() for images, _ in loader]  # the same epoch again: deterministic
    assert len(kept) == len(copied_on_arrival) > 6
    assert all(torch.equal(a[0], b) for a, b in zip(kept, copied_on_arrival, strict=True))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the failure under test
def test_ffcv_loading_thread_failure_is_an_error_not_a_hang(
    formats_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FFCV's loading thread dies on any error and its consumer would wait forever: the loader must raise."""
    real = _seeded_crop_decoder_class()

    class Broken(real):  # type: ignore[misc, valid-type]
        def generate_code(self) -> Any:
            def decode(batch_indices, my_storage, metadata, storage_state):  # type: ignore[no-untyped-def]
                raise_in_numba = object()  # numba cannot compile this: the thread fails at its first batch
                return raise_in_numba

            decode.is_parallel = True
            return decode

    monkeypatch.setattr(ffcv_loading, "_seeded_crop_decoder_class", lambda: Broken)
    with pytest.raises(DataError, match="loading thread stopped"):
        list(make_loader(formats_dataset, "train", 32, 4, backend="ffcv"))


# --------------------------------------------------------------------------------------------- across backends


def _smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Low-frequency and asymmetric in every direction and channel: a flipped, cropped-elsewhere or BGR image
    is far from the right one, while decoders and resamplers that differ by a fraction of a pixel agree."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.4) * width, rng.uniform(0.2, 0.4) * height
    blob = np.exp(-(((x - cx) / (0.25 * width)) ** 2 + ((y - cy) / (0.25 * height)) ** 2))
    r = 255 * x / width
    g = 255 * (y / height) ** 1.5
    b = 255 * blob * rng.uniform(0.6, 1.0)
    return Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def smooth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny extracted-tree source of smooth images (4 classes, varied sizes), staged with both formats."""
    src = tmp_path_factory.mktemp("smooth_source")
    rng = np.random.default_rng(0)
    for c in range(4):
        wnid = f"n{c:08d}"
        for split, count in (("train", 4), ("val", 3)):
            folder = src / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(90, 160)), int(rng.integers(90, 160)))
                _smooth_image(rng, *size).save(folder / f"{wnid}_{split}{i}.JPEG", quality=95)
    params = dataclasses.replace(FORMATS_PARAMS, minival=0)
    return stage_directly(src, tmp_path_factory.mktemp("smooth"), params)


@pytest.mark.parametrize("resolution", [32, 56])
def test_backends_agree_on_eval_images(smooth_dataset: Path, resolution: int) -> None:
    out = {b: _epoch(make_loader(smooth_dataset, "val", resolution, 5, backend=b)) for b in ("wds", *BACKENDS)}
    reference, labels = out["wds"]
    reference = reference.float()

    def mad(x: torch.Tensor) -> float:  # mean absolute difference of the worst image, in 0..255 levels
        return (x.float() - reference).abs().mean(dim=(1, 2, 3)).max().item()

    # Measured: ffcv ~1.1 (its JPEGs are encoded again at quality 90), dali ~0.2 (the same libjpeg-turbo
    # and crop box as wds); a crop of 80% instead of 87.5% of the shorter side ~4.2, a flip ~40, BGR ~60.
    tolerance = 2.0
    wrong_crop = _epoch(make_loader(smooth_dataset, "val", resolution, 5, crop_ratio=0.8))[0]
    assert mad(wrong_crop) > 1.5 * tolerance
    for backend in BACKENDS:
        images, backend_labels = out[backend]
        assert torch.equal(backend_labels, labels)  # the same samples in the same order
        assert mad(images) < tolerance, backend
        assert min(mad(images.flip(3)), mad(images.flip(2)), mad(images.flip(1))) > 10 * tolerance
