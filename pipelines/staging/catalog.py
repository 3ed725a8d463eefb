"""The catalog: every image of a plan by row number, in columns rather than a dict per image.

A unit's index (`spools`) holds a record per image: key, wnid, label, source name, where each tier's JPEG lies in
the unit's spool (or that the tier is the original, at its origin in the source) and the dataset's metadata. As
Python dicts they cost ~2 KB an image, and ImageNet-21k has ~14M images. `read_catalog` reads the indexes back
one unit at a time into columns of ~30 bytes an image plus its key plus 16 a tier (ImageNet-21k at three tiers:
~95): the keys as fixed-width bytes (numpy sorts them in the order Python sorts the str keys), numbers in arrays,
what repeats interned (wnids and their labels; origin archives, or a tree's folders; source-name suffixes such as
'.JPEG'), and what only some images have (an origin, metadata, a source name that is not the key + a suffix)
kept for those images alone. From then on a row names an image: the plan's splits and shards are arrays of rows,
and the shard, FFCV and keys writers read rows through the accessors here.
"""

from __future__ import annotations

import bisect
import json
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.staging.params import StagingError
from pipelines.staging.spools import UnitResult, unit_paths, unit_records

# At most this many distinct source-name suffixes are interned; a source whose names start with their key but end
# in ever new ways has the rest kept per image, rather than an entry per image in the table.
_MAX_SUFFIXES = 1024


# Keys compared at a time when looking for one that two images share: bounds the copy the comparison makes.
_DUPLICATE_CHUNK = 1 << 16


# What the narrow tier columns hold: a JPEG's sides are at most 65535 px (the format's limit, and every tier is a
# JPEG), and no JPEG of those sides comes near 4 GiB.
_MAX_SIDE, _MAX_SIZE = np.iinfo(np.uint16).max, np.iinfo(np.uint32).max


def _utf8(text: str) -> bytes:
    # surrogatepass: a tar member name's undecodable bytes reach the index as lone surrogates and must round-trip.
    return text.encode("utf-8", "surrogatepass")


def _str(data: bytes | bytearray) -> str:
    return data.decode("utf-8", "surrogatepass")


def _find(rows: np.ndarray, row: int) -> int | None:
    """Where `row` is in the ascending `rows` of a sparse column, or None."""
    i = int(np.searchsorted(rows, row))
    return i if i < len(rows) and rows[i] == row else None


