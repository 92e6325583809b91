"""The worker's batch logic as named stages over typed records (broker-agnostic; stream/worker/app.py feeds it).

    decode    RawRecord -> Decoded    the ``frames`` envelope (contracts.envelope.decode_frame)
    route     Decoded   -> Routed     camera/line/product -> Triton model + its spec (stream.inference.routing)
    prepare   Routed    -> Prepared   bounded image decode + OpenCV preprocess per the spec (contracts.image/spec)
    infer     Prepared  -> Scored     one Triton request per model; transient errors retried with backoff
                                      forever (never DLQ'd), a permanent error isolates the poison frame(s)
    publish   Batch     -> Outgoing   results, defect events, dead letters (+ the lifecycle's drift alerts and
                                      events); stream/worker/app.py sends them and awaits every send before the ack

A frame that fails a stage becomes a :class:`DeadLetter` for ``frames-dlq`` (reason + stage); one bad
frame never stops the stream. :meth:`Pipeline.process` returns a :class:`Batch` with the scored
frames in input order.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from contracts.envelope import EnvelopeError, Frame, InspectionResult, decode_frame, dlq_record, peek_ids
from contracts.image import decode_image
from contracts.logs import get_logger
from contracts.spec import ModelSpec, to_tensor
from stream.inference.heatmap import make_defect_event
from stream.inference.routing import Route, Router, RoutingConfig
from stream.inference.triton_client import InferOutput, PermanentInferError, TransientInferError, TritonInfer
from stream.worker.config import WorkerConfig
from stream.worker.metrics import WorkerMetrics

log = get_logger("stream.worker.pipeline")

# frames up to this size are decoded on the event loop when they arrive alone (no thread hop); larger
# ones, and every frame of a multi-frame batch, go to the decode thread pool (OpenCV releases the GIL)
INLINE_DECODE_MAX_BYTES = 2 * 1024 * 1024


# ----------------------------------------------------------------------------- records between the stages


@dataclass(frozen=True)
class RawRecord:
    """One ``frames`` record as the broker delivered it."""

    index: int  # position in the micro-batch
    key: bytes | None
    value: bytes | None
    headers: Any
    kafka_ts_s: float | None


@dataclass(frozen=True)
class Decoded:
    raw: RawRecord
    frame: Frame
    t_start: float  # perf_counter when the frame's decode began


@dataclass(frozen=True)
class Routed:
    decoded: Decoded
    route: Route
    spec: ModelSpec


@dataclass(frozen=True)
class Prepared:
    raw: RawRecord
    frame: Frame
    route: Route
    tensor: np.ndarray  # (3, H, W) float32 per the model's spec
    latency_ms: dict[str, float]  # queue, decode, preprocess


@dataclass(frozen=True)
class Scored:
    raw: RawRecord
    key: bytes  # the frame's camera id: results and defect events are keyed by camera
    spec: ModelSpec  # of the model version that scored it
    result: InspectionResult
    result_json: bytes
    defect_json: bytes | None  # a defect event when the frame is anomalous


@dataclass(frozen=True)
class DeadLetter:
    raw: RawRecord
    reason: str
    stage: str
    record: tuple[bytes | None, bytes, Any]  # (key, value, headers) for frames-dlq (contracts.envelope.dlq_record)


@dataclass(frozen=True)
class Outgoing:
    """A record to publish with the batch (before its offsets commit)."""

    topic: Any  # a Faust topic
    key: bytes | None
    value: bytes
    headers: Any


@dataclass(frozen=True)
class Batch:
    records: list[RawRecord]
    scored: list[Scored]  # input order
    dead: list[DeadLetter]


# ----------------------------------------------------------------------------- the stages


class Pipeline:
    """decode -> route -> prepare -> infer for one micro-batch (see the module docstring)."""

    def __init__(self, cfg: WorkerConfig, triton: TritonInfer, metrics: WorkerMetrics):
        s = cfg.settings
        self.triton = triton
        self.metrics = metrics
        self.router = Router(RoutingConfig.load(s.routing))
        self.model_missing_since: dict[str, float] = {}
        self.executor = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode")
        self.grace_s = s.worker_transient_grace_s
        self.heatmap_size = s.heatmap_size
        self.max_bytes = s.max_frame_bytes
        self._image_limits = {"max_side": s.max_image_side, "max_pixels": s.max_image_pixels,
                              "max_bytes": s.max_frame_bytes}

    async def refresh_models(self) -> None:
        await self.triton.specs(max_age_s=0)
        self.router.update_models(self.triton.available())

    # -- decode / route / prepare (in the decode threads)
    def decode(self, raw: RawRecord) -> Decoded:
        t0 = time.perf_counter()
        return Decoded(raw, decode_frame(raw.key, raw.value, raw.headers), t0)

    def route(self, d: Decoded) -> Routed:
        try:
            route = self.router.route(d.frame)
        except EnvelopeError as e:
            # its model was READY before (reloading / Triton restarting): retry within the grace period
            if e.reason != "unknown_product":
                raise
            route = Router(self.router.config, self.triton.available(include_unready=True)).route(d.frame)
            missing = time.monotonic() - self.model_missing_since.setdefault(route.model, time.monotonic())
            if missing > self.grace_s:
                raise
        spec = self.triton.spec_for(route.model)
        if spec is None:
            raise EnvelopeError("unknown_product", f"model {route.model} has no linewatch_spec")
        return Routed(d, route, spec)

    def prepare(self, r: Routed, now_ms: float) -> Prepared:
        raw = r.decoded.raw
        img = decode_image(r.decoded.frame.image, **self._image_limits)
        t1 = time.perf_counter()
        x = to_tensor(img, r.spec)
        t2 = time.perf_counter()
        queue_ms = max(0.0, now_ms - raw.kafka_ts_s * 1000) if raw.kafka_ts_s else 0.0
        lat = {"queue": round(queue_ms, 3), "decode": round((t1 - r.decoded.t_start) * 1000, 3),
               "preprocess": round((t2 - t1) * 1000, 3)}
        self.metrics.stage_latency.labels(stage="decode").observe(lat["decode"])
        self.metrics.stage_latency.labels(stage="preprocess").observe(lat["preprocess"])
        return Prepared(raw, r.decoded.frame, r.route, x, lat)

    def front(self, raw: RawRecord, now_ms: float) -> Prepared | DeadLetter:
        """decode -> route -> prepare one frame; a failure is a dead letter naming its stage."""
        stage = "decode"
        try:
            d = self.decode(raw)
            stage = "route"
            r = self.route(d)
            stage = "prepare"
            return self.prepare(r, now_ms)
        except EnvelopeError as e:
            return self.dead_letter(raw, e.reason, e.detail, stage)
        except Exception as e:  # never stop the stream on one frame
            return self.dead_letter(raw, "internal_error", f"{type(e).__name__}: {e}", stage)

    async def front_stages(self, records: list[RawRecord], now_ms: float) -> list[Prepared | DeadLetter]:
        if len(records) == 1 and len(records[0].value or b"") <= INLINE_DECODE_MAX_BYTES:
            # a lone frame: decode on the loop, no thread hop (batch-1 latency, ~1.5 ms measured)
            return [self.front(records[0], now_ms)]
        loop = asyncio.get_running_loop()  # OpenCV releases the GIL: frames in parallel threads
        return list(await asyncio.gather(*(loop.run_in_executor(self.executor, self.front, r, now_ms)
                                           for r in records)))

    # -- infer
    async def infer(self, items: list[Prepared], t_batch: float) -> tuple[list[Scored], list[DeadLetter]]:
        """Score every prepared frame: transient Triton errors are retried (backoff up to 10 s, re-routing
        in between, since a model may be unloaded or replaced); frames never DLQ'd for them unless their
        model stays unroutable past the grace period."""
        scored: list[Scored] = []
        dead: list[DeadLetter] = []
        pending, backoff, t_first_fail = items, 0.5, 0.0
        while pending:
            retry: list[Prepared] = []
            groups: dict[str, list[Prepared]] = defaultdict(list)
            for p in pending:
                groups[p.route.model].append(p)
            for model, group in groups.items():
                s, r, d = await self._infer_model(model, group, t_batch)
                scored += s
                retry += r
                dead += d
            if not retry:
                break
            t_first_fail = t_first_fail or time.monotonic()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            try:
                await self.refresh_models()
            except Exception as e:
                log.warning("triton_refresh_failed", error=str(e)[:300])
            pending, lost = self._reroute(retry, waited=time.monotonic() - t_first_fail)
            dead += lost
        return scored, dead

    async def _infer_model(self, model: str, group: list[Prepared], t_batch: float):
        """(scored, to retry, dead letters) of one model's share of the batch."""
        self.metrics.batch_size.labels(model=model).observe(len(group))
        try:
            out = await self.triton.infer(model, np.stack([p.tensor for p in group]), [p.route.task for p in group])
        except TransientInferError as e:
            log.warning("triton_transient_batch", model=model, n=len(group), error=str(e)[:300])
            return [], group, []
        except PermanentInferError as e:
            if len(group) == 1:
                return [], [], [self.dead_letter(group[0].raw, "inference_error", str(e), "infer")]
            return await self._isolate_poison(model, group, t_batch)
        self.metrics.stage_latency.labels(stage="infer").observe(out.infer_ms)
        return [self.score(p, out, j, t_batch) for j, p in enumerate(group)], [], []

    async def _isolate_poison(self, model: str, group: list[Prepared], t_batch: float):
        """A permanent error on a multi-frame request: retry one by one so only the poison frame(s) are DLQ'd."""
        scored, retry, dead = [], [], []
        for p in group:
            try:
                out = await self.triton.infer(model, p.tensor[None], [p.route.task])
            except PermanentInferError as e:
                dead.append(self.dead_letter(p.raw, "inference_error", str(e), "infer"))
            except TransientInferError:
                retry.append(p)
            else:
                scored.append(self.score(p, out, 0, t_batch))
        return scored, retry, dead

    def _reroute(self, pending: list[Prepared], waited: float) -> tuple[list[Prepared], list[DeadLetter]]:
        still: list[Prepared] = []
        dead: list[DeadLetter] = []
        for p in pending:
            try:
                r = self.router.route(p.frame)
            except EnvelopeError as e:
                if waited < self.grace_s:  # e.g. model reloading: keep retrying
                    still.append(p)
                else:
                    dead.append(self.dead_letter(p.raw, e.reason, e.detail, "route"))
                continue
            if r.model != p.route.model:  # another model (its own input contract): preprocess again
                img = decode_image(p.frame.image, **self._image_limits)
                p = replace(p, tensor=to_tensor(img, self.triton.spec_for(r.model)))
            still.append(replace(p, route=r))
        return still, dead

    # -- outputs
    def score(self, p: Prepared, out: InferOutput, j: int, t_batch: float) -> Scored:
        f, route = p.frame, p.route
        spec = self.triton.spec_for(route.model)
        score = float(out.scores[j])
        task = out.tasks[j] if out.tasks is not None else route.task
        rd = float(out.route_distance[j]) if out.route_distance is not None else None
        done_ms = time.time() * 1000
        lat = {**p.latency_ms, "infer": round(out.infer_ms, 3),
               "batch_total": round((time.perf_counter() - t_batch) * 1000, 3),
               "e2e": round(max(0.0, done_ms - f.ts_ms), 3)}
        res = InspectionResult(
            frame_id=f.frame_id, camera=f.camera_id, line=f.line_id, model=route.model,
            model_version=str(spec.version), task=task or "", routed=route.routed, route_distance=rd,
            score=score, threshold=spec.threshold, is_anomaly=bool(score > spec.threshold), shadow=False,
            product=route.product or spec.product, latency_ms=lat, ts_ms=f.ts_ms, processed_ts_ms=int(done_ms),
            gt_label=f.extra.get("gt_label"), gt_defect=f.extra.get("gt_defect"),
        )
        defect = None
        if res.is_anomaly:
            try:
                defect = make_defect_event(res, out.maps[j], spec.map_threshold, size=self.heatmap_size).to_json()
            except Exception as e:  # the result still goes out; only its heat map is missing
                log.warning("defect_event_failed", frame_id=f.frame_id, camera=f.camera_id, error=str(e))
        self.metrics.stage_latency.labels(stage="e2e").observe(lat["e2e"])
        return Scored(p.raw, f.key, spec, res, res.to_json(), defect)

    def dead_letter(self, raw: RawRecord, reason: str, detail: str, stage: str) -> DeadLetter:
        fid, cam = peek_ids(raw.headers)
        self.metrics.dlq.labels(reason=reason).inc()
        log.warning("frame_dlq", frame_id=fid, camera=cam, reason=reason, detail=detail[:300], stage=stage)
        rec = dlq_record(raw.key, raw.value, raw.headers, reason, detail, stage=stage,
                         max_value_bytes=self.max_bytes)
        return DeadLetter(raw, reason, stage, rec)

    # -- publish
    @staticmethod
    def outgoing(batch: Batch, results: Any, defects: Any, dlq: Any) -> list[Outgoing]:
        """The batch's records for the results / defect-events / DLQ topics, in input order."""
        out: list[Outgoing] = []
        for s in batch.scored:
            out.append(Outgoing(results, s.key, s.result_json, None))
            if s.defect_json is not None:
                out.append(Outgoing(defects, s.key, s.defect_json, None))
        out += [Outgoing(dlq, *d.record) for d in batch.dead]
        return out

    # -- one micro-batch
    async def process(self, records: list[RawRecord]) -> Batch:
        t_batch = time.perf_counter()
        now_ms = time.time() * 1000
        await self.triton.specs()
        self.router.update_models(self.triton.available())
        for name in self.triton.ready_models():
            self.model_missing_since.pop(name, None)
        for r in records:
            self.metrics.frames_in.labels(camera=peek_ids(r.headers)[1] or "?").inc()
        front = await self.front_stages(records, now_ms)
        dead = [x for x in front if isinstance(x, DeadLetter)]
        scored, lost = await self.infer([x for x in front if isinstance(x, Prepared)], t_batch)
        scored.sort(key=lambda s: s.raw.index)
        return Batch(records, scored, dead + lost)
