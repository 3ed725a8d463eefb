"""Versions: their names, finding finished ones, the base a grown source is staged on, and what a version records.

A version is named by a content address (`dataset_version`: the source's fingerprint, StageParams, ENCODING,
SHARD_LAYOUT and the base version), so the same inputs stage the same version and a rerun finds it
(`find_staged`). A source that grew since an earlier version is staged incrementally on top of it
(`resolve_base`): the new version keeps every image of the base in its split and shards and adds the new ones.
`write_keys` and `write_manifest` record a finished version (the manifest last: it is what makes the folder a
version); `build_manifest` says what the manifest holds.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import struct
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import atomic_open, atomic_write_json
from pipelines.dataset import (
    KEYS,
    MANIFEST,
    MANIFEST_FORMAT,
    SPLITS,
    FileEntry,
    Manifest,
    SplitCounts,
    read_keys,
    read_manifest,
)
from pipelines.hashing import content_hash
from pipelines.settings import PROJECT_ROOT
from pipelines.source.records import GROWING_KINDS, Source
from pipelines.staging.catalog import Catalog
from pipelines.staging.params import AUTO, ENCODING, SHARD_LAYOUT, WORK, StageParams, StagingError
from pipelines.staging.plan import BaseVersion, DatasetPlan
from pipelines.staging.spools import UnitResult


def finished_versions(root: Path) -> list[tuple[str, Manifest]]:
    """(name, manifest) of every finished version under a datasets root, oldest first.

    A folder without a manifest is an unfinished run, never a version; one whose manifest does not read is skipped.
    """
    found = []
    if not root.is_dir():
        return []
    for d in root.iterdir():
        path = d / MANIFEST
        if d.name == WORK or not path.is_file():
            continue
        try:
            found.append((path.stat().st_mtime_ns, d.name, read_manifest(d)))
        except (OSError, ValueError):
            continue
    return [(name, m) for _, name, m in sorted(found, key=lambda f: (f[0], f[1]))]


def _params_record(params: StageParams) -> dict[str, Any]:
    """StageParams as a manifest records them (JSON: lists for tuples)."""
    return json.loads(json.dumps(asdict(params)))


def _same_params(manifest: Manifest, params: StageParams) -> bool:
    return manifest.params == _params_record(params) and manifest.encoding == ENCODING


def find_staged(
    root: Path,
    fingerprint: dict[str, Any],
    params: StageParams,
    base_version: str | None = AUTO,
    dataset: str = "imagenet",
) -> Path | None:
    """A finished version of exactly this source and these parameters, if any: staged in full, on top of
    `base_version`, or (AUTO) either way."""
    named = dataset_version(fingerprint, params, None if base_version == AUTO else base_version, dataset)
    if (root / named / MANIFEST).is_file():
        return root / named
    if base_version != AUTO:
        return None
    for name, manifest in reversed(finished_versions(root)):
        if manifest.source.get("fingerprint") == fingerprint and _same_params(manifest, params):
            return root / name
    return None


def _source_keys(src: Source) -> dict[str, dict[str, str] | None]:
    """Source split ('train', 'val') -> key -> wnid where the source lists its files without reading them
    (trees; val of archives). None for the train split of archives: a class tar must be read to list it. A
    source that holds its val out of train lists both under 'train'."""
    train = None
    if src.listed:
        train = {u.key(n): u.wnid for u in src.train_units() for n in u.names}  # type: ignore[attr-defined]
    if src.val_per_class:
        return {"train": train}
    return {"train": train, "val": {e.key: e.wnid for e in src.val_entries()}}


def _base_problem(base: BaseVersion, src: Source, params: StageParams) -> str | None:
    """Why `base` cannot be grown into this source, or None."""
    if src.kind not in GROWING_KINDS:
        return f"a {src.dataset} source is a fixed release, staged whole"
    if base.manifest.source.get("dataset", "imagenet") != src.dataset:
        return "it is another dataset's version"
    if base.manifest.classes != tuple(src.classes):
        return "its classes differ from the source's"
    if not _same_params(base.manifest, params):
        return "it was staged with other parameters"
    if params.formats:
        return f"extra formats ({', '.join(params.formats)}) are written whole, not incrementally"
    for split, listed in _source_keys(src).items():
        if listed is None:
            continue  # class tars: checked while reading (the units count the base images they saw)
        known = base.known(split, carved=bool(src.val_per_class))
        missing = sorted(k for k, wnid in known.items() if listed.get(k) != wnid)
        if missing:
            return f"{len(missing)} of its {split} images are not in the source with the same class (e.g. {missing[0]})"
    return None


def resolve_base(
    root: Path,
    base_version: str | None,
    src: Source,
    params: StageParams,
    log: Callable[..., None],
) -> BaseVersion | None:
    """The version to grow from: `base_version` by name, the latest compatible one for AUTO, or None (always
    for a fixed release: CIFAR, Flowers... are staged whole)."""
    if base_version is None or (base_version == AUTO and src.kind not in GROWING_KINDS):
        return None
    if base_version != AUTO:
        if not (root / base_version / MANIFEST).is_file():
            raise ValueError(f"{root / base_version}: base version is not a finished staged dataset")
        base = _load_base(root / base_version)
        problem = _base_problem(base, src, params)
        if problem:
            raise ValueError(f"cannot stage incrementally from {base_version}: {problem}")
        return base
    reasons = []
    for name, manifest in reversed(finished_versions(root)):
        if manifest.classes != tuple(src.classes) or not _same_params(manifest, params):
            continue  # another dataset, or other parameters: not a candidate
        if not (root / name / KEYS).is_file():
            continue
        base = _load_base(root / name)
        problem = _base_problem(base, src, params)
        if problem is None:
            return base
        reasons.append(f"{name}: {problem}")
    if reasons:
        log(f"staging in full: no earlier version is a subset of the source ({'; '.join(reasons[:3])})")
    return None


def _load_base(dataset_dir: Path) -> BaseVersion:
    splits, bad = read_keys(dataset_dir)
    return BaseVersion(dataset_dir.name, read_manifest(dataset_dir), splits, bad)


def check_base_seen(units: Sequence[UnitResult], base: BaseVersion) -> None:
    """Each class tar, read whole, must have held every image its class has in the base (the source only grew)."""
    known = base.known_by_class("train")
    for unit in units:
        if unit.split != "train":
            continue
        wnid = unit.unit_id.removeprefix("train-")
        if unit.skipped != len(known.get(wnid, ())):
            raise StagingError(
                f"class {wnid}: the source holds {unit.skipped} of the {len(known.get(wnid, ()))} images that "
                f"base version {base.name} has: the source did not only grow, so stage it in full (--full)"
            )


def dataset_version(
    fingerprint: dict[str, Any], params: StageParams, base_version: str | None = None, dataset: str = "imagenet"
) -> str:
    """A content address named after its dataset (`cifar100-<hash>`): the same source staged with the same
    parameters (from the same base) by code that cuts the same shards is the same version."""
    inputs: dict[str, Any] = {
        "source": fingerprint,
        "params": asdict(params),
        "encoding": ENCODING,
        "shard_layout": SHARD_LAYOUT,
    }
    if base_version is not None:
        inputs["base_version"] = base_version
    return f"{dataset}-{content_hash(inputs, 12)}"


def build_manifest(
    plan: DatasetPlan,
    shards: Sequence[FileEntry],
    params: StageParams,
    fingerprint: dict[str, Any],
    source: dict[str, Any],
    version: str,
    code_version: str,
    *,
    keys: FileEntry,
    indexes: Sequence[FileEntry],
    extra: Mapping[str, Sequence[FileEntry]],
) -> Manifest:
    """The manifest of a version: its own shards and, for an incremental version, the base's too, with the keys
    file, the shard indexes and the extra formats' files."""
    base = plan.base
    counts: dict[str, dict[str, int]] = {}
    samples: dict[str, int] = {}
    catalog = plan.catalog
    for split, rows in plan.splits.items():
        per_class: dict[str, int] = defaultdict(int)
        if base is not None:
            for wnid, n in base.manifest.splits[split].per_class.items():
                per_class[wnid] += n
        ids, numbers = np.unique(catalog.wnid_ids[rows], return_counts=True)
        for i, n in zip(ids.tolist(), numbers.tolist()):
            per_class[catalog.wnids[i]] += n
        counts[split] = dict(sorted(per_class.items()))
        samples[split] = len(rows) + (base.manifest.splits[split].samples if base is not None else 0)
    minival = set(catalog.key_list(plan.splits["minival"]))
    minival |= set(base.manifest.minival_keys) if base is not None else set()
    bad = [*plan.bad, *(base.manifest.bad_files if base is not None else ())]
    return Manifest(
        format=MANIFEST_FORMAT,
        version=version,
        base_version=base.name if base is not None else None,
        classes=tuple(plan.classes),
        num_classes=len(plan.classes),
        splits={s: SplitCounts(samples[s], counts[s]) for s in plan.splits},
        minival_keys=tuple(sorted(minival)),
        tiers=tuple(params.tiers),
        shards=tuple(sorted(shards, key=lambda s: (s["tier"], s["split"], s["path"]))),
        bad_files=tuple(sorted(bad, key=lambda b: (b["source"], b["split"]))),
        images_seen=plan.total_seen,
        source={**source, "fingerprint": fingerprint},
        params=_params_record(params),
        encoding=ENCODING,
        code_version=code_version,
        keys=keys,
        indexes=tuple(indexes),
        extra={fmt: tuple(entries) for fmt, entries in extra.items()},
    )


