"""The worker's batch logic as named stages over typed records (broker-agnostic; stream/worker/app.py feeds it).

    decode    RawRecord -> Decoded    the ``frames`` envelope (contracts.envelope.decode_frame)
    route     Decoded   -> Routed     camera/line/product -> Triton model + its spec (stream.inference.routing)
    prepare   Routed    -> Prepared   bounded image decode + OpenCV preprocess per the spec (contracts.image/spec)
    infer     Prepared  -> Scored     one Triton request per model (stream/worker/infer_stage.py): a permanent
                                      error isolates the poison frame(s); transient ones are retried, within a
                                      per-frame budget (retry_exhausted) while Triton answers, and behind the
                                      circuit breaker (no requests, consumption paused) while Triton is down
    publish   Batch     -> Outgoing   results, defect events, dead letters (+ the lifecycle's drift alerts and
                                      events); stream/worker/app.py sends them and awaits every send before the ack

The records between the stages are stream/worker/records.py. A frame that fails a stage becomes a
:class:`DeadLetter` for ``frames-dlq`` (reason + stage); one bad frame never stops the stream. :meth:`Pipeline.process` returns a :class:`Batch` with the scored
frames in input order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from contracts.envelope import EnvelopeError, InspectionResult, decode_frame, dlq_record, peek_ids
from contracts.image import decode_image, model_pixel_cap, plan_decode, read_header
from contracts.logs import get_logger
from contracts.operating_point import OperatingPoint, operating_point_of
from contracts.spec import ModelSpec, to_pixels
from stream.inference.heatmap import make_defect_event
from stream.inference.routing import Router, RoutingConfig
from stream.inference.triton_client import InferOutput, TritonInfer
from stream.worker.breaker import CircuitBreaker
from stream.worker.budget import MemoryBudget
from stream.worker.config import WorkerConfig
from stream.worker.infer_stage import InferStage
from stream.worker.metrics import WorkerMetrics
from stream.worker.records import Batch, DeadLetter, Decoded, Outgoing, Prepared, RawRecord, Routed, Scored
from stream.worker.serving import ResyncThrottle, ServingView

log = get_logger("stream.worker.pipeline")

# frames up to this size are decoded on the event loop when they arrive alone (no thread hop); larger
# ones, and every frame of a multi-frame batch, go to the decode thread pool (OpenCV releases the GIL)
INLINE_DECODE_MAX_BYTES = 2 * 1024 * 1024
INLINE_DECODE_MAX_PIXELS = 4_000_000  # ...and whose header declares at most this (a small PNG can declare 40 MP)


# ----------------------------------------------------------------------------- the stages


class Pipeline(InferStage):
    """decode -> route -> prepare -> infer for one micro-batch (see the module docstring)."""

    def __init__(self, cfg: WorkerConfig, triton: TritonInfer, metrics: WorkerMetrics,
                 breaker: CircuitBreaker | None = None):
        s = cfg.settings
        self.triton = triton
        self.metrics = metrics
        self.router = Router(RoutingConfig.load(s.routing))
        self.model_missing_since: dict[str, float] = {}
        # set by the worker app: await it to apply every serving-state entry written so far (stream/worker/serving.py)
        self.sync_serving: Callable[[], Awaitable[None]] | None = None
        # set by the worker app: the serving state, the authority on which products are served (issue #26 item 4)
        self.serving: ServingView | None = None
        self.awaiting: set[str] = set()  # models of served products not loaded in Triton: the breaker waits for them
        self.resync = ResyncThrottle()  # ...when a frame names a product nothing routes
        self.executor = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode")
        self.grace_s = s.worker_transient_grace_s
        self.retry_budget = s.worker_retry_budget
        self.breaker = breaker or CircuitBreaker(self.probe, backoff_s=s.worker_breaker_backoff_s,
                                                 backoff_max_s=s.worker_breaker_backoff_max_s, metrics=metrics)
        self.heatmap_size = s.heatmap_size
        self.max_bytes = cfg.dlq_value_bytes or s.max_frame_bytes  # a DLQ record's original value
        self._image_limits = {"max_side": s.max_image_side, "max_pixels": s.max_image_pixels,
                              "max_bytes": s.max_frame_bytes}
        # decode bombs under the cap: a per-model pixel cap, JPEG reduced decoding, a decode memory budget
        self.pixels_per_input = s.max_image_pixels_per_input
        self.jpeg_reduced = s.jpeg_reduced_decode
        self.budget = MemoryBudget(cfg.decode_budget_bytes)
        # (model, version, task) -> (the spec dict it was read from, its operating point)
        self._ops: dict[tuple[str, str, str], tuple[dict, OperatingPoint]] = {}
        log.info("decode_limits", threads=cfg.decode_threads, budget_mb=cfg.decode_budget_bytes >> 20,
                 max_image_pixels=s.max_image_pixels, pixels_per_input=self.pixels_per_input,
                 jpeg_reduced=self.jpeg_reduced)

    async def refresh_models(self) -> None:
        await self.triton.specs(max_age_s=0)
        self.router.update_models(self.triton.available())

    # -- decode / route / prepare (in the decode threads)
    def decode(self, raw: RawRecord) -> Decoded:
        t0 = time.perf_counter()
        return Decoded(raw, decode_frame(raw.key, raw.value, raw.headers), t0)

    def route(self, d: Decoded) -> Routed:
        try:
            route = self.route_live(d.frame)
        except EnvelopeError as e:
            # not served by the serving state, its model READY before (reloading / Triton restarting): retry
            # within the grace period
            if e.reason != "unknown_product":
                raise
            route = Router(self.router.config, self.triton.available(include_unready=True)).route(d.frame)
            missing = time.monotonic() - self.model_missing_since.setdefault(route.model, time.monotonic())
            if missing > self.grace_s:
                raise
        spec = self.triton.spec_for(route.model)
        if spec is None:
            raise EnvelopeError("unknown_product", f"model {route.model} has no linewatch_spec")
        self.check_task(route)
        return Routed(d, route, spec)

    def prepare(self, r: Routed, now_ms: float) -> Prepared:
        """Bounded decode + preprocess: the limits and the decode's peak bytes come from the header; the decode
        waits for room in the memory budget (one that could never fit is DLQ'd too_large)."""
        raw, data, inp = r.decoded.raw, r.decoded.frame.image, r.spec.input
        cap = model_pixel_cap(self._image_limits["max_pixels"], self.pixels_per_input, inp.width, inp.height)
        plan = plan_decode(data, **{**self._image_limits, "max_pixels": cap}, target=(inp.width, inp.height),
                           reduce=self.jpeg_reduced)
        cost = plan.cost_bytes + 27 * inp.width * inp.height  # + to_tensor's resized uint8 and float32 copies
        if not self.budget.fits(cost):
            h = plan.header
            raise EnvelopeError("too_large", f"decoding the {h.width}x{h.height} {h.fmt} needs ~{cost >> 20} MiB, over "
                                             f"the decode memory budget of {self.budget.limit >> 20} MiB")
        with self.budget.hold(cost):
            img = decode_image(data, plan=plan)
            t1 = time.perf_counter()
            x = to_pixels(img, r.spec)
            del img
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

    def _inline(self, raw: RawRecord) -> bool:
        """Decode this lone frame on the event loop? Only a small one, and only when no decode holds budget
        (the loop must never wait for it)."""
        v = raw.value or b""
        if len(v) > INLINE_DECODE_MAX_BYTES or self.budget.in_use:
            return False
        try:
            return read_header(v).pixels <= INLINE_DECODE_MAX_PIXELS
        except EnvelopeError:
            return True  # front() DLQs it, cheaply

    async def front_stages(self, records: list[RawRecord], now_ms: float) -> list[Prepared | DeadLetter]:
        if len(records) == 1 and self._inline(records[0]):
            # a lone frame: decode on the loop, no thread hop (batch-1 latency, ~1.5 ms measured)
            return [self.front(records[0], now_ms)]
        loop = asyncio.get_running_loop()  # OpenCV releases the GIL: frames in parallel threads
        return list(await asyncio.gather(*(loop.run_in_executor(self.executor, self.front, r, now_ms)
                                           for r in records)))

    # -- outputs
    def operating_point(self, model: str, spec: ModelSpec, task: str | None) -> OperatingPoint:
        """The operating point ``spec`` applies to ``task`` (per task for a multi-task model), cached per
        (model, version, task) for as long as that version's spec is the same object."""
        key = (model, str(spec.version), task or "")
        hit = self._ops.get(key)
        if hit is not None and hit[0] is spec.raw:
            return hit[1]
        op = operating_point_of(spec.raw, task or None)
        if len(self._ops) >= 4096:
            self._ops.clear()
        self._ops[key] = (spec.raw, op)
        return op

    def score(self, p: Prepared, out: InferOutput, j: int, t_batch: float) -> Scored:
        f, route = p.frame, p.route
        served = out.versions[j] if out.versions else None
        # judged with the operating point of the version Triton says served it (per task for a multi-task
        # model); labelled with that version
        spec = self.triton.spec_at(route.model, served) or self.triton.spec_for(route.model)
        if served and str(spec.version) != served:
            log.warning("spec_version_unknown", model=route.model, served=served, judged_with=str(spec.version))
        score = float(out.scores[j])
        task = out.tasks[j] if out.tasks is not None else route.task
        rd = float(out.route_distance[j]) if out.route_distance is not None else None
        op = self.operating_point(route.model, spec, task)
        done_ms = time.time() * 1000
        lat = {**p.latency_ms, "infer": round(out.infer_ms, 3),
               "batch_total": round((time.perf_counter() - t_batch) * 1000, 3),
               "e2e": round(max(0.0, done_ms - f.ts_ms), 3)}
        res = InspectionResult(
            frame_id=f.frame_id, camera=f.camera_id, line=f.line_id, model=route.model,
            model_version=served or str(spec.version), task=task or "", routed=route.routed, route_distance=rd,
            score=score, threshold=op.threshold, is_anomaly=op.is_anomaly(score), shadow=False,
            product=route.product or spec.product, latency_ms=lat, ts_ms=f.ts_ms, processed_ts_ms=int(done_ms),
            gt_label=f.extra.get("gt_label"), gt_defect=f.extra.get("gt_defect"),
            score_normalized=op.normalised(score), warmup=f.warmup,
        )
        defect = None
        if res.is_anomaly:
            try:  # boxes at the model's input resolution, against the operating point's map threshold
                defect = make_defect_event(res, out.maps[j], op, (spec.input.height, spec.input.width),
                                           size=self.heatmap_size).to_json()
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
        # a frame naming a product nothing routes yet: catch up with the serving state (read-your-writes) and
        # re-read Triton's models before calling it unknown; a task no model reports: re-read the specs (<= 1/s)
        # (throttled: stream/worker/serving.ResyncThrottle; per batch, a camera of a product not onboarded yet made
        # every batch pay both round trips)
        unknown = self.unknown_products(records) if self.sync_serving is not None else set()
        if unknown and self.resync.due(unknown, time.monotonic()):
            await self.sync_serving()
            await self.triton.specs(max_age_s=0)
            self.resync.forget(unknown - self.unknown_products(records))
        await self.triton.specs(max_age_s=1.0 if self.names_unknown_task(records) else 30.0)
        self.router.update_models(self.triton.available())
        for name in self.triton.ready_models():
            self.model_missing_since.pop(name, None)
        for r in records:
            self.metrics.count_frame_in(peek_ids(r.headers)[1])  # a bounded label set (untrusted header)
        front = await self.front_stages(records, now_ms)
        dead = [x for x in front if isinstance(x, DeadLetter)]
        scored, lost = await self.infer([x for x in front if isinstance(x, Prepared)], t_batch)
        scored.sort(key=lambda s: s.raw.index)
        return Batch(records, scored, dead + lost)
