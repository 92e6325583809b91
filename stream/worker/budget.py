"""Decode resources of the worker: how many frames it decodes at once, bounded by the pod's limits.

A frame under the pixel cap can still be a bomb for a small pod (40 MP of 16-bit RGBA is ~300 MiB at
full depth), and the node's ``os.cpu_count()`` is not the pod's CPU limit. So:

- :func:`decode_threads`: the decode thread count from the cgroup CPU quota (``cpu.max`` / v1
  ``cpu.cfs_quota_us``), else the CPUs this process may run on, at most 4.
- :class:`MemoryBudget`: decodes hold their estimated peak bytes (contracts.image.DecodePlan) while
  they run; a decode waits (FIFO) until the budget has room, and one that could never fit is
  rejected (the frame goes to the DLQ as ``too_large``). The default budget is a fraction of the
  cgroup memory limit (``memory.max`` / v1 ``memory.limit_in_bytes``), else a constant.

The cgroup readers take the cgroup root and ``/proc/self/cgroup`` as arguments (tests write both).
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MAX_DECODE_THREADS = 4
DECODE_BUDGET_FRACTION = 0.25  # of the cgroup memory limit: the rest is the worker itself, buffers, batches
DEFAULT_DECODE_BUDGET_MB = 1024  # no cgroup memory limit (a laptop, a VM)
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-aligned LONG_MAX


class BudgetExceeded(Exception):
    """A decode that needs more than the whole budget: it could never be admitted."""


class MemoryBudget:
    """Admit concurrent holders while the sum of their costs stays <= ``limit`` bytes (FIFO, so a
    large decode is not starved by small ones arriving after it). Thread-safe; blocking."""

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"budget must be positive, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def fits(self, cost: int) -> bool:
        return cost <= self.limit

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        if not self.fits(cost):
            raise BudgetExceeded(f"needs {cost} bytes, the budget is {self.limit}")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._queue[0] is ticket and self.in_use + cost <= self.limit)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= cost
                self._cond.notify_all()


# ----------------------------------------------------------------------------- cgroup limits


def _own_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> this process's cgroup path ("" is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            out[ctrl] = parts[2]
    return out


def _candidates(base: Path, rel: str) -> list[Path]:
    """The cgroup dir and its ancestors up to ``base`` (a limit may be set on the pod, one level up);
    ``base`` itself covers a container whose cgroup namespace makes its own cgroup the root."""
    dirs, p = [], Path(rel.lstrip("/"))
    while True:
        dirs.append(base / p)
        if p == Path("."):
            break
        p = p.parent
    return dirs


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest memory limit over this process's cgroup and its ancestors, in bytes; None if unlimited."""
    paths = _own_paths(proc_cgroup)
    found: list[int] = []
    if (root / "cgroup.controllers").exists():  # v2
        for d in _candidates(root, paths.get("", "/")):
            v = _read(d / "memory.max")
            if v and v != "max" and v.isdigit():
                found.append(int(v))
    else:  # v1
        for d in _candidates(root / "memory", paths.get("memory", "/")):
            v = _read(d / "memory.limit_in_bytes")
            if v and v.isdigit() and int(v) < _UNLIMITED:
                found.append(int(v))
    return min(found) if found else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) over this process's cgroup and its ancestors; None if unlimited."""
    paths = _own_paths(proc_cgroup)
    found: list[float] = []
    if (root / "cgroup.controllers").exists():  # v2: "quota period" or "max period"
        for d in _candidates(root, paths.get("", "/")):
            v = (_read(d / "cpu.max") or "").split()
            if len(v) == 2 and v[0] != "max" and v[0].isdigit() and v[1].isdigit() and int(v[1]) > 0:
                found.append(int(v[0]) / int(v[1]))
    else:  # v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us, under "cpu" or "cpu,cpuacct"
        for ctrl in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            for d in _candidates(root / ctrl, paths.get("cpu", "/")):
                q, per = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if q and per and q.isdigit() and per.isdigit() and int(per) > 0:
                    found.append(int(q) / int(per))
    return min(found) if found else None


def available_cpus() -> int:
    """CPUs this process may run on (cpuset / affinity), not the node's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_threads(configured: int, *, cpu_limit: float | None, cpus: int) -> int:
    """``configured`` if set, else min(4, the CPU quota rounded down (at least 1), the usable CPUs)."""
    if configured:
        return configured
    n = cpus if cpu_limit is None else min(cpus, max(1, math.floor(cpu_limit)))
    return max(1, min(MAX_DECODE_THREADS, n))


def decode_budget_bytes(configured_mb: int, *, mem_limit: int | None) -> int:
    """``configured_mb`` MiB if set, else a quarter of the cgroup memory limit, else 1 GiB."""
    if configured_mb:
        return configured_mb * 1024 * 1024
    if mem_limit:
        return int(mem_limit * DECODE_BUDGET_FRACTION)
    return DEFAULT_DECODE_BUDGET_MB * 1024 * 1024
