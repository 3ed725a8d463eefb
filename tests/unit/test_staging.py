"""Staging turns the demo ILSVRC2012 archives into checked, deterministic WebDataset shards and a manifest.

Expected values come from the generator (`DemoSummary`) and from reading the archives with plain `tarfile`,
never from `pipelines.source.imagenet`, so a labelling bug in the readers cannot hide behind the same bug here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipelines.atomic import sidecar_path
from pipelines.dataset import (
    KEYS,
    LATEST,
    MANIFEST,
    SPLITS,
    Manifest,
    keys_document,
    latest_version,
    read_keys,
    read_manifest,
)
from pipelines.source.demo import DemoSummary, extract_to_tree
from pipelines.staging import runners, spools, stager, versions
from pipelines.staging.images import BadImage, encode_tiers, tier_size
from pipelines.staging.params import WORK, StageParams, StagingError
from pipelines.staging.plan import minival_quota, plan_dataset
from pipelines.staging.runners import thread_map
from pipelines.staging.spools import UnitResult, load_unit, process_unit, unit_paths
from pipelines.staging.stager import _exclusive, stage
from pipelines.staging.versions import BaseVersion, check_base_seen, dataset_version

from helpers import (
    BAD_INPUTS,
    STAGE_PARAMS,
    ConcurrencyProbe,
    add_images,
    damage_class_tar,
    damaged_source,
    read_samples,
    shard_paths,
    stage_directly,
    work_of,
)

TIERS = STAGE_PARAMS.tiers


# --------------------------------------------------------------------------------------------- expectations


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    reader = tar.extractfile(member)
    assert reader is not None
    return reader.read()


def _archive_train(demo: DemoSummary) -> dict[str, tuple[str, bytes]]:
    """key -> (wnid, original bytes) of every train file, read from the tar of class tars."""
    out: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(demo.train_archive, "r:") as outer:
        for m in outer:
            wnid = m.name.removesuffix(".tar")
            with tarfile.open(fileobj=io.BytesIO(_read(outer, m)), mode="r:") as inner:
                for im in inner:
                    out[im.name.removesuffix(".JPEG")] = (wnid, _read(inner, im))
    return out


def _archive_val(demo: DemoSummary) -> dict[str, bytes]:
    with tarfile.open(demo.val_archive, "r:") as tar:
        return {m.name.removesuffix(".JPEG"): _read(tar, m) for m in tar}


def _oddity_keys(demo: DemoSummary, kind: str) -> list[str]:
    return [o.file_name.removesuffix(".JPEG") for o in demo.oddities if o.kind == kind]


def _good_train(demo: DemoSummary) -> dict[str, str]:
    """key -> wnid of the train files that decode (all but the truncated one)."""
    truncated = set(_oddity_keys(demo, "truncated_jpeg"))
    return {k: wnid for k, (wnid, _) in _archive_train(demo).items() if k not in truncated}


def _manifest(dataset: Path) -> Manifest:
    return read_manifest(dataset)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root (work/ included) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob(pattern))}


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def same_code(staged_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restaging records the code version of the first staging: a commit made meanwhile must not differ."""
    recorded = _manifest(staged_dataset).code_version
    monkeypatch.setattr(stager, "code_version", lambda: recorded)


