"""What the broker accepts per record, read once at worker start (issue #15 item 2).

A DLQ record carries the original frame (up to ``max_frame_bytes``) plus bounded headers. When the DLQ
topic's ``max.message.bytes`` is below that, an undecodable frame just under ``max_frame_bytes`` would
make a DLQ record the broker refuses for ever. :func:`read_topic_limits` reads the topics'
``max.message.bytes`` (admin DescribeConfigs); a topic that reports none (Tansu stores only the configs a
topic was created with, and enforces none) gets ``Settings.kafka_max_message_bytes`` (None: no limit
known). :func:`dlq_value_cap` then caps the original value a DLQ record keeps (a larger one is replaced
by its size + sha256, as for frames over ``max_frame_bytes``), or refuses to start when the DLQ topic
cannot even hold a DLQ record's headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from contracts.cli import UsageError
from contracts.config import Settings
from contracts.envelope import DLQ_MAX_HEADER_VALUE, DLQ_MAX_HEADERS, MAX_HEADER_BYTES
from contracts.logs import get_logger

log = get_logger("stream.kafka.limits")

# a DLQ record beyond its value: <= DLQ_MAX_HEADERS original headers (key <= MAX_HEADER_BYTES, value <=
# DLQ_MAX_HEADER_VALUE), the error_* headers, the key and the record framing; 1 MiB covers it with room
DLQ_HEADROOM_BYTES = 1024 * 1024
DLQ_HEADERS_BOUND = DLQ_MAX_HEADERS * (MAX_HEADER_BYTES + DLQ_MAX_HEADER_VALUE) + 8 * MAX_HEADER_BYTES


class TopicLimitError(UsageError):
    """The broker's limits cannot hold what the worker must publish (one line, exit 2)."""


async def read_topic_limits(s: Settings, topics: Iterable[str], timeout_s: float = 10.0) -> dict[str, int | None]:
    """{topic: max.message.bytes} (the setting's value where the broker reports none or cannot be asked)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from stream.kafka.clients import client_kwargs

    topics = list(dict.fromkeys(topics))
    out: dict[str, int | None] = dict.fromkeys(topics, s.kafka_max_message_bytes)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, **client_kwargs(settings=s))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        asked = [t for t in topics if t in existing]  # a topic Faust will create gets the broker default
        if asked:
            # every config, unfiltered: Tansu cannot parse a DescribeConfigs request naming config keys
            res = [ConfigResource(ConfigResourceType.TOPIC, t) for t in asked]
            for resp in await asyncio.wait_for(admin.describe_configs(res), timeout_s):
                for r in resp.resources:
                    err, name, entries = r[0], r[3], r[4]
                    if err:
                        continue
                    for e in entries:
                        if e[0] == "max.message.bytes" and e[1] and str(e[1]).isdigit():
                            out[name] = int(e[1])
    except Exception as e:  # broker unreachable / DescribeConfigs unsupported: the setting stands
        log.warning("topic_limits_unknown", error=f"{type(e).__name__}: {e}"[:300],
                    assumed=s.kafka_max_message_bytes)
    finally:
        try:
            await admin.close()
        except Exception:  # never started
            pass
    return out


def dlq_value_cap(max_frame_bytes: int, dlq_topic: str, dlq_limit: int | None) -> int:
    """The largest original value a DLQ record may keep so that the record fits ``dlq_limit``."""
    if dlq_limit is None:
        return max_frame_bytes
    room = dlq_limit - DLQ_HEADROOM_BYTES
    if room <= 0:
        raise TopicLimitError(f"topic {dlq_topic} accepts records up to {dlq_limit} bytes (max.message.bytes); a DLQ "
                              f"record needs {DLQ_HEADROOM_BYTES} bytes for its headers alone: raise it")
    return min(max_frame_bytes, room)
