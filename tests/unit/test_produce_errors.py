"""Producer error handling, the start-up wait and the bounded stop (issue #15 items 1 and 2): no broker.

- :func:`stream.kafka.produce.classify` sorts aiokafka / Faust errors into retriable vs fatal;
- :func:`stream.worker.app.send_all` sends each record once, re-sends only the unacknowledged ones with
  capped backoff, and stops at once on a fatal error (it used to re-send the whole list up to 1,000,000
  times, whatever the error);
- :func:`stream.kafka.limits.dlq_value_cap` fits a DLQ record into the DLQ topic's max.message.bytes;
- withholding a failed batch's acks: tests/unit/test_faust_adapter.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from aiokafka import errors as ke
from faust.exceptions import ProducerSendError

from stream.kafka.limits import DLQ_HEADERS_BOUND, DLQ_HEADROOM_BYTES, TopicLimitError, dlq_value_cap
from stream.kafka.produce import FatalProduceError, classify
from stream.kafka.produce import send_all as send_records
from stream.worker.app import send_all
from stream.worker.records import Outgoing


def _wrapped(e: BaseException) -> ProducerSendError:
    """How Faust's aiokafka producer raises a client-side refusal (``raise ProducerSendError(...) from exc``)."""
    try:
        raise ProducerSendError(f"Error while sending: {e!r}") from e
    except ProducerSendError as w:
        return w


@pytest.mark.parametrize("err", [
    ke.TopicAuthorizationFailedError(), ke.ClusterAuthorizationFailedError(), ke.MessageSizeTooLargeError(),
    ke.RecordTooLargeError(), ke.RecordListTooLargeError(), ke.InvalidTopicError(), ke.ProducerClosed(),
    ke.UnsupportedVersionError(), ke.SaslAuthenticationFailed(), ke.PolicyViolationError(),
    _wrapped(ke.MessageSizeTooLargeError("The message is 40000000 bytes")), _wrapped(ke.TopicAuthorizationFailedError()),
    TypeError("a bug"), KeyError("x"),
])
def test_fatal_errors(err):
    assert classify(err) == "fatal"


@pytest.mark.parametrize("err", [
    ke.KafkaTimeoutError(), ke.RequestTimedOutError(), ke.KafkaConnectionError(), ke.NodeNotReadyError(),
    ke.NotEnoughReplicasError(), ke.NotEnoughReplicasAfterAppendError(), ke.LeaderNotAvailableError(),
    ke.NotLeaderForPartitionError(), ke.UnknownTopicOrPartitionError(), ke.CorruptRecordException(),
    _wrapped(ke.KafkaConnectionError("Connection reset")), TimeoutError(), ConnectionResetError(),
])
def test_retriable_errors(err):
    assert classify(err) == "retriable"


# ----------------------------------------------------------------------------- send_all bookkeeping


@dataclass
class FakeTopic:
    """A Faust topic's ``send``: returns a delivery future whose outcome follows ``script[value]`` per attempt."""

    name: str = "inspection-results"
    script: dict[bytes, list[BaseException | None]] = field(default_factory=dict)
    raise_at_send: dict[bytes, BaseException] = field(default_factory=dict)
    sends: list[bytes] = field(default_factory=list)
    delivered: list[bytes] = field(default_factory=list)

    def get_topic_name(self) -> str:
        return self.name

    async def send(self, *, key, value, headers, force):
        assert force
        self.sends.append(value)
        if value in self.raise_at_send:
            raise self.raise_at_send[value]
        fut = asyncio.get_running_loop().create_future()
        outcome = self.script.get(value, [None])
        err = outcome.pop(0) if len(outcome) > 1 else outcome[0]
        if err is None:
            self.delivered.append(value)
            fut.set_result("meta")
        else:
            fut.set_exception(err)
        return fut


def _records(topic: FakeTopic, n: int) -> list[Outgoing]:
    return [Outgoing(topic, b"cam", f"r{i}".encode(), None) for i in range(n)]


def test_only_unacknowledged_records_are_sent_again():
    t = FakeTopic(script={b"r1": [ke.KafkaTimeoutError(), None], b"r3": [ke.NotEnoughReplicasError(), None]})
    rounds = asyncio.run(send_all(_records(t, 4), 0.001, 0.01))
    assert rounds == 1
    # every record sent once, the two that failed retriably once more; nothing acknowledged is duplicated
    assert sorted(t.sends) == [b"r0", b"r1", b"r1", b"r2", b"r3", b"r3"]
    assert sorted(t.delivered) == [b"r0", b"r1", b"r2", b"r3"]


def test_retriable_errors_back_off_and_eventually_succeed():
    t = FakeTopic(script={b"r0": [ke.KafkaConnectionError()] * 4 + [None]})
    delays: list[float] = []

    async def sleep(d):
        delays.append(d)

    def run(rng):
        return asyncio.run(send_records(_records(t, 2), lambda o: o.topic.send(key=o.key, value=o.value, headers=None,
                                                                              force=True),
                                        backoff_s=0.2, backoff_max_s=1.0, sleep=sleep, rng=rng))

    rounds = run(lambda: 1.0)  # equal jitter at its top: the capped exponential envelope
    assert rounds == 4 and delays == [0.2, 0.4, 0.8, 1.0]
    assert t.sends.count(b"r1") == 1 and t.sends.count(b"r0") == 5
    t.script[b"r0"] = [ke.KafkaConnectionError()] * 4 + [None]
    delays.clear()
    assert run(lambda: 0.0) == 4 and delays == [0.1, 0.2, 0.4, 0.5]  # at its bottom: half the envelope