def _jpeg(size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", size, (200, 60, 30))
    img.paste((20, 120, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- content


@pytest.mark.parametrize("tier", TIERS)
def test_every_good_train_image_is_staged_once_with_its_label(
    staged_dataset: Path, demo_summary: DemoSummary, tier: int
) -> None:
    expected = _good_train(demo_summary)
    train, minival = read_samples(staged_dataset, "train", tier), read_samples(staged_dataset, "minival", tier)
    assert not set(train) & set(minival)
    staged = {**train, **minival}
    assert sorted(staged) == sorted(expected)
    for key, parts in staged.items():
        wnid = expected[key]
        assert sorted(parts) == ["cls", "jpg", "json"], key
        assert int(parts["cls"]) == demo_summary.wnids.index(wnid), key
        assert json.loads(parts["json"]) == {"wnid": wnid, "source": f"{key}.JPEG"}


def test_manifest_counts_and_classes_match_the_generator(staged_dataset: Path, demo_summary: DemoSummary) -> None:
    manifest = _manifest(staged_dataset)
    assert manifest.classes == tuple(demo_summary.wnids) == tuple(sorted(demo_summary.wnids))
    assert manifest.num_classes == len(demo_summary.wnids)
    good = Counter(_good_train(demo_summary).values())
    assert sum(good.values()) == demo_summary.num_train - 1
    splits = manifest.splits
    per_class = Counter(splits["train"].per_class) + Counter(splits["minival"].per_class)
    assert per_class == good
    assert splits["train"].samples + splits["minival"].samples == sum(good.values())
    assert splits["val"].per_class == dict(Counter(demo_summary.val_wnids))
    assert manifest.images_seen == demo_summary.num_train + demo_summary.num_val
    assert manifest.tiers == tuple(TIERS)


@pytest.mark.parametrize("tier", TIERS)
def test_val_labels_follow_the_ground_truth_not_the_ilsvrc_ids(
    staged_dataset: Path, demo_summary: DemoSummary, tier: int
) -> None:
    # The trap this guards against: using ILSVRC2012_ID - 1 as the class index.
    id_labels = [demo_summary.ilsvrc_ids[demo_summary.wnids.index(w)] - 1 for w in demo_summary.val_wnids]
    true_labels = [demo_summary.wnids.index(w) for w in demo_summary.val_wnids]
    assert id_labels != true_labels
    val = read_samples(staged_dataset, "val", tier)
    assert sorted(val) == [f"ILSVRC2012_val_{i + 1:08d}" for i in range(demo_summary.num_val)]
    for i, wnid in enumerate(demo_summary.val_wnids):
        parts = val[f"ILSVRC2012_val_{i + 1:08d}"]
        assert int(parts["cls"]) == true_labels[i]
        assert json.loads(parts["json"])["wnid"] == wnid


def test_truncated_file_is_reported_and_in_no_shard(staged_dataset: Path, demo_summary: DemoSummary) -> None:
    (name,) = [o.file_name for o in demo_summary.oddities if o.kind == "truncated_jpeg"]
    bad = _manifest(staged_dataset).bad_files
    assert [(b["source"], b["split"]) for b in bad] == [(name, "train")]
    assert "does not decode" in bad[0]["reason"] and "truncated" in bad[0]["reason"]
    key = name.removesuffix(".JPEG")
    for split in SPLITS:
        for tier in TIERS:
            assert key not in read_samples(staged_dataset, split, tier)


@pytest.mark.parametrize("kind", ["png_named_jpeg", "cmyk_jpeg", "grayscale_jpeg"])
def test_odd_files_are_staged_as_rgb_jpegs(staged_dataset: Path, demo_summary: DemoSummary, kind: str) -> None:
    keys = _oddity_keys(demo_summary, kind)
    assert keys
    for tier in TIERS:
        staged = {s: read_samples(staged_dataset, s, tier) for s in SPLITS}
        for key in keys:
            (parts,) = [samples[key] for samples in staged.values() if key in samples]
            img = Image.open(io.BytesIO(parts["jpg"]))
            assert (img.format, img.mode, len(img.getbands())) == ("JPEG", "RGB", 3), (kind, key, tier)
            img.load()


def test_every_staged_image_is_an_rgb_jpeg_scaled_down_to_its_tier(
    staged_dataset: Path, demo_summary: DemoSummary
) -> None:
    originals = {k: data for k, (_, data) in _archive_train(demo_summary).items()} | _archive_val(demo_summary)
    for split in SPLITS:
        for tier in TIERS:
            for key, parts in read_samples(staged_dataset, split, tier).items():
                img = Image.open(io.BytesIO(parts["jpg"]))
                assert (img.format, img.mode) == ("JPEG", "RGB")
                full = Image.open(io.BytesIO(originals[key])).size
                assert img.size == tier_size(*full, tier), (split, tier, key)
                assert min(img.size) == min(tier, *full)


# --------------------------------------------------------------------------------------------- minival


def test_minival_is_stratified_seeded_and_disjoint_from_train(
    staged_dataset: Path, demo_summary: DemoSummary
) -> None:
    manifest = _manifest(staged_dataset)
    good = Counter(_good_train(demo_summary).values())
    quota = minival_quota(dict(good), STAGE_PARAMS.minival, STAGE_PARAMS.seed)
    assert manifest.splits["minival"].per_class == {c: q for c, q in quota.items() if q}
    assert all(q >= 1 for q in quota.values())  # 0.25 of 11 or 12 images
    minival = read_samples(staged_dataset, "minival", TIERS[0])
    train = read_samples(staged_dataset, "train", TIERS[0])
    assert list(manifest.minival_keys) == sorted(minival)
    assert not set(minival) & set(train)
    assert Counter(json.loads(p["json"])["wnid"] for p in minival.values()) == Counter(quota)
    # Both tiers hold the same images in each split.
    for split in SPLITS:
        assert sorted(read_samples(staged_dataset, split, TIERS[1])) == sorted(
            read_samples(staged_dataset, split, TIERS[0]))


@pytest.mark.parametrize(
    "counts, minival, expected",
    [
        ({}, 0.25, {}),
        ({"a": 12, "b": 11}, 0.25, {"a": 3, "b": 3}),  # 2.75 rounds to 3
        ({"a": 10, "b": 4}, 0.1, {"a": 1, "b": 0}),  # 0.4 rounds to 0
        ({"a": 1, "b": 4}, 0.5, {"a": 0, "b": 2}),  # a lone image stays in train
        ({"a": 4}, 0.9, {"a": 3}),  # 3.6 rounds to 4, capped so one image is left for train
        ({"a": 10, "b": 10}, 0.0, {"a": 0, "b": 0}),
        ({"a": 10, "b": 10, "c": 10}, 6, {"a": 2, "b": 2, "c": 2}),
        ({"a": 10, "b": 10, "c": 10}, 0, {"a": 0, "b": 0, "c": 0}),
        ({"a": 3, "b": 10}, 10, {"a": 2, "b": 5}),  # a keeps one image; its shortfall is not moved to b
        ({"a": 1, "b": 1}, 4, {"a": 0, "b": 0}),
        ({"a": 50}, 25, {"a": 25}),
    ],
)
def test_minival_quota(counts: dict[str, int], minival: int | float, expected: dict[str, int]) -> None:
    assert minival_quota(counts, minival, seed=0) == expected


@pytest.mark.parametrize("minival", [1, 7, 13, 29])
def test_minival_quota_remainder_goes_to_seeded_classes(minival: int) -> None:
    counts = {f"n{i:08d}": 100 for i in range(10)}
    quota = minival_quota(counts, minival, seed=3)
    base, extra = divmod(minival, 10)
    assert sum(quota.values()) == minival
    assert sorted(quota.values()) == [base] * (10 - extra) + [base + 1] * extra
    assert quota == minival_quota(counts, minival, seed=3)
    # The remainder is spread by the seed, not always given to the first classes.
    lucky = {tuple(c for c, q in minival_quota(counts, minival, seed=s).items() if q > base) for s in range(8)}
    assert len(lucky) > 1


# --------------------------------------------------------------------------------------------- shards


def test_manifest_checksums_and_sizes_match_the_shard_files(staged_dataset: Path) -> None:
    manifest = _manifest(staged_dataset)
    splits = manifest.splits
    for entry in manifest.shards:
        path = staged_dataset / entry["path"]
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert sidecar_path(path).read_text().strip() == entry["sha256"]
        with tarfile.open(path, "r:") as tar:
            assert len({m.name.partition(".")[0] for m in tar}) == entry["samples"]
    for split in SPLITS:
        for tier in TIERS:
            entries = [e for e in manifest.shards if (e["split"], e["tier"]) == (split, tier)]
            assert len(entries) == math.ceil(splits[split].samples / STAGE_PARAMS.shard_size)
            assert sum(e["samples"] for e in entries) == splits[split].samples
            assert all(e["samples"] == STAGE_PARAMS.shard_size for e in entries[:-1])


def test_shards_mix_classes(staged_dataset: Path) -> None:
    first = shard_paths(staged_dataset, "train", TIERS[0])[0]
    with tarfile.open(first, "r:") as tar:
        labels = {_read(tar, m) for m in tar if m.name.endswith(".cls")}
    assert len(labels) > 1


@pytest.mark.parametrize("split", SPLITS)
def test_shards_read_back_with_plain_webdataset(staged_dataset: Path, split: str) -> None:
    urls = [str(p) for p in shard_paths(staged_dataset, split, TIERS[0])]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    expected = read_samples(staged_dataset, split, TIERS[0])
    assert [s["__key__"] for s in samples] == list(expected)
    for s in samples:
        parts = expected[s["__key__"]]
        assert (s["jpg"], s["cls"], s["json"]) == (parts["jpg"], parts["cls"], parts["json"])
        assert Image.open(io.BytesIO(s["jpg"])).mode == "RGB"
        assert 0 <= int(s["cls"]) < 4


# --------------------------------------------------------------------------------------------- determinism, resume


@pytest.mark.usefixtures("same_code")
def test_staging_twice_gives_identical_bytes(staged_dataset: Path, demo_archives: Path, tmp_path: Path) -> None:
    # Units processed in the opposite order, as a parallel or resumed run might finish them.
    units = len(list((work_of(staged_dataset, STAGE_PARAMS) / "units").glob("*.tar")))
    again = stage_directly(demo_archives, tmp_path, STAGE_PARAMS, unit_order=range(units - 1, -1, -1))
    assert again.name == staged_dataset.name  # same version
    first, second = _files(staged_dataset), _files(again)
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], name


@pytest.mark.parametrize("layout", ["tree", "kaggle"])
def test_extracted_layouts_stage_to_the_same_shards(
    staged_dataset: Path, demo_archives: Path, tmp_path: Path, layout: str
) -> None:
    source = extract_to_tree(demo_archives, tmp_path / layout, layout)  # type: ignore[arg-type]
    other = stage_directly(source, tmp_path / "datasets", STAGE_PARAMS)
    assert other.name != staged_dataset.name  # another source fingerprint, another version
    assert _manifest(other).source["kind"] == layout
    for key in ("classes", "splits", "minival_keys", "shards", "bad_files", "images_seen"):
        assert getattr(_manifest(other), key) == getattr(_manifest(staged_dataset), key), key


def test_val_chunking_does_not_change_the_shards(staged_dataset: Path, demo_archives: Path, tmp_path: Path) -> None:
    chunked = dataclasses.replace(STAGE_PARAMS, val_chunk=5)
    other = stage_directly(demo_archives, tmp_path, chunked)
    assert len(list((work_of(other, chunked) / "units").glob("val-*.tar"))) == 4  # 16 val images in chunks of 5
    shards = lambda d: [(e["path"], e["sha256"]) for e in _manifest(d).shards]  # noqa: E731
    assert shards(other) == shards(staged_dataset)


def test_a_second_run_of_the_same_source_fails_at_once_and_leaves_other_runs_files(
    copy_staged: Path, demo_archives: Path
) -> None:
    work = work_of(copy_staged, STAGE_PARAMS)
    (copy_staged / MANIFEST).unlink()  # unfinished: a rerun would stage it
    stray = copy_staged.parent / "imagenet-other" / ".shard.tar.123.tmp"  # another run's file being written
    stray.parent.mkdir()
    stray.write_bytes(b"partial")
    with _exclusive(work):  # a first run holds the source's work folder
        with pytest.raises(StagingError, match="another staging run of this source is in progress"):
            stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS)
    again = stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS)  # the lock went with the first run
    assert (again / MANIFEST).is_file() and stray.read_bytes() == b"partial"


