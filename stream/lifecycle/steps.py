"""The rollout's steps that must complete once Triton serves the new version (issue #26 item 1).

A rollout is a sequence of states (stream/lifecycle/controller.py, ``Rollout.state``)::

    verifying -> loading_candidate -> shadow -> promoting -> recording -> announcing -> done
                      \\________________ any failure: roll back ________________/

Up to and including ``promoting`` a failure is rolled back: the candidate is dropped, the previous version
keeps serving (a failed promote restores its version policy) and ``rolled_back`` / ``refused`` is the
outcome; an error that escapes (Triton unreachable, the broker gone before the candidate loaded) re-runs
the whole event (:meth:`RolloutController.handle_until_decided`). After ``promoting`` there is no way back:
Triton serves the new version, so ``recording`` (the serving state) and ``announcing`` (the ``promoted``
event) are idempotent writes retried with backoff until they are done (:func:`until_done`). The service
commits the ``released`` event only once its outcome is published; a controller that dies in between has
its event redelivered, and the next one finishes the same steps (``_recovered``) or, when the outcome is
already out, skips it (stream/lifecycle/service.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from contracts.backoff import Backoff
from contracts.logs import get_logger
from stream.lifecycle.lease import LeaseLost

log = get_logger("stream.lifecycle.steps")

T = TypeVar("T")

STEP_BACKOFF = Backoff(base_s=0.5, cap_s=15.0)


async def until_done(step: str, fn: Callable[[], Awaitable[T]], *, backoff: Backoff = STEP_BACKOFF,
                     **ctx) -> T:
    """``await fn()`` until it returns; each failure is logged and retried after ``backoff``. A lost lease
    (another controller is active) and cancellation (the controller stopping) end it at once."""
    attempt = 0
    while True:
        try:
            return await fn()
        except LeaseLost:
            raise
        except Exception as e:
            attempt += 1
            wait_s = backoff.delay(attempt)
            log.warning("rollout_step_retry", step=step, attempt=attempt, retry_in_s=round(wait_s, 2),
                        error=f"{type(e).__name__}: {e}"[:300], **ctx)
            await asyncio.sleep(wait_s)


async def write_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread(fn, *args)`` for a repository write: a cancelled caller (the controller stopping,
    or a lost lease ending its task) waits for the thread to finish before the cancellation goes on, so no
    write is left running behind a rollout that has already moved on (cleaned up, or handed to another
    controller)."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        try:
            await fut
        except Exception as e:  # the write's own failure: logged, the cancellation is what propagates
            log.warning("repository_write_failed_while_cancelled", error=f"{type(e).__name__}: {e}"[:300])
        raise
