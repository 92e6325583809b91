"""Ack safety and produce errors on the real stack (issue #15 items 1 and 2): Tansu broker + tritonserver
+ the Faust worker (subprocess), accounting with stream.ops.accounting.account.

Faust's ``take_events`` acks a batch in a ``finally`` block, so an exception escaping the batch body used
to commit frames with no result and no DLQ record. Each trigger here must end with every frame accounted:

(a) a worker started while Triton has been down longer than its readiness wait (``worker_ready_wait_s``);
(b) an exception escaping the batch body: a fatal produce error (the broker's answer "topic authorization
    failed" for the results topic) and a non-Kafka error in publishing (``np.stack``-style ValueError).
    The worker stops at once (exit 1, one ``worker_fatal`` line), commits nothing, and a restarted
    worker scores the redelivered frames. The failure is injected in the worker process (``_INJECT``:
    aiokafka's producer / the pipeline's publish step raise while a marker file exists), the broker and
    Triton are real: Tansu grants every ACL and accepts any record size, so it never refuses by itself;
(c) SIGTERM while the broker is stopped (SIGSTOP) exits within ``worker_shutdown_timeout_s`` (< 20 s,
    below the pod's 60 s grace); the frames are scored after the broker is back.

Item 2, record sizes: Tansu stores a topic's ``max.message.bytes`` and reports it (DescribeConfigs) but
enforces none (shown below: a 2 MiB record into a 1.5 MiB topic is accepted), so the guard is the
worker's startup check: a DLQ record's original value is capped to fit the DLQ topic, and a DLQ topic
too small for a DLQ record's headers stops the worker at start with one line (exit 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from contracts.envelope import Frame, encode_frame, headers_to_dict, new_frame_id
from devstack.stack import LocalStack
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from stream.ops.accounting import account
from tests.harness.chaos import load_images
from tests.harness.line import STEP_CAP_S
from tests.harness.probe_model import write_probe_model
from tests.harness.streams import topics

pytestmark = pytest.mark.integration

MIB = 1024 * 1024

# run the worker with a failure injected while the file $LW_INJECT_FILE exists ($LW_INJECT: auth | raise)
_INJECT = r'''
import asyncio, os, sys
from pathlib import Path
marker, mode = Path(os.environ["LW_INJECT_FILE"]), os.environ["LW_INJECT"]
if mode == "auth":  # the broker's answer to a produce the ACLs deny (error code 29), for the results topic
    import aiokafka
    from aiokafka.errors import TopicAuthorizationFailedError
    orig = aiokafka.AIOKafkaProducer.send
    async def send(self, topic, *a, **kw):
        if marker.exists() and topic.endswith("-results"):
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(TopicAuthorizationFailedError(f"not authorized to write {topic}"))
            return fut
        return await orig(self, topic, *a, **kw)
    aiokafka.AIOKafkaProducer.send = send
else:  # an exception escaping the batch body, e.g. np.stack over tensors of two specs
    from stream.worker import pipeline
    orig = pipeline.Pipeline.outgoing
    def outgoing(batch, *a):
        if marker.exists():
            raise ValueError("all input arrays must have the same shape")
        return orig(batch, *a)
    pipeline.Pipeline.outgoing = staticmethod(outgoing)
from stream.worker.app import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def ack_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("ack-stack")
    repo = root / "model_repository"
    model = write_probe_model(repo, "probe_ack")
    stack = LocalStack(root / "work", repo, start_timeout_s=STEP_CAP_S, load_models=[model])
    stack.start()
    stack.probe_model = model
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def images(shared_data) -> list[bytes]:
    return load_images(shared_data / "mvtec" / "bottle" / "test", limit=4)


def _topics(tag: str) -> dict[str, str]:
    return topics(f"ack-{tag}-{uuid.uuid4().hex[:6]}")


def _create(boot: str, t: dict[str, str], dlq_max_bytes: int | None = None) -> None:
    if dlq_max_bytes is None:
        asyncio.run(ensure_topics(boot, t.values(), partitions=1))
        return

    async def go():
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=boot)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t["dlq"], 1, 1, topic_configs={"max.message.bytes": str(dlq_max_bytes)})])
        finally:
            await admin.close()
        await ensure_topics(boot, t.values(), partitions=1)

    asyncio.run(go())


def _worker(stack, t, tmp_path: Path, *, app_id: str, env: dict | None = None, inject: str | None = None,
            name: str = "w") -> WorkerProcess:
    w = WorkerProcess(stack.kafka_bootstrap, stack.triton_grpc_url, tmp_path, app_id=app_id, batch_max=4,
                      batch_within=0.1, log_path=tmp_path / f"{name}.log", env=env,
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"],
                                  "--routing", json.dumps({"products": {"bottle": stack.probe_model}})])
    if inject:
        i = w.cmd.index("-m")
        w.cmd[i:i + 2] = ["-c", _INJECT]
    return w.start()


def _frames(images: list[bytes], n: int, camera: str = "cam-ack") -> list[Frame]:
    return [Frame(frame_id=new_frame_id(), camera_id=camera, ts_ms=int(time.time() * 1000),
                  image=images[i % len(images)], product="bottle", content_type="image/png") for i in range(n)]


def _publish(boot: str, topic: str, frames: list[Frame], **kw) -> None:
    async def go():
        async with Producer(boot, **kw) as p:
            await p.send_many(topic, [encode_frame(f) for f in frames])

    asyncio.run(go())


def _account(boot: str, t: dict, wait_s: float):
    return asyncio.run(account(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"],
                               wait_s=wait_s))


def _log(w: WorkerProcess) -> str:
    return w.log_path.read_text(errors="replace")


# ----------------------------------------------------------------------------- (a) Triton down at start


def test_worker_started_while_triton_down_past_the_ready_wait_loses_nothing(ack_stack, images, tmp_path, reliability):
    boot = ack_stack.kafka_bootstrap
    t = _topics("start")
    _create(boot, t)
    frames = _frames(images, 10)
    _publish(boot, t["frames"], frames)
    models = ack_stack.kill_triton()
    w = None
    try:
        w = _worker(ack_stack, t, tmp_path, app_id=f"lw-ack-start-{uuid.uuid4().hex[:6]}",
                    env={"LINEWATCH_WORKER_READY_WAIT_S": "4", "LINEWATCH_WORKER_BREAKER_BACKOFF_MAX_S": "1"})
        # Triton stays down at least 3x the worker's readiness wait and until the worker has joined, taken the
        # frames and opened its breaker on them (however long that takes here; 120 s is an upper bound)
        t_start, opened = time.monotonic(), False
        while time.monotonic() - t_start < 120 and w.alive():
            opened = '"event":"triton_breaker_open"' in _log(w)
            if opened and time.monotonic() - t_start >= 14.0:
                break
            time.sleep(0.2)
        assert w.alive(), _log(w)[-3000:]
        assert opened, f"the worker never opened its breaker with Triton down\n{_log(w)[-3000:]}"
        before = _account(boot, t, 0)
        ack_stack.start_triton(models)
        t_up = time.monotonic()
        rep = _account(boot, t, 90)
        lg = _log(w)
        print(f"\ntriton down at start: results before Triton {before.results}, all {rep.produced} accounted "
              f"{time.monotonic() - t_up:.1f}s after it came up, lost {len(rep.missing)}, dlq {rep.dlq}, "
              f"breaker opened {lg.count('triton_breaker_open')}x")
        reliability.record("triton_down_at_start", rep, results_before_triton=before.results,
                           accounted_s_after_triton_up=round(time.monotonic() - t_up, 1))
        assert before.results == 0
        assert rep.missing == [] and rep.dlq == 0 and rep.produced == 10, (rep.missing, rep.dlq_reasons, lg[-3000:])
        assert '"event":"triton_breaker_open"' in lg and "worker_fatal" not in lg
        assert w.alive()
    finally:
        if w:
            w.stop()
        if ack_stack.probe_model not in ack_stack.ready_models():
            ack_stack.kill_triton()
            ack_stack.start_triton(models)


# ----------------------------------------------------------------------------- (b) an exception in the batch


@pytest.mark.parametrize("inject", ["auth", "raise"])
def test_exception_escaping_the_batch_commits_nothing_and_frames_are_redelivered(ack_stack, images, tmp_path,
                                                                                 inject, reliability):
    boot = ack_stack.kafka_bootstrap
    t = _topics(f"fatal-{inject}")
    _create(boot, t)
    group = f"lw-ack-{inject}-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "inject"
    marker.touch()
    env = {"LW_INJECT_FILE": str(marker), "LW_INJECT": inject}
    frames = _frames(images, 10)
    _publish(boot, t["frames"], frames)
    w = _worker(ack_stack, t, tmp_path, app_id=group, env=env, inject=inject, name="injected")
    try:
        t0 = time.monotonic()
        try:
            rc = w.proc.wait(90)  # before the fix: retried for ever (auth) / acked and went on (raise)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not stop on the fatal error; log: {_log(w)[-3000:]}")
        stop_s = time.monotonic() - t0
        lg = _log(w)
        assert rc == 1, (rc, lg[-3000:])
        assert lg.count('"event":"worker_fatal"') == 1, lg[-3000:]
        assert "produce_retry" not in lg
        mid = _account(boot, t, 0)
        assert mid.results == 0 and mid.dlq == 0  # nothing published for the failed batch...
    finally:
        w.stop()
    # ...and nothing committed: the cause fixed (ACL granted / bug fixed), a worker of the same group gets every
    # frame again (Tansu's OffsetFetch answer does not parse in aiokafka's admin client, so redelivery is the proof)
    marker.unlink()
    w2 = _worker(ack_stack, t, tmp_path, app_id=group, env=env, inject=inject, name="restarted")
    try:
        rep = _account(boot, t, 90)
        print(f"\n{inject}: fatal stop after {stop_s:.1f}s (rc {rc}); after restart "
              f"{rep.accounted}/{rep.produced} accounted, lost {len(rep.missing)}, duplicates {rep.duplicate_results}")
        reliability.record("fatal_produce_error" if inject == "auth" else "exception_in_batch", rep, worker_exit=rc,
                           fatal_stop_s=round(stop_s, 1), published_before_restart=mid.results + mid.dlq)
        assert rep.missing == [] and rep.produced == 10 and rep.dlq == 0, (rep.missing, _log(w2)[-3000:])
    finally:
        w2.stop()


# ----------------------------------------------------------------------------- (c) SIGTERM, broker stopped


def test_sigterm_with_the_broker_stopped_exits_within_the_bound(ack_stack, images, tmp_path, reliability):
    boot = ack_stack.kafka_bootstrap
    t = _topics("term")
    _create(boot, t)
    group = f"lw-ack-term-{uuid.uuid4().hex[:6]}"
    w = _worker(ack_stack, t, tmp_path, app_id=group, name="term")
    _publish(boot, t["frames"], _frames(images, 1))
    assert _account(boot, t, 120).missing == [], _log(w)[-3000:]
    _publish(boot, t["frames"], _frames(images, 6))
    time.sleep(0.5)
    ack_stack.signal_service("tansu", signal.SIGSTOP)
    try:
        time.sleep(2.0)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        try:
            rc = w.proc.wait(45)
        except subprocess.TimeoutExpired:
            rc = None
        exit_s = time.monotonic() - t0
    finally:
        ack_stack.signal_service("tansu", signal.SIGCONT)
        w.stop(5)
    print(f"\nSIGTERM with the broker stopped: exited after {exit_s:.1f}s (rc {rc})")
    assert rc is not None and exit_s < 20, f"still running {exit_s:.0f}s after SIGTERM; log: {_log(w)[-2000:]}"
    w2 = _worker(ack_stack, t, tmp_path, app_id=group, name="term2")
    try:
        rep = _account(boot, t, 90)
        reliability.record("sigterm_broker_stopped", rep, exit_s=round(exit_s, 1), worker_exit=rc)
        assert rep.missing == [] and rep.produced == 7, (rep.missing, _log(w2)[-3000:])
    finally:
        w2.stop()


# ----------------------------------------------------------------------------- item 2: record sizes


def test_dlq_record_fits_the_dlq_topic_limit(ack_stack, tmp_path, reliability):
    boot = ack_stack.kafka_bootstrap
    t = _topics("size")
    limit = 3 * MIB // 2
    _create(boot, t, dlq_max_bytes=limit)

    async def probe():  # evidence: Tansu reports the topic limit but does not enforce it
        async with Producer(boot, max_request_size=8 * MIB) as p:
            await p.send_many(t["defects"], [(None, b"x" * (2 * MIB), [])])

    asyncio.run(probe())
    w = _worker(ack_stack, t, tmp_path, app_id=f"lw-ack-size-{uuid.uuid4().hex[:6]}", name="size")
    try:
        junk = Frame(frame_id=new_frame_id(), camera_id="cam-ack", ts_ms=int(time.time() * 1000),
                     image=os.urandom(2 * MIB), product="bottle", content_type="image/png")  # undecodable, 2 MiB
        _publish(boot, t["frames"], [junk], max_request_size=8 * MIB)
        rep = _account(boot, t, 120)
        reliability.record("dlq_record_over_topic_limit", rep, expect_dlq={"unsupported_format": 1})
        assert rep.missing == [] and rep.dlq == 1, (rep, _log(w)[-3000:])
        rec = asyncio.run(read_topics(boot, [t["dlq"]], timeout_s=15, idle_s=2.0))[t["dlq"]][0]
        size = len(rec.key or b"") + len(rec.value or b"") + sum(len(k) + len(v) for k, v in rec.headers)
        h = headers_to_dict(rec.headers)
        print(f"\nDLQ topic max.message.bytes {limit}: DLQ record {size} bytes for a {2 * MIB}-byte frame "
              f"(original_bytes={h.get('error_original_bytes')!r})")
        assert size <= limit and h["error_original_bytes"] == str(2 * MIB).encode()
        assert '"event":"dlq_value_capped"' in _log(w)
    finally:
        w.stop()


def test_dlq_topic_too_small_for_a_dlq_record_refuses_to_start(ack_stack, tmp_path):
    boot = ack_stack.kafka_bootstrap
    t = _topics("tiny")
    _create(boot, t, dlq_max_bytes=500_000)
    w = _worker(ack_stack, t, tmp_path, app_id=f"lw-ack-tiny-{uuid.uuid4().hex[:6]}", name="tiny")
    try:
        rc = w.proc.wait(60)
    finally:
        w.stop()
    lines = [ln for ln in _log(w).splitlines() if "error:" in ln]
    assert rc == 2, _log(w)[-2000:]
    assert len(lines) == 1 and "accepts records up to 500000 bytes" in lines[0], lines