@pytest.mark.usefixtures("same_code")
def test_rerun_reuses_spools_and_shards(
    copy_staged: Path, demo_archives: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = (copy_staged / MANIFEST).read_bytes()
    before = _mtimes(copy_staged.parent, "*.tar")  # spools under work/ and the version's shards
    assert any(k.startswith("work/") for k in before) and any(k.startswith(f"{copy_staged.name}/32/") for k in before)
    (copy_staged / MANIFEST).unlink()  # killed after the shards, before the manifest

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished unit was decoded again")

    monkeypatch.setattr(spools, "encode_tiers", no_decoding)
    assert stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS) == copy_staged
    assert _mtimes(copy_staged.parent, "*.tar") == before
    assert (copy_staged / MANIFEST).read_bytes() == manifest


def test_corrupted_shard_is_detected_and_rewritten(copy_staged: Path, demo_archives: Path) -> None:
    victim = shard_paths(copy_staged, "train", TIERS[1])[1]
    original = victim.read_bytes()
    name = victim.relative_to(copy_staged).as_posix()
    others = {k: v for k, v in _mtimes(copy_staged, "*.tar").items() if k != name}
    _flip_byte(victim, 600)  # inside the first image's bytes: tar still reads, the checksum does not match
    (copy_staged / MANIFEST).unlink()
    stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS)
    assert victim.read_bytes() == original
    assert {k: v for k, v in _mtimes(copy_staged, "*.tar").items() if k in others} == others


