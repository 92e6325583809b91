"""The ``model-events`` edges of the rollout controller outside Faust: the standalone consumer
(``linewatch rollout run``, a dedicated rollout Deployment, tests) and an aiokafka publisher."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.logs import get_logger
from contracts.model_events import ModelEvent, ModelEventError, decode
from stream.kafka.clients import Producer, client_kwargs
from stream.lifecycle.controller import HANDLED, Publish, RolloutController

log = get_logger("stream.lifecycle.events")


def actionable(value: bytes | None) -> ModelEvent | None:
    """The event in a ``model-events`` record if the controller acts on it (invalid ones are logged)."""
    try:
        ev = decode(value)
    except ModelEventError as e:
        log.warning("model_event_invalid", error=str(e)[:300])
        return None
    return ev if ev.type in HANDLED else None


async def serve_events(bootstrap: str, topic: str, controller: RolloutController, *, group_id: str | None = None,
                       stop: asyncio.Event | None = None, settings: Settings | None = None) -> None:
    """Standalone controller (no Faust): consume ``topic`` with aiokafka and handle its events in order
    (outcomes are published by the controller's ``publish``).

    ``group_id=None`` reads every partition from the beginning (tests, one-shot catch-up); a group id
    resumes from its committed offsets (a dedicated rollout Deployment)."""
    stop = stop or asyncio.Event()
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=group_id is not None,
                         auto_offset_reset="earliest", **client_kwargs("consumer", settings))
    await c.start()
    try:
        if group_id is None:
            await _assign_all_from_start(c, topic)
        else:
            c.subscribe([topic])
        while not stop.is_set():
            batch = await c.getmany(timeout_ms=200)
            for recs in batch.values():
                for r in recs:
                    ev = actionable(r.value)
                    if ev is not None:
                        await controller.handle_safely(ev)
    finally:
        await c.stop()


async def _assign_all_from_start(c: AIOKafkaConsumer, topic: str) -> None:
    parts = c.partitions_for_topic(topic) or set()
    for _ in range(50):
        if parts:
            break
        await asyncio.sleep(0.2)
        parts = c.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    c.assign(tps)
    await c.seek_to_beginning(*tps)


def kafka_publisher(producer: Producer, topic: str) -> Publish:
    """Publish callable over a started :class:`stream.kafka.clients.Producer` (awaits the broker ack)."""

    async def publish(ev: ModelEvent) -> None:
        await producer.send_many(topic, [(ev.key, ev.to_json(), [])])

    return publish
