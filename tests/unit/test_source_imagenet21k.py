"""ImageNet-21k as released (a tar of per-synset tars, plain or gzipped): staged with a val held out per synset,
every image once with its WNID's label, the gzipped stream read in shares; damaged tars are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.dataset import read_keys, read_manifest
from pipelines.source import detect_source_kind, open_source
from pipelines.source.records import SourceError
from pipelines.source.samples.imagenet21k import write_imagenet21k
from pipelines.staging.params import StageParams

from helpers import read_samples, stage_directly

WNIDS = ("n01440764", "n01443537", "n09999001", "n09999002", "n09999003")
COUNTS = (12, 9, 14, 4, 10)  # the 4-image synset keeps half for train
PARAMS = StageParams(tiers=(32,), shard_size=16, minival=0, seed=0)


def _labels_by_key(dest: Path) -> dict[str, tuple[str, int]]:
    import json

    out = {}
    for split in ("train", "minival", "val"):
        for key, sample in read_samples(dest, split, 32).items():
            out[key] = (json.loads(sample["json"])["wnid"], int(sample["cls"]))
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_whole_tar_is_staged_with_a_val_held_out_per_synset(tmp_path: Path, gz: bool) -> None:
    release = write_imagenet21k(tmp_path / "src", WNIDS, per_class=COUNTS, gz=gz)
    assert detect_source_kind(release.path.parent) == "imagenet21k"
    src = open_source(release.path.parent, val_per_class=3)
    assert src.val_per_class == 3 and src.num_val == 0
    assert src.classes == (() if gz else tuple(sorted(WNIDS)))
    dest = stage_directly(release.path.parent, tmp_path / "out", PARAMS)
    manifest = read_manifest(dest)
    assert dest.name.startswith("imagenet21k-") and manifest.source["dataset"] == "imagenet21k"
    assert manifest.classes == tuple(sorted(WNIDS))
    # The default hold-out (50) is capped at half a synset.
    assert manifest.splits["val"].per_class == {w: n // 2 for w, n in zip(WNIDS, COUNTS, strict=True)}
    labels = _labels_by_key(dest)
    assert len(labels) == sum(COUNTS)
    for key, (wnid, label) in labels.items():
        assert key.startswith(wnid + "_") and manifest.classes[label] == wnid


def test_plain_and_gzipped_releases_stage_the_same_samples(tmp_path: Path) -> None:
    plain = write_imagenet21k(tmp_path / "plain", WNIDS, per_class=COUNTS)
    packed = write_imagenet21k(tmp_path / "packed", WNIDS, per_class=COUNTS, gz=True)
    a = stage_directly(plain.path.parent, tmp_path / "out", PARAMS)
    b = stage_directly(packed.path.parent, tmp_path / "out", PARAMS)
    assert a != b
    assert read_keys(a) == read_keys(b)  # the same keys in the same splits, val included
    assert _labels_by_key(a) == _labels_by_key(b)


def test_a_damaged_release_is_one_line(tmp_path: Path) -> None:
    release = write_imagenet21k(tmp_path / "src", WNIDS, per_class=COUNTS, gz=True)
    data = release.path.read_bytes()
    release.path.write_bytes(data[: len(data) // 2])
    src = open_source(release.path.parent)
    with pytest.raises(SourceError, match="winter21_whole.tar.gz: corrupt or truncated"):
        list(src.iter_train())
    plain = write_imagenet21k(tmp_path / "plain", WNIDS, per_class=COUNTS)
    raw = bytearray(plain.path.read_bytes())
    raw[512:612] = b"x" * 100  # the first synset tar's first header (the outer header is the first 512 bytes)
    plain.path.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="fall11_whole.tar"):
        list(open_source(plain.path.parent).iter_train())