@pytest.mark.usefixtures("same_code")
def test_corrupted_spool_is_redone(copy_staged: Path, demo_archives: Path, demo_summary: DemoSummary) -> None:
    work = work_of(copy_staged, STAGE_PARAMS)
    unit_id = f"train-{demo_summary.wnids[0]}"
    spool, _ = unit_paths(work, unit_id)
    original = spool.read_bytes()
    files_before = _files(copy_staged)
    assert load_unit(work, unit_id, STAGE_PARAMS) is not None
    _flip_byte(spool, 1000)
    assert load_unit(work, unit_id, STAGE_PARAMS) is None
    # Spools are keyed by what changes their bytes: other tiers mean a redo.
    other_tiers = dataclasses.replace(STAGE_PARAMS, tiers=(48,))
    assert load_unit(work, f"train-{demo_summary.wnids[1]}", other_tiers) is None
    (copy_staged / MANIFEST).unlink()
    stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS)
    assert spool.read_bytes() == original
    assert _files(copy_staged) == files_before


def test_too_many_bad_files_raise_naming_one(demo_archives: Path, demo_summary: DemoSummary, tmp_path: Path) -> None:
    (name,) = [o.file_name for o in demo_summary.oddities if o.kind == "truncated_jpeg"]
    strict = dataclasses.replace(STAGE_PARAMS, max_bad_fraction=0.01)  # the default; 1 in 64 is 1.6%
    with pytest.raises(StagingError, match=rf"1 of 64 images.*max_bad_fraction.*{name}"):
        stage_directly(demo_archives, tmp_path, strict)


def _unit(work: Path, split: str, good: int, bad: int, wnid: str = "n00000001", unit_id: str = "") -> UnitResult:
    """A finished unit as `plan_dataset` reads it: its records in its index under `work`."""
    unit_id = unit_id or f"{split}-{wnid}"
    records = [
        {"key": f"{wnid}_{split}_{i}", "wnid": wnid, "label": 0, "source": f"{wnid}_{i}.JPEG",
         "tiers": {"32": [0, 1, 32, 32]}}
        for i in range(good)
    ]
    bad_files = tuple(
        {"source": f"{wnid}_bad_{i}.JPEG", "split": split, "reason": "does not decode"} for i in range(bad))
    index = unit_paths(work, unit_id)[1]
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"unit": unit_id, "split": split, "records": records, "bad": list(bad_files)}))
    return UnitResult(unit_id, split, good, bad_files)


