"""aiokafka helpers shared by replay / tail / demo / tests / benchmarks: topic creation, a producer
whose sends are awaited, and a group-less reader that drains topics from the beginning.

(The worker itself produces through Faust; these are the edges around it.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts.config import Settings, process_settings
from contracts.logs import get_logger

log = get_logger("stream.kafka.clients")



def client_kwargs(role: str = "any", settings: Settings | None = None, **extra) -> dict[str, Any]:
    """aiokafka kwargs (security + dev-broker timings) from the settings, minus bootstrap_servers.

    ``settings`` come from the entry point; callers that are none (tests, benchmarks) may omit them
    (contracts.config.process_settings)."""
    kw = aiokafka_client_kwargs(settings or process_settings(), role=role)
    kw.pop("bootstrap_servers", None)
    kw.update(extra)
    return kw


def aiokafka_client_kwargs(s: Settings, role: str = "any") -> dict[str, Any]:
    """aiokafka client kwargs from settings: security, and the dev-broker timings.

    role: "producer", "consumer" or "any" (only keys every aiokafka client accepts).
    """
    kw: dict[str, Any] = {"bootstrap_servers": s.kafka_bootstrap, "security_protocol": s.kafka_security_protocol}
    if s.kafka_security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = s.kafka_sasl_mechanism or "PLAIN"
        kw["sasl_plain_username"] = s.kafka_sasl_username
        kw["sasl_plain_password"] = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = ssl_context(s)
    if s.dev_broker:
        if role == "consumer":
            # (b) Tansu keeps a departed fresh member until its session times out: keep it short
            kw.update(session_timeout_ms=6000, heartbeat_interval_ms=2000)
        elif role == "producer":
            # (a) ListOffsets(latest) is wrong on multi-record batches: one record per batch
            kw.update(max_batch_size=1)
    return kw


def ssl_context(s: Settings):
    """TLS context from the kafka_ssl_* settings (CA bundle, optional client cert/key), or None."""
    if s.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    from aiokafka.helpers import create_ssl_context

    pw = s.kafka_ssl_key_password.get_secret_value() if s.kafka_ssl_key_password else None
    return create_ssl_context(cafile=s.kafka_ssl_cafile, certfile=s.kafka_ssl_certfile,
                              keyfile=s.kafka_ssl_keyfile, password=pw)


def faust_broker_credentials(s: Settings):
    """The Faust app's ``broker_credentials`` for the same security settings (None for PLAINTEXT).

    Faust turns these into the same aiokafka kwargs for its consumer, producer and admin client
    (``faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth``)."""
    proto = s.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    import faust  # the worker image has faust; the aiokafka-only verbs never get here

    ctx = ssl_context(s)
    if proto == "SSL":
        return faust.SSLCredentials(ctx)
    creds = faust.SASLCredentials(username=s.kafka_sasl_username,
                                  password=s.kafka_sasl_password.get_secret_value(),
                                  ssl_context=ctx, mechanism=s.kafka_sasl_mechanism or "PLAIN")
    return creds


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition the default (murmur2, as in the Java client) partitioner gives ``key``."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def ensure_topics(bootstrap: str, topics: Iterable[str] | None = None, partitions: int = 1, *,
                        settings: Settings | None = None, config: dict[str, str] | None = None) -> None:
    """Create the missing ``topics`` (default: every topic of the settings), with topic ``config``."""
    s = settings or process_settings()
    topics = s.topics() if topics is None else topics
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs(settings=s))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1, topic_configs=dict(config or {}))
               for t in topics if t not in existing]
        if new:
            try:
                await admin.create_topics(new)
            except Exception as e:  # raced with another creator
                if "exist" not in str(e).lower():
                    raise
    finally:
        await admin.close()


class Producer:
    """Thin aiokafka producer wrapper; ``send`` returns after the broker acknowledged."""

    def __init__(self, bootstrap: str, *, settings: Settings | None = None, **kw):
        self.p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0,
                                  **client_kwargs("producer", settings, **kw))

    async def start(self) -> None:
        await self.p.start()

    async def stop(self) -> None:
        await self.p.stop()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()

    async def send_many(self, topic: str, records: Iterable[tuple[bytes | None, bytes, list]]) -> None:
        futs = [await self.p.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        await asyncio.gather(*futs)


async def partitions_of(c: AIOKafkaConsumer, topic: str) -> set[int]:
    """``topic``'s partition ids as ``c`` sees them now, learning a topic created after ``c`` started.

    ``partitions_for_topic`` reads the client's cached cluster metadata, which ``c.topics()`` does not
    update (it fetches into a separate object): a topic created later would stay unknown until the next
    periodic refresh (``metadata_max_age_ms``, 5 min). When the topic exists but is not cached, the
    client's metadata is refreshed now (aiokafka's own ``force_metadata_update``)."""
    parts = c.partitions_for_topic(topic)
    if parts:
        return set(parts)
    if topic in await c.topics():
        await c._client.force_metadata_update()
        parts = c.partitions_for_topic(topic)
    return set(parts or ())


async def read_topics(bootstrap: str, topics: Iterable[str], *, until: Callable[[dict[str, list]], bool] | None = None,
                      timeout_s: float = 30.0, idle_s: float | None = None,
                      on_record: Callable[[Any], None] | None = None,
                      settings: Settings | None = None) -> dict[str, list]:
    """Read the given topics from offset 0 without a consumer group (no commits, no rebalance).

    Stops when ``until(records_by_topic)`` is true, after ``timeout_s``, or after ``idle_s`` without
    new records. Returns {topic: [ConsumerRecord, ...]}.
    """
    topics = list(topics)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         group_id=None, **client_kwargs("consumer", settings))
    await c.start()
    out: dict[str, list] = {t: [] for t in topics}
    try:
        tps = []
        t0 = time.monotonic()
        while True:
            tps = []
            for t in topics:
                tps += [TopicPartition(t, p) for p in sorted(await partitions_of(c, t))]
            if tps or time.monotonic() - t0 > min(timeout_s, 10):
                break
            await asyncio.sleep(0.3)
        if not tps:
            return out
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        last_new = time.monotonic()
        while True:
            batch = await c.getmany(timeout_ms=200, max_records=500)
            got = False
            for tp, recs in batch.items():
                out[tp.topic].extend(recs)
                if on_record:
                    for r in recs:
                        on_record(r)
                got = got or bool(recs)
            if got:
                last_new = time.monotonic()
            if until is not None and until(out):
                break
            if time.monotonic() - t0 > timeout_s:
                break
            if idle_s is not None and time.monotonic() - last_new > idle_s:
                break
    finally:
        await c.stop()
    return out
