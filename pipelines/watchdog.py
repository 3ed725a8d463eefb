"""Nothing of a killed command stays behind: a small process that watches an `effnet` command and, once the
command is gone (SIGKILL included), stops every process the command had started.

The servers a command starts for itself (a temporary Prefect server, a local Ray instance with its GCS, raylet
and agents) outlive a SIGKILLed parent: they are reparented to init and run on. The watchdog runs in its own
session (a Ctrl-C to the terminal does not reach it first), snapshots the command's process tree every
`interval` seconds, and when the command has exited, sends SIGTERM to what is left of the last snapshot, then
SIGKILL to what is still there after `grace` seconds. A process is identified by pid and start time, so a pid
reused by an unrelated process is never signalled.

Run as `python -m pipelines.watchdog PID`; `start()` does that for the calling process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

Identity = tuple[int, float]  # (pid, create_time)


def start(pid: int | None = None) -> subprocess.Popen:
    """Watch `pid` (default: this process) from a detached watchdog process."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.watchdog", str(pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def descendants(proc: psutil.Process) -> set[Identity]:
    found = set()
    for child in proc.children(recursive=True):
        try:
            found.add((child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            pass
    return found


def alive(identities: set[Identity]) -> list[psutil.Process]:
    procs = []
    for pid, created in identities:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    return procs


def stop(procs: list[psutil.Process], grace: float) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def watch(pid: int, interval: float = 0.5, grace: float = 3.0) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    me = os.getpid()
    seen: set[Identity] = set()
    while True:
        try:
            if parent.status() == psutil.STATUS_ZOMBIE:
                break
            # Accumulated: a process that has exited leaves the set only by failing `alive` later.
            seen |= {i for i in descendants(parent) if i[0] != me}
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    stop(alive(seen), grace)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
