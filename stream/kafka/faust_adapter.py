"""Every place linewatch reaches past Faust's (faust-streaming) and aiokafka's public API, in one module.

The rest of stream/ uses Faust through its public face: ``Stream.noack_take`` with manual
``Stream.ack`` (the worker acks a batch only once all its outputs are on the broker), ``App.consumer``'s
``assignment`` / ``highwater``, the ``on_partitions_assigned`` / ``_revoked`` signals, ``Worker.on_stop``.
What follows has no public equivalent. Each touch says why it must stay private and names the upstream
issue where there is one; tests/unit/test_faust_adapter.py checks every private attribute, method and
behaviour relied on against the installed faust and aiokafka, so an upgrade that changes one fails a
test, not production.

1. :func:`withhold`: a batch the worker will never ack (its body raised, or the worker is stopping
   mid-batch) is marked settled without being acked (``Message.acked``), so Faust's ``wait_empty`` (run on
   every rebalance and stop with ``stream_wait_empty``) does not wait for it and no commit covers it.
2. :func:`pause_fetch` / :func:`resume_fetch`: pause the partitions in aiokafka's own consumer, on Faust's
   consumer thread (``Consumer._thread``, ``_ensure_consumer``). Faust's ``Consumer.pause_partitions`` only
   drops them from the set its fetch loop filters on, so records aiokafka had already returned for them
   (its position past them) are discarded without a result or an ack and the next commit skips them: the
   filter faust-streaming#88 fixed for a full stream buffer (``_buffered_partitions``), not for a pause.
3. :func:`limit_fetch_wait`: Faust's worker consumer hard-codes ``fetch_max_wait_ms=1500``
   (``AIOKafkaConsumerThread._create_worker_consumer``; no setting, no upstream issue found). The embedded
   Tansu broker answers a fetch only when that wait expires.
4. :func:`apply_dev_broker_workarounds`: aiokafka sends LeaveGroup only for ``generation > 0``
   (``GroupCoordinator._maybe_leave_group``); Tansu numbers a group's first generation 0 (Kafka: 1). No
   upstream issue found (it is Tansu's numbering; only the dev broker gets the patch).
5. :func:`leader_topic_name`: the name of Faust's internal leader-election topic (``App._leader_assignor``),
   for the worker's Kafka ACLs (stream/ops/acls.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from contracts.logs import get_logger

log = get_logger("stream.kafka.faust_adapter")


# ----------------------------------------------------------------------------- 1. acks


def withhold(events: Iterable[Any]) -> int:
    """Mark these events' messages settled without acking them: Faust's ``Consumer.ack`` is never told, so
    their offsets never commit (the consumer commits only offsets it was told about, contiguously) and the
    frames are redelivered to the next worker; ``wait_empty`` drops settled messages from the set it waits
    for. Returns how many were not settled before."""
    n = 0
    for e in events:
        msg = e.message
        if not msg.acked:
            msg.acked = True  # private: Message.ack returns early on it and Consumer.ack is never called
            n += 1
    return n


# ----------------------------------------------------------------------------- 2. pause in aiokafka


async def _on_consumer_thread(app: Any, method: str, tps: Iterable[Any]) -> None:
    """Call the aiokafka consumer's ``pause`` / ``resume`` with ``tps`` on Faust's consumer thread (the aiokafka
    consumer lives on that thread's event loop)."""
    from aiokafka import TopicPartition

    thread = app.consumer._thread  # private: Faust exposes no handle on its aiokafka consumer
    consumer = thread._ensure_consumer()  # private: raises ConsumerNotStarted before the thread started it
    parts = [TopicPartition(tp.topic, tp.partition) for tp in tps]

    async def call() -> None:
        getattr(consumer, method)(*parts)

    await thread.call_thread(call)


def _run(app: Any, method: str, tps: set) -> asyncio.Future:
    fut = asyncio.ensure_future(_on_consumer_thread(app, method, tps))
    fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or log.error(
        "consumption_control_failed", method=method, error=str(f.exception())[:300]))
    return fut


def pause_fetch(app: Any, tps: set) -> asyncio.Future:
    """Pause fetching ``tps`` in aiokafka (its position is kept: what it had buffered is fetched again after
    :func:`resume_fetch`; what Faust already holds is processed). Scheduled on the running loop."""
    return _run(app, "pause", tps)


def resume_fetch(app: Any, tps: set) -> asyncio.Future:
    return _run(app, "resume", tps)


# ----------------------------------------------------------------------------- 3. the worker consumer's fetch wait

_fetch_wait_ms: list[int] = []


def limit_fetch_wait(ms: int) -> None:
    """Give Faust's worker consumer ``fetch_max_wait_ms=ms`` instead of its hard-coded 1500. Tansu answers a
    fetch only when that wait expires (measured: frames arrived in bursts every ~500 ms, p50 e2e ~500 ms at
    10 fps); Apache Kafka answers as soon as fetch_min_bytes is met, so a short wait is harmless there (a few
    more empty fetches while idle). Applied before the consumer is created; idempotent (the last ``ms`` wins)."""
    from faust.transport.drivers import aiokafka as fa  # the worker only: the aiokafka-only verbs lack faust

    _fetch_wait_ms[:] = [ms]
    cls = fa.AIOKafkaConsumerThread
    if getattr(cls, "_linewatch_patched", False):
        return
    orig = cls._create_worker_consumer  # private: the one place Faust builds the worker's AIOKafkaConsumer

    def _create_worker_consumer(self, transport):
        consumer = orig(self, transport)
        consumer._fetch_max_wait_ms = _fetch_wait_ms[0]  # private: read when the consumer starts its fetcher
        return consumer

    cls._create_worker_consumer = _create_worker_consumer
    cls._linewatch_patched = True


# ----------------------------------------------------------------------------- 4. LeaveGroup on Tansu


async def _maybe_leave_group_gen0(self) -> None:
    """aiokafka's ``GroupCoordinator._maybe_leave_group`` with ``generation >= 0`` for ``> 0`` (it still skips
    -1, "no generation", and static membership)."""
    from aiokafka.errors import KafkaError
    from aiokafka.protocol.group import LeaveGroupRequest

    if self.generation >= 0 and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except KafkaError as err:
            log.warning("leave_group_failed", group=self.group_id, error=str(err))
        else:
            log.info("leave_group_sent", group=self.group_id, generation=self.generation)
    self.reset_generation()


def apply_dev_broker_workarounds() -> bool:
    """Idempotently make aiokafka send LeaveGroup in a group's generation 0 (Tansu): without it a consumer
    leaving a fresh group is never removed and the next member waits a whole session timeout to join.
    Returns True if it patched now, False if already done. Only where ``Settings.dev_broker`` is true."""
    from aiokafka.consumer import group_coordinator as gc

    cls = gc.GroupCoordinator
    if getattr(cls, "_linewatch_dev_broker", False):
        return False
    cls._maybe_leave_group = _maybe_leave_group_gen0  # private: called by the coordinator when it closes
    cls._linewatch_dev_broker = True
    return True


# ----------------------------------------------------------------------------- 5. Faust's internal topics


def leader_topic_name(app: Any) -> str:
    """Faust's leader-election topic (``<app id>-__assignor-__leader``, created unless ``topic_disable_leader``)."""
    return app._leader_assignor._leader_topic_name  # private: no public accessor on App or LeaderAssignor
