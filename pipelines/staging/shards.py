"""Shards: the planned samples of one split at one tier, copied from the spools (and the source) into a tar.

`write_shard` writes `<tier>/<split>-NNNNNN.tar` of a version in WebDataset form (`<key>.jpg`, `<key>.cls`,
`<key>.json` per sample, in the plan's order), with the same bytes for the same samples, and a `.sha256`
sidecar after it; a shard whose sidecar verifies is reused, so a killed run resumes with the shards it had
finished. `SampleReader` reads a sample's JPEG at a tier from wherever staging left it (a spool, or the source for
an original kept as it is; `Catalog.where`, which the FFCV writer asks too). A version staged on top of another
hard-links the base's shards and sidecars (`link_base_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.atomic import atomic_open, atomic_path, atomic_write_bytes, sidecar_path, verified_digest, write_sidecar
from pipelines.dataset import (
    IMAGE_EXT,
    INDEX_SUFFIX,
    LABEL_EXT,
    META_EXT,
    ensure_index,
    index_component,
    index_lines,
    index_path,
    index_text,
)
from pipelines.staging.catalog import Catalog
from pipelines.staging.params import StagingError
from pipelines.staging.plan import DatasetPlan, ShardPlan
from pipelines.staging.spools import TarWriter


class SampleReader:
    """Reads a planned sample's JPEG at a tier (by its catalog row): from its unit's spool, or from the source where
    an original kept as it is lies (`origin`). Keeps the last few files open (spools and archives are read many
    times)."""

    _OPEN_FILES = 64

    def __init__(self, catalog: Catalog, work: Path) -> None:
        self.catalog, self.work = catalog, work
        self._files: dict[str, Any] = {}  # path -> open file, oldest first

    def read(self, row: int, tier: int) -> bytes:
        path, offset, size = self.catalog.where(row, tier, self.work)
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= self._OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed by close())
            except OSError as exc:
                raise StagingError(f"{path}: cannot read {self.catalog.key(row)} back: {exc}") from None
        self._files[path] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise StagingError(
                f"{path}: {self.catalog.key(row)} ends past the end of the file: the file changed while staging"
            )
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_bytes(plan: DatasetPlan, shard: ShardPlan) -> int:
    """The JPEG bytes a planned shard holds: its size, for running the largest shards first."""
    return int(plan.catalog.sizes[shard.rows, plan.catalog.column(shard.tier)].sum())


def write_shard(plan: DatasetPlan, shard: ShardPlan, work: Path, out: Path) -> dict[str, Any]:
    """Write one shard (reusing it if its checksum sidecar verifies); return its manifest entry."""
    path = out / shard.relpath()
    entry = {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.rows)}
    digest = verified_digest(path)
    if digest is not None:
        _refresh_index(path)
        return {**entry, "bytes": path.stat().st_size, "sha256": digest}
    # Streamed to the file (a shard of full-size images is ~100 MB); not fsynced one by one: `stage` waits for
    # every shard once, before the manifest commits the version.
    lines = []  # the shard's index, from the offsets the writer knows: the tar is never read back for it
    catalog = plan.catalog
    with atomic_open(path, durable=False) as f, SampleReader(catalog, work) as reader:
        tar = TarWriter(f)
        for row in shard.rows.tolist():
            key = catalog.key(row)
            jpeg = reader.read(row, shard.tier)
            meta = json.dumps(
                {"wnid": catalog.wnid(row), "source": catalog.source(row), **catalog.meta(row)}, sort_keys=True
            )
            label = str(catalog.label(row)).encode()
            members = []
            for ext, payload in ((IMAGE_EXT, jpeg), (LABEL_EXT, label), (META_EXT, meta.encode())):
                members.append(index_component(ext, tar.add(f"{key}.{ext}", payload), len(payload), f"{key}.{ext}"))
            lines.append(" ".join(members))
        tar.close()
    # The index before the sidecar: a shard whose sidecar verifies has its index too.
    atomic_write_bytes(index_path(path), index_text(lines).encode(), durable=False)
    write_sidecar(path, tar.sha256.hexdigest(), durable=False)
    return {**entry, "bytes": tar.offset, "sha256": tar.sha256.hexdigest()}


def _refresh_index(shard: Path) -> None:
    """A reused shard's index, rewritten when it is not what the shard's tar headers give (missing or damaged).
    Reading the headers costs little beside the checksum that just read the whole shard."""
    data = index_text(index_lines(shard)).encode()
    path = index_path(shard)
    if not (path.exists() and path.read_bytes() == data):
        atomic_write_bytes(path, data, durable=False)


def link_base_shards(base_dir: Path, dest: Path, entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hard-link a base version's shards (and sidecars) into a new version: the same files, no copy.

    Falls back to a copy where the file system has no hard links. Idempotent; returns the entries unchanged.
    """
    for entry in entries:
        src = base_dir / entry["path"]
        try:
            size = src.stat().st_size
        except FileNotFoundError:
            raise StagingError(f"{src}: shard of base version {base_dir.name} is missing") from None
        if size != entry["bytes"]:
            raise StagingError(f"{src}: {size} bytes, its manifest says {entry['bytes']}")
        for name in (Path(entry["path"]), sidecar_path(entry["path"]), index_path(Path(entry["path"]))):
            if name.suffix != INDEX_SUFFIX or (base_dir / name).exists():  # a base staged before indexes has none
                _link_or_copy(base_dir / name, dest / name)
    return list(entries)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_path(dst, durable=False) as tmp:
        tmp.unlink()  # os.link makes the name itself
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_shard_indexes(dest: Path, shard_entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest entries of the index beside every shard of a version (`dataset.index_text`: each sample's
    members by offset and size, DALI's wds2idx format), so a loader reads only the samples it wants. `write_shard`
    writes a shard's index with it and `link_base_shards` links the base's; a shard without one (inherited from a
    version staged before indexes) gets it from its tar headers (`dataset.ensure_index`)."""
    entries = []
    for shard in sorted(shard_entries, key=lambda s: s["path"]):
        data = ensure_index(Path(dest) / shard["path"]).read_bytes()
        entries.append(
            {
                "path": index_path(Path(shard["path"])).as_posix(),
                "shard": shard["path"],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return entries
