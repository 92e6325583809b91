"""End-to-end: real Tansu broker + real tritonserver (``local_stack``) + a real exported detector +
the Faust worker as a subprocess. No mocks.

The ``detector`` fixture (tests/integration/conftest.py) is ``pytest --it-model-dir DIR`` (an exported
Triton model dir) when given; else a tiny-schedule EfficientAD trained + exported through the models
CLI (subprocess) into this session's temporary directory. Nothing the repo's ``triton_repo/`` or an
earlier command (``make demo``) left behind is ever read.
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from contracts.envelope import (
    Frame,
    decode_defect_event,
    decode_result,
    dlq_reason,
    encode_frame,
    headers_to_dict,
)
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from stream.ops.replay import replay
from tests.harness.streams import topics

pytestmark = pytest.mark.integration


def _worker(local_stack, tmp: Path, t: dict[str, str], app_id: str) -> WorkerProcess:
    return WorkerProcess(local_stack.kafka_bootstrap, local_stack.triton_grpc_url, tmp, app_id=app_id,
                         batch_max=8, batch_within=0.05, log_path=tmp / f"{app_id}.log",
                         extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                     "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]])


@pytest.fixture(scope="module")
def running(stack, detector, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    t = topics(f"it-{uuid.uuid4().hex[:6]}")
    asyncio.run(ensure_topics(stack.kafka_bootstrap, t.values(), partitions=2))
    w = _worker(stack, tmp, t, f"lw-it-{uuid.uuid4().hex[:6]}").start()
    yield t, w
    w.stop()


def _collect(bootstrap, t, ids: set[str], timeout_s: float = 90.0):
    def seen(o):
        s = set()
        for r in o[t["results"]]:
            s.add(decode_result(r.value).frame_id)
        for r in o[t["dlq"]]:
            s.add(headers_to_dict(r.headers).get("test_id", headers_to_dict(r.headers).get("frame_id", b"")).decode())
        return s

    recs = asyncio.run(read_topics(bootstrap, [t["results"], t["dlq"], t["defects"]],
                                   until=lambda o: ids <= seen(o), timeout_s=timeout_s))
    return recs, seen(recs)


# 2 good + 4 defective bottle test images, contamination/017 (the most obvious defect, the one even the tiny
# detector flags) among them; 3 cameras -> 18 frames
PICKED = ("good/000.png", "good/004.png", "contamination/017.png", "contamination/015.png", "broken_large/012.png",
          "broken_small/012.png")


@pytest.fixture
def picked(bottle_test, tmp_path) -> Path:
    """A replay folder of :data:`PICKED` (labels from the sub-folder names, as in the MVTec layout)."""
    for name in PICKED:
        (tmp_path / "picked" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "picked" / name).symlink_to(bottle_test / name)
    return tmp_path / "picked"


def test_n_frames_in_n_results_out_order_preserved(stack, running, picked):
    t, w = running
    sent = asyncio.run(replay(stack.kafka_bootstrap, picked, cameras=["cam-a", "cam-b", "cam-c"], fps=0,
                              topic=t["frames"], product="bottle"))
    ids = {s.frame_id for s in sent}
    assert len(ids) == 18 and sum(s.gt_label == "defect" for s in sent) == 12
    recs, seen = _collect(stack.kafka_bootstrap, t, ids)
    assert w.alive(), w.log_path.read_text()[-3000:]
    results = [decode_result(r.value) for r in recs[t["results"]]]
    got = {r.frame_id for r in results}
    assert got >= ids, f"missing results for {len(ids - got)} frames"
    for r in results:
        assert r.model and r.latency_ms.get("infer", 0) > 0 and np.isfinite(r.score)
        assert r.gt_label in ("good", "defect")
        # the operating point's normalised score: above 0.5 exactly when flagged (docs/CONTRACTS.md)
        assert 0.0 <= r.score_normalized <= 1.0 and (r.score_normalized > 0.5) == r.is_anomaly
    # per-camera order preserved (results keyed by camera; compare first occurrence order)
    for cam in ("cam-a", "cam-b", "cam-c"):
        want = [s.frame_id for s in sent if s.camera == cam]
        order = []
        for r in results:
            if r.camera == cam and r.frame_id not in order:
                order.append(r.frame_id)
        assert order == want, f"{cam}: results out of order"
    # defective frames flagged, and one defect event per anomalous result, each with a heat map and >= 1 box
    anomalous = {r.frame_id for r in results if r.is_anomaly}
    defective = {r.frame_id for r in results if r.gt_label == "defect"}
    scores = sorted({(r.gt_defect or "good", round(r.score, 5), round(r.threshold, 5)) for r in results})
    assert anomalous & defective, f"no defective frame was flagged (truth, score, threshold): {scores}"
    events = [decode_defect_event(r.value) for r in recs[t["defects"]]]
    assert {e.result.frame_id for e in events} == anomalous
    for e in events:
        assert e.heatmap_png_b64 and len(e.boxes) >= 1, f"{e.result.frame_id}: a defect event without a box"


def _png(shape=(64, 64, 3)):
    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
    return buf.tobytes()


def _png_bomb(w=60000, h=60000):
    def chunk(tag, d):
        return struct.pack(">I", len(d)) + tag + d + struct.pack(">I", zlib.crc32(tag + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_malformed_frames_go_to_dlq_with_reason(stack, running, detector):
    t, w = running
    good_png = _png()
    cases: dict[str, tuple[bytes, dict]] = {
        "missing_header": (good_png, {"drop": "frame_id"}),
        "bad_header": (good_png, {"set": ("ts_ms", b"not-a-number")}),
        "unsupported_content_type": (good_png, {"set": ("content_type", b"text/plain")}),
        "empty_payload": (b"", {}),
        "unsupported_format": (b"this is definitely not an image " * 4, {}),
        "undecodable_image": (good_png[: len(good_png) // 3], {}),
        "too_large": (_png_bomb(), {}),
    }
    if detector != "moleflow":  # MoLE-Flow routes unknown products itself
        cases["unknown_product"] = (good_png, {"set": ("product", b"no-such-product"), "camera": "cam-unmapped"})
    records, expect = [], {}
    goods = []
    for i, (reason, (payload, how)) in enumerate(cases.items()):
        test_id = f"bad-{reason}-{uuid.uuid4().hex[:6]}"
        f = Frame(frame_id=test_id, camera_id=how.get("camera", "cam-dlq"), ts_ms=int(time.time() * 1000),
                  image=payload or b"x", product="bottle", content_type="image/png")
        k, v, h = encode_frame(f)
        if not payload:
            v = b""
        h = [(a, b) for a, b in h if a != how.get("drop") and a != how.get("set", ("",))[0]]
        if "set" in how:
            h.append(how["set"])
        h.append(("test_id", test_id.encode()))
        records.append((k, v, h))
        expect[test_id] = reason
        gid = f"good-{i}-{uuid.uuid4().hex[:6]}"  # a valid frame after each bad one: the stream keeps going
        k, v, h = encode_frame(Frame(frame_id=gid, camera_id="cam-dlq", ts_ms=int(time.time() * 1000), image=good_png,
                                     product="bottle", content_type="image/png"))
        records.append((k, v, h + [("test_id", gid.encode())]))
        goods.append(gid)

    async def pub():
        async with Producer(stack.kafka_bootstrap) as p:
            await p.send_many(t["frames"], records)

    asyncio.run(pub())
    recs, seen = _collect(stack.kafka_bootstrap, t, set(expect) | set(goods))
    got = {}
    for r in recs[t["dlq"]]:
        h = headers_to_dict(r.headers)
        tid = h.get("test_id", b"").decode()
        if tid in expect:
            reason, detail = dlq_reason(r.headers)
            got[tid] = reason
            assert detail, f"{tid}: DLQ record without error_detail"
            idx = [x[2] for x in records].index(next(x[2] for x in records if ("test_id", tid.encode()) in x[2]))
            assert r.value == records[idx][1], f"{tid}: DLQ value is not the original bytes"
    assert got == expect
    results = {decode_result(r.value).frame_id for r in recs[t["results"]]}
    assert set(goods) <= results
    assert w.alive()
    # metrics on the worker's web port count the DLQ by reason
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/metrics", timeout=5).read().decode()
    assert 'linewatch_dlq_total{reason="undecodable_image"}' in body
    assert "linewatch_stage_latency_ms_bucket" in body and "linewatch_batch_size_bucket" in body


# Worker SIGKILL + restart and a model unloaded under traffic: tests/integration/test_faults.py
# (fault scenarios proven through `linewatch account`).


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
