"""One writer at a time on a store directory (issue #26 item 9): an OS file lock (``fcntl.flock``, exclusive) on
``<dir>/.lock``.

Two onboardings of one multi-task model (MoLE-Flow) both loaded the training store, both took the next adapter
index and both exported the same next version. The training job holds this lock on the training store from
"load the store, take the next index" to "the exported version's manifest is written", so the second job waits,
then loads the store with the first one's adapter and exports the next version. The kernel drops the lock when
its holder dies (no stale lock files to clean up); a store on a network file system needs one that honours
``flock`` (NFSv4 does, as a whole-file lock).

Re-entrant within a process (the training job holds it and runs the detector's ``train-task`` verb in-process,
which takes it too): ``flock`` locks belong to open file descriptions, so a second ``open`` + ``flock`` in the
holder itself would wait on itself for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"

_held: dict[str, tuple[int, int]] = {}  # resolved dir -> (fd, depth), this process's holds
_guard = threading.Lock()


class StoreLockTimeout(TimeoutError):
    """The store stayed locked by another writer for longer than the caller would wait."""


@contextlib.contextmanager
def store_lock(directory: str | Path, *, timeout_s: float | None = None, what: str = "store") -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if missing) for the ``with`` block. Waits for another
    holder (a line on stderr says so); :class:`StoreLockTimeout` after ``timeout_s`` (None: wait as long as it
    takes, a training job's onboarding)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield d
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, d, timeout_s, what)
        with _guard:
            _held[key] = (fd, 1)
        try:
            yield d
        finally:
            with _guard:
                _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, d: Path, timeout_s: float | None, what: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    sys.stderr.write(f"{what} {d} is locked by another writer (an onboarding of the same model): waiting\n")
    t0 = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sys.stderr.write(f"{what} {d}: lock taken after {time.monotonic() - t0:.1f} s\n")
            return
        except BlockingIOError:
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise StoreLockTimeout(f"{what} {d} stayed locked for {timeout_s:g} s") from None
            time.sleep(0.2)
