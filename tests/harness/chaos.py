"""Fault injection against the embedded stack: the harness behind tests/integration/test_faults.py
and benchmarks/reliability.py.

A scenario runs one Faust worker (subprocess, as in production) against a :class:`~devstack.stack.LocalStack`
on fresh topics, publishes frames at a steady rate from a background producer, injects one fault
while they flow, then proves with :func:`stream.ops.accounting.account` that every frame ended in the
results topic or the DLQ. Faults (all loopback, all on the real processes):

- ``worker_sigkill``: SIGKILL the worker while a batch is inside Triton, start a new one (same group);
- ``broker_pause``: SIGSTOP the Tansu broker (unreachable, memory kept), SIGCONT after ``fault_s``;
- ``triton_crash``: SIGKILL tritonserver (+ its Python-backend stubs), restart it on the same ports
  after ``fault_s`` and re-load the models it had;
- ``triton_flap``: SIGKILL tritonserver, bring it back *without* models for ``fault_s/2``, SIGKILL it
  again, then restart it with its models (a crash-looping server);
- ``model_unload``: unload the model through Triton's explicit model control, load it back after ``fault_s``;
- ``triton_stall``: SIGSTOP tritonserver for ``fault_s`` (a hung/slow server) while frames keep arriving.

Measured per scenario: frames sent, lost (accounting ``missing``), duplicated result copies, DLQ'd,
recovery time (fault end -> first result record seen on the results topic after it), the worker's
peak RSS growth, and whether the worker process survived (no crash / crash loop).

The probe detector (:func:`tests.harness.probe_model.write_probe_model`) is a real Triton Python-backend model with a real
``linewatch_spec`` (64x64 input, anomaly map = mean |x| over channels, a configurable per-batch
delay); it makes the scenarios cost seconds on a 2-core machine instead of minutes. Any exported
detector can be used instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts.logs import get_logger

log = get_logger("tests.harness.chaos")

FAULTS = ("worker_sigkill", "broker_pause", "triton_crash", "triton_flap", "model_unload", "triton_stall")

# ----------------------------------------------------------------------------- background helpers


class _LoopThread(threading.Thread):
    """Runs one coroutine in its own event loop on a daemon thread; ``error`` holds what it raised."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.error: BaseException | None = None
        self.stop_evt = threading.Event()

    async def main(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def run(self) -> None:
        try:
            asyncio.run(self.main())
        except BaseException as e:
            self.error = e

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_evt.set()
        self.join(timeout)


class Feeder(_LoopThread):
    """A production line: publishes ``n`` frames (cycling ``images``) at ``fps`` across ``cameras``,
    each send awaited (acks=all), so a broker outage stalls it like it stalls a real producer.
    ``n=None``: publishes until :meth:`stop` (``stop_evt``); the frame in flight is sent first."""

    def __init__(self, bootstrap: str, topic: str, images: list[bytes], *, n: int | None, fps: float,
                 cameras: tuple[str, ...] = ("cam-f1", "cam-f2"), product: str = "bottle"):
        super().__init__("feeder")
        self.bootstrap, self.topic, self.images = bootstrap, topic, images
        self.n, self.fps, self.cameras, self.product = n, fps, cameras, product
        self.sent: list[str] = []
        self.sent_at: list[float] = []

    async def main(self) -> None:
        from contracts.envelope import Frame, encode_frame, new_frame_id
        from stream.kafka.clients import Producer

        t0 = time.monotonic()
        async with Producer(self.bootstrap) as p:
            for i in itertools.count() if self.n is None else range(self.n):
                if self.stop_evt.is_set():
                    return
                f = Frame(frame_id=new_frame_id(), camera_id=self.cameras[i % len(self.cameras)],
                          ts_ms=int(time.time() * 1000), image=self.images[i % len(self.images)],
                          product=self.product, content_type="image/png")
                await p.send_many(self.topic, [encode_frame(f)])
                self.sent.append(f.frame_id)
                self.sent_at.append(time.monotonic())
                delay = t0 + (i + 1) / self.fps - time.monotonic() if self.fps > 0 else 0
                if delay > 0:
                    await asyncio.sleep(delay)


class ResultWatch(_LoopThread):
    """Tails a results topic from the beginning and records when each result record arrived here."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__("result-watch")
        self.bootstrap, self.topic = bootstrap, topic
        self.arrivals: list[float] = []
        self.ready = threading.Event()

    async def main(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from stream.kafka.clients import client_kwargs

        c = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", **client_kwargs("consumer"))
        await c.start()
        self.ready.set()
        try:
            while not self.stop_evt.is_set():
                batch = await c.getmany(timeout_ms=100)
                now = time.monotonic()
                self.arrivals += [now for recs in batch.values() for _ in recs]
        finally:
            await c.stop()

    def first_after(self, t: float) -> float | None:
        return next((a for a in self.arrivals if a >= t), None)


class RssSampler(threading.Thread):
    """Peak resident memory of a process (MiB), sampled every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(name="rss", daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            try:
                self.samples.append((time.monotonic(), self.rss_mb()))
            except psutil.Error:
                return
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak(self, since: float = 0.0) -> float:
        return max((m for t, m in self.samples if t >= since), default=0.0)


# ----------------------------------------------------------------------------- scenarios


@dataclass
class ScenarioResult:
    fault: str
    frames_sent: int  # n (at least n with ``after``) + 1 warm-up frame
    sent_before_fault: int
    sent_during_fault: int  # frames the line published while the fault lasted
    lost: int
    duplicated: int  # result records beyond the first per frame (at-least-once redelivery)
    duplicated_frames: int
    dlq: int
    recovery_s: float | None  # fault end -> first result record seen after it
    fault_s: float  # how long the fault lasted (injection -> end)
    worker_survived: bool  # the worker process that saw the fault (or its replacement) is still up
    worker_crashes: int  # agent crashes / tracebacks in the worker log
    rss_base_mb: float
    rss_peak_mb: float
    retries: dict[str, int]  # worker log events: triton_retry / triton_transient_batch / produce_retry
    triton_transient_errors: float  # linewatch_triton_errors_total{kind="transient"} of the last worker
    wall_s: float
    ok: bool
    report: dict[str, Any] = field(default_factory=dict)
    topics: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    # "" unless tritonserver stopped answering after the fault and was restarted as its livenessProbe would
    # (devstack/faults.StackFaults.liveness_restart): the server's failure, recorded, not the worker's
    triton_liveness_restart: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_images(folder: str | Path, limit: int = 16) -> list[bytes]:
    from stream.sources.inputs import list_images

    return [it.path.read_bytes() for it in list_images(folder)[:limit]]


def _crash_lines(log_path: Path) -> int:
    if not log_path.is_file():
        return 0
    text = log_path.read_text(errors="replace")
    return sum(text.count(m) for m in ("Traceback (most recent call last)", "Crashed reason", "Agent crashed"))


def _count_events(log_path: Path, event: str) -> int:
    if not log_path.is_file():
        return 0
    return log_path.read_text(errors="replace").count(f'"event":"{event}"')


def scrape_metrics(port: int, timeout_s: float = 5.0) -> dict[str, float]:
    """The worker's Prometheus page as {'name{labels}': value} (labels other than ``kind``/``reason``
    dropped and summed, so 'linewatch_triton_errors_total{kind="transient"}' is one key)."""
    import re
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or line.startswith("#"):
            continue
        name, labels, val = m.group(1), m.group(2) or "", float(m.group(3))
        keep = ",".join(x for x in labels.strip("{}").split(",") if x.split("=")[0] in ("kind", "reason"))
        key = f"{name}{{{keep}}}" if keep else name
        out[key] = out.get(key, 0.0) + val
    return out


def _wait_metric(port: int, name: str, pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = scrape_metrics(port, timeout_s=1.0).get(name)
        if v is not None and pred(v):
            return True
        time.sleep(0.02)
    return False


def run_scenario(stack, fault: str, images: list[bytes], workdir: str | Path, *, model: str, n: int = 80,
                 fps: float = 10.0, fault_s: float = 8.0, warm_results: int = 5, settle_s: float = 120.0,
                 batch_max: int = 8, web_port: int | None = None, after: int | None = None) -> ScenarioResult:
    """Run one fault scenario against ``stack`` (a started :class:`devstack.stack.LocalStack` with
    ``model`` loaded). Returns the measured :class:`ScenarioResult`; ``ok`` = nothing lost, nothing
    DLQ'd, the topics read to their end, the worker alive and without crashes.

    ``after=None``: the line publishes exactly ``n`` frames (a fixed length, what benchmarks/reliability.py
    records). ``after=k``: the line publishes until the fault has ended and ``k`` more frames were sent after
    it (and at least ``n`` in all), so the fault lands on a publishing line and frames follow it however long
    the warm-up and the fault take on this machine (tests/integration/test_faults.py)."""
    import tritonclient.grpc as grpcclient

    from devstack.worker_process import WorkerProcess
    from stream.kafka.clients import ensure_topics
    from tests.harness.settle import settle

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{fault}-{uuid.uuid4().hex[:6]}"
    topics = {k: f"chaos-{tag}-{k}" for k in ("frames", "results", "defects", "dlq")}
    boot = stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, topics.values(), partitions=1))
    t_start = time.monotonic()

    def worker(i: int) -> WorkerProcess:
        return WorkerProcess(boot, stack.triton_grpc_url, workdir, app_id=f"lw-{tag}", batch_max=batch_max,
                             batch_within=0.05, web_port=web_port, log_path=workdir / f"worker-{tag}-{i}.log",
                             extra_args=["--frames-topic", topics["frames"], "--results-topic", topics["results"],
                                         "--defects-topic", topics["defects"], "--dlq-topic", topics["dlq"],
                                         "--routing", json.dumps({"products": {"bottle": model}})])

    workers = [worker(0).start()]
    rss = RssSampler(workers[0].proc.pid)
    rss.start()
    watch = ResultWatch(boot, topics["results"])
    watch.start()
    warm = Feeder(boot, topics["frames"], images[:1], n=1, fps=0)
    feeder = Feeder(boot, topics["frames"], images, n=n if after is None else None, fps=fps)
    notes, liveness = "", ""
    t_fault = t_end = None

    def wait_results(k: int) -> None:
        deadline = time.monotonic() + 120
        while len(watch.arrivals) < k:
            if time.monotonic() > deadline or not workers[0].alive():
                raise RuntimeError(f"{fault}: no results before the fault; worker log: "
                                   f"{workers[0].log_path.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)

    try:
        watch.ready.wait(30)
        warm.start()
        wait_results(1)  # one frame through: the worker has joined its group and reached Triton
        feeder.start()
        wait_results(1 + warm_results)  # the line is publishing and the worker keeping up
        rss_base = rss.peak()
        t_fault = time.monotonic()
        log.info("fault_inject", fault=fault, results_so_far=len(watch.arrivals), sent_so_far=len(feeder.sent))
        if fault == "worker_sigkill":
            # kill while a batch is taken and not yet acknowledged (inside Triton or being published)
            mid_batch = _wait_metric(workers[0].web_port, "linewatch_inflight_frames", lambda v: v > 0, 20.0)
            workers[0].kill()
            notes = "" if mid_batch else "worker was not mid-batch when killed"
            t_fault = time.monotonic()
            rss.stop()
            workers.append(worker(1).start())
            t_end = time.monotonic()
            rss = RssSampler(workers[-1].proc.pid)
            rss.start()
        elif fault in ("broker_pause", "triton_stall"):  # frozen, not dead: unreachable, state kept
            service = "tansu" if fault == "broker_pause" else "triton"
            stack.signal_service(service, signal.SIGSTOP)
            try:
                time.sleep(fault_s)
            finally:
                stack.signal_service(service, signal.SIGCONT)
            if fault == "triton_stall":
                liveness = stack.liveness_restart()
            t_end = time.monotonic()
        elif fault == "triton_crash":
            stack.restart_triton(down_s=fault_s)
            t_end = time.monotonic()
        elif fault == "triton_flap":
            models = stack.kill_triton()
            stack.start_triton([])  # back up, but without its models (as a fresh explicit-mode server is)
            time.sleep(fault_s / 2)
            stack.kill_triton()  # ... and down again before anything was loaded
            time.sleep(fault_s / 2)
            stack.start_triton(models)
            t_end = time.monotonic()
        elif fault == "model_unload":
            with grpcclient.InferenceServerClient(stack.triton_grpc_url) as c:
                c.unload_model(model, headers=stack.control_headers)
                d = time.monotonic() + 60
                while c.is_model_ready(model) and time.monotonic() < d:
                    time.sleep(0.05)
                time.sleep(max(0.0, fault_s - (time.monotonic() - t_fault)))
            stack.load_model(model)
            t_end = time.monotonic()
        log.info("fault_end", fault=fault, seconds=round(t_end - t_fault, 2))
        if after is not None:  # open-ended line: ``after`` frames past the fault's end (>= n in all), then stop
            want = max(n, sum(t <= t_end for t in feeder.sent_at) + after)
            deadline = time.monotonic() + max(60.0, want / max(fps, 0.1) * 3)  # an upper bound for a stalled send
            while len(feeder.sent) < want and feeder.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            feeder.stop_evt.set()
        feeder.join(max(60.0, n / max(fps, 0.1) * 3))
        if feeder.is_alive() or feeder.error:
            notes = "; ".join(x for x in (notes, f"feeder did not finish: {feeder.error!r}") if x)
        rep = settle(boot, frames_topic=topics["frames"], results_topic=topics["results"], dlq_topic=topics["dlq"],
                     stall_s=settle_s)
        metrics = scrape_metrics(workers[-1].web_port)
        alive = workers[-1].alive()
    finally:
        if t_fault is not None and t_end is None:  # the fault handler itself failed: undo a pause
            for name in ("tansu", "triton"):
                with contextlib.suppress(Exception):
                    stack.signal_service(name, signal.SIGCONT)
        for w in workers:  # first: a leaked worker would outlive the scenario
            w.stop()
        for th in (feeder, warm, rss, watch):
            with contextlib.suppress(Exception):
                th.stop()
    rec = watch.first_after(t_end)
    crashes = sum(_crash_lines(w.log_path) for w in workers)
    retries = {ev: sum(_count_events(w.log_path, ev) for w in workers)
               for ev in ("triton_retry", "triton_transient_batch", "produce_retry")}
    res = ScenarioResult(
        fault=fault, frames_sent=len(warm.sent) + len(feeder.sent), sent_before_fault=1 + sum(t < t_fault for t in feeder.sent_at),
        sent_during_fault=sum(t_fault <= t <= t_end for t in feeder.sent_at),
        lost=len(rep.missing), duplicated=rep.duplicate_results,
        duplicated_frames=len(rep.duplicated), dlq=rep.dlq, recovery_s=None if rec is None else round(rec - t_end, 3),
        fault_s=round(t_end - t_fault, 3), worker_survived=alive, worker_crashes=crashes,
        rss_base_mb=round(rss_base, 1), rss_peak_mb=round(max(rss_base, rss.peak(since=t_fault)), 1),
        retries=retries, triton_transient_errors=metrics.get('linewatch_triton_errors_total{kind="transient"}', 0.0),
        wall_s=round(time.monotonic() - t_start, 1),
        ok=rep.ok and rep.dlq == 0 and alive and crashes == 0 and not notes
        and (len(feeder.sent) == n if after is None else len(feeder.sent) >= n),
        report=rep.to_dict(), topics=topics, notes=notes, triton_liveness_restart=liveness)
    log.info("scenario_done", **{k: v for k, v in res.to_dict().items() if k not in ("report", "topics")})
    return res
