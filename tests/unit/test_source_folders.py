"""A plain class-folder tree (ImageFolder's layout): file names repeat across classes and splits, class names
hold spaces; without val/ or test/ a val is held out of each class; versions are named after the folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.dataset import read_keys, read_manifest
from pipelines.source import open_source
from pipelines.source.kinds import detect_source_kind
from pipelines.source.records import SourceError, safe_key
from pipelines.source.samples.folders import write_class_folders
from pipelines.staging.params import StageParams

from helpers import read_samples, stage_directly

PARAMS = StageParams(tiers=(32,), shard_size=8, minival=1, seed=0)


def test_safe_key_keeps_plain_names_and_separates_the_rest() -> None:
    assert safe_key("n01440764_10026") == "n01440764_10026"
    odd = ["a b", "a-b", "a\nb", "a.b", "a/b"]
    keys = [safe_key(k) for k in odd]
    assert len(set(keys)) == len(odd)
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_") for k in keys)


def test_repeated_file_names_are_staged_once_each_with_their_class(tmp_path: Path) -> None:
    tree = write_class_folders(tmp_path / "Flowers", num_classes=4, train_per_class=6, val_per_class=2)
    assert detect_source_kind(tree.root) == "folders"
    src = open_source(tree.root)
    assert src.dataset == "flowers"
    assert [src.class_words[c] for c in src.classes] == list(tree.classes)
    records = [*src.iter_train(), *src.iter_val()]
    assert len({r.key for r in records}) == len(records) == 4 * (6 + 2)
    for r in records:
        assert src.class_words[r.wnid] == tree.classes[r.label]

    dest = stage_directly(tree.root, tmp_path / "out", PARAMS)
    manifest = read_manifest(dest)
    assert dest.name.startswith("flowers-") and manifest.source["dataset"] == "flowers"
    assert manifest.source["class_names"] == list(tree.classes)
    assert manifest.source["splits"] == {"train": ["train"], "val": ["val"]}
    assert manifest.splits["val"].samples == 8
    assert manifest.splits["train"].samples + manifest.splits["minival"].samples == 24
    # Every staged sample carries the label of the folder its file came from.
    for split in ("train", "minival", "val"):
        for key, sample in read_samples(dest, split, 32).items():
            meta = json.loads(sample["json"])
            assert int(sample["cls"]) == manifest.classes.index(meta["wnid"])
            folder = key.split("_", 2)[1]
            assert src.class_words[meta["wnid"]].startswith(folder.split("-")[0].split(" ")[0])


def test_test_folder_is_the_val_split_and_names_with_spaces_are_safe(tmp_path: Path) -> None:
    tree = write_class_folders(tmp_path / "set", num_classes=5, train_per_class=4, val_per_class=1, val_name="test")
    src = open_source(tree.root)
    assert src.splits["val"] == ["test"] and src.num_val == 5
    assert all(" " not in c for c in src.classes)
    with pytest.raises(ValueError, match="own test split"):
        open_source(tree.root, val_per_class=3)


def test_a_tree_without_val_holds_out_val_per_class_and_grows(tmp_path: Path) -> None:
    tree = write_class_folders(tmp_path / "pets", num_classes=3, train_per_class=12, val_per_class=0)
    out = tmp_path / "out"
    src = open_source(tree.root, val_per_class=3)
    assert src.val_per_class == 3 and src.num_val == 0
    first = stage_directly(tree.root, out, PARAMS)  # the kind's default (50) is capped at half a class
    assert read_manifest(first).splits["val"].per_class == {c: 6 for c in src.classes}
    shutil.rmtree(out)

    params = PARAMS
    from pipelines.staging.stager import stage

    v1 = stage(tree.root, out, params, log=lambda *_: None, val_per_class=3)
    m1 = read_manifest(v1)
    assert m1.splits["val"].per_class == {c: 3 for c in src.classes}
    assert m1.source["fingerprint"]["val_per_class"] == 3
    # The same tree with another hold-out is another version; the same one is found again.
    assert stage(tree.root, out, params, log=lambda *_: None, val_per_class=3) == v1
    # Files added to a class: a version on top of v1 whose val keeps v1's images.
    extra = tree.root / "train" / tree.classes[0]
    for n in range(12, 16):
        shutil.copy(extra / "0.jpg", extra / f"{n}.jpg")
    v2 = stage(tree.root, out, params, log=lambda *_: None, val_per_class=3)
    m2 = read_manifest(v2)
    assert m2.base_version == v1.name
    old_val = set(read_keys(v1)[0]["val"])
    assert old_val <= set(read_keys(v2)[0]["val"])
    assert m2.splits["val"].samples == 9
    assert m2.splits["train"].samples + m2.splits["minival"].samples == 36 + 4 - 9


def test_not_a_dataset_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="class folder holds no images"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no dataset found"):
        open_source(tmp_path / "train" / "a")