def write_keys(dest: Path, plan: DatasetPlan) -> FileEntry:
    """Write the version's keys file (the base's images and the new ones); return its manifest entry.

    The bytes are `dataset.keys_document`'s for the same keys (the tests hold them to it), written as they are
    made: the one-shot document would need a dict of every key and the whole JSON text (~150 bytes an image).
    """
    base = plan.base
    bad = dict(base.bad) if base else {}
    bad.update((Path(b["source"]).stem, [b["split"], b["wnid"]]) for b in plan.bad)
    with atomic_open(dest / KEYS) as f:
        out = _GzipWriter(f)
        # json.dumps(doc, sort_keys=True, separators=(",", ":")) of keys_document's doc, piece by piece.
        out.write(f'{{"bad":{json.dumps(bad, sort_keys=True, separators=(",", ":"))},"format":1,"splits":{{')
        for i, split in enumerate(sorted(SPLITS)):
            out.write(f"{',' if i else ''}{_json_str(split)}:{{")
            pairs = _sorted_pairs(plan, split)
            first = True
            while chunk := list(islice(pairs, _KEYS_CHUNK)):
                out.write(("" if first else ",") + ",".join(f"{_json_str(k)}:{_json_str(w)}" for k, w in chunk))
                first = False
            out.write("}")
        out.write("}}")
        out.close()
    return {"path": KEYS, "bytes": out.size, "sha256": out.sha256.hexdigest()}


