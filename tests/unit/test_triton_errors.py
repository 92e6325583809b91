"""Triton error classification (stream.inference.triton_client), the per-frame retry budget and the
circuit breaker (stream.worker.breaker): transient is decided by the gRPC status code only, never by
the error's text (which may echo a frame's own headers, e.g. MoLE-Flow's ``unknown task '<task>'``)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from contracts.spec import parse_spec
from stream.inference import triton_client
from stream.inference.triton_client import TritonInfer, is_transient


def _ise(status: str | None, msg: str = "boom") -> InferenceServerException:
    return InferenceServerException(msg=msg, status=status)


@pytest.mark.parametrize("status", ["StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                                    "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED",
                                    "StatusCode.CANCELLED", "StatusCode.NOT_FOUND"])
def test_transient_status_codes(status):
    assert is_transient(_ise(status, "anything"))


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.UNKNOWN",
                                    "StatusCode.UNIMPLEMENTED", "StatusCode.FAILED_PRECONDITION",
                                    "StatusCode.PERMISSION_DENIED", None])
def test_permanent_status_codes(status):
    assert not is_transient(_ise(status))


@pytest.mark.parametrize("status", ["StatusCode.INTERNAL", "StatusCode.INVALID_ARGUMENT", None])
@pytest.mark.parametrize("msg", [
    "moleflow: unknown task 'unavailable-now'; known: ('bottle',)",  # MoLE-Flow echoes the frame's task header
    "UNAVAILABLE: not ready, Socket closed, failed to connect, Connection reset, not found, unknown model",
    "[StatusCode.UNAVAILABLE] failed to connect to all addresses",  # text that *looks* like a code
])
def test_message_text_never_makes_an_error_transient(status, msg):
    assert not is_transient(_ise(status, msg))


def test_connection_level_errors_are_transient():
    assert is_transient(TimeoutError())
    assert is_transient(ConnectionResetError())
    assert not is_transient(ValueError("unavailable"))
    assert not is_transient(RuntimeError("StatusCode.UNAVAILABLE"))


def test_raw_grpc_errors_classified_by_code():
    class _Rpc(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "unavailable"

    assert is_transient(_Rpc(grpc.StatusCode.UNAVAILABLE))
    assert not is_transient(_Rpc(grpc.StatusCode.INTERNAL))


def test_status_code_helper():
    assert triton_client.status_code(_ise("StatusCode.UNAVAILABLE")) == "UNAVAILABLE"
    assert triton_client.status_code(_ise(None)) is None
    assert triton_client.status_code(ValueError()) is None


def test_tasks_of_comes_from_the_model_spec():
    async def go():
        t = TritonInfer("127.0.0.1:1")
        try:
            t.last_specs["moleflow"] = parse_spec(
                '{"schema": 1, "model": "moleflow", "detector": "moleflow", "version": 2, '
                '"input": {"name": "image", "height": 224, "width": 224}, "tasks": {"bottle": {}, "elpv": {}}}')
            assert t.tasks_of("moleflow") == ("bottle", "elpv")
            assert t.tasks_of("nope") is None
        finally:
            await t.close()

    asyncio.run(go())


# ----------------------------------------------------------------------------- retry budget


def test_retry_budget_charges_only_the_frames_own_failures():
    from stream.worker.breaker import RetryBudget

    b = RetryBudget(3)
    assert not b.charge("f1") and not b.charge("f1") and not b.charge("f1")
    assert b.charge("f1")  # the 4th own failure exceeds a budget of 3
    assert b.attempts("f1") == 4 and b.attempts("f2") == 0
    b.forget("f1")
    assert b.attempts("f1") == 0


# ----------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_probes_with_capped_backoff_and_closes():
    from stream.worker.breaker import CircuitBreaker

    probes: list[float] = []
    sleeps: list[float] = []
    live = iter([False, False, False, False, False, True])
    events: list[str] = []

    async def probe() -> bool:
        probes.append(len(sleeps))
        return next(live)

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def go():
        br = CircuitBreaker(probe, backoff_s=0.5, backoff_max_s=2.0, sleep=fake_sleep, rng=lambda: 1.0,
                            on_open=lambda: events.append("open"), on_close=lambda: events.append("close"))
        assert br.closed
        br.open("UNAVAILABLE")
        br.open("again")  # already open: no second transition
        assert not br.closed
        await br.wait_closed()
        assert br.closed and br.opened_total == 1

    asyncio.run(go())
    assert events == ["open", "close"]
    assert len(probes) == 6  # one probe per backoff step, never a busy loop
    # capped exponential backoff (first probe after a wait); rng at 1.0: equal jitter's top, the envelope
    assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_breaker_probes_are_jittered_within_the_envelope():
    """Every worker's breaker probes a restarted Triton at a different moment (equal jitter), never sooner
    than half a step and never later than the capped step."""
    import random

    from stream.worker.breaker import CircuitBreaker

    sleeps: list[float] = []
    live = iter([False] * 7 + [True])

    async def probe() -> bool:
        return next(live)

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def go(seed: int) -> None:
        br = CircuitBreaker(probe, backoff_s=0.5, backoff_max_s=2.0, sleep=fake_sleep, rng=random.Random(seed).random)
        br.open("UNAVAILABLE")
        await br.wait_closed()

    asyncio.run(go(7))
    envelope = [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert len(sleeps) == 8 and all(e / 2 <= s <= e for s, e in zip(sleeps, envelope, strict=True))
    assert len(set(sleeps)) == len(sleeps)  # jittered: no two waits alike
