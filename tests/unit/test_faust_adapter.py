"""stream/kafka/faust_adapter.py: every private part of faust-streaming and aiokafka linewatch relies on,
checked against the installed packages (issue #27 item 2). A Faust or aiokafka upgrade that renames, removes
or changes one of them fails here, not in production. One section per touch, named as in the module.
No broker: Faust apps are built, never started."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import faust
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.group import LeaveGroupRequest
from faust.exceptions import ConsumerNotStarted
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as fa
from faust.types.tuples import ConsumerMessage, Message

from stream.kafka import faust_adapter as fad


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ----------------------------------------------------------------------------- 1. withhold: Message.acked


class _Consumer:
    def __init__(self):
        self.acked: list[int] = []

    def ack(self, message) -> bool:
        self.acked.append(message.offset)
        return True


@dataclass
class _Event:
    message: ConsumerMessage


def _messages(n: int) -> list[ConsumerMessage]:
    msgs = [ConsumerMessage("frames", 0, off, 0.0, 0, None, b"k", b"v", None) for off in range(n)]
    for m in msgs:
        m.incref()  # the one stream holding it
    return msgs


def test_message_acked_is_a_plain_attribute_the_final_ack_checks():
    assert "acked" in Message.__slots__ and ConsumerMessage("t", 0, 0, 0.0, 0, None, b"", b"", None).acked is False
    assert "acked" in inspect.getsource(Message.ack)  # Message.ack returns early for a settled message
    assert _params(Message.ack)[:2] == ["self", "consumer"]


def test_withheld_events_never_reach_the_consumer_ack():
    """The stream's ack (``Stream.ack`` -> ``Event.ack`` -> ``Message.ack``) of a withheld message does not
    reach ``Consumer.ack``: its offset is never committed and the frame is redelivered."""
    msgs = _messages(4)
    consumer = _Consumer()
    assert fad.withhold([_Event(m) for m in msgs[2:]]) == 2
    assert fad.withhold([_Event(m) for m in msgs[2:]]) == 0  # idempotent
    for m in msgs:  # an ack of every event of the batch, failed ones included
        m.ack(consumer)
    assert consumer.acked == [0, 1]  # offsets 2 and 3 are never committed


def test_wait_empty_drops_withheld_messages_from_what_it_waits_for():
    """``Consumer.wait_empty`` (every rebalance and stop, ``stream_wait_empty``) loops while
    ``_unacked_messages`` holds a message and cleans it with ``_clean_unacked_messages``, which drops the
    settled ones: a withheld batch does not hold a rebalance up."""
    assert "_unacked_messages" in inspect.getsource(faust_consumer.Consumer.wait_empty)
    assert "_clean_unacked_messages" in inspect.getsource(faust_consumer.Consumer.wait_empty)
    msgs = _messages(3)
    fake = SimpleNamespace(_unacked_messages=set(msgs))
    fad.withhold([_Event(msgs[0])])
    faust_consumer.Consumer._clean_unacked_messages(fake)
    assert fake._unacked_messages == set(msgs[1:])


def test_the_agent_takes_with_manual_acks_through_public_stream_methods():
    """Public, but what the worker's at-least-once rests on: ``noack_take(max_, within)`` and ``ack(event)``."""
    assert _params(faust.Stream.noack_take)[:3] == ["self", "max_", "within"]
    assert inspect.isasyncgenfunction(inspect.unwrap(faust.Stream.noack_take))
    assert _params(faust.Stream.ack) == ["self", "event"] and inspect.iscoroutinefunction(faust.Stream.ack)


# ----------------------------------------------------------------------------- 2. pause in aiokafka: Consumer._thread


def test_faust_consumer_has_the_thread_and_its_aiokafka_consumer():
    app = faust.App("lw-adapter-thread", broker="kafka://127.0.0.1:1")
    thread = app.consumer._thread
    assert isinstance(thread, fa.AIOKafkaConsumerThread)
    with pytest.raises(ConsumerNotStarted):
        thread._ensure_consumer()  # before the thread started its consumer
    assert fa.AIOKafkaConsumerThread._ensure_consumer(SimpleNamespace(_consumer="c")) == "c"
    assert _params(thread.call_thread)[:1] == ["fun"] and inspect.iscoroutinefunction(thread.call_thread)
    assert _params(AIOKafkaConsumer.pause) == ["self", "partitions"]
    assert _params(AIOKafkaConsumer.resume) == ["self", "partitions"]


