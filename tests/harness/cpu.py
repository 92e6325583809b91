"""CPU threads for in-process training in tests: this machine's cores shared by the test processes that run at
once (``make test``: pytest-xdist workers, PYTEST_XDIST_WORKER_COUNT), at most 2. Two workers each running
torch with every core's worth of OpenMP threads would oversubscribe the CPU (spinning threads waiting on each
other); the figures are the same, only slower."""

from __future__ import annotations

import os


def cpu_threads(cap: int = 2) -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, min(cap, (os.cpu_count() or 1) // max(1, workers)))
