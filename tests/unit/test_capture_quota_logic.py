"""Issue #26 item 8 at unit level: the capture logic under a camera that rotates its ``product`` header.
Quotas (products, images per product, bytes) with a ``capture_refused`` event naming the reason; bounded
memory (recent candidates by bytes, per-product counters, cached manifests, pending selections); a
selection that cannot be honoured says so; writes fsync'd under temp names unique per process; a restarted
service re-reads what is on disk. On the real broker: tests/integration/test_capture_quota.py."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from contracts.envelope import Frame, dlq_record, encode_frame
from stream.lifecycle import onboarding
from stream.lifecycle.capture import CaptureService
from stream.lifecycle.onboarding import CapturePolicy, CaptureStore, OnboardEvent

JPEG = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[1].tobytes()


def _frame(fid: str, product: str) -> Frame:
    return Frame(fid, "cam-rot", 123, JPEG, line_id="l1", product=product, content_type="image/jpeg")


def _dlq(svc: CaptureService, fid: str, product: str) -> None:
    k, v, h = encode_frame(_frame(fid, product))
    svc.on_dlq(*dlq_record(k, v, h, "unknown_product", f"no model for {product}"))


def _disk(root) -> tuple[set[str], int]:
    prods = {p.name for p in root.iterdir() if p.is_dir()}
    return prods, sum(f.stat().st_size for f in root.rglob("good/*") if f.is_file())


def _settings(settings, tmp_path, **kw):
    base = {"capture_dir": tmp_path, "capture_every_n": 1, "capture_max_per_product": 3,
            "capture_max_products": 5, "capture_max_bytes": 12 * len(JPEG) + 10}
    return settings.with_overrides(**{**base, **kw})


def test_rotating_product_header_stays_within_the_quotas_and_says_why(tmp_path, settings):
    svc = CaptureService(_settings(settings, tmp_path))
    events: list[OnboardEvent] = []
    for i in range(2000):  # 500 product names, each four times
        _dlq(svc, f"f{i}", f"prod-{i % 500:03d}")
        if i % 64 == 63:
            events += svc.flush()
    events += svc.flush()
    prods, used = _disk(tmp_path)
    assert len(prods) <= 5 and used <= 12 * len(JPEG) + 10
    for p in prods:
        assert len(list((tmp_path / p / "good").iterdir())) <= 3
    refused = [e for e in events if e.type == "capture_refused"]
    reasons = {e.detail["reason"] for e in refused}
    assert {"max_products", "max_bytes"} <= reasons, reasons
    assert all(e.detail.get("limit") and e.detail.get("message") for e in refused)
    assert len(refused) <= 64  # reported once per product and reason, rate-limited: not once per frame
    assert svc.stats["refused_max_products"] > 1000


def test_images_per_product_quota_is_refused_once(tmp_path, settings):
    svc = CaptureService(_settings(settings, tmp_path, capture_max_products=50, capture_max_bytes=10**9))
    for i in range(10):
        _dlq(svc, f"g{i}", "elpv")
    ev = svc.flush()
    assert len(list((tmp_path / "elpv" / "good").iterdir())) == 3
    refused = [e for e in ev if e.type == "capture_refused"]
    assert [e.detail["reason"] for e in refused] == ["max_images"] and refused[0].detail["limit"] == 3


def test_memory_structures_stay_bounded(tmp_path, settings):
    s = _settings(settings, tmp_path, capture_policy="select", capture_buffer=10_000,
                  capture_buffer_bytes=20 * len(JPEG), capture_max_products=10_000, capture_max_bytes=10**12)
    svc = CaptureService(s)
    for i in range(5000):
        _dlq(svc, f"m{i}", f"p{i % 2500}")
    pol = svc.policy
    assert sum(len(f.image) for _, f, _ in pol._recent.values()) <= 20 * len(JPEG)
    assert len(pol._seen) <= onboarding.MAX_TRACKED
    svc.on_onboarding(OnboardEvent("capture_select", "p1", {"frame_ids": [f"x{i}" for i in range(50_000)]}).to_json())
    assert len(pol.selected) <= onboarding.MAX_SELECTED
    store = CaptureStore(tmp_path)
    for i in range(500):
        store.add(f"q{i}", _frame(f"q{i}", f"q{i}"), "t")
        store.flush(f"q{i}")
    assert len(store._manifests) <= onboarding.MAX_MANIFESTS
    assert all(store.has(f"q{i}", f"q{i}") for i in range(500))  # evicted manifests are re-read from disk


def test_a_selection_that_cannot_be_honoured_says_so(tmp_path, settings):
    svc = CaptureService(_settings(settings, tmp_path, capture_policy="select", capture_buffer=4))
    for i in range(10):
        _dlq(svc, f"c{i}", "elpv")
    svc.on_onboarding(OnboardEvent("capture_select", "elpv", {"frame_ids": ["c9", "c0", "c1"]}).to_json())
    ev = svc.flush()
    assert [e.detail["frame_ids"] for e in ev if e.type == "captured"] == [["c9"]]
    (ref,) = [e for e in ev if e.type == "capture_refused"]
    assert ref.detail["reason"] == "selection_not_buffered" and ref.detail["frame_ids"] == ["c0", "c1"]
    assert "not captured" in ref.detail["message"]


def test_writes_are_fsynced_under_unique_temp_names(tmp_path, monkeypatch):
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b), len(synced))),
                                                     real_replace(a, b))[1])
    store = CaptureStore(tmp_path)
    assert store.add("elpv", _frame("w1", "elpv"), "t")
    store.flush("elpv")
    assert len(replaced) == 2 and all(n > 0 for _, _, n in replaced)  # each file fsync'd before its rename
    assert len(synced) >= 4  # the file and its directory, twice
    tmps = [a for a, _, _ in replaced]
    assert all(str(os.getpid()) in t and onboarding.HOST in t for t in tmps) and len(set(tmps)) == 2


def test_restart_rereads_the_manifests_and_keeps_the_quota(tmp_path, settings):
    s = _settings(settings, tmp_path)
    svc = CaptureService(s)
    for i in range(5):
        _dlq(svc, f"r{i}", f"prod-{i}")
    svc.flush()
    again = CaptureService(s)  # a new process over the same volume
    assert again.usage.products == 5 and again.usage.bytes == 5 * len(JPEG)
    _dlq(again, "r0", "prod-0")  # captured before the restart: not written twice
    _dlq(again, "new", "prod-new")  # a sixth product: refused
    ev = again.flush()
    assert again.stats["duplicate"] == 1 and not (tmp_path / "prod-new").exists()
    assert [e.detail["reason"] for e in ev if e.type == "capture_refused"] == ["max_products"]


@pytest.mark.parametrize("n", [1])
def test_policy_recent_is_bounded_by_bytes(n):
    p = CapturePolicy("select", buffer=1000, buffer_bytes=5 * len(JPEG))
    for i in range(50):
        p.want("a", _frame(f"b{i}", "a"), 0, "t")
    assert len(p._recent) == 5 and list(p._recent)[-1] == "b49"