def test_pause_and_resume_run_aiokafkas_own_on_the_consumer_thread():
    calls: list = []

    class Thread:
        def _ensure_consumer(self):
            return SimpleNamespace(pause=lambda *tps: calls.append(("pause", tps)),
                                   resume=lambda *tps: calls.append(("resume", tps)))

        async def call_thread(self, fun):
            calls.append("on_thread")
            await fun()

    app = SimpleNamespace(consumer=SimpleNamespace(_thread=Thread()))
    tp = faust.types.TP("frames", 3)

    async def run():
        await fad.pause_fetch(app, {tp})
        await fad.resume_fetch(app, {tp})

    asyncio.run(run())
    want = (TopicPartition("frames", 3),)
    assert calls == ["on_thread", ("pause", want), "on_thread", ("resume", want)]


def test_faust_pause_partitions_still_only_filters_its_own_fetch_loop():
    """Why the pause stays private: Faust's ``Consumer.pause_partitions`` only edits the partition sets its
    fetch loop filters on (records already fetched for a paused partition are dropped; faust-streaming#88).
    If it ever pauses the driver's consumer, this fails and attach_breaker can use it instead."""
    src = inspect.getsource(faust_consumer.Consumer.pause_partitions)
    assert "_paused_partitions" in src and "_thread" not in src
    assert "pause_partitions" not in vars(fa.Consumer)


# ----------------------------------------------------------------------------- 3. fetch wait: _create_worker_consumer


def test_worker_consumer_fetch_wait_is_hard_coded_and_patched():
    assert _params(fa.AIOKafkaConsumerThread._create_worker_consumer)[:2] == ["self", "transport"]
    assert "fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start)  # read when its fetcher starts
    app = faust.App("lw-adapter-fetch", broker="kafka://127.0.0.1:1")
    thread = app.consumer._thread

    async def build() -> int:
        c = thread._create_worker_consumer(app.transport)
        try:
            return c._fetch_max_wait_ms
        finally:
            await c.stop()

    if not getattr(fa.AIOKafkaConsumerThread, "_linewatch_patched", False):
        assert asyncio.run(build()) == 1500  # Faust's own: no setting changes it
    fad.limit_fetch_wait(120)
    assert asyncio.run(build()) == 120
    fad.limit_fetch_wait(80)  # idempotent: the last value wins, the method is wrapped once
    assert asyncio.run(build()) == 80


# ----------------------------------------------------------------------------- 4. LeaveGroup: _maybe_leave_group


def test_group_coordinator_leave_group_hook_and_what_it_uses():
    assert inspect.iscoroutinefunction(GroupCoordinator._maybe_leave_group)
    assert _params(GroupCoordinator._maybe_leave_group) == ["self"]
    assert "_maybe_leave_group" in inspect.getsource(GroupCoordinator.close)
    assert inspect.iscoroutinefunction(GroupCoordinator._send_req) and _params(GroupCoordinator._send_req) == [
        "self", "request"]
    init = inspect.getsource(GroupCoordinator.__init__)
    assert "self._group_instance_id" in init and "self.group_id" in init
    assert callable(GroupCoordinator.reset_generation)
    assert LeaveGroupRequest("g", "m") is not None


@pytest.mark.parametrize(("generation", "instance", "sent"), [(0, None, True), (3, None, True), (-1, None, False),
                                                                (0, "static-1", False)])
def test_leave_group_is_sent_in_generation_zero(generation, instance, sent):
    reqs: list = []
    reset: list = []

    async def send_req(req):
        reqs.append(req)

    fake = SimpleNamespace(generation=generation, _group_instance_id=instance, group_id="g", member_id="m",
                           _send_req=send_req, reset_generation=lambda: reset.append(True))
    asyncio.run(fad._maybe_leave_group_gen0(fake))
    assert bool(reqs) is sent and reset == [True]


def test_dev_broker_workaround_patches_once():
    fad.apply_dev_broker_workarounds()
    assert GroupCoordinator._maybe_leave_group is fad._maybe_leave_group_gen0
    assert fad.apply_dev_broker_workarounds() is False


# ----------------------------------------------------------------------------- 5. the leader topic: _leader_assignor


def test_leader_topic_name():
    app = faust.App("lw-adapter-leader", broker="kafka://127.0.0.1:1")
    assert fad.leader_topic_name(app) == "lw-adapter-leader-__assignor-__leader"
