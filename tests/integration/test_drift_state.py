"""Drift windows survive a worker restart (issue #16 item 3): real broker, real tritonserver, Faust workers.

A model whose scores sit far above its own calibration (a drifted camera). Window 16, evaluated every 8
frames. Worker A scores 8 frames of the camera (window not full: no alert) and is stopped; worker B of the
same group takes the partition, restores A's window from ``drift-state`` and, after 8 more frames, raises
the alert a single worker would have raised at frame 16. A fresh window would still be half empty.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import cv2
import pytest

from contracts.envelope import Frame, encode_frame
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.rollout import Tiny, write_artifact
from tests.harness.settle import settle

pytestmark = pytest.mark.integration


def test_drift_window_continues_on_the_next_worker(local_stack, shared_data, tmp_path):
    files = sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:90]
    images = [cv2.imencode(".png", cv2.resize(cv2.imread(str(f)), (128, 128)))[1].tobytes() for f in files]
    uid = uuid.uuid4().hex[:6]
    model, product = f"lwt_drift_{uid}", f"drift-{uid}"
    repo = Path(local_stack.model_repository)
    # scores ~3x the calibration of the honest model: every full window is a score shift
    write_artifact(repo, model, 1, product, Tiny(gain=3.0), images, honest=Tiny(gain=1.0))
    local_stack.load_model(model)
    t = {k: f"it-drift-{uid}-{k}" for k in ("frames", "results", "defects", "dlq", "drift", "state")}
    boot = local_stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, [t[k] for k in ("frames", "results", "defects", "dlq", "drift")]))
    asyncio.run(ensure_topics(boot, [t["state"]], config={"cleanup.policy": "compact"}))
    env = {"LINEWATCH_TOPIC_DRIFT": t["drift"], "LINEWATCH_TOPIC_DRIFT_STATE": t["state"],
           "LINEWATCH_DRIFT__WINDOW": "16", "LINEWATCH_DRIFT__CHECK_EVERY": "8", "LINEWATCH_DRIFT__MIN_INTERVAL_S": "0"}
    args = ["--frames-topic", t["frames"], "--results-topic", t["results"], "--defects-topic", t["defects"],
            "--dlq-topic", t["dlq"], "--routing", json.dumps({"products": {product: model}})]

    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(boot, local_stack.triton_grpc_url, tmp_path / name, app_id=f"lw-drift-{uid}",
                             batch_max=4, batch_within=0.05, env=env, extra_args=args,
                             log_path=tmp_path / f"{name}.log").start()

    def send(tag: str, n: int) -> None:
        async def go():
            async with Producer(boot) as p:
                await p.send_many(t["frames"], [encode_frame(Frame(f"{tag}-{i}", "cam-drift", int(time.time() * 1000),
                                                                   images[i], product=product,
                                                                   content_type="image/png")) for i in range(n)])
        asyncio.run(go())

    def alerts() -> list[dict]:
        recs = asyncio.run(read_topics(boot, [t["drift"]], timeout_s=10, idle_s=1.5))[t["drift"]]
        return [json.loads(r.value) for r in recs]

    a = worker("worker-a")
    try:
        send("a", 8)
        rep = settle(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"])
        assert rep.ok and rep.missing == [], a.log_path.read_text()[-3000:]
        assert alerts() == []  # 8 of 16: the window is not full yet
    finally:
        a.stop()
    b = worker("worker-b")
    try:
        send("b", 8)
        rep = settle(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"])
        deadline = time.monotonic() + 20
        got = alerts()
        while not got and time.monotonic() < deadline:
            time.sleep(0.5)
            got = alerts()
        log_b = b.log_path.read_text()
    finally:
        b.stop()
    print(f"\ndrift state: {rep.summary_line()}; alerts after the restart {[d['detector'] for d in got]}")
    assert rep.ok and rep.missing == [] and rep.dlq == 0
    assert '"event":"drift_state_restored"' in log_b and '"cameras":1' in log_b, log_b[-3000:]
    assert got and {d["camera"] for d in got} == {"cam-drift"} and "score_shift" in {d["detector"] for d in got}
    assert all(d["window"] == 16 for d in got)
