"""Units: each decodes its images once and spools every tier's JPEG into its work folder's `units/<unit>.tar`.

A unit is one train class, one chunk of val files, one batch file... (`pipelines.source.records.Unit`).
`process_unit` decodes, checks and encodes its images (`images.encode_tiers`) and writes the spool, a tar of
the re-encoded tiers, plus a JSON index of every record (key, label, where each tier's bytes lie) and the bad
files with their reasons. A tier that keeps an original as it is points at the source instead of holding a second
copy. A unit whose index matches the parameters and whose spool matches the index's checksum is reused, so a
killed run resumes with the units it had finished; it needs nothing but its picklable arguments, so it runs on
a thread or in a worker process alike (`runners.unit_runner`). It returns a `UnitResult` of a few counts: its
records stay in its index, which the plan reads back one unit at a time (`unit_records`, `catalog`).

The spools' tar writer (`TarWriter`) is also the shards' (`shards.write_shard`): fixed metadata and a running
sha256, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.atomic import atomic_open, atomic_write_json, sha256_file
from pipelines.source.records import Unit
from pipelines.staging.images import BadImage, encode_tiers
from pipelines.staging.params import ENCODING, UNITS, StageParams


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte header `tarfile` writes for `_deterministic_tarinfo(name, size)` in USTAR format, built
    directly: tarfile's own per-member code was a fifth of the staging time."""
    raw = name.encode()
    if len(raw) > 100 or size >= 8**11:
        return _deterministic_tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    chksum = sum(head) + _HEADER_TAIL_SUM + 8 * 32  # the checksum counts its own field as 8 spaces
    return head + b"%06o\0 " % chksum + _HEADER_TAIL


# typeflag '0', no link name, 'ustar\0' '00', empty owner names and device numbers, no prefix, padding.
_HEADER_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)


_HEADER_TAIL_SUM = sum(_HEADER_TAIL)


class TarWriter:
    """Writes regular files as a tar with the bytes `tarfile` would write (see `_deterministic_tarinfo`),
    hashing as it goes."""

    def __init__(self, f: Any) -> None:
        self._f, self.offset, self.sha256 = f, 0, hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append one file; returns where its data starts."""
        self._write(_tar_header(name, len(data)))
        start = self.offset
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(b"\0" * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        return start

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), then zeros to a whole record, as tarfile does."""
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._write(b"\0" * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))


@dataclass(frozen=True)
class UnitResult:
    """A finished unit, without its records: they stay in its index (`unit_records`), so what a run holds per unit
    (and Prefect, which keeps every task's result) does not grow with the unit's images."""

    unit_id: str
    split: str  # "train" or "val"
    images: int  # the records in its index
    bad: tuple[dict[str, str], ...]
    skipped: int = 0  # images left out because the base version holds them


def unit_paths(work: Path, unit_id: str) -> tuple[Path, Path]:
    return work / UNITS / f"{unit_id}.tar", work / UNITS / f"{unit_id}.json"


def _deterministic_tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def process_unit(
    unit: Unit,
    split: str,
    work: Path,
    params: StageParams,
    skip: frozenset[str] = frozenset(),
) -> UnitResult:
    """Decode, check and encode one unit's images (but those in `skip`) into its spool; reuse a finished spool.

    Needs nothing but its (picklable) arguments, so it runs in any worker process.
    """
    unit_id = unit.ident(split)
    spool, index = unit_paths(work, unit_id)
    cached = load_unit(work, unit_id, params)
    if cached is not None:
        return cached
    # Never fsynced (load_unit verifies a spool before reusing it), but written back from the end of the unit on
    # rather than in one burst when the kernel's dirty-page limits are reached. An error or interrupt mid-unit
    # leaves no partial spool.
    with atomic_open(spool, durable=False) as f:
        tar = TarWriter(f)
        records, bad, skipped = _write_spool(tar, unit, split, params, skip)
        tar.close()
    atomic_write_json(
        index,
        {
            "unit": unit_id,
            "split": split,
            "params": unit_params(params),
            "spool_sha256": tar.sha256.hexdigest(),
            "records": records,
            "bad": bad,
            "skipped": skipped,
        },
    )
    return UnitResult(unit_id, split, len(records), tuple(bad), skipped)


def _write_spool(
    tar: TarWriter,
    unit: Unit,
    split: str,
    params: StageParams,
    skip: frozenset[str],
) -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    images = unit.read()
    records: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    skipped = 0
    for raw in images:
        if raw.key in skip:
            skipped += 1
            continue
        try:
            encoded = encode_tiers(raw.data, params.tiers, params.jpeg_quality)
        except BadImage as exc:
            bad.append({"source": raw.source_name, "split": split, "wnid": raw.wnid, "reason": str(exc)})
            continue
        # A tier that keeps the original points at the source (offset None: read it at `origin`); the spool
        # holds only re-encoded tiers (without this it held two copies of most ImageNet originals).
        offsets: dict[str, list[int | None]] = {}
        written: dict[int, int | None] = {}  # id(bytes) -> spool offset
        for tier, (jpeg, w, h) in sorted(encoded.items()):
            if id(jpeg) not in written:
                kept = jpeg is raw.data and raw.origin is not None
                written[id(jpeg)] = None if kept else tar.add(f"{raw.key}.{tier}.jpg", jpeg)
            offsets[str(tier)] = [written[id(jpeg)], len(jpeg), w, h]
        record = {"key": raw.key, "wnid": raw.wnid, "label": raw.label, "source": raw.source_name, "tiers": offsets}
        if raw.origin is not None and None in written.values():
            record["origin"] = list(raw.origin)
        if raw.meta:
            record["meta"] = raw.meta
        records.append(record)
    return records, bad, skipped


def unit_params(params: StageParams) -> dict[str, Any]:
    """What a spool's bytes depend on (a unit index records it; a work folder's name hashes it): a new shard size
    or minival reuses every spool."""
    return {"tiers": list(params.tiers), "jpeg_quality": params.jpeg_quality, "encoding": ENCODING}


def load_unit(work: Path, unit_id: str, params: StageParams) -> UnitResult | None:
    """A finished unit if its index and spool agree with `params`, else None (the unit will be redone)."""
    spool, index = unit_paths(work, unit_id)
    if not (spool.exists() and index.exists()):
        return None
    try:
        meta = json.loads(index.read_bytes())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("params") != unit_params(params) or meta.get("spool_sha256") != sha256_file(spool):
        return None
    return UnitResult(unit_id, meta["split"], len(meta["records"]), tuple(meta["bad"]), meta.get("skipped", 0))


def unit_records(work: Path, unit_id: str) -> list[dict[str, Any]]:
    """The records of a finished unit's index, as `process_unit` wrote them: key, wnid, label, source, tiers
    ({tier: [spool offset or None, size, width, height]}), and where they apply origin and meta."""
    return json.loads(unit_paths(work, unit_id)[1].read_bytes())["records"]
