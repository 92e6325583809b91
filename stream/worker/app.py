"""The stream worker: a Faust (faust-streaming) app consuming ``frames``.

Per micro-batch (``stream.noack_take(batch_max, within=batch_within_s)``: manual acks) the stages of
:mod:`stream.worker.pipeline` (decode -> route -> prepare -> infer) produce one result per frame on
``inspection-results``, one defect event per anomalous frame on ``defect-events`` and a DLQ record
per malformed frame on ``frames-dlq``; the lifecycle hook (stream/lifecycle/hooks.py) adds drift
alerts and feeds a rollout's shadow window. Every send future is awaited before the iteration
returns (stream/kafka/produce.py: retriable errors re-send only the unacknowledged records, fatal ones
stop the worker), and only then does the agent ack the batch's events, so offsets commit only after the
outputs are on the broker (at-least-once; results are keyed by camera and carry ``frame_id`` so a replayed
frame yields an identical, idempotent result). A batch whose body raised is never acked: the agent
withholds it and stops the worker (stream/worker/acks.py), and every stop is bounded
(``worker_shutdown_timeout_s``). Faust's private parts it relies on are in stream/kafka/faust_adapter.py.
At start the DLQ topic's ``max.message.bytes`` caps the original bytes a DLQ record keeps
(stream/kafka/limits.py), and Triton being down waits behind the circuit breaker.

``python -m stream.worker.app`` is an entry point of its own (the container runs ``linewatch worker``):
it builds the Settings once and passes them down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust

from contracts.cli import EXIT_RUNTIME, OneLineParser, run_command
from contracts.config import Settings
from contracts.logs import configure_logging, get_logger
from stream.inference.triton_client import TritonInfer
from stream.kafka.codecs import require_codecs
from stream.kafka.faust_adapter import (
    apply_dev_broker_workarounds,
    limit_fetch_wait,
    pause_fetch,
    resume_fetch,
    withhold,
)
from stream.kafka.limits import DLQ_HEADROOM_BYTES, dlq_value_cap, read_topic_limits
from stream.kafka.produce import send_all as _send_records
from stream.lifecycle.wiring import register as register_lifecycle
from stream.worker.acks import ShutdownWatchdog, exit_code_for, fatal_stop, reach_triton
from stream.worker.breaker import CircuitBreaker
from stream.worker.config import WorkerConfig, add_worker_args, worker_config
from stream.worker.metrics import WorkerMetrics
from stream.worker.pipeline import Pipeline
from stream.worker.records import Batch, Outgoing, RawRecord
from stream.worker.serving import ServingView

log = get_logger("stream.worker.app")


def _app_kwargs(cfg: WorkerConfig) -> dict[str, Any]:
    s = cfg.settings
    kw: dict[str, Any] = dict(
        broker=cfg.broker_urls,
        datadir=str(cfg.datadir),
        web_port=s.worker_web_port,
        web_host=s.worker_web_host,
        web_bind=s.worker_web_host,
        web_enabled=True,
        consumer_auto_offset_reset="earliest",
        topic_partitions=s.topic_partitions,
        topic_replication_factor=1,
        broker_commit_every=s.batch_max,
        broker_commit_interval=0.5,
        stream_wait_empty=True,
        stream_buffer_maxsize=cfg.stream_buffer_max,
        producer_acks=-1,
        producer_linger_ms=0,
        # a DLQ record carries the original frame (<= max_frame_bytes, larger ones are dropped) + headers
        producer_max_request_size=s.max_frame_bytes + DLQ_HEADROOM_BYTES,
    )
    if cfg.broker_credentials is not None:  # TLS / SASL (stream.kafka.clients.faust_broker_credentials)
        kw["broker_credentials"] = cfg.broker_credentials
    if s.dev_broker:  # embedded Tansu broker: short joins; single-record batches where end offsets matter
        kw.update(broker_session_timeout=6, broker_heartbeat_interval=1, producer_max_batch_size=1,
                  broker_rebalance_timeout=6)
    return kw


# a delivery report not back after this long is treated as lost and the record re-sent (stream.kafka.produce)
DELIVERY_TIMEOUT_S = 60.0


async def send_all(sends: list[Outgoing], backoff_s: float = 0.2, backoff_max_s: float = 10.0) -> int:
    """Publish every record and await its acknowledgement (before the batch is acked): a retriable error
    re-sends only the records not yet acknowledged (capped backoff); a fatal one raises
    :class:`stream.kafka.produce.FatalProduceError`. Returns the retry rounds it took."""

    async def send(o: Outgoing):
        return await o.topic.send(key=o.key, value=o.value, headers=o.headers, force=True)

    return await _send_records(sends, send, target=lambda o: f"topic {o.topic.get_topic_name()}",
                               backoff_s=backoff_s, backoff_max_s=backoff_max_s, delivery_timeout_s=DELIVERY_TIMEOUT_S)


def _count(batch: Batch, metrics: WorkerMetrics) -> None:
    for s in batch.scored:
        res = s.result
        metrics.results_out.labels(model=res.model).inc()
        if s.defect_json is not None:
            metrics.defects_out.labels(model=res.model).inc()
        log.info("frame_result", frame_id=res.frame_id, camera=res.camera, model=res.model, task=res.task,
                 score=round(res.score, 5), is_anomaly=res.is_anomaly, e2e_ms=res.latency_ms.get("e2e"))


def _record_lag(app: faust.App, events: list, metrics: WorkerMetrics) -> None:
    last: dict[Any, int] = {}
    for e in events:
        last[e.message.tp] = max(last.get(e.message.tp, -1), e.message.offset)
    for tp, off in last.items():
        try:
            hw = app.consumer.highwater(tp)
        except Exception:  # no highwater yet (assignment in progress): the gauge keeps its last value
            continue
        if hw is not None:
            metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, hw - off - 1))


def attach_breaker(app: faust.App, breaker: CircuitBreaker, topic: str) -> None:
    """While the Triton circuit breaker is open, pause fetching ``topic``'s assigned partitions (the
    backlog stays in Kafka, no frames are taken); resume the ones it paused when it closes.

    The pause is aiokafka's own, not Faust's ``pause_partitions``, which loses records it had fetched
    (stream/kafka/faust_adapter.py :func:`~stream.kafka.faust_adapter.pause_fetch`): frames lost whenever
    Triton went down mid-fetch. aiokafka's pause keeps the position: what it had buffered is fetched again
    after the resume; what Faust holds is processed."""
    paused: set = set()

    def pause() -> None:
        tps = {tp for tp in app.consumer.assignment() if tp.topic == topic}
        pause_fetch(app, tps)
        paused.update(tps)
        log.warning("consumption_paused", reason=breaker.reason[:300], partitions=len(tps))

    def resume() -> None:
        tps = paused & set(app.consumer.assignment())
        resume_fetch(app, tps)
        paused.clear()
        log.info("consumption_resumed", partitions=len(tps))

    breaker.on_open, breaker.on_close = pause, resume


def build_app(cfg: WorkerConfig) -> faust.App:
    """Create the Faust app with its agent, /metrics and /healthz pages and the lifecycle hooks."""
    require_codecs()  # a producer's lz4/snappy/zstd batch must not crash the worker (stream/kafka/codecs.py)
    s = cfg.settings
    if s.dev_broker and apply_dev_broker_workarounds():
        log.info("dev_broker_workaround_applied", fix="LeaveGroup for generation >= 0")
    if s.worker_fetch_max_wait_ms:
        limit_fetch_wait(s.worker_fetch_max_wait_ms)
    cfg.datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(s.app_id, **_app_kwargs(cfg))
    metrics = WorkerMetrics()
    state: dict[str, Pipeline] = {}

    def raw_topic(name: str):
        return app.topic(name, key_serializer="raw", value_serializer="raw")

    frames_t, results_t = raw_topic(s.topic_frames), raw_topic(s.topic_results)
    defects_t, dlq_t = raw_topic(s.topic_defects), raw_topic(s.topic_dlq)
    init_lock = asyncio.Lock()

    async def pipeline() -> Pipeline:
        if "pipeline" in state:
            return state["pipeline"]
        async with init_lock:
            if "pipeline" not in state:
                # no retries inside the client: the pipeline retries, per-frame budget + circuit breaker
                triton = TritonInfer(s.triton_grpc_url, metrics=metrics, max_retries=0)
                p = Pipeline(cfg, triton, metrics)
                attach_breaker(app, p.breaker, s.topic_frames)
                # the serving state, read whole before the first frame is routed, then followed
                view = ServingView(s, p.router, triton)
                await view.start()
                p.sync_serving = view.sync
                p.serving = view  # the authority: a product it serves waits for its model, never unknown_product
                state["serving"] = view
                # Triton down at start: the breaker pauses consumption and probes; nothing raises into the agent
                await reach_triton(p, s.worker_ready_wait_s)
                log.info("worker_models", models={m: str(triton.spec_for(m).version) for m in triton.ready_models()})
                state["pipeline"] = p
        return state["pipeline"]

    # drift alerts (+ retrain_requested) per batch (stream/lifecycle/wiring.py); rollouts are the controller's
    lifecycle = register_lifecycle(app, cfg)

    async def handle(events: list) -> None:
        p = await pipeline()
        metrics.inflight.set(len(events))
        m = [e.message for e in events]
        batch = await p.process([RawRecord(i, x.key, x.value, x.headers, x.timestamp, x.partition)
                                  for i, x in enumerate(m)])
        _count(batch, metrics)
        sends = p.outgoing(batch, results_t, defects_t, dlq_t) + lifecycle.after_batch(batch)
        t0 = time.perf_counter()
        await send_all(sends, s.worker_produce_backoff_s, s.worker_produce_backoff_max_s)
        metrics.stage_latency.labels(stage="publish").observe((time.perf_counter() - t0) * 1000)
        metrics.inflight.set(0)
        _record_lag(app, events, metrics)

    @app.agent(frames_t)
    async def inspect(stream):
        # manual acks: a batch is acked only once every output is on the broker; one that never will be is
        # withheld (settled unacked: no commit covers it, no rebalance waits for it) and redelivered later
        async for events in stream.noack_take(s.batch_max, within=s.batch_within_s):
            try:
                await handle(events)
            except asyncio.CancelledError:  # stopping (SIGTERM, rebalance) mid-batch: redelivered later
                withhold(events)
                raise
            except BaseException as e:
                fatal_stop(state, e, events)
                await asyncio.Event().wait()  # take no further batch; the stop cancels this task
            for event in events:
                await stream.ack(event)

    @app.page("/metrics")
    async def metrics_page(web, request):
        body, ctype = metrics.render()
        return web.bytes(body, content_type=ctype.split(";")[0])

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"ok": True, "models": state["pipeline"].triton.ready_models() if "pipeline" in state else []})

    @app.task
    async def warm():
        try:
            await pipeline()
        except Exception as e:  # the agent retries on its first batch
            log.error("triton_unreachable_at_start", error=str(e))

    # every topic this app publishes to (stream/ops/acls.py derives the worker's KafkaUser from it)
    # read outside Faust: the serving state (serving.py), the drift state on assignment (drift_state.py)
    app.linewatch_follows = (s.topic_serving_state,) + (  # type: ignore[attr-defined]
        (s.topic_drift_state,) if lifecycle.state is not None else ())
    app.linewatch_writes = tuple(t.get_topic_name() for t in (results_t, defects_t, dlq_t, *lifecycle.output_topics))  # type: ignore[attr-defined]
    app.linewatch_metrics = metrics  # type: ignore[attr-defined]
    app.linewatch_state = state  # type: ignore[attr-defined]
    return app


def limit_topics(s: Settings) -> list[str]:
    """The topics whose ``max.message.bytes`` the worker reads at start (DescribeConfigs)."""
    return [s.topic_dlq, s.topic_results, s.topic_defects]


def check_topic_limits(cfg: WorkerConfig) -> WorkerConfig:
    """Read the output topics' max.message.bytes and cap the DLQ record's original value to fit; refuse to
    start (TopicLimitError, one line, exit 2) when the DLQ topic cannot hold a DLQ record at all."""
    s = cfg.settings
    with ThreadPoolExecutor(1) as ex:  # its own event loop, before Faust's exists
        limits = ex.submit(asyncio.run, read_topic_limits(s, limit_topics(s))).result()
    cap = dlq_value_cap(s.max_frame_bytes, s.topic_dlq, limits.get(s.topic_dlq))
    log.info("topic_limits", max_message_bytes=limits, max_frame_bytes=s.max_frame_bytes, dlq_value_bytes=cap)
    if cap < s.max_frame_bytes:
        log.warning("dlq_value_capped", topic=s.topic_dlq, max_message_bytes=limits.get(s.topic_dlq), cap=cap,
                    note="a DLQ'd frame larger than the cap keeps its size and sha256, not its bytes")
    return dataclasses.replace(cfg, dlq_value_bytes=cap)


def run_worker(cfg: WorkerConfig, loglevel: str = "info") -> None:
    """Run the Faust worker in the foreground until SIGINT/SIGTERM (or a fatal error: exit 1)."""
    from faust.worker import Worker

    s = cfg.settings
    cfg = check_topic_limits(cfg)
    app = build_app(cfg)
    state = app.linewatch_state  # type: ignore[attr-defined]
    watchdog = ShutdownWatchdog(s.worker_shutdown_timeout_s)

    class BoundedWorker(Worker):
        async def on_stop(self) -> None:  # the first step of every stop (a signal's included)
            fatal = state.get("fatal")
            watchdog.exit_code = exit_code_for(fatal) if fatal is not None else EXIT_RUNTIME
            watchdog.arm("worker stop" + (f" after {type(fatal).__name__}" if fatal else ""))
            await super().on_stop()

    log.info("worker_start", bootstrap=s.kafka_bootstrap, triton=s.triton_grpc_url, topic=s.topic_frames,
             batch_max=s.batch_max, within_s=s.batch_within_s, web_port=s.worker_web_port, dev_broker=s.dev_broker,
             security=type(cfg.broker_credentials).__name__ if cfg.broker_credentials else "PLAINTEXT",
             max_frame_bytes=s.max_frame_bytes, max_image_pixels=s.max_image_pixels)
    worker = BoundedWorker(app, loglevel=loglevel, redirect_stdouts=False, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        fatal = state.get("fatal")
        if fatal is not None:
            raise SystemExit(exit_code_for(fatal)) from None
        raise


def main(argv: list[str] | None = None) -> int:  # python -m stream.worker.app
    ap = OneLineParser("stream.worker.app")
    add_worker_args(ap)
    a = ap.parse_args(argv)

    def command() -> int:
        settings = Settings()  # the config root of this entry point
        configure_logging(settings.log_level)
        run_worker(worker_config(settings, a))
        return 0

    return run_command("stream.worker.app", command)


if __name__ == "__main__":
    sys.exit(main())
