"""One active rollout controller (issue #26 item 3): a lease on the model repository's volume, with a
fencing generation.

The Deployment's ``Recreate`` strategy does not cover an eviction, a lost node or a second
``linewatch controller`` started by hand: two controllers would race on Triton's model control and on the
serving state. So a controller takes this lease before it does anything, and a second one stands by:

- **the lock**: an exclusive POSIX record lock (``fcntl.lockf``; NFSv4 honours it) on
  ``<repository>/.linewatch-controller.lease`` (the volume only the controller writes and every Triton
  reads; Triton lists model directories and ignores files). The kernel (or the NFS server's lease) drops it
  when its holder dies, so the standby takes over without anyone cleaning up.
- **the generation**: whoever takes the lock writes generation + 1 (with its holder id) into the file and
  keeps its own number. :meth:`ControllerLease.check` re-reads the file through the held descriptor before
  every model-control call and every ``serving-state`` / ``model-events`` write; a different generation
  means another controller took over (a network file system's lease that expired while this process was
  paused), and :class:`LeaseLost` stops this one before it writes anything.

POSIX record locks belong to the process and are released when *any* descriptor of the file is closed, so
the file is opened once and only ever read through that descriptor.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from pathlib import Path

import orjson

from contracts.logs import get_logger

log = get_logger("stream.lifecycle.lease")

LEASE_FILE = ".linewatch-controller.lease"


class LeaseLost(RuntimeError):
    """Another controller holds the lease now: this one must stop writing (and exit)."""


def holder_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


class ControllerLease:
    """``await acquire(stop)`` once (waits while another controller holds it), then ``check()`` before each write."""

    def __init__(self, path: str | os.PathLike, holder: str | None = None):
        self.path = Path(path)
        self.holder = holder or holder_id()
        self.generation: int | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self.generation is not None

    def _read(self) -> dict:
        """The record in the file (through the held descriptor); ``{}`` when empty, ``{"unreadable": True}``
        when it is not a lease record."""
        assert self._fd is not None
        raw = os.pread(self._fd, 4096, 0).rstrip(b"\0 \n")
        try:
            rec = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return {"unreadable": True}
        return rec if isinstance(rec, dict) else {"unreadable": True}

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this process holds it now."""
        if self.held:
            return True
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: another process holds it
            return False
        rec = self._read()
        prev = None if rec.get("unreadable") else rec.get("generation", 0)
        # an unreadable record restarts nowhere near an earlier holder's number: the clock is past every one
        gen = prev + 1 if isinstance(prev, int) and prev >= 0 else int(time.time())
        rec = orjson.dumps({"generation": gen, "holder": self.holder, "acquired_ms": int(time.time() * 1000)})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, rec + b"\n", 0)
        os.fsync(self._fd)
        self.generation = gen
        log.info("controller_lease_acquired", path=str(self.path), generation=gen, holder=self.holder)
        return True

    async def acquire(self, stop: asyncio.Event, poll_s: float = 1.0, log_every_s: float = 30.0) -> bool:
        """Wait for the lease (a standby controller); False when ``stop`` was set first."""
        last_log = None
        while not stop.is_set():
            if await asyncio.to_thread(self.try_acquire):
                return True
            now = time.monotonic()
            if last_log is None or now - last_log >= log_every_s:
                last_log = now
                rec = self._read()
                log.info("controller_standby", path=str(self.path), holder=rec.get("holder"),
                         generation=rec.get("generation"))
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        return False

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this process still holds the lease at its own generation."""
        if not self.held:
            raise LeaseLost(f"controller lease {self.path} not held by {self.holder}")
        now = self._read()
        if now.get("generation") != self.generation:
            raise LeaseLost(f"controller lease {self.path} taken over: generation {now.get('generation')} by "
                            f"{now.get('holder')!r} (this controller holds {self.generation})")

    def release(self) -> None:
        if self._fd is not None:
            try:
                if self.held:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd, self.generation = None, None
