"""How staging's steps run: mappers, the unit runner, progress, and the number of workers.

A `Mapper` runs a step over argument tuples and returns the results in order (`thread_map` here; the Prefect flow
passes one that submits tasks). `unit_runner` runs `spools.process_unit` at most `workers` at a time, on the
callers' threads or in spawned worker processes, and stops starting units once one failed on bad input
(`INPUT_ERRORS`). `Tracker` logs each phase's progress with an ETA and reports it to a `Progress` callback
(`progress_bar` draws one); `resolve_workers` checks `workers`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from pipelines.source.records import SourceError
from pipelines.staging.images import opencv
from pipelines.staging.params import StagingError, whole_number
from pipelines.staging.spools import UnitResult, process_unit

Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]

# Bad input (a corrupt archive, too many bad files, inconsistent units): it fails the same way on every try, so
# it ends a run at once and is never retried.
INPUT_ERRORS = (SourceError, StagingError)


def sequential_map(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*a) for a in args]


def thread_map(workers: int) -> Mapper:
    """A mapper running `workers` calls at a time on threads. The first error, whichever call raises it, ends the
    map at once: calls not started are cancelled, those running finish."""

    def run(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
        if workers <= 1:
            return sequential_map(fn, args)
        ex = ThreadPoolExecutor(workers, thread_name_prefix="staging")
        try:
            futures = [ex.submit(fn, *a) for a in args]
            for f in as_completed(futures):
                f.result()
            return [f.result() for f in futures]
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    return run


def available_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Tracker:
    """Counts the finished steps of one phase; logs every 5% with an ETA and reports to `progress`."""

    def __init__(self, phase: str, total: int, log: Callable[..., None], progress: Progress | None) -> None:
        self.phase, self.total, self.log, self.progress = phase, total, log, progress
        self.done, self.t0, self.lock = 0, time.monotonic(), threading.Lock()
        self.every = max(1, total // 20)
        if progress is not None:
            progress(phase, 0, total)

    def step(self) -> None:
        with self.lock:
            self.done += 1
            if self.done % self.every == 0 or self.done == self.total:
                eta = (self.total - self.done) * (time.monotonic() - self.t0) / self.done
                self.log(f"{self.phase} {self.done}/{self.total}, ETA {eta:.0f} s")
            if self.progress is not None:
                self.progress(self.phase, self.done, self.total)


class Counted:
    """`fn` that ticks a tracker when it returns (in the thread that called it)."""

    def __init__(self, fn: Callable[..., Any], tracker: Tracker) -> None:
        self.fn, self.tracker = fn, tracker

    def __call__(self, *args: Any) -> Any:
        result = self.fn(*args)
        self.tracker.step()
        return result


class _InPool:
    """`fn` run in a process pool; the calling thread waits for it."""

    def __init__(self, pool: ProcessPoolExecutor, fn: Callable[..., Any]) -> None:
        self.pool, self.fn = pool, fn

    def __call__(self, *args: Any) -> Any:
        return self.pool.submit(self.fn, *args).result()


def _worker_init(parent: int) -> None:
    """In each unit worker: exit when the parent dies (even by SIGKILL), so that no orphan keeps writing spools
    beside a rerun; leave Ctrl-C to the parent; one OpenCV thread (the processes are the parallelism)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opencv().setNumThreads(1)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory instead of returning it to the kernel after every image.

    Each image allocates and frees a few MB of pixel buffers; glibc serves such sizes by mmap (or trims its
    heap) and hands them back at once, and the page faults of mapping them again cost a unit worker up to a
    fifth of its time (measured). Process-wide: at most 256 MB of freed memory stays with the process.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


@contextmanager
def unit_runner(workers: int, processes: bool = False) -> Iterator[_Limited]:
    """`process_unit`, at most `workers` at a time, on the callers' threads or (`processes`) in worker processes.

    Threads are the default: OpenCV's decode, resize and encode, hashing and file IO release the GIL, so on two
    cores two threads ran the units 1.75x as fast as one, and faster than two processes, which pay their
    start-up and a fresh heap (benchmarks/staging.py). Processes scale further on many cores, where the
    ~5 % of each image spent in Python starts to bind. They are spawned, not forked: the parent may hold
    threads (Prefect's) and their locks, which a fork would copy mid-use.
    """
    # Limited even for one worker: the mapper may call from more threads than `workers` (any mapper may).
    if workers <= 1:
        yield _Limited(process_unit, 1)  # one unit at a time, OpenCV's own threads inside it
        return
    if not processes:
        cv2 = opencv()
        before = cv2.getNumThreads()
        cv2.setNumThreads(1)  # the units are the parallelism; OpenCV's own threads would only contend
        _keep_freed_memory()
        try:
            yield _Limited(process_unit, workers)
        finally:
            cv2.setNumThreads(before)
        return
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        # Limited here too, so that no unit waits in the pool's queue: a failed run has none left to finish.
        yield _Limited(_InPool(pool, process_unit), workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class NotStarted(StagingError):
    """A unit not started because another failed on bad input; `stage` raises that one's error instead."""


class _Limited:
    """`fn` run on the calling thread, by at most `limit` threads at once (a mapper may call from more), and no
    longer started once a call failed on bad input: a corrupt class tar ends the run, rather than every unit
    waiting for a slot behind it running first. Other errors (I/O) are left to the caller's retries."""

    def __init__(self, fn: Callable[..., Any], limit: int) -> None:
        self.fn, self._slots = fn, threading.BoundedSemaphore(limit)
        self.failure: Exception | None = None

    def __call__(self, *args: Any) -> UnitResult:
        with self._slots:
            if self.failure is not None:
                raise NotStarted(f"not started: {self.failure}")
            try:
                return self.fn(*args)
            except INPUT_ERRORS as exc:
                self.failure = self.failure or exc
                raise


def progress_bar(file: Any = None) -> Progress:
    """A Progress that draws one tqdm bar per phase (on stderr), with rate and ETA."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    lock = threading.Lock()

    def update(phase: str, done: int, total: int) -> None:
        if total <= 0:
            return
        with lock:
            bar = bars.get(phase)
            if bar is None:
                bar = bars[phase] = tqdm(
                    total=total,
                    desc=f"staging {phase}",
                    unit=phase.rstrip("s"),
                    file=file or sys.stderr,
                    dynamic_ncols=True,
                    leave=True,
                )
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return update


def largest_first(
    mapper: Mapper, fn: Callable[..., Any], args: list[tuple[Any, ...]], size: Callable[[tuple[Any, ...]], float]
) -> list[Any]:
    """`mapper(fn, args)` with the largest arguments submitted first, so that no big one is left running alone
    at the end; results in the order of `args`."""
    order = sorted(range(len(args)), key=lambda i: -size(args[i]))
    done = mapper(fn, [args[i] for i in order])
    return [r for _, r in sorted(zip(order, done), key=lambda pair: pair[0])]


# A progress callback: (phase, done, total), phase "units" or "shards"; called from any thread of this process.
Progress = Callable[[str, int, int], None]


# More unit workers than any host has cores; a typo (--workers 10000) would otherwise start that many processes.
MAX_WORKERS = 512


def resolve_workers(workers: Any) -> int:
    """Units decoded at once: None is every core; anything else a whole number in 1..MAX_WORKERS (0 is an
    error, not "the default")."""
    if workers is None:
        return available_cores()
    return whole_number("workers", workers, 1, MAX_WORKERS)
