"""TODO docstring (from pipelines/staging.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from pipelines.atomic import (
    atomic_open,
    atomic_write_bytes,
    sha256_file,
)
from pipelines.staging.params import StagingError
from pipelines.staging.plan import DatasetPlan, ShardPlan
from pipelines.staging.spools import _TarWriter, unit_paths


class SampleReader:
    """Reads a planned sample's JPEG at a tier: from its unit's spool, or from the source where an original kept
    as it is lies (`origin`). Keeps the last few files open (spools and archives are read many times)."""

    _OPEN_FILES = 64

    def __init__(self, work: Path) -> None:
        self.work = work
        self._files: dict[str, Any] = {}  # path -> open file, oldest first

    def where(self, rec: dict[str, Any], tier: int) -> tuple[str, int, int]:
        """(file, offset, size) of the sample's bytes at `tier`."""
        offset, size, _, _ = rec["tiers"][str(tier)]
        if offset is None:
            path, offset = rec["origin"]
            return path, offset, size
        return str(unit_paths(self.work, rec["unit"])[0]), offset, size

    def read(self, rec: dict[str, Any], tier: int) -> bytes:
        path, offset, size = self.where(rec, tier)
        f = self._files.pop(path, None)
        if f is None:
            if len(self._files) >= self._OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed by close())
            except OSError as exc:
                raise StagingError(f"{path}: cannot read {rec['key']} back: {exc}") from None
        self._files[path] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise StagingError(f"{path}: {rec['key']} ends past the end of the file: the file changed while staging")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_bytes(plan: DatasetPlan, shard: ShardPlan) -> int:
    return sum(plan.records[key]["tiers"][str(shard.tier)][1] for key in shard.keys)


def write_shard(plan: DatasetPlan, shard: ShardPlan, work: Path, out: Path) -> dict[str, Any]:
    """Write one shard (reusing it if its checksum sidecar verifies); return its manifest entry."""
    path = out / shard.relpath()
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists() and sidecar.exists():
        digest = sha256_file(path)
        if sidecar.read_text().strip() == digest:
            return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
                    "bytes": path.stat().st_size, "sha256": digest}
    # Streamed to the file (a shard of full-size images is ~100 MB); not fsynced one by one: `stage` waits for
    # every shard once, before the manifest commits the version.
    with atomic_open(path, durable=False) as f, SampleReader(work) as reader:
        tar = _TarWriter(f)
        for key in shard.keys:
            rec = plan.records[key]
            jpeg = reader.read(rec, shard.tier)
            meta = json.dumps({"wnid": rec["wnid"], "source": rec["source"]}, sort_keys=True).encode()
            for suffix, payload in (("jpg", jpeg), ("cls", str(rec["label"]).encode()), ("json", meta)):
                tar.add(f"{key}.{suffix}", payload)
        tar.close()
    digest = tar.sha256.hexdigest()
    atomic_write_bytes(sidecar, (digest + "\n").encode(), durable=False)
    return {"path": shard.relpath(), "split": shard.split, "tier": shard.tier, "samples": len(shard.keys),
            "bytes": tar.offset, "sha256": digest}


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
        for name in (entry["path"], entry["path"] + ".sha256"):
            _link_or_copy(base_dir / name, dest / name)
    return list(entries)


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