@dataclass(eq=False)
class Catalog:
    """The images of a plan by row; a unit's rows are consecutive, in its index's order (see the module's doc)."""

    tiers: tuple[int, ...]
    keys: np.ndarray  # (rows,) UTF-8 bytes padded to the longest ('S<n>'; keys are file-safe: no NUL to lose)
    wnid_ids: np.ndarray  # (rows,) int32 into `wnids` and `wnid_labels` (the sources number their classes)
    suffix_ids: np.ndarray  # (rows,) int32: the source name is the key + `suffixes[id]`; -1: it is in `text`
    offsets: np.ndarray  # (rows, tiers) int64: where the tier's JPEG starts in the unit's spool; -1: at the origin
    sizes: np.ndarray  # (rows, tiers) uint32: its bytes
    dims: np.ndarray  # (rows, tiers, 2) uint16: its width and height
    # Only the images with metadata or a source name not by suffix: the metadata's JSON (empty for none), NUL, the
    # source name (empty where by suffix). `text_rows` ascending; `text_ends` where each one's text ends.
    text: bytearray
    text_rows: np.ndarray  # int32
    text_ends: np.ndarray  # int64
    # Only the images with a tier kept as the original: its file (`origins[id]`, followed by the source name where
    # `origin_named`: a tree's folder holds many files) and where in it. `origin_rows` ascending.
    origin_rows: np.ndarray  # int32
    origin_ids: np.ndarray  # int32
    origin_named: np.ndarray  # bool
    origin_offsets: np.ndarray  # int64
    wnids: list[str]
    wnid_labels: np.ndarray  # (wnids,) int32
    suffixes: list[str]
    origins: list[str]
    unit_ids: list[str]
    unit_splits: list[str]
    unit_starts: list[int]  # each unit's first row
    _key_order: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def column(self, tier: int) -> int:
        """The index of a tier in the tier columns (`offsets`, `sizes`, `dims`)."""
        return self.tiers.index(tier)

    def key(self, row: int) -> str:
        return _str(self.keys[row])

    def key_list(self, rows: np.ndarray) -> list[str]:
        return [_str(k) for k in self.keys[rows].tolist()]

    def wnid(self, row: int) -> str:
        return self.wnids[self.wnid_ids[row]]

    def label(self, row: int) -> int:
        return int(self.wnid_labels[self.wnid_ids[row]])

    def unit(self, row: int) -> str:
        # bisect_right: a unit without images starts where the next one does, and holds no row.
        return self.unit_ids[bisect.bisect_right(self.unit_starts, row) - 1]

    def _text(self, row: int) -> tuple[str, str]:
        """(metadata JSON, source name) as kept for the row; empty where it has none kept."""
        i = _find(self.text_rows, row)
        if i is None:
            return "", ""
        start = int(self.text_ends[i - 1]) if i else 0
        meta, _, source = _str(self.text[start : int(self.text_ends[i])]).partition("\0")
        return meta, source  # the JSON never holds a raw NUL, so the first one is the separator

    def source(self, row: int) -> str:
        suffix = int(self.suffix_ids[row])
        return self.key(row) + self.suffixes[suffix] if suffix >= 0 else self._text(row)[1]

    def meta(self, row: int) -> dict[str, Any]:
        text = self._text(row)[0]
        return json.loads(text) if text else {}

    def where(self, row: int, tier: int, work: Path) -> tuple[str, int, int]:
        """(file, offset, size) of the image's JPEG at `tier`: in its unit's spool under `work`, or at its origin."""
        column = self.column(tier)
        offset, size = int(self.offsets[row, column]), int(self.sizes[row, column])
        if offset >= 0:
            return str(unit_paths(work, self.unit(row))[0]), offset, size
        i = _find(self.origin_rows, row)
        assert i is not None  # a tier kept as the original has an origin (`spools._write_spool`)
        path = self.origins[self.origin_ids[i]] + (self.source(row) if self.origin_named[i] else "")
        return path, int(self.origin_offsets[i]), size

    def unit_spans(self) -> Iterator[tuple[str, int, int]]:
        """(split, first row, end row) of each unit."""
        ends = [*self.unit_starts[1:], len(self)]
        yield from zip(self.unit_splits, self.unit_starts, ends)

    def relabel(self, classes: Sequence[str]) -> None:
        """Label every image by its wnid's place in `classes` (a source whose classes are learnt from its records)."""
        label = {c: i for i, c in enumerate(classes)}
        self.wnid_labels = np.array([label[w] for w in self.wnids], np.int32)

    def key_order(self) -> np.ndarray:
        """The rows sorted by key (as `sorted` sorts the str keys: UTF-8 bytes sort as code points), computed once:
        the splits and the keys file are cut from it. A key that two images share is a StagingError."""
        if self._key_order is None:
            order = np.argsort(self.keys, kind="stable").astype(np.intc)
            for start in range(0, max(0, len(order) - 1), _DUPLICATE_CHUNK):
                run = self.keys[order[start : start + _DUPLICATE_CHUNK + 1]]
                same = np.flatnonzero(run[1:] == run[:-1])
                if same.size:
                    raise StagingError(f"image key {self.key(order[start + same[0]])} appears twice in the source")
            self._key_order = order
        return self._key_order


def read_catalog(work: Path, units: Sequence[UnitResult], tiers: Sequence[int]) -> Catalog:
    """The records of `units`, read back from their indexes in `work` one unit at a time."""
    builder = _Builder(tuple(tiers), sum(unit.images for unit in units))
    for unit in units:
        records = unit_records(work, unit.unit_id)
        if len(records) != unit.images:
            raise StagingError(
                f"{unit_paths(work, unit.unit_id)[1]}: {len(records)} records where its unit made {unit.images}: "
                f"the work folder changed while staging"
            )
        builder.add(unit, records)
    return builder.build()


