"""The console's Kafka side: group-less tails of every topic it shows, feeding :class:`ConsoleState`, and the
producer of operator feedback.

No consumer group, nothing committed: each topic is assigned whole and read from ``console_replay`` records
before its end (per partition: a bounded replay, so the pages are not empty after a restart), then followed.
The compacted ``serving-state`` is read whole (:class:`stream.kafka.follow.TopicFollower`). A topic that does
not exist yet is picked up once it does. Frames are read only to draw thumbnails: their bytes sit in a
bounded :class:`~stream.console.images.FrameBuffer` and are decoded (bounded, in a thread) only for a
defect event or a page that asks.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.envelope import EnvelopeError, decode_defect_event, decode_result, headers_to_dict, peek_ids
from contracts.logs import get_logger
from contracts.model_events import ModelEventError
from contracts.model_events import decode as decode_model_event
from contracts.serving_state import decode_entry
from stream.console.feedback import Feedback, FeedbackError, decode_feedback
from stream.console.images import LRU, FrameBuffer, thumbnail
from stream.console.state import ConsoleState
from stream.kafka.clients import Producer, client_kwargs, ensure_topics, partitions_of
from stream.kafka.codecs import require_codecs
from stream.kafka.follow import TopicFollower
from stream.lifecycle.onboarding import OnboardEvent, decode_event

log = get_logger("stream.console")


@dataclass(frozen=True)
class ConsoleTopics:
    """What the console reads and writes (stream/ops/acls.py grants exactly these)."""

    results: str
    defects: str
    drift: str
    dlq: str
    serving_state: str
    model_events: str
    feedback: str
    onboarding: str  # progress read; the operator's capture_select written
    frames: str | None  # None: no thumbnails (console_frame_buffer_mb = 0)

    @classmethod
    def of(cls, s: Settings) -> ConsoleTopics:
        return cls(s.topic_results, s.topic_defects, s.topic_drift, s.topic_dlq, s.topic_serving_state,
                   s.topic_model_events, s.topic_feedback, s.topic_onboarding,
                   s.topic_frames if s.console_frame_buffer_mb > 0 else None)

    @property
    def reads(self) -> tuple[str, ...]:
        t = (self.results, self.defects, self.drift, self.dlq, self.serving_state, self.model_events, self.feedback,
             self.onboarding)
        return t + ((self.frames,) if self.frames else ())

    @property
    def writes(self) -> tuple[str, ...]:
        return (self.feedback, self.onboarding)


class TopicTail:
    """One topic, every partition, from ``replay`` records before the end; then followed until cancelled."""

    def __init__(self, bootstrap: str, topic: str, on_record: Callable[[Any], Any], *, replay: int,
                 settings: Settings, poll_ms: int = 200):
        self.topic, self.on_record, self.replay, self.poll_ms = topic, on_record, replay, poll_ms
        extra = {"fetch_max_wait_ms": 100} if settings.dev_broker else {}
        self.c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                  auto_offset_reset="latest", **client_kwargs("consumer", settings, **extra))
        self.records = 0
        self.assigned = asyncio.Event()

    async def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(await partitions_of(self.c, self.topic))]

    async def run(self) -> None:
        await self.c.start()
        try:
            tps = await self._partitions()
            while not tps:  # not created yet: the console shows it once it is
                await asyncio.sleep(2.0)
                tps = await self._partitions()
            self.c.assign(tps)
            begin, end = await self.c.beginning_offsets(tps), await self.c.end_offsets(tps)
            for tp in tps:
                self.c.seek(tp, max(begin[tp], end[tp] - self.replay))
            self.assigned.set()
            log.info("console_topic_assigned", topic=self.topic, partitions=len(tps),
                     replay=sum(end[tp] - max(begin[tp], end[tp] - self.replay) for tp in tps))
            while True:
                try:
                    batch = await self.c.getmany(timeout_ms=self.poll_ms, max_records=200)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # broker away: aiokafka reconnects; keep trying
                    log.warning("console_fetch_failed", topic=self.topic, error=f"{type(e).__name__}: {e}"[:300])
                    await asyncio.sleep(1.0)
                    continue
                for recs in batch.values():
                    for r in recs:
                        self.records += 1
                        try:
                            out = self.on_record(r)
                            if inspect.isawaitable(out):
                                await out
                        except (EnvelopeError, ModelEventError, FeedbackError, ValueError) as e:
                            log.warning("console_bad_record", topic=self.topic, offset=r.offset, error=str(e)[:300])
                        except Exception as e:  # one record never stops the console
                            log.error("console_record_failed", topic=self.topic, offset=r.offset,
                                      error=f"{type(e).__name__}: {e}"[:300])
        finally:
            await self.c.stop()


class ConsoleSources:
    """Every tail of the console, the frame buffer + thumbnail cache, and the feedback producer."""

    def __init__(self, settings: Settings, bootstrap: str, state: ConsoleState):
        require_codecs()
        self.s, self.bootstrap, self.state = settings, bootstrap, state
        self.topics = ConsoleTopics.of(settings)
        self.frames = FrameBuffer(settings.console_frame_buffer_mb * 1024 * 1024)
        self.thumbs = LRU(256)
        self._decode = asyncio.Semaphore(1)  # one thumbnail decode at a time, off the event loop
        self.producer: Producer | None = None
        self.tails: list[TopicTail] = []
        self.follower: TopicFollower | None = None
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()

    # ------------------------------------------------------------------ records -> state
    async def _thumb(self, frame_id: str) -> bytes | None:
        data = self.frames.get(frame_id)
        if data is None:
            return None
        async with self._decode:
            return await asyncio.to_thread(thumbnail, data, max_side=self.s.max_image_side,
                                           max_pixels=self.s.max_image_pixels, max_bytes=self.s.max_frame_bytes)

    async def frame_thumbnail(self, frame_id: str) -> bytes | None:
        """A frame's JPEG thumbnail: a defect's own, the cache, or decoded from the frame buffer now."""
        rec = self.state.defects.get(frame_id)
        if rec is not None and rec.thumb is not None:
            return rec.thumb
        hit = self.thumbs.get(frame_id)
        if hit is None:
            hit = await self._thumb(frame_id)
            if hit is not None:
                self.thumbs.put(frame_id, hit)
        return hit

    def on_frame(self, r) -> Any:
        fid, _cam = peek_ids(r.headers)
        if not fid or not r.value:
            return None
        self.frames.put(fid, r.value)
        rec = self.state.defects.get(fid)
        if rec is not None and rec.thumb is None:  # the defect event came first (e.g. during the replay)
            return self._attach_thumb(fid)
        return None

    async def _attach_thumb(self, fid: str) -> None:
        rec = self.state.defects.get(fid)
        if rec is not None and rec.thumb is None:
            rec.thumb = await self._thumb(fid)

    def on_result(self, r) -> None:
        res = decode_result(r.value)
        self.state.apply_result(res, has_frame=res.frame_id in self.frames)

    async def on_defect(self, r) -> None:
        ev = decode_defect_event(r.value)
        self.state.apply_defect(ev, await self._thumb(ev.result.frame_id))

    def on_drift(self, r) -> None:
        self.state.apply_drift(orjson.loads(r.value))

    def on_dlq(self, r) -> None:
        self.state.apply_dlq(headers_to_dict(r.headers), len(r.value or b""))

    def on_model_event(self, r) -> None:
        self.state.apply_model_event(decode_model_event(r.value))

    def on_feedback(self, r) -> None:
        self.state.apply_feedback(decode_feedback(r.value))

    def on_onboarding(self, r) -> None:
        self.state.apply_onboard_event(decode_event(r.value))

    def on_serving(self, key: bytes | None, value: bytes | None) -> None:
        e = decode_entry(value)
        product = e.product if e is not None else (key or b"").decode("utf-8", "replace")
        if product:
            self.state.apply_serving(product, e)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        t, s, n = self.topics, self.s, self.s.console_replay
        if s.dev_broker:  # the embedded broker: create the feedback topic like the stack creates the others
            await ensure_topics(self.bootstrap, [t.feedback, t.onboarding], settings=s)
        if s.console_token is not None:
            self.producer = Producer(self.bootstrap, settings=s)
            await self.producer.start()
        specs = [(t.results, self.on_result, n), (t.defects, self.on_defect, n), (t.drift, self.on_drift, n),
                 (t.dlq, self.on_dlq, n), (t.model_events, self.on_model_event, max(n, 1000)),
                 (t.feedback, self.on_feedback, max(n, 10000)), (t.onboarding, self.on_onboarding, max(n, 2000))]
        if t.frames:
            specs.append((t.frames, self.on_frame, min(n, 16)))
        self.tails = [TopicTail(self.bootstrap, topic, fn, replay=k, settings=s) for topic, fn, k in specs]
        self._tasks = [asyncio.ensure_future(tail.run()) for tail in self.tails]
        self.follower = TopicFollower(self.bootstrap, t.serving_state, self.on_serving, settings=s, missing_ok=True)
        await self.follower.start()

    async def send_feedback(self, fb: Feedback) -> None:
        """Publish one verdict (awaits the broker's ack), then apply it here at once."""
        if self.producer is None:
            raise RuntimeError("the feedback producer is not started (no console token)")
        await self.producer.send_many(self.topics.feedback, [(fb.key, fb.to_json(), [])])
        self.state.apply_feedback(fb)
        log.info("console_feedback", frame_id=fb.frame_id, verdict=fb.verdict, product=fb.product,
                 model=fb.model, version=fb.model_version, score=fb.score)

    async def send_capture_select(self, product: str, frame_ids: list[str]) -> OnboardEvent:
        """An operator's selection: a ``capture_select`` record the capture service acts on (awaits the ack)."""
        if self.producer is None:
            raise RuntimeError("the console producer is not started (no console token)")
        ev = OnboardEvent("capture_select", product, {"frame_ids": frame_ids})
        await self.producer.send_many(self.topics.onboarding, [ev.record()])
        log.info("console_capture_select", product=product, frames=len(frame_ids))
        return ev

    def health(self) -> dict[str, Any]:
        return {"topics": {tail.topic: {"assigned": tail.assigned.is_set(), "records": tail.records}
                           for tail in self.tails},
                "serving_state_caught_up": bool(self.follower and self.follower.caught_up.is_set()),
                "frames_buffered": len(self.frames), "frame_buffer_bytes": self.frames.bytes,
                "failed": [tail.topic for tail, task in zip(self.tails, self._tasks, strict=False)
                           if task.done() and not task.cancelled() and task.exception() is not None]}

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self.follower is not None:
            await self.follower.stop()
        if self.producer is not None:
            await self.producer.stop()
