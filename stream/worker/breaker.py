"""Retry safety of the worker: a per-frame retry budget and a circuit breaker on Triton.

- :class:`RetryBudget`: counts the transient failures that are a frame's *own* (its single-frame
  request failed transiently while Triton was live and its model READY). Past the budget the frame
  goes to the DLQ as ``retry_exhausted`` instead of being retried for ever and stalling its partition.
- :class:`CircuitBreaker`: opened when Triton itself is unreachable (not live). While open the worker
  sends no inference requests and takes no new frames (app.py pauses the consumer's partitions);
  it probes liveness once per backoff step (exponential, capped, equal jitter: every worker's probes
  do not arrive together; :class:`contracts.backoff.Backoff`) and closes on the first live answer.
  Frames are never charged retries while it is open: Triton being down is not their fault.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from contracts.backoff import Backoff
from contracts.logs import get_logger

log = get_logger("stream.worker.breaker")


class RetryBudget:
    """Own transient failures per frame id; :meth:`charge` is True once a frame exceeds ``budget``."""

    def __init__(self, budget: int):
        self.budget = budget
        self._attempts: dict[str, int] = {}

    def charge(self, frame_id: str) -> bool:
        n = self._attempts.get(frame_id, 0) + 1
        self._attempts[frame_id] = n
        return n > self.budget

    def attempts(self, frame_id: str) -> int:
        return self._attempts.get(frame_id, 0)

    def forget(self, frame_id: str) -> None:
        self._attempts.pop(frame_id, None)


class CircuitBreaker:
    """closed -> (open) -> probing with capped backoff -> closed. ``probe``: is Triton live?"""

    def __init__(self, probe: Callable[[], Awaitable[bool]], *, backoff_s: float = 0.5, backoff_max_s: float = 10.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_open: Callable[[], None] | None = None, on_close: Callable[[], None] | None = None,
                 metrics=None, rng: Callable[[], float] = random.random):
        self.probe = probe
        self.backoff = Backoff(backoff_s, backoff_max_s, "equal", rng)
        self._sleep = sleep
        self.on_open = on_open
        self.on_close = on_close
        self.metrics = metrics
        self.closed = True
        self.reason = ""  # why it last opened: Triton unreachable, or a served model not loaded (infer_stage.py)
        self.opened_total = 0
        self._lock = asyncio.Lock()

    def open(self, why: str) -> None:
        if not self.closed:
            return
        self.closed = False
        self.reason = why
        self.opened_total += 1
        log.warning("triton_breaker_open", reason=why[:300])
        if self.metrics is not None:
            self.metrics.breaker_open.set(1)
            self.metrics.breaker_opened.inc()
        if self.on_open is not None:
            self._call(self.on_open)

    def _close(self, probes: int) -> None:
        self.closed = True
        log.info("triton_breaker_closed", probes=probes)
        if self.metrics is not None:
            self.metrics.breaker_open.set(0)
        if self.on_close is not None:
            self._call(self.on_close)

    @staticmethod
    def _call(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # a pause/resume hook must never break the worker
            log.warning("triton_breaker_hook_failed", error=f"{type(e).__name__}: {e}"[:300])

    async def wait_closed(self) -> None:
        """Return once the breaker is closed, probing Triton once per (capped, doubling, jittered) backoff
        step; the first probe comes after one step."""
        if self.closed:
            return
        async with self._lock:  # one prober, however many callers wait
            delay, probes = self.backoff.delay(1), 0
            while not self.closed:
                await self._sleep(delay)
                probes += 1
                try:
                    live = await self.probe()
                except Exception:  # unreachable: still down
                    live = False
                if live:
                    log.info("triton_breaker_probe", probe=probes, live=live)
                    self._close(probes)
                    return
                delay = self.backoff.delay(probes + 1)
                log.info("triton_breaker_probe", probe=probes, live=live, next_delay_s=round(delay, 3))
