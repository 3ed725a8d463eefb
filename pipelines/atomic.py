"""Files that appear whole or not at all, and the checksum sidecars that say a large file is whole.

A file is written under a temporary name beside it (`.<name>.<random>.tmp`, see `atomic_path`) and renamed when
it is whole, so a crash never leaves half a file under the real name; `remove_stale_temporaries` deletes what
killed writers left. `durable` says whether the rename waits for the disk (fsync) or only starts the writeback,
for files that a later `fsync_files` waits for at a commit point (a staged version's manifest) or that are
checked before they are reused.

A `.sha256` sidecar beside a file records the file's checksum once it is written: `verified_digest` says whether
a file left by an earlier run is the one its sidecar vouches for, so it can be reused instead of written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_CHUNK = 1 << 20

TEMPORARY_SUFFIX = ".tmp"

TEMPORARY_PATTERN = f".*{TEMPORARY_SUFFIX}"  # a glob for every temporary name `atomic_path` makes

SIDECAR_SUFFIX = ".sha256"


def _new_temporary(path: Path) -> Path:
    """A new, empty file beside `path` under a name no other writer holds (O_EXCL), hidden and ending in
    TEMPORARY_SUFFIX. Created with mode 0666 less the umask, as `open` creates files (mkstemp's 0600 would make
    a staged version unreadable to other users of a shared data folder)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _sync(path: Path, durable: bool) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync and sync_file_range act on the file, whichever descriptor names it
    try:
        if durable:
            os.fsync(fd)
        else:
            start_writeback(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """A temporary file (created, empty) beside `path` for the block to write by name, renamed to `path` when the
    block ends without an error and deleted when it does not.

    Before the rename, `durable` waits until the file is on disk (fsync); `durable=False` only starts the
    writeback, and a later `fsync_files` (before the commit point, e.g. a manifest) waits for it, by when most
    of it is done. For writers that open the file themselves (FFCV's); `atomic_open` hands out an open file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    try:
        yield tmp
        _sync(tmp, durable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike[str], durable: bool = True) -> Iterator[BinaryIO]:
    """`atomic_path`'s temporary file, open for writing (closed before it is synced and renamed)."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        yield f


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
        _sync(Path(p), durable=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where a file's checksum sidecar lives: `train-000000.tar` -> `train-000000.tar.sha256`."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike[str], digest: str, durable: bool = True) -> Path:
    """Record `digest` as the sha256 of the file at `path`, written after the file itself: a sidecar never vouches
    for a file that was not finished."""
    return atomic_write_bytes(sidecar_path(path), (digest + "\n").encode(), durable)


def verified_digest(path: str | os.PathLike[str]) -> str | None:
    """The sha256 of the file at `path` if its sidecar records exactly that (reads every byte), else None: the
    file or its sidecar is missing, or the file is not the one the sidecar was written for (damaged, or left
    half-written by older code)."""
    path, sidecar = Path(path), sidecar_path(path)
    if not (path.exists() and sidecar.exists()):
        return None
    digest = sha256_file(path)
    return digest if sidecar.read_text().strip() == digest else None


def remove_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = True, older_than_s: float = 0) -> int:
    """Delete leftovers of writers that were killed mid-write (`atomic_path`'s temporary names, TEMPORARY_PATTERN),
    under `folder` (or directly in it), last modified more than `older_than_s` seconds ago."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    for p in folder.rglob(TEMPORARY_PATTERN) if recursive else folder.glob(TEMPORARY_PATTERN):
        try:
            if older_than_s and p.stat().st_mtime > cutoff:
                continue
            p.unlink()
        except FileNotFoundError:
            continue
        n += 1
    return n