class _Interned:
    """Strings numbered in the order first seen, each stored once."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self._ids: dict[str, int] = {}

    def id(self, text: str) -> int:
        i = self._ids.get(text)
        if i is None:
            i = self._ids[text] = len(self.strings)
            self.strings.append(text)
        return i

    def __contains__(self, text: str) -> bool:
        return text in self._ids


class _Builder:
    """Fills the catalog's columns a unit at a time. The per-image columns are allocated once, at the length the
    units reported: pieces per unit joined at the end left the heap holding both (the pieces' holes are too small
    to reuse), which doubled the catalog's share of the peak."""

    def __init__(self, tiers: tuple[int, ...], rows: int) -> None:
        self.tiers, self.tier_names = tiers, [str(t) for t in tiers]
        t = len(tiers)
        self.keys = np.zeros(rows, "S1")  # widened to the longest key as keys come
        self.wnid_ids = np.empty(rows, np.int32)
        self.suffix_ids = np.empty(rows, np.int32)
        self.offsets = np.empty((rows, t), np.int64)
        self.sizes = np.empty((rows, t), np.uint32)
        self.dims = np.empty((rows, t, 2), np.uint16)
        self.text, self.text_rows, self.text_ends = bytearray(), array("i"), array("q")
        self.origin_rows, self.origin_ids, self.origin_named = array("i"), array("i"), array("b")
        self.origin_offsets = array("q")
        self.wnids, self.suffixes, self.origins = _Interned(), _Interned(), _Interned()
        self.wnid_labels: list[int] = []
        self.unit_ids: list[str] = []
        self.unit_splits: list[str] = []
        self.unit_starts: list[int] = []
        self.rows = 0

    def add(self, unit: UnitResult, records: list[dict[str, Any]]) -> None:
        start, end = self.rows, self.rows + len(records)
        keys, ids, tiers = [], [], []
        for row, rec in enumerate(records, start):
            key, source = rec["key"], rec["source"]
            keys.append(_utf8(key))
            suffix = self._suffix(key, source)
            ids.append((self._wnid(rec), suffix))
            for name in self.tier_names:
                offset, size, w, h = rec["tiers"][name]
                tiers.append((-1 if offset is None else offset, size, w, h))
            meta = rec.get("meta")
            if meta or suffix < 0:
                self.text += _utf8((json.dumps(meta) if meta else "") + "\0" + ("" if suffix >= 0 else source))
                self.text_rows.append(row)
                self.text_ends.append(len(self.text))
            if rec.get("origin") is not None:
                self._origin(row, rec["origin"], source)
        if keys:
            unit_keys = np.array(keys, dtype=bytes)
            if unit_keys.itemsize > self.keys.itemsize:  # rare: ImageNet's val keys are longer than train's
                self.keys = self.keys.astype(unit_keys.dtype)
            self.keys[start:end] = unit_keys
            self.wnid_ids[start:end], self.suffix_ids[start:end] = np.array(ids, np.int64).T
            per_tier = np.array(tiers, np.int64).reshape(len(records), len(self.tiers), 4)
            if per_tier[:, :, 1].max() > _MAX_SIZE or per_tier[:, :, 2:].max() > _MAX_SIDE:
                raise StagingError(f"unit {unit.unit_id}: a JPEG larger than a JPEG can be (its index is damaged)")
            self.offsets[start:end], self.sizes[start:end] = per_tier[:, :, 0], per_tier[:, :, 1]
            self.dims[start:end] = per_tier[:, :, 2:]
        self.unit_ids.append(unit.unit_id)
        self.unit_splits.append(unit.split)
        self.unit_starts.append(start)
        self.rows = end

    def _wnid(self, rec: dict[str, Any]) -> int:
        """The record's wnid id; its label is its wnid's (the sources number their classes), kept once a class."""
        wnid, label = self.wnids.id(rec["wnid"]), rec["label"]
        if wnid == len(self.wnid_labels):
            self.wnid_labels.append(label)
        elif self.wnid_labels[wnid] != label:
            raise StagingError(
                f"image {rec['key']}: label {label} for class {rec['wnid']}, whose other images have label "
                f"{self.wnid_labels[wnid]}"
            )
        return wnid

    def _suffix(self, key: str, source: str) -> int:
        """ImageNet's source names are the key + '.JPEG': one suffix for every image."""
        if not source.startswith(key):
            return -1
        suffix = source[len(key) :]
        if suffix not in self.suffixes and len(self.suffixes.strings) >= _MAX_SUFFIXES:
            return -1
        return self.suffixes.id(suffix)

    def _origin(self, row: int, origin: list[Any], source: str) -> None:
        """A tree's file is its folder + its source name: the folder is interned, not a path per image; an
        archive is interned whole."""
        path, offset = origin
        named = bool(source) and path.endswith(source)
        self.origin_rows.append(row)
        self.origin_ids.append(self.origins.id(path[: -len(source)] if named else path))
        self.origin_named.append(named)
        self.origin_offsets.append(offset)

    def build(self) -> Catalog:
        return Catalog(
            tiers=self.tiers,
            keys=self.keys,
            wnid_ids=self.wnid_ids,
            suffix_ids=self.suffix_ids,
            offsets=self.offsets,
            sizes=self.sizes,
            dims=self.dims,
            text=self.text,
            text_rows=_numpy(self.text_rows, np.intc),
            text_ends=_numpy(self.text_ends, np.int64),
            origin_rows=_numpy(self.origin_rows, np.intc),
            origin_ids=_numpy(self.origin_ids, np.intc),
            origin_named=_numpy(self.origin_named, np.int8).astype(bool),
            origin_offsets=_numpy(self.origin_offsets, np.int64),
            wnids=self.wnids.strings,
            wnid_labels=np.array(self.wnid_labels, np.int32),
            suffixes=self.suffixes.strings,
            origins=self.origins.strings,
            unit_ids=self.unit_ids,
            unit_splits=self.unit_splits,
            unit_starts=self.unit_starts,
        )


def _numpy(values: array[Any], dtype: Any) -> np.ndarray:
    """An array module's array as numpy's, sharing its memory."""
    return np.frombuffer(values, dtype) if len(values) else np.empty(0, dtype)
