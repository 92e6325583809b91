"""The stream worker: a Faust (faust-streaming) app consuming ``frames``.

Per micro-batch (``stream.take_events(max, within=seconds)``):
decode + validate envelope -> route (camera/line/product -> Triton model) -> OpenCV preprocess per
the model's ``linewatch_spec`` -> one Triton request per model (shared gRPC aio client; transient
errors retried with backoff forever, never DLQ'd) -> one result per frame on
``inspection-results`` and one defect event per anomalous frame on ``defect-events``; malformed
frames go to ``frames-dlq`` with a reason. Every send future is awaited before the iteration
returns, and Faust's ``take_events`` acks the batch only after the iteration, so offsets commit
only after the outputs are on the broker (at-least-once; results are keyed by camera and carry
``frame_id`` so a replayed frame yields an identical, idempotent result).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from contracts.envelope import (
    EnvelopeError,
    Frame,
    InspectionResult,
    decode_frame,
    dlq_record,
    peek_ids,
)
from contracts.image import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, decode_image
from contracts.logs import get_logger
from contracts.spec import to_tensor
from stream.inference.heatmap import make_defect_event
from stream.inference.routing import Router, RoutingConfig
from stream.inference.triton_client import PermanentInferError, TransientInferError, TritonInfer
from stream.worker.metrics import WorkerMetrics

log = get_logger("stream.worker.app")


@dataclass
class WorkerConfig:
    kafka_bootstrap: str = "127.0.0.1:9092"
    triton_grpc_url: str = "127.0.0.1:8001"
    app_id: str = "linewatch-worker"
    frames_topic: str = "frames"
    results_topic: str = "inspection-results"
    defects_topic: str = "defect-events"
    dlq_topic: str = "frames-dlq"
    batch_max: int = 8
    batch_within_s: float = 0.05
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    datadir: str = ".stack/faust"
    dev_broker: bool = False
    routing: Any = None  # dict / JSON path / inline JSON
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # larger frames -> DLQ too_large (value dropped, size + sha256 kept)
    broker_credentials: Any = field(default=None, repr=False)  # faust SASL/SSL credentials (contracts.config)
    heatmap_size: int = 64
    shadow: bool = False
    partitions: int = 1
    fetch_max_wait_ms: int = 50
    transient_grace_s: float = 120.0  # a model missing from Triton this long -> frames DLQ'd (unknown_product)
    # frames buffered per partition ahead of the agent (Faust default 4096: a stalled Triton let a 530 KB-frame
    # backlog grow the worker by ~22 MB/s of lag); past it Faust stops fetching and the backlog stays in Kafka
    stream_buffer_max: int = 0  # 0 = max(16, 4 * batch_max)
    decode_threads: int = min(4, os.cpu_count() or 1)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides) -> WorkerConfig:
        """Map the project's pydantic ``Settings`` (contracts.config) onto the worker config; explicit
        keyword overrides (CLI flags) win. Invalid settings (e.g. SASL without a password) fail
        here and never fall back to defaults."""
        from contracts.config import Settings  # noqa: PLC0415
        from stream.kafka.clients import faust_broker_credentials  # noqa: PLC0415

        s = settings if settings is not None else Settings()
        kw: dict[str, Any] = {
            "kafka_bootstrap": s.kafka_bootstrap, "triton_grpc_url": s.triton_grpc_url,
            "frames_topic": s.topic_frames, "results_topic": s.topic_results, "defects_topic": s.topic_defects,
            "dlq_topic": s.topic_dlq, "batch_max": s.batch_max, "batch_within_s": s.batch_within_s,
            "web_port": s.worker_web_port, "dev_broker": s.dev_broker, "routing": s.routing, "app_id": s.app_id,
            "max_bytes": s.max_frame_bytes, "max_pixels": s.max_image_pixels, "max_side": s.max_image_side,
            "broker_credentials": faust_broker_credentials(s),
        }
        kw = {k: v for k, v in kw.items() if v is not None}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(kw.get("kafka_bootstrap"), list | tuple):
            kw["kafka_bootstrap"] = ",".join(kw["kafka_bootstrap"])
        return cls(**kw)


# frames up to this size are decoded on the event loop when they arrive alone (no thread hop); larger
# ones, and every frame of a multi-frame batch, go to the decode thread pool (OpenCV releases the GIL)
INLINE_DECODE_MAX_BYTES = 2 * 1024 * 1024

_fetch_patch_ms: list[int] = []


def limit_fetch_wait(ms: int) -> None:
    """Faust hard-codes the worker consumer's fetch_max_wait_ms=1500. Tansu answers a fetch only
    when that wait expires (measured: frames arrived in bursts every ~500 ms, p50 e2e ~500 ms at
    10 fps); Apache Kafka answers as soon as fetch_min_bytes is met, so a short wait is harmless
    there (a few more empty fetches while idle). Patched on the consumer before it starts."""
    from faust.transport.drivers import aiokafka as fa  # noqa: PLC0415

    _fetch_patch_ms[:] = [ms]
    if getattr(fa.AIOKafkaConsumerThread, "_linewatch_patched", False):
        return
    orig = fa.AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = orig(self, transport)
        consumer._fetch_max_wait_ms = _fetch_patch_ms[0]
        return consumer

    fa.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
    fa.AIOKafkaConsumerThread._linewatch_patched = True


def apply_dev_broker_workarounds() -> None:
    """Tansu quirks: aiokafka LeaveGroup for generation 0 (stream.kafka.compat)."""
    from stream.kafka.compat import apply_dev_broker_workarounds as apply  # noqa: PLC0415

    if apply():
        log.info("dev_broker_workaround_applied", fix="LeaveGroup for generation >= 0")


class Pipeline:
    """Broker-agnostic batch logic (decode/route/preprocess/infer/build outputs)."""

    def __init__(self, cfg: WorkerConfig, triton: TritonInfer, metrics: WorkerMetrics):
        self.cfg = cfg
        self.triton = triton
        self.metrics = metrics
        self.router = Router(RoutingConfig.load(cfg.routing))
        self.model_missing_since: dict[str, float] = {}
        self.executor = ThreadPoolExecutor(max_workers=max(1, cfg.decode_threads), thread_name_prefix="decode")
        self.limits = {"max_side": cfg.max_side, "max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}

    async def refresh_models(self) -> None:
        await self.triton.specs(max_age_s=0)
        self.router.update_models(self.triton.available())

    async def process(self, records: list[tuple[bytes | None, bytes | None, Any, float | None]]):
        """records: (key, value, headers, kafka_ts_s). Returns (outputs, dlq) where outputs is a list,
        in input order, of (key, result_json, defect_json | None, result) and dlq of (key, value, headers)."""
        m = self.metrics
        t_batch = time.perf_counter()
        now_ms = time.time() * 1000
        await self.triton.specs()
        self.router.update_models(self.triton.available())
        for name in self.triton.available():
            self.model_missing_since.pop(name, None)
        n = len(records)
        outputs: list[Any] = [None] * n
        dlq: list[tuple] = []
        frames: dict[int, Frame] = {}
        lat: dict[int, dict[str, float]] = {}
        tensors: dict[int, np.ndarray] = {}
        routes = {}

        def to_dlq(i: int, reason: str, detail: str, stage: str):
            key, value, headers, _ = records[i]
            fid, cam = peek_ids(headers)
            m.dlq.labels(reason=reason).inc()
            log.warning("frame_dlq", frame_id=fid, camera=cam, reason=reason, detail=detail[:300], stage=stage)
            dlq.append(dlq_record(key, value, headers, reason, detail, stage=stage, max_value_bytes=self.cfg.max_bytes))

        def prep(i: int):
            key, value, headers, kts = records[i]
            t0 = time.perf_counter()
            f = decode_frame(key, value, headers)
            try:
                route = self.router.route(f)
            except EnvelopeError as e:
                # its model was READY before (reloading / Triton restarting): retry within the grace period
                if e.reason != "unknown_product":
                    raise
                route = Router(self.router.config, {k: v.tasks for k, v in self.triton.last_specs.items()}).route(f)
                if time.monotonic() - self.model_missing_since.setdefault(route.model, time.monotonic()) > self.cfg.transient_grace_s:
                    raise
            spec = self.triton._specs.get(route.model) or self.triton.last_specs[route.model]
            img = decode_image(f.image, **self.limits)
            t1 = time.perf_counter()
            x = to_tensor(img, spec)
            return f, route, x, t0, t1, time.perf_counter()

        loop = asyncio.get_running_loop()
        for _, _, headers, _ in records:
            _, cam = peek_ids(headers)
            m.frames_in.labels(camera=cam or "?").inc()
        if n == 1 and len(records[0][1] or b"") <= INLINE_DECODE_MAX_BYTES:
            # a lone frame: decode on the loop, no thread hop (batch-1 latency, ~1.5 ms measured)
            try:
                done = [prep(0)]
            except Exception as e:  # noqa: BLE001 - handled per frame below, as gather(return_exceptions) does
                done = [e]
        else:
            # OpenCV releases the GIL: decode + preprocess frames in parallel threads
            done = await asyncio.gather(*(loop.run_in_executor(self.executor, prep, i) for i in range(n)),
                                        return_exceptions=True)
        for i, d in enumerate(done):
            if isinstance(d, EnvelopeError):
                to_dlq(i, d.reason, d.detail, "decode")
                continue
            if isinstance(d, BaseException):  # never stop the stream on one frame
                to_dlq(i, "internal_error", f"{type(d).__name__}: {d}", "decode")
                continue
            f, route, x, t0, t1, t2 = d
            kts = records[i][3]
            frames[i], routes[i], tensors[i] = f, route, x
            queue_ms = max(0.0, now_ms - kts * 1000) if kts else 0.0
            lat[i] = {"queue": round(queue_ms, 3), "decode": round((t1 - t0) * 1000, 3),
                      "preprocess": round((t2 - t1) * 1000, 3)}
            m.stage_latency.labels(stage="decode").observe((t1 - t0) * 1000)
            m.stage_latency.labels(stage="preprocess").observe((t2 - t1) * 1000)

        pending = sorted(frames)
        backoff = 0.5
        t_first_fail = 0.0
        while pending:
            groups: dict[str, list[int]] = defaultdict(list)
            for i in pending:
                groups[routes[i].model].append(i)
            retry: list[int] = []
            for model, idx in groups.items():
                spec = self.triton._specs.get(model) or self.triton.last_specs.get(model)
                batch = np.stack([tensors[i] for i in idx])
                m.batch_size.labels(model=model).observe(len(idx))
                try:
                    out = await self.triton.infer(model, batch, [routes[i].task for i in idx])
                except TransientInferError as e:
                    log.warning("triton_transient_batch", model=model, n=len(idx), error=str(e)[:300])
                    retry.extend(idx)
                    continue
                except PermanentInferError as e:
                    if len(idx) > 1:  # isolate the poison frame(s): retry one by one
                        singles = []
                        for i in idx:
                            try:
                                singles.append((i, await self.triton.infer(model, tensors[i][None], [routes[i].task])))
                            except PermanentInferError as e1:
                                to_dlq(i, "inference_error", str(e1), "infer")
                            except TransientInferError:
                                retry.append(i)
                        for i, o in singles:
                            self._emit(outputs, i, frames[i], routes[i], spec, o, 0, lat[i], now_ms, t_batch)
                    else:
                        to_dlq(idx[0], "inference_error", str(e), "infer")
                    continue
                m.stage_latency.labels(stage="infer").observe(out.infer_ms)
                for j, i in enumerate(idx):
                    self._emit(outputs, i, frames[i], routes[i], spec, out, j, lat[i], now_ms, t_batch)
            pending = retry
            if pending:
                t_first_fail = t_first_fail or time.monotonic()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                try:
                    await self.refresh_models()
                except Exception as e:  # noqa: BLE001
                    log.warning("triton_refresh_failed", error=str(e)[:300])
                still = []
                waited = time.monotonic() - t_first_fail
                for i in pending:  # re-route: a model may have been unloaded or replaced
                    try:
                        r = self.router.route(frames[i])
                        if r.model != routes[i].model:
                            tensors[i] = to_tensor(decode_image(frames[i].image, **self.limits), self.triton.last_specs[r.model])
                        routes[i] = r
                        still.append(i)
                    except EnvelopeError as e:
                        if waited < self.cfg.transient_grace_s:  # e.g. model reloading: keep retrying
                            still.append(i)
                        else:
                            to_dlq(i, e.reason, e.detail, "route")
                pending = still
        return [o for o in outputs if o is not None], dlq

    def _emit(self, outputs, i, f: Frame, route, spec, out, j, lat, now_ms, t_batch):
        score = float(out.scores[j])
        task = out.tasks[j] if out.tasks is not None else route.task
        rd = float(out.route_distance[j]) if out.route_distance is not None else None
        thr = spec.threshold
        is_anom = bool(score > thr)
        done_ms = time.time() * 1000
        lat = dict(lat)
        lat["infer"] = round(out.infer_ms, 3)
        lat["batch_total"] = round((time.perf_counter() - t_batch) * 1000, 3)
        lat["e2e"] = round(max(0.0, done_ms - f.ts_ms), 3)
        res = InspectionResult(
            frame_id=f.frame_id, camera=f.camera_id, line=f.line_id, model=route.model,
            model_version=str(spec.version), task=task or "", routed=route.routed, route_distance=rd,
            score=score, threshold=thr, is_anomaly=is_anom, shadow=self.cfg.shadow,
            product=route.product or spec.product, latency_ms=lat, ts_ms=f.ts_ms, processed_ts_ms=int(done_ms),
            gt_label=f.extra.get("gt_label"), gt_defect=f.extra.get("gt_defect"),
        )
        defect = None
        if is_anom:
            try:
                defect = make_defect_event(res, out.maps[j], spec.map_threshold, size=self.cfg.heatmap_size).to_json()
            except Exception as e:  # noqa: BLE001
                log.warning("defect_event_failed", frame_id=f.frame_id, camera=f.camera_id, error=str(e))
        self.metrics.stage_latency.labels(stage="e2e").observe(lat["e2e"])
        outputs[i] = (f.key, res.to_json(), defect, res)


def build_app(cfg: WorkerConfig):
    """Create the Faust app with its agent, /metrics page and lifecycle hooks."""
    import faust  # noqa: PLC0415 - keep `import stream.worker.app` cheap for the CLI

    if cfg.dev_broker:
        apply_dev_broker_workarounds()
    if cfg.fetch_max_wait_ms:
        limit_fetch_wait(cfg.fetch_max_wait_ms)
    Path(cfg.datadir).mkdir(parents=True, exist_ok=True)
    app_kw: dict[str, Any] = dict(
        broker=[f"kafka://{h}" for h in cfg.kafka_bootstrap.split(",")],
        datadir=cfg.datadir,
        web_port=cfg.web_port,
        web_host=cfg.web_host,
        web_bind=cfg.web_host,
        web_enabled=True,
        consumer_auto_offset_reset="earliest",
        topic_partitions=cfg.partitions,
        topic_replication_factor=1,
        broker_commit_every=max(cfg.batch_max, 1),
        broker_commit_interval=0.5,
        stream_wait_empty=True,
        stream_buffer_maxsize=cfg.stream_buffer_max or max(16, 4 * cfg.batch_max),
        producer_acks=-1,
        producer_linger_ms=0,
        # a DLQ record carries the original frame (<= max_bytes, larger ones are dropped) + headers
        producer_max_request_size=cfg.max_bytes + 1024 * 1024,
    )
    if cfg.broker_credentials is not None:  # TLS / SASL (contracts.config.faust_broker_credentials)
        app_kw["broker_credentials"] = cfg.broker_credentials
    if cfg.dev_broker:  # embedded Tansu broker: short joins; single-record batches where end offsets matter
        app_kw.update(broker_session_timeout=6, broker_heartbeat_interval=1, producer_max_batch_size=1,
                      broker_rebalance_timeout=6)
    app = faust.App(cfg.app_id, **app_kw)
    metrics = WorkerMetrics()
    state: dict[str, Any] = {}

    frames_t = app.topic(cfg.frames_topic, key_serializer="raw", value_serializer="raw")
    results_t = app.topic(cfg.results_topic, key_serializer="raw", value_serializer="raw")
    defects_t = app.topic(cfg.defects_topic, key_serializer="raw", value_serializer="raw")
    dlq_t = app.topic(cfg.dlq_topic, key_serializer="raw", value_serializer="raw")

    init_lock = asyncio.Lock()

    async def pipeline() -> Pipeline:
        if "pipeline" in state:
            return state["pipeline"]
        async with init_lock:
            if "pipeline" in state:
                return state["pipeline"]
            triton = TritonInfer(cfg.triton_grpc_url, metrics=metrics)
            await triton.wait_ready(120)
            p = Pipeline(cfg, triton, metrics)
            await p.refresh_models()
            log.info("worker_models", models={k: str(v.version) for k, v in triton._specs.items()})
            state["pipeline"] = p
            return p

    async def send_all(sends: list[tuple]) -> None:
        """Send and await every future (results before the batch is acked)."""
        for attempt in range(1_000_000):
            try:
                futs = [await t.send(key=k, value=v, headers=h, force=True) for t, k, v, h in sends]
                await asyncio.gather(*futs)
                return
            except Exception as e:  # noqa: BLE001 - broker hiccup: resend (idempotent by frame_id)
                delay = min(10.0, 0.2 * 2 ** min(attempt, 6))
                log.warning("produce_retry", attempt=attempt + 1, error=str(e)[:300], delay_s=delay)
                await asyncio.sleep(delay)

    # adapter lifecycle + drift (stream/lifecycle/rollout.py): model-events rollout agent, shadow traffic, drift-alerts
    from stream.lifecycle.rollout import register as register_lifecycle  # noqa: PLC0415

    lifecycle = register_lifecycle(app, cfg, pipeline)

    @app.agent(frames_t)
    async def inspect(stream):
        async for events in stream.take_events(cfg.batch_max, within=cfg.batch_within_s):
            p = await pipeline()
            metrics.inflight.set(len(events))
            records = [(e.message.key, e.message.value, e.message.headers, e.message.timestamp) for e in events]
            outputs, dlq = await p.process(records)
            sends: list[tuple] = []
            for key, rj, dj, res in outputs:
                sends.append((results_t, key, rj, None))
                metrics.results_out.labels(model=res.model).inc()
                if dj is not None:
                    sends.append((defects_t, key, dj, None))
                    metrics.defects_out.labels(model=res.model).inc()
                log.info("frame_result", frame_id=res.frame_id, camera=res.camera, model=res.model, task=res.task,
                         score=round(res.score, 5), is_anomaly=res.is_anomaly, e2e_ms=res.latency_ms.get("e2e"))
            for k, v, h in dlq:
                sends.append((dlq_t, k, v, h))
            sends += await lifecycle.after_batch(records, outputs)  # drift alerts, shadow frames
            t0 = time.perf_counter()
            await send_all(sends)
            metrics.stage_latency.labels(stage="publish").observe((time.perf_counter() - t0) * 1000)
            metrics.inflight.set(0)
            last: dict[Any, int] = {}
            for e in events:
                last[e.message.tp] = max(last.get(e.message.tp, -1), e.message.offset)
            for tp, off in last.items():
                try:
                    hw = app.consumer.highwater(tp)
                    if hw is not None:
                        metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - off - 1))
                except Exception:  # noqa: BLE001
                    pass

    @app.page("/metrics")
    async def metrics_page(web, request):
        body, ctype = metrics.render()
        return web.bytes(body, content_type=ctype.split(";")[0])

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"ok": True, "models": sorted(state["pipeline"].triton._specs) if "pipeline" in state else []})

    @app.task
    async def warm():
        try:
            await pipeline()
        except Exception as e:  # noqa: BLE001
            log.error("triton_unreachable_at_start", error=str(e))

    app.linewatch_metrics = metrics  # type: ignore[attr-defined]
    app.linewatch_state = state  # type: ignore[attr-defined]
    return app


def run_worker(cfg: WorkerConfig, loglevel: str = "info") -> None:
    """Run the Faust worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker  # noqa: PLC0415

    app = build_app(cfg)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    log.info("worker_start", bootstrap=cfg.kafka_bootstrap, triton=cfg.triton_grpc_url, topic=cfg.frames_topic,
             batch_max=cfg.batch_max, within_s=cfg.batch_within_s, web_port=cfg.web_port, dev_broker=cfg.dev_broker,
             security=type(cfg.broker_credentials).__name__ if cfg.broker_credentials else "PLAINTEXT",
             max_frame_bytes=cfg.max_bytes, max_image_pixels=cfg.max_pixels)
    worker = Worker(app, loglevel=loglevel, redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()


def main(argv: list[str] | None = None) -> None:  # python -m stream.worker.app
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser("stream.worker.app")
    add_worker_args(ap)
    a = ap.parse_args(argv)
    try:
        cfg = config_from_args(a)
    except ValueError as e:  # pydantic ValidationError included: one line, no traceback
        from contracts.config import one_line_error  # noqa: PLC0415

        raise SystemExit(f"stream.worker.app: error: {one_line_error(e)}") from None
    run_worker(cfg)


def add_worker_args(ap) -> None:
    ap.add_argument("--bootstrap", help="Kafka bootstrap host:port (default from settings)")
    ap.add_argument("--triton", help="Triton gRPC host:port (default from settings)")
    ap.add_argument("--batch-max", type=int)
    ap.add_argument("--batch-within", type=float, help="seconds")
    ap.add_argument("--web-port", type=int)
    ap.add_argument("--app-id")
    ap.add_argument("--datadir")
    ap.add_argument("--routing", help="routing JSON file or inline JSON")
    ap.add_argument("--dev-broker", action="store_true", default=None, help="apply Tansu workarounds")
    ap.add_argument("--frames-topic")
    ap.add_argument("--results-topic")
    ap.add_argument("--defects-topic")
    ap.add_argument("--dlq-topic")
    ap.add_argument("--fetch-max-wait-ms", type=int,
                    help="consumer fetch wait cap (Tansu answers only when it expires: latency vs idle polling)")


def config_from_args(a) -> WorkerConfig:
    return WorkerConfig.from_settings(
        None, kafka_bootstrap=a.bootstrap, triton_grpc_url=a.triton, batch_max=a.batch_max,
        batch_within_s=a.batch_within, web_port=a.web_port, app_id=a.app_id, datadir=a.datadir,
        routing=a.routing, dev_broker=a.dev_broker, frames_topic=a.frames_topic, results_topic=a.results_topic,
        defects_topic=a.defects_topic, dlq_topic=a.dlq_topic, fetch_max_wait_ms=a.fetch_max_wait_ms)


if __name__ == "__main__":
    main()
