"""Follow a compacted topic: read every partition to its end, then keep applying new records.

The serving state (contracts/serving_state.py) and the drift state are compacted topics that every
process reads whole at startup and then follows. No consumer group: each follower assigns itself every
partition from the beginning, so all replicas see the same records and nothing is committed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.logs import get_logger
from stream.kafka.clients import client_kwargs, partitions_of
from stream.kafka.codecs import require_codecs

log = get_logger("stream.kafka.follow")

OnRecord = Callable[[bytes | None, bytes | None], None]


async def read_to_end(c: AIOKafkaConsumer, tps: list[TopicPartition], apply: Callable[[dict], None], *,
                      timeout_s: float, poll_ms: int = 200, start: dict[TopicPartition, int] | None = None) -> None:
    """Assign ``tps`` from their beginning (or the offsets in ``start``) and ``apply`` every fetched batch until
    each partition reached the end offset it had when this was called (TimeoutError past ``timeout_s``)."""
    c.assign(tps)
    if start:
        for tp in tps:
            c.seek(tp, start[tp])
    else:
        await c.seek_to_beginning(*tps)
    ends = await c.end_offsets(tps)
    deadline = time.monotonic() + timeout_s
    while not all([await c.position(tp) >= ends[tp] for tp in tps]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sorted({tp.topic for tp in tps})} not read to the end within {timeout_s:.0f}s")
        apply(await c.getmany(timeout_ms=poll_ms))


class TopicFollower:
    """``await start()`` returns once every partition of ``topic`` was read to the end offset it had
    at start (``caught_up``); a background task then applies records as they arrive until ``stop()``."""

    def __init__(self, bootstrap: str, topic: str, on_record: OnRecord, *, settings: Settings | None = None,
                 poll_ms: int = 200, missing_ok: bool = False):
        require_codecs()
        self.topic, self.on_record, self.poll_ms = topic, on_record, poll_ms
        self.c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                  auto_offset_reset="earliest", **client_kwargs("consumer", settings))
        self.missing_ok = missing_ok  # a topic that does not exist yet counts as empty; followed once it does
        self.caught_up = asyncio.Event()
        self.records = 0
        self._task: asyncio.Task | None = None

    async def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(await partitions_of(self.c, self.topic))]

    async def start(self, timeout_s: float = 30.0) -> None:
        await self.c.start()
        deadline = time.monotonic() + (min(timeout_s, 3.0) if self.missing_ok else timeout_s)
        tps = await self._partitions()
        while not tps:
            if time.monotonic() > deadline:
                if self.missing_ok:
                    log.info("topic_absent", topic=self.topic, note="empty until it is created")
                    self.caught_up.set()
                    self._task = asyncio.ensure_future(self._follow(assigned=False))
                    return
                await self.c.stop()
                raise TimeoutError(f"topic {self.topic} does not exist (waited {timeout_s:.0f}s)")
            await asyncio.sleep(0.3)
            tps = await self._partitions()
        await read_to_end(self.c, tps, self._apply, timeout_s=timeout_s, poll_ms=self.poll_ms)
        self.caught_up.set()
        log.info("topic_caught_up", topic=self.topic, records=self.records, partitions=len(tps))
        self._task = asyncio.ensure_future(self._follow(assigned=True))

    async def sync(self, timeout_s: float = 2.0) -> bool:
        """Read-your-writes: wait until every record written before this call is applied (the end offsets
        now). False on timeout or when the topic is not followed yet."""
        tps = sorted(self.c.assignment())
        if not tps or self._task is None:
            return False
        deadline = time.monotonic() + timeout_s
        try:
            ends = await self.c.end_offsets(tps)
            while not all([await self.c.position(tp) >= ends[tp] for tp in tps]):
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.02)
        except Exception as e:  # broker away: the caller decides with what it has
            log.warning("follow_sync_failed", topic=self.topic, error=f"{type(e).__name__}: {e}"[:300])
            return False
        return True

    async def _assign(self, tps: list[TopicPartition]) -> None:
        self.c.assign(tps)
        await self.c.seek_to_beginning(*tps)

    def _apply(self, batch: dict) -> None:
        for recs in batch.values():
            for r in recs:
                self.records += 1
                try:
                    self.on_record(r.key, r.value)
                except Exception as e:  # one bad record never stops the follower
                    log.warning("follow_record_failed", topic=self.topic, offset=r.offset, error=str(e)[:300])

    async def _follow(self, assigned: bool) -> None:
        while True:
            try:
                if not assigned:
                    tps = await self._partitions()
                    if not tps:
                        await asyncio.sleep(2.0)
                        continue
                    await self._assign(tps)
                    assigned = True
                self._apply(await self.c.getmany(timeout_ms=self.poll_ms))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # broker away: aiokafka reconnects; keep trying
                log.warning("follow_failed", topic=self.topic, error=f"{type(e).__name__}: {e}"[:300])
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.c.stop()
