"""The training job end to end with a real MoLE-Flow: job -> model store -> ``released`` -> the Faust
worker's rollout agent -> Triton (explicit model control) -> frames of the new product are served.

Real components only: the Tansu broker, tritonserver, the worker as a subprocess, MoLE-Flow trained
(tiny schedule) on real MVTec bottle and ELPV solar-cell images.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from contracts.envelope import Frame, decode_result, encode_frame
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.line import STEP_CAP_S
from tests.harness.rollout import lifecycle_topics, start_controller, topic_env

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TINY = ["--quick", "--epochs", "2", "--max-images", "24", "--threads", "2"]


def run_job(*args: str, timeout: float = 400) -> dict:
    p = subprocess.run([sys.executable, "-m", "models.jobs.train_job", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def outcome(boot: str, topic: str, model: str, version: int, timeout_s: float = 240) -> dict:
    def hit(o):
        return [d for d in (json.loads(r.value) for r in o[topic])
                if d.get("model") == model and d.get("version") == version
                and d.get("type") in ("promoted", "rolled_back", "refused")]

    recs = asyncio.run(read_topics(boot, [topic], until=lambda o: bool(hit(o)), timeout_s=timeout_s))
    got = hit(recs)
    assert got, [r.value for r in recs[topic]]
    return got[0]


def test_training_job_adds_adapter_live_zero_failed_frames_zero_forgetting(local_stack, shared_data, tmp_path):
    from models.moleflow.datasets import elpv_split

    uid = uuid.uuid4().hex[:6]
    boot = local_stack.kafka_bootstrap
    t = lifecycle_topics(f"it-job-{uid}")
    asyncio.run(ensure_topics(boot, t.values()))
    model = f"lwt_moleflow_{uid}"
    # products unique to this test: the session's Triton may serve e.g. efficientad_bottle for "bottle"
    bottle_p, cells_p = f"bottle-{uid}", f"cells-{uid}"
    store, base = tmp_path / "store", tmp_path / "base"
    common = ["--store", f"file://{store}", "--model", model, "--base-store", str(base), "--bootstrap", boot,
              "--topic", t["events"], "--holdout", "0.3"]
    # the controller (the only holder of Triton's model-control key) rolls out; the worker follows its serving state
    ctl = start_controller(local_stack, t, tmp_path)
    w = WorkerProcess(boot, local_stack.triton_grpc_url, tmp_path, app_id=f"lw-job-{uid}", batch_max=8,
                      batch_within=0.05, env=topic_env(t),
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()
    bottle = [p.read_bytes() for p in sorted((shared_data / "mvtec" / "bottle" / "test" / "good").glob("*.png"))[:8]]

    async def send(frames):
        async with Producer(boot) as p:
            await p.send_many(t["frames"], [encode_frame(f) for f in frames])

    def bottle_frames(tag: str) -> list[Frame]:
        return [Frame(f"{tag}-{i}", "cam-bottle", int(time.time() * 1000), b, product=bottle_p,
                      content_type="image/png") for i, b in enumerate(bottle)]

    try:
        # 1. first product: the job creates the frozen base + the bottle adapter, releases v1
        s1 = run_job("--product", bottle_p, "--train-dir", str(shared_data / "mvtec" / "bottle" / "train" / "good"),
                     *common, "--", *TINY)
        assert s1["model"] == model and s1["version"] == 1
        o1 = outcome(boot, t["events"], model, 1)
        assert o1["type"] == "promoted", o1
        asyncio.run(send(bottle_frames("b1")))

        # 2. second product while bottle frames keep flowing: ELPV cells adapter on the same frozen base -> v2
        cells_dir = tmp_path / "cells"
        cells_dir.mkdir()
        train_cells, test_cells = elpv_split(n_train=60, n_test_good=4, n_test_bad=4)
        for p in train_cells:
            (cells_dir / p.name).symlink_to(p)
        stop = threading.Event()
        sent: list[str] = []

        def stream_bottle():  # live traffic for the old version during training, load, shadow and promotion
            k = 0
            while not stop.is_set():
                fr = bottle_frames(f"live{k}")[:2]
                asyncio.run(send(fr))
                sent.extend(f.frame_id for f in fr)
                k += 1
                time.sleep(0.5)

        th = threading.Thread(target=stream_bottle, daemon=True)
        th.start()
        try:
            s2 = run_job("--product", cells_p, "--train-dir", str(cells_dir), *common, "--", *TINY)
            assert s2["version"] == 2
            o2 = outcome(boot, t["events"], model, 2)
            assert o2["type"] == "promoted", o2
        finally:
            stop.set()
            th.join(30)
        asyncio.run(send(bottle_frames("b2")))
        cells = [Frame(f"cell-{i}", "cam-cells", int(time.time() * 1000), p.read_bytes(), product=cells_p,
                       content_type="image/png", extra={"gt_label": str(lab)}) for i, (p, lab) in enumerate(test_cells)]
        asyncio.run(send(cells))

        want = {f"b1-{i}" for i in range(len(bottle))} | {f"b2-{i}" for i in range(len(bottle))} | set(sent) \
            | {f.frame_id for f in cells}

        def done(o):
            return want <= {decode_result(r.value).frame_id for r in o[t["results"]]}

        out = asyncio.run(read_topics(boot, [t["results"], t["dlq"]], until=done, timeout_s=STEP_CAP_S))
        assert w.alive(), w.log_path.read_text()[-3000:]
        res = {}
        for r in out[t["results"]]:
            d = decode_result(r.value)
            if not d.shadow:
                res[d.frame_id] = d
        assert want <= set(res), sorted(want - set(res))[:10]
        assert not out[t["dlq"]], [dict(r.headers) for r in out[t["dlq"]]][:3]  # 0 failed frames during the switch
        assert len(sent) >= 4
        # new product's frames reach the new adapter of the same model
        assert {(res[f.frame_id].model, res[f.frame_id].task, res[f.frame_id].model_version) for f in cells} \
            == {(model, cells_p, "2")}
        # zero forgetting through Triton: the bottle adapter scores the same images identically in v1 and v2
        v1 = np.array([res[f"b1-{i}"].score for i in range(len(bottle))])
        v2 = np.array([res[f"b2-{i}"].score for i in range(len(bottle))])
        assert {res[f"b1-{i}"].model_version for i in range(len(bottle))} == {"1"}
        assert {res[f"b2-{i}"].model_version for i in range(len(bottle))} == {"2"}
        np.testing.assert_allclose(v2, v1, rtol=1e-4, atol=1e-4)
    finally:
        w.stop()
        ctl.stop()
