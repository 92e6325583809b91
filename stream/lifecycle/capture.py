"""The capture service (``linewatch capture``; issue 18 item 3): frames of products the system cannot judge
become a dataset for onboarding.

Two triggers, one consumer group (``Settings.capture_group``, committed after the files are written, so a
restart re-reads at most one batch; a frame already in the manifest is not written twice):

- **unknown product**: ``frames-dlq`` records whose ``error`` is ``unknown_product``. A DLQ record is the
  original frame bytes with the original headers plus ``error*`` headers (contracts.envelope.dlq_record),
  so :func:`contracts.envelope.decode_frame` recovers the frame as the camera published it. (A frame over
  the DLQ size limit keeps only its size and sha256: it is skipped, counted ``empty``.) Only products the
  serving state (followed here) does not serve are taken: a served one is never "new" (issue #26 item 4).
- **out of distribution**: a ``retrain_requested`` event on ``retrain-requests`` (a worker's route-OOD drift
  alert; stream/lifecycle/hooks.py; never on ``model-events``, whose commands the controller obeys and which
  workers may not write) *arms* capture for its product (or, without one, its camera) for
  ``capture_arm_s``: live frames of that product are then read from the ``frames`` topic (every
  partition, no group, from the end, like the rollout's shadow sampler) while the arm lasts. An arm lives in
  this process only: a restarted service does not re-arm (its ``retrain_requested`` was acked).

Which candidates are kept is :class:`stream.lifecycle.onboarding.CapturePolicy` (``every_n`` or operator
``select``ion; selections also arrive as ``capture_select`` records on ``topic_onboarding``). Files and the
manifest: :class:`stream.lifecycle.onboarding.CaptureStore`; progress (``captured``, ``capture_armed``,
``capture_refused``) is published on ``topic_onboarding`` (layouts and records: stream/lifecycle/onboarding.py).
A frame without a ``product`` header is skipped (counted ``no_product``): a dataset needs the product's name.

Bounds (issue #26 item 8): quotas on products, bytes and automatic images per product
(stream/lifecycle/capture_quota.py: a refusal is a ``capture_refused`` record with its reason); recent
candidates bounded by count and bytes, per-product counters, cached manifests, pending selections and arms
capped; an operator selection whose frames left the buffer is reported (``selection_not_buffered``), not
taken as done. Files and manifests are fsync'd under temp names unique per pod and process before the
offsets are committed; a restarted service re-reads the manifests (usage, and what was captured).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.envelope import EnvelopeError, Frame, decode_frame, dlq_reason
from contracts.logs import get_logger
from contracts.model_events import ModelEventError
from contracts.model_events import decode as decode_model_event
from contracts.names import is_safe_name
from stream.kafka.clients import Producer, client_kwargs, ensure_topics, partitions_of
from stream.kafka.follow import TopicFollower
from stream.lifecycle.capture_quota import Quotas
from stream.lifecycle.onboarding import (
    CapturePolicy,
    CaptureStore,
    OnboardEvent,
    OnboardEventError,
    decode_event,
)
from stream.lifecycle.supervise import run_until_stopped

log = get_logger("stream.lifecycle.capture")
MAX_ARMS = 256


@dataclass(frozen=True)
class CaptureTopics:
    """The Kafka resources the service uses (stream/ops/acls.py derives its KafkaUser from the same object)."""

    dlq: str  # unknown_product candidates, in ``group``
    retrain: str  # retrain_requested arms (the workers' retrain-requests topic), in ``group``
    onboarding: str  # capture_select read in ``group``; captured / capture_armed written
    frames: str  # live frames while armed: every partition, no group
    group: str
    serving_state: str = "serving-state"  # followed whole, no group: products it serves are never captured

    @classmethod
    def of(cls, s: Settings) -> CaptureTopics:
        return cls(s.topic_dlq, s.topic_retrain_requests, s.topic_onboarding, s.topic_frames, s.capture_group,
                   s.topic_serving_state)

    @property
    def subscribed(self) -> tuple[str, ...]:
        return (self.dlq, self.retrain, self.onboarding)

    @property
    def writes(self) -> tuple[str, ...]:
        return (self.onboarding,)


@dataclass
class Arm:
    """Capture live frames of ``product`` (or, without one, of ``camera``) until ``until`` (monotonic)."""

    product: str | None
    camera: str | None
    until: float

    def matches(self, frame: Frame) -> bool:
        return frame.product == self.product if self.product else frame.camera_id == self.camera


def policy_of(s: Settings, selected: set[str] | None = None) -> CapturePolicy:
    return CapturePolicy(s.capture_policy, s.capture_every_n, s.capture_max_per_product, s.capture_buffer, selected,
                         buffer_bytes=s.capture_buffer_bytes)


class CaptureService:
    def __init__(self, s: Settings, policy: CapturePolicy | None = None, store: CaptureStore | None = None):
        self.s = s
        self.policy = policy or policy_of(s)
        self.store = store or CaptureStore(s.capture_dir)
        self.producer: Producer | None = None  # made in run(): aiokafka objects belong to their loop
        self.arms: dict[str, Arm] = {}  # "product:<p>" / "camera:<c>" -> arm
        self.stats: Counter = Counter()
        self._new: dict[str, list[str]] = {}  # product -> frame ids captured since the last flush
        self._triggers: dict[str, str] = {}
        self._armed = asyncio.Event()
        self.live_ready = asyncio.Event()  # the live reader is positioned at the end of every frames partition
        self.served: set[str] = set()  # products the serving state serves: not "unknown", never captured as such
        self.quotas = Quotas(s, self.store, self.stats)
        self.store.usage()  # read from the manifests on disk now: a restarted service keeps the quotas

    @property
    def usage(self):
        """Products and bytes on the capture volume (stream/lifecycle/onboarding.py ``Usage``)."""
        return self.store.usage()

    # -- pure-ish steps (unit-testable without a broker)
    def offer(self, frame: Frame, trigger: str) -> bool:
        """A candidate frame: captured if the policy wants it. Returns whether it was written."""
        product = frame.product
        if not product or not is_safe_name(product):
            self.stats["no_product"] += 1
            return False
        if not frame.image:
            self.stats["empty"] += 1
            return False
        if self.store.has(product, frame.frame_id):
            self.stats["duplicate"] += 1
            return False
        why = self.quotas.check(product, len(frame.image))
        if why is not None:  # before the policy: a refused product takes no memory here
            self.quotas.refuse(product, why)
            return False
        count = self.store.count(product)
        if (self.policy.mode == "every_n" and count >= self.policy.max_per_product
                and frame.frame_id not in self.policy.selected):
            self.quotas.refuse(product, "max_images")
        if not self.policy.want(product, frame, count, trigger):
            self.stats["not_selected"] += 1
            return False
        return self._write(product, frame, trigger)

    def _write(self, product: str, frame: Frame, trigger: str) -> bool:
        why = self.quotas.check(product, len(frame.image))
        if why is not None:
            self.quotas.refuse(product, why)
            return False
        if not self.store.add(product, frame, trigger):
            return False
        self.stats["captured"] += 1
        self._new.setdefault(product, []).append(frame.frame_id)
        self._triggers[product] = trigger
        return True

    def on_dlq(self, key: bytes | None, value: bytes | None, headers) -> None:
        reason, _ = dlq_reason(headers)
        if reason != "unknown_product":
            return
        try:
            frame = decode_frame(key, value, headers)
        except EnvelopeError:
            self.stats["undecodable"] += 1
            return
        if frame.product in self.served:  # the serving state knows it: a model loading, not a new product
            self.stats["served"] += 1
            return
        self.offer(frame, "unknown_product")

    def on_serving(self, key: bytes | None, value: bytes | None) -> None:
        product = (key or b"").decode("utf-8", "replace")
        (self.served.add if value else self.served.discard)(product)  # an empty value: a tombstone (retired)

    def on_model_event(self, value: bytes | None) -> OnboardEvent | None:
        try:
            ev = decode_model_event(value)
        except ModelEventError:
            return None
        if ev.type != "retrain_requested":
            return None
        camera = (ev.detail or {}).get("camera")
        if not ev.product and not isinstance(camera, str):
            return None
        until = time.monotonic() + self.s.capture_arm_s
        key = f"product:{ev.product}" if ev.product else f"camera:{camera}"
        self.arms.pop(key, None)
        self.arms[key] = Arm(ev.product, None if ev.product else camera, until)
        while len(self.arms) > MAX_ARMS:  # the oldest arm goes
            del self.arms[next(iter(self.arms))]
        self._armed.set()
        log.info("capture_armed", product=ev.product, camera=camera, model=ev.model, seconds=self.s.capture_arm_s)
        if not ev.product or not is_safe_name(ev.product):
            return None  # armed by camera: its frames are captured under their own product header
        return OnboardEvent("capture_armed", ev.product, {
            "camera": camera, "model": ev.model, "reasons": ev.reasons,
            "until_ms": int((time.time() + self.s.capture_arm_s) * 1000)})

    def on_onboarding(self, value: bytes | None) -> None:
        try:
            ev = decode_event(value)
        except OnboardEventError:
            return
        if ev.type != "capture_select":
            return
        ids = [i for i in ev.detail.get("frame_ids", []) if isinstance(i, str)]
        now, missing = self.policy.select_ids(ids)
        refused = []
        for product, frame, trigger in now:
            if not self._write(product, frame, trigger) and not self.store.has(product, frame.frame_id):
                refused.append(frame.frame_id)
        if missing:  # not taken as done: the console shows it
            self.quotas.emit(ev.product, "selection_not_buffered", frame_ids=missing[:50], count=len(missing),
                             message=f"{len(missing)} selected frame(s) were no longer buffered (capture_buffer "
                                     f"{self.policy.buffer}, capture_buffer_bytes {self.policy.buffer_bytes}): not "
                                     "captured now, only if they arrive again")
        if refused:
            self.quotas.emit(ev.product, "selection_refused", frame_ids=refused[:50], count=len(refused),
                             message=f"{len(refused)} selected frame(s) refused by the capture quotas")
        log.info("capture_selected", product=ev.product, frame_ids=len(ids), captured=len(now) - len(refused),
                 not_buffered=len(missing))

    def expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, a in self.arms.items() if a.until < now]:
            log.info("capture_disarmed", key=k)
            del self.arms[k]

    def on_live_frame(self, key: bytes | None, value: bytes | None, headers) -> None:
        self.expire()
        if not self.arms:
            return
        try:
            frame = decode_frame(key, value, headers)
        except EnvelopeError:
            return
        if any(a.matches(frame) for a in self.arms.values()):
            self.offer(frame, "retrain_requested")

    def flush(self) -> list[OnboardEvent]:
        """Rewrite the manifests touched since the last flush; the ``captured`` records to publish."""
        out = []
        for product, ids in self._new.items():
            count = self.store.flush(product)
            out.append(OnboardEvent("captured", product, {"count": count, "new": len(ids), "frame_ids": ids[-50:],
                                                          "trigger": self._triggers.get(product)}))
            log.info("captured", product=product, count=count, new=len(ids))
        self._new.clear()
        self._triggers.clear()
        return out + self.quotas.take()

    # -- Kafka
    async def _publish(self, events: list[OnboardEvent]) -> None:
        if events:
            await self.producer.send_many(self.s.topic_onboarding, [e.record() for e in events])

    async def _control(self, stop: asyncio.Event) -> None:
        """DLQ + model-events + onboarding commands, in the capture group."""
        s = self.s
        # dev: a topic created after the subscription (the DLQ, by the first worker) is seen within seconds
        extra = {"metadata_max_age_ms": 5000} if s.dev_broker else {}
        t = CaptureTopics.of(s)
        c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=t.group, enable_auto_commit=False,
                             auto_offset_reset="earliest", **client_kwargs("consumer", s, **extra))
        await c.start()
        try:
            c.subscribe(list(t.subscribed))
            while not stop.is_set():
                batch = await c.getmany(timeout_ms=300, max_records=64)
                events: list[OnboardEvent] = []
                for tp, recs in batch.items():
                    for r in recs:
                        if tp.topic == s.topic_dlq:
                            self.on_dlq(r.key, r.value, r.headers)
                        elif tp.topic == t.retrain:
                            ev = self.on_model_event(r.value)
                            events += [ev] if ev else []
                        else:
                            self.on_onboarding(r.value)
                events += self.flush()
                await self._publish(events)
                if batch:  # files and manifests are on disk: only now acked
                    await c.commit()
        finally:
            await c.stop()

    async def _live(self, stop: asyncio.Event) -> None:
        """While an arm lasts: the frames topic from its end, every partition, no consumer group."""
        s = self.s
        while not stop.is_set():
            if not self.arms:
                self._armed.clear()
                waiter = asyncio.ensure_future(self._armed.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                 auto_offset_reset="latest", **client_kwargs("consumer", s))
            await c.start()
            try:
                parts = await partitions_of(c, s.topic_frames)
                tps = [TopicPartition(s.topic_frames, p) for p in sorted(parts)]
                if not tps:
                    await asyncio.sleep(1.0)
                    continue
                c.assign(tps)
                await c.seek_to_end(*tps)
                for tp in tps:  # resolve the end offsets now: frames published from here on are seen
                    await c.position(tp)
                self.live_ready.set()
                while not stop.is_set() and self.arms:
                    batch = await c.getmany(timeout_ms=300, max_records=64)
                    for recs in batch.values():
                        for r in recs:
                            self.on_live_frame(r.key, r.value, r.headers)
                    await self._publish(self.flush())
                    self.expire()
            finally:
                self.live_ready.clear()
                await c.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        s = self.s
        if s.dev_broker:  # the embedded broker; in k8s the KafkaTopics exist
            # (frames and the DLQ are the workers': their partition count is theirs to choose)
            await ensure_topics(s.kafka_bootstrap, [s.topic_retrain_requests, s.topic_onboarding], settings=s)
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.producer = Producer(s.kafka_bootstrap, settings=s)
        await self.producer.start()
        serving = TopicFollower(s.kafka_bootstrap, CaptureTopics.of(s).serving_state, self.on_serving, settings=s,
                                missing_ok=True)
        log.info("capture_start", capture_dir=str(self.store.root), policy=self.policy.mode,
                 every_n=self.policy.every_n, max_per_product=self.policy.max_per_product)
        try:
            await serving.start()
            await run_until_stopped(stop, self._control(stop), self._live(stop))
        finally:
            await serving.stop()
            await self.producer.stop()
            log.info("capture_stop", **dict(self.stats))
