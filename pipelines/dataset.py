"""The staged-version contract: what a dataset version holds, under which names, and how to read it.

A datasets root holds versions (`imagenet-<hash>/`), `LATEST` (the name of the version the last finished staging
run staged or found) and staging's `work/` folder. A version holds:

- `<tier>/<split>-NNNNNN.tar`: WebDataset shards per resolution tier (the images' shorter side at most, in px)
  and split, each with a `.sha256` sidecar; a sample is `<key>.jpg`, `<key>.cls` (the label as ASCII digits)
  and `<key>.json` (its WNID and source file name);
- `manifest.json`, written last (a folder without one is an unfinished run, never a version): the classes, each
  split's counts, the tiers, every shard with its size and sha256, the bad files, the source's fingerprint and
  the staging parameters (`read_manifest` reads it as a `Manifest`, whose fields are its keys);
- `keys.json.gz`: every image key by split, and the bad files' keys, which a version staged on top of this one
  reads to know what is new;
- `<tier>/<split>-NNNNNN.idx` beside each shard: where each sample's members lie (offset and size), in the
  format of DALI's `wds2idx`, listed under the manifest's `indexes`; the wds and dali backends read samples by
  it. A version staged before indexes gets them written on first use (`ensure_index`);
- with the extra format `ffcv`, `<tier>/<split>.beton` (with a `.sha256` sidecar), listed under the manifest's
  `extra` (the `dali` format lists the shard indexes there again).

`pipelines.staging` writes versions; `pipelines.loading` and training read them, and `effnet verify` checks one
against its manifest (`check_version`).
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pipelines.atomic import atomic_write_bytes, sha256_file
from pipelines.settings import StackError

TRAIN_SPLITS = ("train",)  # trained on: random crops at any scale, a fresh order every epoch

EVAL_SPLITS = ("minival", "val")  # evaluated: the centre crop, every sample once

SPLITS = TRAIN_SPLITS + EVAL_SPLITS  # minival is held out of the source's train images, val is the source's val

MANIFEST = "manifest.json"

KEYS = "keys.json.gz"  # in each version: every image key by split (with its WNID) and the bad files' keys

LATEST = "LATEST"  # under a datasets root: the name of the most recently staged version

MANIFEST_FORMAT = 1

SHARD_SUFFIX = ".tar"

# A shard sample's members, by extension: the JPEG, the label as ASCII digits, and its WNID and source file name.
IMAGE_EXT, LABEL_EXT, META_EXT = "jpg", "cls", "json"

EXTENSIONS = (IMAGE_EXT, LABEL_EXT)  # the members the loaders read

# Extra formats staged beside the shards on request, each listed under its name in the manifest's `extra`.
FFCV, DALI = "ffcv", "dali"

EXTRA_FORMATS = (FFCV, DALI)
# The loader backends: the WebDataset shards every version holds, or an extra format's files. Written as a type
# (a recipe's `data.backend`: mypy reads a Literal only off the values written in it), the tuple taken from it.
Backend = Literal["wds", "ffcv", "dali"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)

BETON_SUFFIX = ".beton"

INDEX_VERSION = "v1.2"  # the version `wds2idx` in DALI 2.x writes: components carry their member name

INDEX_SUFFIX = ".idx"


def shard_relpath(tier: int, split: str, index: int) -> str:
    """A shard's path inside its version: `256/train-000012.tar`."""
    return f"{tier}/{split}-{index:06d}{SHARD_SUFFIX}"


def beton_relpath(tier: int, split: str) -> str:
    """A split's FFCV file inside its version: `256/train.beton`."""
    return f"{tier}/{split}{BETON_SUFFIX}"


def index_path(shard: Path) -> Path:
    """Where a shard's DALI index lives: `train-000000.tar` -> `train-000000.idx` (what `wds2idx` names it)."""
    return shard.with_suffix(INDEX_SUFFIX)


def index_component(ext: str, offset: int, size: int, name: str) -> str:
    """One member of a sample in an index line: `<ext> <data offset> <size> <member name>`."""
    return f"{ext} {offset} {size} {name}"


