"""Live shadow traffic for the controller: a sample of frames from every ``frames`` partition.

While a rollout is in its shadow window, the sampler reads the frames topic from its end (every
partition, no consumer group: the workers' group and its offsets are untouched), keeps every
``rollout.shadow_sample_every``-th frame whose ``product`` header belongs to the candidate, asks the
model serving that product now whether it flags the frame (only frames it does not flag count as
good-looking evidence; contracts in stream/lifecycle/policy.py) and offers it to the candidate
(:meth:`stream.lifecycle.controller.RolloutController.offer`).
"""

from __future__ import annotations

import asyncio

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.envelope import EnvelopeError, decode_frame
from contracts.image import decode_image
from contracts.logs import get_logger
from contracts.operating_point import operating_point_of
from contracts.spec import to_pixels
from stream.inference.triton_client import TritonInfer
from stream.kafka.clients import client_kwargs, partitions_of

log = get_logger("stream.lifecycle.sampler")


class ShadowSampler:
    def __init__(self, s: Settings, ctl, frames_topic: str):
        self.s, self.ctl, self.topic = s, ctl, frames_topic
        self.sampled = 0
        self._seen = 0

    def _shadowing(self) -> list:
        return [r for r in self.ctl.active.values() if r.state == "shadow"]

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._shadowing():
                await asyncio.sleep(0.2)
                continue
            try:
                await self._window(stop)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # live frames are extra evidence: the probe images still decide
                log.warning("shadow_sampler_failed", error=f"{type(e).__name__}: {e}"[:300])
                await asyncio.sleep(1.0)

    async def _window(self, stop: asyncio.Event) -> None:
        s = self.s
        c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="latest", **client_kwargs("consumer", s))
        infer = TritonInfer(self.ctl.url, max_retries=1)
        await c.start()
        try:
            parts = await partitions_of(c, self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            if not tps:
                await asyncio.sleep(1.0)
                return
            c.assign(tps)
            await c.seek_to_end(*tps)
            log.info("shadow_sampling", partitions=len(tps), every=s.rollout.shadow_sample_every)
            while not stop.is_set() and self._shadowing():
                batch = await c.getmany(timeout_ms=200, max_records=64)
                for recs in batch.values():
                    for r in recs:
                        await self._offer(infer, r)
        finally:
            await c.stop()
            await infer.close()

    async def _offer(self, infer: TritonInfer, r) -> None:
        try:
            frame = decode_frame(r.key, r.value, r.headers)
        except EnvelopeError:
            return
        wanted = [ro for ro in self._shadowing()
                  if frame.product and (frame.product == ro.artifact.product or frame.product == ro.task)]
        if not wanted:
            return
        self._seen += 1
        if self._seen % self.s.rollout.shadow_sample_every:
            return
        for ro in wanted:
            flagged = await self._incumbent_flags(infer, ro, frame)
            if flagged is None:
                continue
            self.ctl.offer(ro.model, frame.product, frame.image, flagged)
            self.sampled += 1

    async def _incumbent_flags(self, infer: TritonInfer, ro, frame) -> bool | None:
        """Does the model serving now flag the frame? False when nothing serves it yet (a new product);
        None when it cannot tell (the frame is not evidence then)."""
        if ro.previous_version is None:
            return False
        try:
            await infer.specs(max_age_s=30.0)
            spec = infer.spec_for(ro.model)
            if spec is None:
                return None
            x = np.stack([to_pixels(decode_image(frame.image), spec)])
            out = await infer.infer(ro.model, x, [frame.task or ""] if ro.task else None)
            task = out.tasks[0] if out.tasks else (frame.task or None)  # a multi-task model: its task's threshold
            return operating_point_of(spec.raw, task).is_anomaly(float(out.scores[0]))
        except Exception as e:
            log.warning("shadow_incumbent_failed", model=ro.model, error=f"{type(e).__name__}: {e}"[:200])
            return None
