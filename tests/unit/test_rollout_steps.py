"""The rollout's must-complete steps (stream/lifecycle/steps.py, issue #26 item 1): retried until done with
backoff, a lost lease and cancellation end them at once."""

from __future__ import annotations

import asyncio

import pytest

from contracts.backoff import Backoff
from stream.lifecycle.lease import LeaseLost
from stream.lifecycle.steps import until_done

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