def index_text(lines: list[str]) -> str:
    """A DALI index file: the header (version, number of samples), then one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def keys_document(splits: dict[str, dict[str, str]], bad: dict[str, list[str]]) -> bytes:
    """The bytes of a keys file (what `read_keys` reads back)."""
    doc = {"format": 1, "splits": {s: splits[s] for s in SPLITS}, "bad": bad}
    # Sorted, and gzip with mtime=0 and no file name: the same keys give the same bytes.
    return gzip.compress(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


def read_keys(dataset_dir: str | os.PathLike[str]) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """(split -> key -> wnid, bad key -> [source split, wnid]) of a staged version, from its keys file."""
    path = Path(dataset_dir) / KEYS
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (the version was staged by older code)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: corrupt keys file: {exc}") from None
    return {s: doc["splits"][s] for s in SPLITS}, doc["bad"]


def mark_latest(root: str | os.PathLike[str], version: str) -> None:
    """Make a finished version the one `latest_version` returns."""
    if not (Path(root) / version / MANIFEST).is_file():
        raise DataError(f"{Path(root) / version}: not a finished version (no {MANIFEST})")
    atomic_write_bytes(Path(root) / LATEST, (version + "\n").encode())


def latest_version(out: str | os.PathLike[str]) -> Path:
    """The most recently staged version under a datasets root."""
    marker = Path(out) / LATEST
    if not marker.exists():
        raise FileNotFoundError(f"{out}: no staged dataset (no {LATEST} file); run `effnet stage` first")
    return Path(out) / marker.read_text().strip()


# One file a manifest lists: its `path` inside the version and, where recorded, `bytes` and `sha256`; a shard also
# its `split`, `tier` and `samples`, a shard index its `shard`, an FFCV file its `split`, `tier` and `samples`.
FileEntry = dict[str, Any]


@dataclass(frozen=True)
class SplitCounts:
    """One split of a version: the images it holds, in all and per class (WNID -> images)."""

    samples: int
    per_class: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    """A staged version's `manifest.json`, typed: one field per key of the file, named as the key.

    `read_manifest` reads one; staging builds one (`staging.versions.build_manifest`) and writes `to_dict()`, the
    JSON object the file has always held, so its bytes and `manifest_hash` are unchanged. The file's lists are
    tuples here; the files it lists stay dicts (`FileEntry`). The keys that versions staged by older code lack
    (`base_version`, `encoding`, `keys`, `indexes`, `extra`) read as None or empty.
    """

    format: int  # MANIFEST_FORMAT
    version: str  # the version's name, `<dataset>-<hash>` (`imagenet-...`, `cifar100-...`)
    classes: tuple[str, ...]  # the class ids (ImageNet: the sorted WNIDs): a label is an index into them
    num_classes: int
    splits: dict[str, SplitCounts]  # by split name (SPLITS)
    minival_keys: tuple[str, ...]  # the keys held out of the source's train images, sorted
    tiers: tuple[int, ...]  # the resolution tiers staged (the images' shorter side at most, in px)
    shards: tuple[FileEntry, ...]  # the WebDataset shards, a base version's included
    bad_files: tuple[dict[str, str], ...]  # the source files that did not decode: `source`, `split`, `wnid`, `reason`
    images_seen: int  # the source's images staging read, bad files and a base version's included
    # The source's `kind`, `fingerprint`, `dataset`, its own split definition (`splits`) and, where it names its
    # classes, `class_names` (in label order); versions staged before these were recorded hold kind and fingerprint.
    source: dict[str, Any]
    params: dict[str, Any]  # the StageParams, as JSON
    code_version: str  # the code that staged it
    base_version: str | None = None  # the version this one was staged on top of
    encoding: int | None = None  # staging's ENCODING
    keys: FileEntry | None = None  # the keys file (KEYS)
    indexes: tuple[FileEntry, ...] = ()  # the index beside every shard (each names its `shard`)
    extra: dict[str, tuple[FileEntry, ...]] = field(default_factory=dict)  # extra format -> its files

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Manifest:
        """The manifest of a parsed `manifest.json`; ValueError when a key is missing or has another shape."""
        try:
            return cls(
                format=doc["format"],
                version=doc["version"],
                classes=tuple(doc["classes"]),
                num_classes=doc["num_classes"],
                splits={s: SplitCounts(c["samples"], c["per_class"]) for s, c in doc["splits"].items()},
                minival_keys=tuple(doc["minival_keys"]),
                tiers=tuple(doc["tiers"]),
                shards=tuple(doc["shards"]),
                bad_files=tuple(doc["bad_files"]),
                images_seen=doc["images_seen"],
                source=doc["source"],
                params=doc["params"],
                code_version=doc["code_version"],
                base_version=doc.get("base_version"),
                encoding=doc.get("encoding"),
                keys=doc.get("keys"),
                indexes=tuple(doc.get("indexes", ())),
                extra={fmt: tuple(entries) for fmt, entries in doc.get("extra", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a staged version's manifest ({type(exc).__name__}: {exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `manifest.json` (every key; lists where the fields hold tuples)."""
        return {
            "format": self.format,
            "version": self.version,
            "base_version": self.base_version,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "splits": {s: {"samples": c.samples, "per_class": c.per_class} for s, c in self.splits.items()},
            "minival_keys": list(self.minival_keys),
            "tiers": list(self.tiers),
            "shards": list(self.shards),
            "bad_files": list(self.bad_files),
            "images_seen": self.images_seen,
            "source": self.source,
            "params": self.params,
            "encoding": self.encoding,
            "code_version": self.code_version,
            "keys": self.keys,
            "indexes": list(self.indexes),
            "extra": {fmt: list(entries) for fmt, entries in self.extra.items()},
        }