@pytest.mark.parametrize("max_bad, raises", [(0.1, False), (0.0999, True), (0.0, True), (1.0, False)])
def test_max_bad_fraction_boundary(max_bad: float, raises: bool, tmp_path: Path) -> None:
    params = StageParams(tiers=(32,), shard_size=4, minival=0, max_bad_fraction=max_bad)
    units = [_unit(tmp_path, "train", 9, 1)]  # exactly 10% bad
    if raises:
        with pytest.raises(StagingError, match="n00000001_bad_0.JPEG"):
            plan_dataset(units, tmp_path, ["n00000001"], params)
    else:
        plan = plan_dataset(units, tmp_path, ["n00000001"], params)
        assert len(plan.splits["train"]) == 9 and len(plan.bad) == 1


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    params = StageParams(tiers=(32,), shard_size=4, minival=0)
    units = [_unit(tmp_path, "train", 2, 0, unit_id=f"train-n00000001-{i}") for i in range(2)]
    with pytest.raises(StagingError, match="n00000001_train_0 appears twice"):
        plan_dataset(units, tmp_path, ["n00000001"], params)


# --------------------------------------------------------------------------------------------- params, images


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tiers=()), dict(tiers=(8,)), dict(tiers=(64, 15)), dict(shard_size=0), dict(shard_size=-3),
        dict(minival=1.0), dict(minival=1.5), dict(minival=-0.1), dict(minival=-1), dict(jpeg_quality=0),
        dict(jpeg_quality=101), dict(max_bad_fraction=-0.01), dict(max_bad_fraction=1.5), dict(val_chunk=0),
    ],
)
def test_stage_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        StageParams(**kwargs)


def test_stage_params_normalise_tiers() -> None:
    assert StageParams(tiers=(64, 32, 64)).tiers == (32, 64)
    assert StageParams(tiers=[128.0]).tiers == (128,)  # type: ignore[list-item]


def test_dataset_version_depends_on_params_and_source() -> None:
    fp = {"kind": "archives", "files": []}
    base = dataset_version(fp, STAGE_PARAMS)
    assert base == dataset_version(fp, dataclasses.replace(STAGE_PARAMS))
    assert base != dataset_version(fp, dataclasses.replace(STAGE_PARAMS, seed=1))
    assert base != dataset_version({"kind": "tree"}, STAGE_PARAMS)


def test_code_that_cuts_other_shards_stages_a_new_version_over_the_same_spools(
    copy_staged: Path, demo_archives: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shard is reused when its sidecar verifies, whatever order cut it: a run of older code killed while
    # writing shards must not lend them to code whose plan orders the images otherwise.
    work = work_of(copy_staged, STAGE_PARAMS)
    (copy_staged / MANIFEST).unlink()
    monkeypatch.setattr(versions, "SHARD_LAYOUT", versions.SHARD_LAYOUT + 1)
    monkeypatch.setattr(spools, "_write_spool", lambda *a: pytest.fail("a unit was decoded again"))
    again = stage_directly(demo_archives, copy_staged.parent, STAGE_PARAMS)
    assert again.name != copy_staged.name and (again / MANIFEST).is_file()
    assert not copy_staged.exists()  # the older code's partial version, an orphan now
    assert work_of(again, STAGE_PARAMS) == work


@pytest.mark.parametrize(
    "size, tier, expected",
    [
        ((640, 480), 128, (171, 128)),
        ((480, 640), 128, (128, 171)),
        ((333, 250), 128, (170, 128)),  # 170.496
        ((128, 128), 128, (128, 128)),
        ((100, 50), 128, (100, 50)),  # never upsampled
        ((129, 300), 128, (128, 298)),
        ((10_000, 100), 50, (5_000, 50)),
        ((4000, 3), 16, (4000, 3)),
    ],
)
def test_tier_size(size: tuple[int, int], tier: int, expected: tuple[int, int]) -> None:
    assert tier_size(*size, tier) == expected


def test_encode_tiers_keeps_small_rgb_jpegs_as_they_are() -> None:
    data = _jpeg((50, 40))
    out = encode_tiers(data, (32, 64, 128), quality=90)
    assert out[64] == (data, 50, 40) and out[128] == (data, 50, 40)
    small, w, h = out[32]
    assert (w, h) == (40, 32) and Image.open(io.BytesIO(small)).size == (40, 32)


@pytest.mark.parametrize(
    "mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_encode_tiers_converts_other_images_to_rgb_jpeg_without_upsampling(mode: str, fmt: str) -> None:
    data = _jpeg((50, 40), mode, fmt)
    out = encode_tiers(data, (32, 64), quality=90)
    for tier, (jpeg, w, h) in out.items():
        img = Image.open(io.BytesIO(jpeg))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (w, h))
        assert (w, h) == tier_size(50, 40, tier)
        assert jpeg != data


@pytest.mark.parametrize("size", [(800, 600), (601, 1203), (333, 250)])
def test_encode_tiers_sizes_come_from_the_full_image_even_when_decoding_scaled(size: tuple[int, int]) -> None:
    # Tiers far below the image: libjpeg's DCT scaling (draft) decodes at 1/2..1/8 first.
    data = _jpeg(size)
    out = encode_tiers(data, (16, 32, 64), quality=90)
    for tier, (jpeg, w, h) in out.items():
        assert (w, h) == tier_size(*size, tier)
        assert Image.open(io.BytesIO(jpeg)).size == (w, h)
        assert min(w, h) == tier and w <= size[0] and h <= size[1]


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"not an image at all", "does not decode"), (_jpeg((64, 48))[:300], "does not decode")],
)
def test_encode_tiers_rejects_broken_files(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage, match=reason):
        encode_tiers(data, (32,), quality=90)


