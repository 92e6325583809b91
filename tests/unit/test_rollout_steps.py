"""The rollout's must-complete steps (stream/lifecycle/steps.py, issue #26 item 1): retried until done with
backoff, a lost lease and cancellation end them at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from contracts.backoff import Backoff
from stream.lifecycle.lease import LeaseLost
from stream.lifecycle.steps import until_done, write_in_thread

FAST = Backoff(base_s=0.001, cap_s=0.005)


def test_a_failing_write_is_retried_until_it_succeeds():
    calls = []

    async def write():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("broker blip")
        return "written"

    assert asyncio.run(until_done("record", write, backoff=FAST)) == "written"
    assert len(calls) == 4


def test_a_lost_lease_is_not_retried():
    calls = []

    async def write():
        calls.append(1)
        raise LeaseLost("generation 2 by 'b'")

    with pytest.raises(LeaseLost):
        asyncio.run(until_done("announce", write, backoff=FAST))
    assert calls == [1]


def test_stopping_cancels_a_step_that_keeps_failing():
    async def write():
        raise ConnectionError("broker down")

    async def go():
        t = asyncio.ensure_future(until_done("record", write, backoff=FAST))
        await asyncio.sleep(0.05)
        assert not t.done()  # still retrying: the outcome is owed
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(go())


def test_a_cancelled_rollout_waits_for_its_repository_write_to_finish():
    """A rollout cancelled while its config is being written in a worker thread: the cancellation surfaces
    only after the write finished (plain asyncio.to_thread returns at once and leaves the thread writing
    behind the cleanup that follows)."""
    started, log = threading.Event(), []

    def write():
        started.set()
        time.sleep(0.3)
        log.append("written")

    async def main():
        task = asyncio.ensure_future(write_in_thread(write))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.append("cancelled")

    asyncio.run(main())
    assert log == ["written", "cancelled"]