def read_manifest(dataset_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a staged dataset version, with a clear error when there is none."""
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no staged dataset here (run `effnet stage` first)")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ValueError(f"{path}: corrupt manifest: {exc}") from None


def version_files(manifest: Manifest) -> list[FileEntry]:
    """Every file a version's manifest lists (shards, keys, shard indexes, FFCV/DALI extras), each with its `path`
    and, where recorded, `bytes` and `sha256`. A version staged before shard indexes has no `indexes`."""
    extras = [e for entries in manifest.extra.values() for e in entries]
    keys = [manifest.keys] if manifest.keys else []
    return [*manifest.shards, *keys, *manifest.indexes, *extras]


def damaged_files(dataset_dir: str | os.PathLike[str], checksums: bool = False) -> list[str]:
    """What is wrong with a staged version's files against its manifest: missing files and wrong sizes (a stat
    each), and with `checksums` every recorded sha256 (reads every byte). Empty when the version is whole."""
    root = Path(dataset_dir)
    problems = []
    for entry in version_files(read_manifest(root)):
        path = root / entry["path"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry['path']} is missing")
            continue
        if "bytes" in entry and size != entry["bytes"]:
            problems.append(f"{entry['path']} has {size} bytes, the manifest says {entry['bytes']}")
        elif checksums and "sha256" in entry and sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256")
    return problems


def check_version(dataset_dir: str | os.PathLike[str], checksums: bool = False) -> None:
    """Raise DataError naming the damaged files of a staged version and how to stage it again."""
    problems = damaged_files(dataset_dir, checksums)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(
            f"{dataset_dir}: the staged version is damaged ({shown}); remove {dataset_dir} and run `effnet stage` "
            "again with the same source and options (finished spools in work/ are reused)"
        )


def manifest_hash(dataset_dir: str | os.PathLike[str]) -> str:
    return sha256_file(Path(dataset_dir) / MANIFEST)


class DataError(RuntimeError):
    """A staged version is missing, damaged or unreadable (staging's own failures are a kind of it)."""


# What every entry point (the command line, a flow, a Ray job's driver) reports in one line, without a traceback:
# the input it was given is wrong (a parameter, a recipe, a path, a damaged dataset, a stack that does not answer,
# a cluster that cannot hold the job: the errors of these kinds subclass one of them).
BAD_INPUT: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, DataError, StackError)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int


