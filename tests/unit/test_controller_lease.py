"""The one-active-controller lease (stream/lifecycle/lease.py, issue #26 item 3): a second process waits while
the first holds it, takes it over when the first dies (generation + 1), and a holder whose generation was
overwritten (a network file system lease that expired) is fenced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from stream.lifecycle.lease import ControllerLease, LeaseLost

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from stream.lifecycle.lease import ControllerLease
lease = ControllerLease(sys.argv[1], holder="child")
assert lease.try_acquire()
print(lease.generation, flush=True)
time.sleep(600)
"""


def _child_holding(path: Path) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip().isdigit(), f"the child did not take the lease: {line!r}"
    return p, int(line)


def test_second_controller_waits_then_takes_over_with_the_next_generation(tmp_path):
    path = tmp_path / "repo" / ".linewatch-controller.lease"
    child, gen = _child_holding(path)
    lease = ControllerLease(path, holder="standby")
    try:
        assert gen == 1
        assert not lease.try_acquire() and not lease.held
        with pytest.raises(LeaseLost):
            lease.check()  # a standby never passes the fence

        async def wait_then_kill():
            stop = asyncio.Event()
            waiting = asyncio.ensure_future(lease.acquire(stop, poll_s=0.05))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "the standby took a lease that is held"
            child.kill()
            return await asyncio.wait_for(waiting, 30)

        assert asyncio.run(wait_then_kill()) is True
        assert lease.generation == 2
        lease.check()  # the new holder passes its own fence
        rec = lease._read()  # through the held descriptor: opening the file again would drop the POSIX lock
        assert rec["generation"] == 2 and rec["holder"] == "standby"
    finally:
        child.kill()
        child.wait()
        lease.release()


def test_holder_whose_generation_was_taken_is_fenced(tmp_path):
    path = tmp_path / ".linewatch-controller.lease"
    lease = ControllerLease(path, holder="a")
    try:
        assert lease.try_acquire() and lease.generation == 1
        lease.check()
        # what a second controller writes after this one's NFS lock lease expired (it never saw the loss)
        path.write_bytes(orjson.dumps({"generation": 2, "holder": "b"}))
        with pytest.raises(LeaseLost, match="generation 2 by 'b'"):
            lease.check()
    finally:
        lease.release()


def test_released_lease_goes_to_the_next_process_and_stop_ends_a_standby(tmp_path):
    path = tmp_path / ".linewatch-controller.lease"
    first = ControllerLease(path, holder="first")
    assert first.try_acquire()
    first.release()
    child, gen = _child_holding(path)
    try:
        assert gen == 2  # generations never repeat
        standby = ControllerLease(path, holder="standby")

        async def stopped():
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.3, stop.set)
            t0 = time.monotonic()
            got = await standby.acquire(stop, poll_s=0.05)
            return got, time.monotonic() - t0

        got, took = asyncio.run(stopped())
        assert got is False and took < 10 and not standby.held
        standby.release()
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(path)


def test_an_unreadable_lease_record_never_reuses_an_earlier_generation(tmp_path):
    path = tmp_path / ".linewatch-controller.lease"
    path.write_bytes(b"\x00garbage")
    lease = ControllerLease(path, holder="after-corruption")
    try:
        assert lease.try_acquire() and lease.generation > 1_000_000  # past any counted generation
    finally:
        lease.release()
