"""Issue #26 item 8 on the real Tansu broker: a camera rotating its ``product`` header (500 distinct names)
whose frames the workers DLQ ``unknown_product`` (the DLQ records are built as the worker builds them,
contracts.envelope.dlq_record, from real MVTec images) against the capture service (its Kafka loop, in its
consumer group). Disk use and product count stay within the quotas, the refusals are on the onboarding
topic with their reason, the offsets are committed after the files; a restarted service re-reads the
manifests and keeps refusing (nothing re-consumed, nothing written twice)."""

from __future__ import annotations

import asyncio
import time
import uuid

import cv2
import pytest

from contracts.envelope import Frame, dlq_record, encode_frame
from stream.kafka.clients import Producer, ensure_topics, read_topics
from stream.lifecycle.capture import CaptureService
from stream.lifecycle.onboarding import decode_event

pytestmark = pytest.mark.integration

N, NAMES = 1500, 500  # each name three times


def _jpegs(shared_data) -> list[bytes]:
    paths = sorted((shared_data / "mvtec" / "bottle" / "test" / "good").glob("*.png"))[:8]
    return [cv2.imencode(".jpg", cv2.resize(cv2.imread(str(p)), (128, 128)))[1].tobytes() for p in paths]


def _records(jpegs, start: int, n: int, names: int):
    out = []
    for i in range(start, start + n):
        product = f"rot-{i % names:03d}"
        f = Frame(f"fr-{i}", "cam-rot", 1_000 + i, jpegs[i % len(jpegs)], line_id="l1", product=product,
                  content_type="image/jpeg")
        out.append(dlq_record(*encode_frame(f), "unknown_product", f"no loaded model for product {product!r}"))
    return out


async def _run_until(svc: CaptureService, done, timeout_s: float) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(svc.run(stop))
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # the last batch's commit
    finally:
        stop.set()
        await task


def _disk(root) -> tuple[set[str], int]:
    prods = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    return prods, sum(f.stat().st_size for f in root.rglob("good/*") if f.is_file())


def test_rotating_product_camera_stays_within_the_capture_quotas(kafka_bootstrap, settings, shared_data, tmp_path,
                                                                 reliability):
    uid = uuid.uuid4().hex[:6]
    boot = kafka_bootstrap
    jpegs = _jpegs(shared_data)
    quota_bytes = 12 * max(map(len, jpegs))
    s = settings.with_overrides(kafka_bootstrap=boot, capture_dir=tmp_path / "caps", capture_group=f"capq-{uid}",
                                topic_frames=f"capq-{uid}-frames", topic_dlq=f"capq-{uid}-dlq",
                                topic_retrain_requests=f"capq-{uid}-retrain", topic_onboarding=f"capq-{uid}-onb",
                                topic_serving_state=f"capq-{uid}-serving", capture_every_n=1,
                                capture_max_per_product=3, capture_max_products=5, capture_max_bytes=quota_bytes)

    async def go():
        await ensure_topics(boot, [s.topic_frames, s.topic_dlq, s.topic_retrain_requests, s.topic_onboarding],
                            settings=s)
        async with Producer(boot, settings=s) as p:
            await p.send_many(s.topic_dlq, _records(jpegs, 0, N, NAMES))
        svc = CaptureService(s)
        seen = lambda: sum(svc.stats.values()) - svc.stats["refusals_suppressed"]  # noqa: E731
        await _run_until(svc, lambda: seen() >= N, 180)
        return svc

    svc = asyncio.run(go())
    prods, used = _disk(s.capture_dir)
    # benchmarks/reliability.py's row: every DLQ'd candidate captured or refused (counted), none unaccounted
    accounted = svc.stats["captured"] + svc.stats["not_selected"] + svc.stats["duplicate"] + sum(
        n for k, n in svc.stats.items() if k.startswith("refused_"))
    reliability.record_counts("capture_quota_rotating_products", frames_sent=N, lost=N - accounted,
                              products=len(prods), bytes=used, quota_bytes=quota_bytes,
                              refused={k: n for k, n in svc.stats.items() if k.startswith("refused_")})
    assert accounted == N, dict(svc.stats)
    assert len(prods) <= 5 and used <= quota_bytes, (len(prods), used, dict(svc.stats))
    assert svc.stats["captured"] >= 5 and svc.stats["refused_max_products"] >= N - 3 * 5 - 5
    evs = [decode_event(r.value) for r in asyncio.run(read_topics(boot, [s.topic_onboarding], timeout_s=20,
                                                                  idle_s=2.0))[s.topic_onboarding]]
    refused = [e for e in evs if e.type == "capture_refused"]
    assert {"max_products", "max_bytes"} <= {e.detail["reason"] for e in refused}, [e.detail for e in refused][:5]
    assert all(e.detail["message"] and e.detail["limit"] for e in refused) and len(refused) <= 70
    assert sum(e.detail["count"] for e in evs if e.type == "captured" and e.product in prods) >= 5

    # a restart: the offsets were committed after the files (nothing re-consumed); the manifests are re-read
    async def again():
        svc2 = CaptureService(s)
        assert svc2.usage.products == len(prods) and svc2.usage.bytes == used
        async with Producer(boot, settings=s) as p:
            await p.send_many(s.topic_dlq, _records(jpegs, N, 2, 1_000_000))  # a 6th product, and another
        await _run_until(svc2, lambda: svc2.stats["refused_max_products"] + svc2.stats["refused_max_bytes"] >= 2, 60)
        return svc2

    svc2 = asyncio.run(again())
    assert svc2.stats["duplicate"] == 0 and svc2.stats["captured"] == 0, dict(svc2.stats)
    assert _disk(s.capture_dir) == (prods, used)