def select_tier(tiers: Sequence[int], resolution: int, crop_ratio: float | None = None) -> int:
    """Smallest staged tier whose images still serve `resolution` (eval needs resolution / crop_ratio)."""
    need = resolution / crop_ratio if crop_ratio else resolution
    fitting = [t for t in sorted(tiers) if t >= need]
    return fitting[0] if fitting else max(tiers)


def split_tier(manifest: Manifest, split: str, resolution: int, crop_ratio: float) -> tuple[bool, int]:
    """(whether `split` is trained on, the staged tier that serves it at `resolution`): training crops at any
    scale, evaluation needs the resize before the centre crop (resolution / crop_ratio)."""
    train = split in TRAIN_SPLITS
    return train, select_tier(manifest.tiers, resolution, None if train else crop_ratio)


def split_shards(dataset_dir: Path, manifest: Manifest, split: str, tier: int) -> list[ShardInfo]:
    shards = [
        ShardInfo(dataset_dir / s["path"], s["samples"])
        for s in manifest.shards
        if s["split"] == split and s["tier"] == tier
    ]
    for s in shards:
        if not s.path.exists():
            raise DataError(f"{s.path}: shard listed in the manifest is missing")
    return sorted(shards, key=lambda s: s.path.name)


def index_lines(shard: Path) -> list[str]:
    """One line per sample of a WebDataset tar: `<ext> <data offset> <size> <member name>` per member."""
    samples: list[list[str]] = []
    last = None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base, ext = _split_name(member.name)
                if not base or base.endswith("/"):
                    continue  # as wds2idx: hidden files are not samples
                component = index_component(ext, member.offset_data, member.size, member.name)
                if base != last:
                    samples.append([])
                    last = base
                samples[-1].append(component)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{shard}: unreadable shard, cannot index it ({exc})") from exc
    return [" ".join(components) for components in samples]


def _split_name(name: str) -> tuple[str, str]:
    """`dir/key.a.b` -> (`dir/key`, `a.b`): the extension starts at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def read_index(path: Path) -> list[str]:
    """The sample lines of an index file, checked against its header."""
    if not path.exists():
        raise DataError(
            f"{path}: shard index missing (a version staged before indexes were written: `ensure_index` adds it)"
        )
    head, *lines = path.read_text().splitlines()
    version, _, count = head.partition(" ")
    if version != INDEX_VERSION or not count.isdigit() or int(count) != len(lines):
        raise DataError(f"{path}: not a {INDEX_VERSION} index of {count or '?'} samples (damaged?)")
    return lines


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample's members lie in its shard: extension -> (data offset, size) in bytes."""

    key: str
    members: dict[str, tuple[int, int]]


def parse_index_line(line: str) -> SampleSpan:
    """One index line (`<ext> <offset> <size> <member name>` per member) as a SampleSpan."""
    fields = line.split(" ")
    if not fields or len(fields) % 4:
        raise DataError(f"not a shard index line: {line[:80]!r}")
    members, key = {}, ""
    for i in range(0, len(fields), 4):
        ext, offset, size, name = fields[i : i + 4]
        key = _split_name(name)[0]
        members[ext] = (int(offset), int(size))
    return SampleSpan(key, members)


def ensure_index(shard: Path) -> Path:
    """The shard's index file, written from its tar headers on first use when the version was staged before
    every shard got one (the same bytes whoever writes it, so concurrent readers may race harmlessly)."""
    path = index_path(shard)
    if path.exists():
        return path
    try:
        atomic_write_bytes(path, index_text(index_lines(shard)).encode(), durable=False)
    except OSError as exc:
        raise DataError(
            f"{shard}: no shard index and none can be written beside it ({exc}); make the folder "
            "writable once, or stage the version again"
        ) from exc
    return path


def shard_index(shard: ShardInfo) -> list[str]:
    """A shard's index lines, one per sample in stored order (checked against the manifest); `parse_index_line`
    reads one, so a reader parses only the samples it wants."""
    lines = read_index(ensure_index(shard.path))
    if len(lines) != shard.samples:
        raise DataError(f"{index_path(shard.path)}: {len(lines)} samples, the manifest says {shard.samples}")
    return lines
