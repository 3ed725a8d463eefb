"""Files are written to a temporary name in the same folder and renamed, so a crash never leaves half a file."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

_CHUNK = 1 << 20


@contextmanager
def atomic_open(path: str | os.PathLike[str], durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write, under a temporary name beside `path`, renamed to `path` when the block ends without an
    error (and deleted when it does not). `durable=False` does not wait for the disk: it only starts the
    writeback, and a later `fsync_files` (before the commit point, e.g. a manifest) waits for it, by when most
    of it is done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            else:
                start_writeback(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """`data` written with `atomic_open`."""
    with atomic_open(path, durable) as f:
        f.write(data)
    return Path(path)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting (Linux
    `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing). The disk then works while the CPUs go on,
    instead of all at once at the final fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE; a failure only means the fsync waits longer


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _libc_sync_file_range()


def fsync_files(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Wait until files written with `durable=False` are on disk: one fsync each, at the commit point."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = True, older_than_s: float = 0) -> int:
    """Delete leftovers of writers that were killed mid-write (names start with '.' and end with '.tmp'),
    under `folder` (or directly in it), last modified more than `older_than_s` seconds ago."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    for p in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        try:
            if older_than_s and p.stat().st_mtime > cutoff:
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        n += 1
    return n
