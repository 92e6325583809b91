"""The broker fixture is real: 1,000 keyed messages with headers through a consumer group."""

import asyncio
import hashlib
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts.config import Settings
from stream.kafka.clients import aiokafka_client_kwargs
from stream.kafka.faust_adapter import apply_dev_broker_workarounds

pytestmark = pytest.mark.integration

N, KEYS, PARTITIONS = 1000, 7, 3


async def _roundtrip(bootstrap: str) -> None:
    apply_dev_broker_workarounds()
    s = Settings(kafka_bootstrap=bootstrap, dev_broker=True)
    topic = f"fixture-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    await admin.close()

    sent: dict[str, list[tuple[int, str]]] = {}
    producer = AIOKafkaProducer(**aiokafka_client_kwargs(s, "producer"), acks="all")
    await producer.start()
    try:
        futures = []
        for i in range(N):
            key = f"cam-{i % KEYS}"
            payload = f"{key}:{i}:".encode() + bytes([i % 251]) * (i % 97)
            digest = hashlib.sha256(payload).hexdigest()
            sent.setdefault(key, []).append((i, digest))
            headers = [("seq", str(i).encode()), ("sha256", digest.encode()), ("camera_id", key.encode())]
            futures.append(await producer.send(topic, payload, key=key.encode(), headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()

    got: dict[str, list[tuple[int, str]]] = {}
    consumer = AIOKafkaConsumer(
        topic, group_id=f"g-{topic}", auto_offset_reset="earliest", enable_auto_commit=False,
        **aiokafka_client_kwargs(s, "consumer"),
    )
    await consumer.start()
    try:
        count = 0
        async with asyncio.timeout(60):
            while count < N:
                batch = await consumer.getmany(timeout_ms=1000)
                for _tp, msgs in batch.items():
                    for m in msgs:
                        h = dict(m.headers)
                        assert hashlib.sha256(m.value).hexdigest() == h["sha256"].decode()
                        assert h["camera_id"] == m.key
                        got.setdefault(m.key.decode(), []).append((int(h["seq"]), h["sha256"].decode()))
                        count += 1
                await consumer.commit()
        extra = await consumer.getmany(timeout_ms=500)
        assert sum(len(v) for v in extra.values()) == 0
        for tp in consumer.assignment():
            assert (await consumer.committed(tp)) == await consumer.position(tp)
    finally:
        await consumer.stop()

    assert count == N
    assert got == sent  # same messages, same payload hashes, per-key order preserved


def test_thousand_keyed_messages_with_headers_through_a_consumer_group(kafka_bootstrap):
    asyncio.run(_roundtrip(kafka_bootstrap))


def test_a_topic_created_after_the_consumer_started_is_seen_at_once(kafka_bootstrap):
    """aiokafka's ``topics()`` does not update the cache ``partitions_for_topic`` reads (5 min refresh):
    ``partitions_of`` refreshes it, so a follower started before its topic existed picks it up."""
    from stream.kafka.clients import ensure_topics, partitions_of

    topic = f"late-{uuid.uuid4().hex[:8]}"

    async def go():
        c = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
        await c.start()
        try:
            assert await partitions_of(c, topic) == set()
            await ensure_topics(kafka_bootstrap, [topic], partitions=2)
            for _ in range(50):
                if await c.topics() and topic in await c.topics():
                    break
                await asyncio.sleep(0.1)
            assert c.partitions_for_topic(topic) is None  # what the bug was: the cache never learnt it
            assert await partitions_of(c, topic) == {0, 1}
        finally:
            await c.stop()

    asyncio.run(go())