_KEYS_CHUNK = 1 << 11  # keys file entries encoded at a time (a few hundred KB of Python strings)


_json_str = json.encoder.encode_basestring_ascii  # how json.dumps writes a str (ensure_ascii)


def _sorted_pairs(plan: DatasetPlan, split: str) -> Iterator[tuple[str, str]]:
    """(key, wnid) of a split's images, the base's and the new ones, sorted by key (a new image's wins a tie, as
    the dict update in keys_document's callers did)."""
    catalog = plan.catalog
    in_split = np.zeros(len(catalog), bool)
    in_split[plan.splits[split]] = True
    by_key = catalog.key_order()
    new = _catalog_pairs(catalog, by_key[in_split[by_key]])
    old_keys = plan.base.splits[split] if plan.base is not None else {}
    old = ((key, 0, old_keys[key]) for key in sorted(old_keys))
    pending: tuple[str, int, str] | None = None
    for item in heapq.merge(old, new):  # by key, then the base's first: the last of a key is the one kept
        if pending is not None and pending[0] != item[0]:
            yield pending[0], pending[2]
        pending = item
    if pending is not None:
        yield pending[0], pending[2]


def _catalog_pairs(catalog: Catalog, rows: np.ndarray) -> Iterator[tuple[str, int, str]]:
    """(key, 1, wnid) of `rows`, made a chunk at a time."""
    for start in range(0, len(rows), _KEYS_CHUNK):
        chunk = rows[start : start + _KEYS_CHUNK]
        for key, wnid in zip(catalog.key_list(chunk), catalog.wnid_ids[chunk].tolist()):
            yield key, 1, catalog.wnids[wnid]


class _GzipWriter:
    """Text to a file as `gzip.compress(data, 6, mtime=0)` would give it, compressed as it comes; counts and hashes
    what it writes. The header is that of an empty document (so it is this Python's, whatever its version); the
    deflate stream of data given piecewise is the one-shot stream; the trailer is the CRC and the length."""

    def __init__(self, f: Any) -> None:
        self._f, self.size, self.sha256 = f, 0, hashlib.sha256()
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._crc = self._length = 0
        self._put(gzip.compress(b"", compresslevel=6, mtime=0)[:_GZIP_HEADER])

    def _put(self, data: bytes) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def write(self, text: str) -> None:
        data = text.encode()
        self._crc, self._length = zlib.crc32(data, self._crc), self._length + len(data)
        self._put(self._deflate.compress(data))

    def close(self) -> None:
        self._put(self._deflate.flush())
        self._put(struct.pack("<LL", self._crc, self._length & 0xFFFFFFFF))


_GZIP_HEADER = 10  # bytes of a gzip header without a file name, comment or extra field


def write_manifest(out: Path, manifest: Manifest) -> Path:
    """Write a version's manifest (last: it is what makes the folder a version)."""
    path = out / MANIFEST
    atomic_write_json(path, manifest.to_dict())
    return path


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("effnet-family")
    except PackageNotFoundError:
        ver = "0+unknown"
    head = PROJECT_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{ver}+g{ref[:10]}"
    except OSError:
        return ver