def test_spool_offsets_point_at_the_encoded_bytes(staged_dataset: Path, demo_summary: DemoSummary) -> None:
    work = work_of(staged_dataset, STAGE_PARAMS)
    unit = load_unit(work, f"train-{demo_summary.wnids[0]}", STAGE_PARAMS)
    assert unit is not None and unit.images
    spool = unit_paths(work, unit.unit_id)[0].read_bytes()
    for rec in spools.unit_records(work, unit.unit_id):
        for tier, (offset, size, w, h) in rec["tiers"].items():
            img = Image.open(io.BytesIO(spool[offset:offset + size]))
            img.load()
            assert img.size == (w, h) and int(tier) in TIERS


@pytest.mark.parametrize("layout", ["archives", "tree"])
def test_originals_kept_as_they_are_come_from_the_source(demo_archives: Path, tmp_path: Path, layout: str) -> None:
    # A tier above every image keeps the RGB JPEGs byte for byte; they are not spooled but read at their origin
    # (an image file, or its span inside the train or val archive).
    source = demo_archives if layout == "archives" else extract_to_tree(demo_archives, tmp_path / layout, layout)
    params = dataclasses.replace(STAGE_PARAMS, tiers=(32, 4096))
    dest = stage_directly(source, tmp_path / "datasets", params)
    originals = {}
    for tar_path in sorted((dest / "4096").rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    originals[m.name[:-4]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    kept = 0
    for unit_file in (work_of(dest, params) / "units").glob("*.json"):
        meta = json.loads(unit_file.read_text())
        spool_size = unit_paths(work_of(dest, params), meta["unit"])[0].stat().st_size
        for rec in meta["records"]:
            offset, size, _, _ = rec["tiers"]["4096"]
            if offset is None:
                path, at = rec["origin"]
                with open(path, "rb") as f:
                    f.seek(at)
                    assert f.read(size) == originals[rec["key"]]
                assert Image.open(io.BytesIO(originals[rec["key"]])).format == "JPEG"
                kept += 1
            else:  # re-encoded (CMYK, grayscale, PNG): spooled
                assert offset + size <= spool_size
    assert kept >= len(originals) - 8  # all but the planted odd files


# --------------------------------------------------------------------------------------------- incremental versions


@dataclasses.dataclass
class Grown:
    """A tree staged, then grown by new train images (and one new val image), then staged again."""

    tree: Path
    root: Path
    old: Path
    new: Path
    new_train: list[str]
    new_val: list[str]
    decoded: list[int]  # encode_tiers calls of the second stage
    logs: list[str]


def _stage(source: Path, root: Path, params: StageParams = STAGE_PARAMS, **kwargs: object) -> Path:
    return stage(source, root, params, log=kwargs.pop("log", lambda *_: None), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def grown(demo_archives: Path, demo_summary: DemoSummary, tmp_path_factory: pytest.TempPathFactory) -> Grown:
    tree = extract_to_tree(demo_archives, tmp_path_factory.mktemp("grown") / "tree", "tree", val_per_class=True)
    root = tree.parent / "datasets"
    old = _stage(tree, root)
    wnids = demo_summary.wnids
    # Classes grow unevenly (one not at all), as nightly additions do.
    new_train = add_images(tree, wnids, {wnids[0]: 5, wnids[1]: 2, wnids[2]: 9})
    new_val = add_images(tree, wnids, {wnids[3]: 1}, split="val")
    decoded: list[int] = []
    logs: list[str] = []
    real = spools.encode_tiers

    def counting(*args: object, **kwargs: object) -> object:
        decoded.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    spools.encode_tiers = counting  # type: ignore[assignment]
    try:
        new = _stage(tree, root, log=logs.append)
    finally:
        spools.encode_tiers = real  # type: ignore[assignment]
    return Grown(tree, root, old, new, new_train, new_val, decoded, logs)


def _all_keys(dataset: Path, tier: int) -> dict[str, list[str]]:
    return {split: sorted(read_samples(dataset, split, tier)) for split in SPLITS}


def test_incremental_version_names_its_base_and_links_its_shards(grown: Grown) -> None:
    old, new = _manifest(grown.old), _manifest(grown.new)
    assert grown.new.name != grown.old.name
    assert new.base_version == grown.old.name and old.base_version is None
    assert latest_version(grown.root) == grown.new
    new_entries = {e["path"]: e for e in new.shards}
    for entry in old.shards:
        assert new_entries[entry["path"]] == entry  # same name, checksum, size: the same shard
        for name in (Path(entry["path"]), sidecar_path(entry["path"])):
            # A hard link: the very file, not rewritten, no disk used.
            assert os.path.samefile(grown.old / name, grown.new / name), name
    added = [e for e in new.shards if e["path"] not in {o["path"] for o in old.shards}]
    assert added and all(e["samples"] for e in added)
    # New shards are numbered after the base's, per split and tier.
    for split in ("train", "val"):
        for tier in TIERS:
            names = [Path(e["path"]).name for e in new.shards if (e["split"], e["tier"]) == (split, tier)]
            assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]


def test_incremental_version_decodes_only_the_new_images(grown: Grown) -> None:
    assert len(grown.decoded) == len(grown.new_train) + len(grown.new_val)
    assert any("on top of " + grown.old.name in line for line in grown.logs)


def test_incremental_version_keeps_every_split_and_holds_every_image_once(grown: Grown) -> None:
    for tier in TIERS:
        old, new = _all_keys(grown.old, tier), _all_keys(grown.new, tier)
        for split in SPLITS:
            assert set(old[split]) <= set(new[split]), (split, tier)  # no old image changed split
        assert not set(new["train"]) & set(new["minival"])
        assert sorted(new["train"] + new["minival"]) == sorted(old["train"] + old["minival"] + grown.new_train)
        assert new["val"] == sorted(old["val"] + grown.new_val)
    old_m, new_m = _manifest(grown.old), _manifest(grown.new)
    assert set(old_m.minival_keys) <= set(new_m.minival_keys)
    assert list(new_m.minival_keys) == _all_keys(grown.new, TIERS[0])["minival"]
    assert new_m.images_seen == old_m.images_seen + len(grown.new_train) + len(grown.new_val)
    assert new_m.bad_files == old_m.bad_files  # the base's bad file is not read again
    for split in SPLITS:
        assert new_m.splits[split].samples == len(_all_keys(grown.new, TIERS[0])[split])


def test_incremental_minival_keeps_the_per_class_rate(grown: Grown) -> None:
    splits = _manifest(grown.new).splits
    totals = Counter(splits["train"].per_class) + Counter(splits["minival"].per_class)
    # What a fresh stage of the grown source would hold out per class (minival 0.25 of each class).
    assert splits["minival"].per_class == minival_quota(dict(totals), STAGE_PARAMS.minival, STAGE_PARAMS.seed)


def test_incremental_version_reads_back_through_the_loader(grown: Grown) -> None:
    from pipelines.loading import make_loader

    n = sum(len(labels) for _, labels in make_loader(grown.new, "val", 32, batch_size=4))
    assert n == _manifest(grown.new).splits["val"].samples


def test_keys_file_lists_every_image_of_a_version(grown: Grown) -> None:
    for dataset in (grown.old, grown.new):
        manifest = _manifest(dataset)
        splits, bad = read_keys(dataset)
        assert {s: sorted(k) for s, k in splits.items()} == _all_keys(dataset, TIERS[0])
        assert sorted(splits["minival"]) == list(manifest.minival_keys)
        assert sorted(bad) == sorted(Path(b["source"]).stem for b in manifest.bad_files)
        data = (dataset / KEYS).read_bytes()
        assert data == keys_document(splits, bad)  # streamed by `write_keys`, the bytes of the one-shot document
        assert manifest.keys == {"path": KEYS, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_restaging_the_grown_source_reuses_the_incremental_version(grown: Grown) -> None:
    before = _mtimes(grown.root, "*")
    logs: list[str] = []
    assert _stage(grown.tree, grown.root, log=logs.append) == grown.new
    assert "already staged" in logs[0]
    assert {k: v for k, v in _mtimes(grown.root, "*").items() if k != LATEST} == {
        k: v for k, v in before.items() if k != LATEST}


def test_full_stage_of_the_grown_source_has_no_base(grown: Grown, tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    shutil.copytree(grown.root, root)
    full = _stage(grown.tree, root, base_version=None)
    assert full.name not in (grown.old.name, grown.new.name)
    assert _manifest(full).base_version is None
    for split in SPLITS:  # the same images, staged afresh
        assert sum(_manifest(full).splits[split].per_class.values()) == \
               _manifest(full).splits[split].samples
    assert sorted(k for s in SPLITS for k in _all_keys(full, TIERS[0])[s]) == \
           sorted(k for s in SPLITS for k in _all_keys(grown.new, TIERS[0])[s])


def test_a_source_that_lost_images_is_staged_in_full(grown: Grown, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(grown.tree, tree)
    root = tmp_path / "datasets"
    base = _stage(tree, root)
    gone = sorted((tree / "train").glob("*/*.JPEG"))[3]
    gone.unlink()
    logs: list[str] = []
    other = _stage(tree, root, log=logs.append)
    assert _manifest(other).base_version is None
    assert any("staging in full" in line and gone.stem in line for line in logs)
    with pytest.raises(ValueError, match=rf"cannot stage incrementally from {base.name}: .*{gone.stem}"):
        _stage(tree, root, base_version=base.name)


def test_a_class_tar_that_lost_images_is_an_error() -> None:
    manifest = Manifest(format=1, version="v1", classes=("n00000001",), num_classes=1, splits={}, minival_keys=(),
                        tiers=(64,), shards=(), bad_files=(), images_seen=2, source={}, params={}, code_version="")
    base = BaseVersion("v1", manifest, {"train": {"n00000001_1": "n00000001", "n00000001_2": "n00000001"},
                                                "minival": {}, "val": {}}, {})
    whole = UnitResult("train-n00000001", "train", 0, (), skipped=2)
    check_base_seen([whole], base)
    with pytest.raises(StagingError, match="n00000001: the source holds 1 of the 2 images.*v1"):
        check_base_seen([dataclasses.replace(whole, skipped=1)], base)


def test_an_unknown_base_version_is_an_error(staged_dataset: Path, demo_archives: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="imagenet-nothere: base version is not a finished"):
        _stage(demo_archives, tmp_path, base_version="imagenet-nothere")


# --------------------------------------------------------------------------------------------- progress, workers


def test_progress_reports_every_unit_and_shard(demo_archives: Path, tmp_path: Path) -> None:
    events: list[tuple[str, int, int]] = []
    logs: list[str] = []
    dest = _stage(demo_archives, tmp_path, progress=lambda *e: events.append(e), log=logs.append)
    units = len(list((work_of(dest, STAGE_PARAMS) / "units").glob("*.tar")))
    shards = len(_manifest(dest).shards)
    for phase, total in (("units", units), ("shards", shards)):
        seen = [(d, t) for p, d, t in events if p == phase]
        assert seen == [(i, total) for i in range(total + 1)], phase
        assert f"{phase} {total}/{total}, ETA 0 s" in logs


def test_thread_map_keeps_order_and_stops_at_the_first_error() -> None:
    assert thread_map(2)(lambda x: x * x, [(i,) for i in range(20)]) == [i * i for i in range(20)]

    def fail_on_3(x: int) -> int:
        if x == 3:
            raise ValueError("bad unit 3")
        return x

    with pytest.raises(ValueError, match="bad unit 3"):
        thread_map(2)(fail_on_3, [(i,) for i in range(6)])


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(demo_archives: Path, tmp_path: Path, kind: str) -> None:
    from pipelines.source.imagenet import ImageNetSourceError

    source, name = damaged_source(demo_archives, tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ImageNetSourceError, match=name.replace(".", r"\.")):
        _stage(source, out)
    assert not out.exists()


def test_a_corrupt_class_tar_fails_when_the_archive_is_indexed(demo_archives: Path, tmp_path: Path) -> None:
    from pipelines.source.imagenet import ImageNetSourceError

    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    train = source / "ILSVRC2012_img_train.tar"
    victim = damage_class_tar(train, 2)  # the class tar's first header; the outer tar's headers stay whole
    out = tmp_path / "out"
    with pytest.raises(ImageNetSourceError, match=rf"{victim.name} in .*{train.name}: corrupt"):
        _stage(source, out)
    assert not out.exists()  # before anything was written, not when the unit's turn came


def test_a_class_tar_damaged_inside_fails_mid_run_at_once_and_finishes_nothing(
    demo_archives: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.source.imagenet import ImageNetSourceError

    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    train = source / "ILSVRC2012_img_train.tar"
    victim = damage_class_tar(train, 1, member=3)  # a later header: found only when the unit reads it
    probe = ConcurrencyProbe(process_unit)
    monkeypatch.setattr(runners, "process_unit", probe)
    out = tmp_path / "out"
    with pytest.raises(ImageNetSourceError, match=rf"{victim.name} in .*{train.name}: corrupt.*bad member header"):
        # More mapper threads than workers, as the flow's task runner has: the others must not go on.
        _stage(source, out, map_units=thread_map(4), workers=1)
    assert probe.failed_at is not None and probe.started_after_failure() == 0
    assert len(probe.starts) < 5  # 4 class units + 1 val unit: the run ended at the bad one
    assert not (out / LATEST).exists()
    assert not list(out.rglob(MANIFEST)) and not list(out.rglob("*.tmp"))
    # What finished is kept for a rerun; no version folder was started.
    assert [p.name for p in out.iterdir()] == [WORK]


def test_an_archive_fingerprint_is_remembered_until_an_archive_changes(
    demo_archives: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.source import imagenet

    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    dest = _stage(source, tmp_path / "out")
    real = imagenet.ImageNetSource.fingerprint

    def hashing_again(self: imagenet.ImageNetSource) -> dict:
        raise AssertionError("the archives were hashed again")

    monkeypatch.setattr(imagenet.ImageNetSource, "fingerprint", hashing_again)
    assert _stage(source, tmp_path / "out") == dest  # a quick no-op: no 145 GB to hash on ImageNet
    val = source / "ILSVRC2012_img_val.tar"
    os.utime(val, ns=(val.stat().st_atime_ns, val.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="hashed again"):
        _stage(source, tmp_path / "out")
    monkeypatch.setattr(imagenet.ImageNetSource, "fingerprint", real)
    assert _stage(source, tmp_path / "out") == dest  # same bytes, same version
