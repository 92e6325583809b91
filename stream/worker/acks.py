"""Ack safety of the worker (issue #15 item 1): nothing reaches Faust's ack but a fully published batch.

The agent takes its batches with manual acks (``Stream.noack_take``, stream/worker/app.py) and acks a
batch's events only after every output is on the broker. A batch whose body raised (or was cancelled) is
never acked: it is withheld (:func:`stream.kafka.faust_adapter.withhold`: settled without telling the
consumer, so no commit covers it and no rebalance waits for it) and its frames are redelivered to the next
worker.

A fatal error (:func:`fatal_stop`) withholds its batch, logs one line and stops the worker with SIGTERM
(exit 1); :class:`ShutdownWatchdog` bounds every stop to ``worker_shutdown_timeout_s`` (a stop against an
unreachable broker otherwise hangs in commit / LeaveGroup / producer flush well past a pod's grace period).
:func:`reach_triton` waits for Triton at start behind the circuit breaker instead of raising out of the agent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from contracts.cli import EXIT_RUNTIME, EXIT_USAGE, UsageError
from contracts.logs import get_logger
from stream.kafka.faust_adapter import withhold

log = get_logger("stream.worker.acks")


class ShutdownWatchdog:
    """Once armed, ends the process after ``timeout_s`` unless it exited by itself first."""

    def __init__(self, timeout_s: float, exit_code: int = EXIT_RUNTIME):
        self.timeout_s = timeout_s
        self.exit_code = exit_code
        self._timer: threading.Timer | None = None

    def arm(self, why: str) -> None:
        if self._timer is not None:
            return
        self._timer = threading.Timer(self.timeout_s, self._fire, args=(why,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, why: str) -> None:
        log.error("shutdown_timeout", after_s=self.timeout_s, reason=why, exit_code=self.exit_code,
                  note="graceful stop did not finish; unacked frames are redelivered")
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # a closed stream: exit anyway
                pass
        os._exit(self.exit_code)


def exit_code_for(exc: BaseException) -> int:
    """Exit status of a worker stopped by ``exc`` (contracts.cli convention)."""
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_RUNTIME


def fatal_stop(state: dict[str, Any], exc: BaseException, events: Iterable[Any] = ()) -> None:
    """Withhold ``events``, record the error, log one line and SIGTERM this process (a bounded stop)."""
    n = withhold(events)
    if "fatal" in state:
        return
    state["fatal"] = exc
    log.error("worker_fatal", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500], withheld=n,
              action="stopping without acking the batch; its frames are redelivered after a restart")
    os.kill(os.getpid(), signal.SIGTERM)


async def reach_triton(pipeline: Any, wait_s: float) -> None:
    """Wait up to ``wait_s`` for Triton, then keep waiting behind the pipeline's circuit breaker (consumption
    paused, capped-backoff liveness probes) until its models can be read. Never raises for Triton being down."""
    while True:
        try:
            await pipeline.triton.wait_ready(wait_s)
            await pipeline.refresh_models()
            # just (re)started: give its models up to wait_s to load, or the first frames would be DLQ'd as
            # unknown_product (a fresh worker has seen no model READY yet, so no grace period applies)
            t0 = time.monotonic()
            while not pipeline.triton.ready_models() and time.monotonic() - t0 < wait_s:
                await asyncio.sleep(0.5)
                await pipeline.refresh_models()
            return
        except Exception as e:
            pipeline.breaker.open(f"Triton not reachable at start: {type(e).__name__}: {e}")
            await pipeline.breaker.wait_closed()