@pytest.mark.parametrize("where", ["future", "send"])
def test_fatal_error_stops_at_once(where):
    err = ke.TopicAuthorizationFailedError()
    t = FakeTopic(script={b"r1": [err]}) if where == "future" else FakeTopic(
        raise_at_send={b"r1": _wrapped(ke.MessageSizeTooLargeError("The message is 40000000 bytes"))})
    with pytest.raises(FatalProduceError) as ei:
        asyncio.run(asyncio.wait_for(send_all(_records(t, 3), 0.001, 0.01), 5))  # used to retry 1,000,000 times
    assert "topic inspection-results" in str(ei.value)
    assert t.sends.count(b"r1") == 1  # never retried


# ----------------------------------------------------------------------------- DLQ record size vs the topic


def test_dlq_value_cap_fits_the_topic():
    mib = 1024 * 1024
    assert DLQ_HEADERS_BOUND <= DLQ_HEADROOM_BYTES
    assert dlq_value_cap(32 * mib, "frames-dlq", None) == 32 * mib  # no limit known (Tansu)
    assert dlq_value_cap(32 * mib, "frames-dlq", 10 * mib) == 9 * mib  # k8s: topics cap at 10 MiB
    assert dlq_value_cap(4 * mib, "frames-dlq", 10 * mib) == 4 * mib
    with pytest.raises(TopicLimitError, match="frames-dlq accepts records up to 500000 bytes"):
        dlq_value_cap(32 * mib, "frames-dlq", 500_000)


def test_capped_dlq_record_fits_the_topic_limit():
    from contracts.envelope import dlq_record

    mib = 1024 * 1024
    cap = dlq_value_cap(32 * mib, "frames-dlq", 10 * mib)
    headers = [(f"h{i}", b"v" * 8000) for i in range(80)]  # past DLQ_MAX_HEADERS: bounded anyway
    k, v, h = dlq_record(b"cam", b"\x00" * (10 * mib - 10), headers, "undecodable_image", "x" * 5000,
                         max_value_bytes=cap)
    size = len(k) + len(v) + sum(len(a) + len(b) for a, b in h)
    assert v == b"" and size <= 10 * mib


# ----------------------------------------------------------------------------- start-up wait and bounded stop


def test_triton_down_at_start_waits_behind_the_breaker_and_never_raises():
    from stream.worker.acks import reach_triton
    from stream.worker.breaker import CircuitBreaker

    class Triton:
        def __init__(self):
            self.calls, self.probes, self.models = 0, 0, []

        async def wait_ready(self, timeout_s):
            self.calls += 1
            if self.probes < 3:
                raise TimeoutError(f"Triton not live after {timeout_s}s")  # what used to escape into the agent

        async def live(self):  # Triton comes up at the third liveness probe
            self.probes += 1
            return self.probes >= 3

    class P:
        def __init__(self):
            self.triton = Triton()
            self.paused = 0

            async def no_sleep(_):
                await asyncio.sleep(0)

            self.breaker = CircuitBreaker(self.triton.live, sleep=no_sleep, on_open=self._pause)

        def _pause(self):
            self.paused += 1

        async def refresh_models(self):
            self.triton.models = ["m"]

    p = P()
    p.triton.ready_models = lambda: p.triton.models
    asyncio.run(asyncio.wait_for(reach_triton(p, 0.01), 5))
    assert p.triton.calls == 2 and p.triton.probes == 3 and p.breaker.closed and p.breaker.opened_total == 1
    assert p.paused == 1  # consumption paused while waiting


def test_shutdown_watchdog_ends_a_hung_stop():
    import subprocess
    import sys
    import time

    code = ("import time; from stream.worker.acks import ShutdownWatchdog; w = ShutdownWatchdog(0.5, 1); "
            "w.arm('SIGTERM'); time.sleep(30)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert r.returncode == 1 and time.monotonic() - t0 < 10
    assert b"shutdown_timeout" in r.stdout + r.stderr


def test_a_delivery_report_that_never_comes_is_resent_not_waited_for_for_ever():
    """A record whose delivery future never completes (a lost report) is re-sent after ``delivery_timeout_s``
    instead of holding its batch -- and the partition's acks and every rebalance -- for ever."""
    sent: list[int] = []

    async def send(i: int):
        sent.append(i)
        fut = asyncio.get_running_loop().create_future()
        if not (i == 1 and sent.count(1) == 1):  # record 1's first report is lost
            fut.set_result(i)
        return fut

    rounds = asyncio.run(asyncio.wait_for(send_records([0, 1, 2], send, backoff_s=0.001, backoff_max_s=0.01,
                                                       delivery_timeout_s=0.2), 10))
    assert rounds == 1 and sorted(sent) == [0, 1, 1, 2]
