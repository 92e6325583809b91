"""`linewatch console` pure logic (issue 18 items 2, 4, 5): the token check, the threshold proposal, feedback
records, aggregation into bounded buffers, gallery filters, pictures, the HTTP layer without Kafka, and the
k8s/monitoring dashboard + alert rules (structure, metric names against the code, `promtool test rules`).
The real-browser test against the real stack is tests/integration/test_console_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from contracts.config import Settings
from contracts.envelope import DefectEvent, InspectionResult
from contracts.model_events import ModelEvent
from contracts.serving_state import ServingEntry
from stream.console import auth
from stream.console.auth import check_bearer
from stream.console.feedback import (
    Feedback,
    FeedbackError,
    decode_feedback,
    parse_request,
    propose,
    propose_thresholds,
)
from stream.console.metrics import ConsoleMetrics
from stream.console.state import SPARK, ConsoleState, Filters
from tests.harness.pictures import heatmap_b64
from tests.harness.requires import require

REPO = Path(__file__).resolve().parents[2]
MON = REPO / "k8s" / "monitoring"


# ---------------------------------------------------------------- token check

def test_actions_disabled_without_a_configured_token():
    for token in (None, ""):
        d = check_bearer("Bearer anything", token)
        assert not d.allowed and d.status == 403 and "LINEWATCH_CONSOLE_TOKEN" in d.message


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic c2VjcmV0", "secret", "Bearer secreT",
                                    "Bearer secret2", "Bearer ecret"])
def test_missing_or_wrong_token_is_401(header):
    d = check_bearer(header, "secret")
    assert not d.allowed and d.status == 401


def test_right_token_allowed_and_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert check_bearer("Bearer s3cr\u00e9t", "s3cr\u00e9t").allowed
    assert check_bearer("bearer  s3cr\u00e9t ", "s3cr\u00e9t").allowed
    assert calls and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


# ---------------------------------------------------------------- feedback + threshold proposal

def fb(frame, verdict, score, *, version="1", product="bottle", model="m", created=0, threshold=0.5):
    return Feedback(frame_id=frame, verdict=verdict, product=product, camera="cam", model=model,
                    model_version=version, score=score, threshold=threshold, created_ms=created or 1)


def test_feedback_round_trips_and_rejects_bad_records():
    f = fb("f1", "confirmed", 0.9)
    assert decode_feedback(f.to_json()) == f and f.key == b"bottle"
    with pytest.raises(FeedbackError):
        fb("f1", "maybe", 0.9)
    with pytest.raises(FeedbackError):
        decode_feedback(b"not json")
    with pytest.raises(FeedbackError):
        decode_feedback(json.dumps({**f.to_dict(), "schema": 9}).encode())
    with pytest.raises(FeedbackError):
        decode_feedback(json.dumps({"schema": 1, "frame_id": "x"}).encode())
    assert parse_request({"verdict": "false_alarm", "note": "glare"}) == ("false_alarm", "glare")
    for bad in ([], {"verdict": "yes"}, {"verdict": "confirmed", "note": "x" * 501}, {"verdict": "confirmed", "note": 3}):
        with pytest.raises(FeedbackError):
            parse_request(bad)


def test_proposal_is_the_midpoint_between_false_alarms_and_confirmed_defects():
    recs = [fb("a", "false_alarm", 0.55), fb("b", "false_alarm", 0.60), fb("c", "confirmed", 0.80),
            fb("d", "confirmed", 0.95)]
    p = propose("bottle", "m", "1", 0.5, recs)
    assert p.proposed == pytest.approx(0.70) and p.removed == 2 and p.overlapping == 0
    assert (p.confirmed, p.false_alarms, p.current) == (2, 2, 0.5)


def test_proposal_never_drops_a_confirmed_defect_when_scores_overlap():
    recs = [fb("a", "false_alarm", 0.55), fb("b", "false_alarm", 0.90), fb("c", "confirmed", 0.80)]
    p = propose("bottle", "m", "1", 0.5, recs)
    assert p.proposed == pytest.approx((0.55 + 0.80) / 2) and p.proposed < 0.80
    assert p.removed == 1 and p.overlapping == 1
    p = propose("bottle", "m", "1", 0.5, [fb("a", "false_alarm", 0.9), fb("c", "confirmed", 0.8)])
    assert p.proposed is None and "no threshold separates" in p.reason


def test_no_proposal_without_both_kinds_of_evidence():
    assert propose("bottle", "m", "1", 0.5, []).proposed is None
    only_fa = propose("bottle", "m", "1", 0.5, [fb("a", "false_alarm", 0.6)])
    assert only_fa.proposed is None and "no confirmed defect" in only_fa.reason
    only_c = propose("bottle", "m", "1", 0.5, [fb("a", "confirmed", 0.6)])
    assert only_c.proposed is None and "no false alarms" in only_c.reason


def test_proposal_uses_the_latest_verdict_and_only_the_serving_version():
    recs = [fb("a", "confirmed", 0.6, created=1), fb("a", "false_alarm", 0.6, created=2),  # changed their mind
            fb("c", "confirmed", 0.9), fb("old", "false_alarm", 0.85, version="0"),
            fb("other", "false_alarm", 0.1, product="cells")]
    (bottle, cells) = propose_thresholds(recs, {"bottle": {"model": "m", "version": 1, "threshold": 0.5}})
    assert bottle.product == "bottle" and bottle.proposed == pytest.approx(0.75) and bottle.false_alarms == 1
    assert cells.product == "cells" and cells.current == 0.5 and cells.proposed is None  # no serving entry


# ---------------------------------------------------------------- aggregation

def result(i, *, camera="cam-1", score=0.1, anomaly=False, line="l1", product="bottle", ts=1_000_000, shadow=False):
    return InspectionResult(frame_id=f"f{i}", camera=camera, line=line, model="m", model_version="1", task="",
                            routed=False, route_distance=None, score=score, threshold=0.5, is_anomaly=anomaly,
                            shadow=shadow, product=product, latency_ms={"e2e": 10.0 + i, "infer": 2.0},
                            ts_ms=ts + i, processed_ts_ms=ts + i)


def defect(i, **kw):
    return DefectEvent(result=result(i, anomaly=True, score=0.9, **kw), heatmap_png_b64=heatmap_b64(),
                       heatmap_scale=1.0, map_threshold=0.3, boxes=[{"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.2,
                                                                   "area": 0.06, "peak": 0.8}])


def test_camera_wall_keeps_a_bounded_score_trend_and_bounded_cameras():
    seen = []
    st = ConsoleState(max_cameras=2, on_change=lambda k, p: seen.append(k))
    for i in range(SPARK + 10):
        st.apply_result(result(i, score=i / 100))
    st.apply_result(result(999, shadow=True))
    (tile,) = st.camera_tiles()
    assert tile["frames"] == SPARK + 10 and len(tile["scores"]) == SPARK and tile["scores"][-1] == pytest.approx(0.69)
    assert st.totals["shadow_results"] == 1 and seen.count("result") == SPARK + 10
    for cam in ("cam-2", "cam-3"):
        st.apply_result(result(0, camera=cam))
    assert [t["camera"] for t in st.camera_tiles()] == ["cam-2", "cam-3"]  # the least recently seen dropped


def test_defect_gallery_bounded_newest_first_with_facets_and_filters():
    st = ConsoleState(max_defects=3)
    for i, (cam, line, product) in enumerate([("a", "l1", "bottle"), ("b", "l2", "bottle"), ("a", "l1", "cells"),
                                              ("b", "l1", "bottle")]):
        st.apply_defect(defect(i, camera=cam, line=line, product=product))
    assert list(st.defects) == ["f1", "f2", "f3"]  # f0 dropped
    everything = st.defect_list(Filters())
    assert [d["frame_id"] for d in everything["items"]] == ["f3", "f2", "f1"] and everything["kept"] == 3
    assert everything["facets"] == {"line": ["l1", "l2"], "camera": ["a", "b"], "product": ["bottle", "cells"]}
    assert [d["frame_id"] for d in st.defect_list(Filters(camera="b"))["items"]] == ["f3", "f1"]
    assert [d["frame_id"] for d in st.defect_list(Filters(line="l1", product="bottle"))["items"]] == ["f3"]
    q = Filters.from_query({"since": str(1_000_002), "until": str(1_000_003), "limit": "1"})
    assert st.defect_list(q)["matched"] == 2 and len(st.defect_list(q)["items"]) == 1
    assert st.defect_list(Filters(verdict="unreviewed"))["matched"] == 3
    st.apply_feedback(fb("f2", "false_alarm", 0.9, created=5))
    assert [d["frame_id"] for d in st.defect_list(Filters(verdict="false_alarm"))["items"]] == ["f2"]
    assert st.defect_list(Filters(verdict="unreviewed"))["matched"] == 2
    assert st.defect_detail("f2")["feedback"]["verdict"] == "false_alarm" and st.defect_detail("nope") is None
    for bad in ({"since": "yesterday"}, {"verdict": "maybe"}):
        with pytest.raises(ValueError):
            Filters.from_query(bad)
    assert Filters.from_query({"limit": "100000"}).limit == 500


def test_feedback_is_applied_once_and_the_latest_verdict_counts():
    st = ConsoleState()
    st.apply_defect(defect(1))
    first = fb("f1", "confirmed", 0.9, created=10)
    assert st.apply_feedback(first) and not st.apply_feedback(first)  # its own write read back
    st.apply_feedback(fb("f1", "false_alarm", 0.9, created=5))  # older: does not win
    assert st.defects["f1"].verdict == "confirmed"
    st.apply_feedback(fb("f1", "false_alarm", 0.9, created=20))
    assert st.defects["f1"].verdict == "false_alarm"
    # a feedback record that arrived before its defect event still sets the verdict
    st.apply_feedback(fb("f2", "confirmed", 0.9, created=1))
    st.apply_defect(defect(2))
    assert st.defects["f2"].verdict == "confirmed"


def test_throughput_latency_and_dlq_by_reason():
    now = 2_000.0
    st = ConsoleState(clock=lambda: now)
    for i in range(30):
        r = result(i, anomaly=i % 10 == 0, ts=int((now - 5) * 1000))
        st.apply_result(r)
    st.apply_result(result(99, ts=int((now - 600) * 1000)))  # outside the window
    for reason in ("undecodable_image", "undecodable_image", "too_large"):
        st.apply_dlq({"error": reason.encode(), "error_detail": b"x", "camera_id": b"cam-1",
                      "error_ts_ms": str(int((now - 1) * 1000)).encode()}, 10)
    st.apply_dlq({"error": b"empty_payload", "error_ts_ms": str(int((now - 900) * 1000)).encode()}, 0)
    t = st.throughput()
    assert sum(t["per_second"]) == 30 and sum(t["anomalies_per_second"]) == 3 and t["fps_10s"] == 3.0
    assert t["e2e_ms"]["p50"] == pytest.approx(np.percentile([10.0 + i for i in range(30)], 50))
    assert t["dlq_by_reason"] == {"undecodable_image": 2, "too_large": 1, "empty_payload": 1}
    assert t["dlq_recent_by_reason"] == {"undecodable_image": 2, "too_large": 1}
    assert t["totals"]["results"] == 31 and t["totals"]["dlq"] == 4 and len(t["dlq_recent"]) == 4
    assert ConsoleState(max_dlq=2).dlq.maxlen == 2


def test_models_view_serving_rollouts_and_proposals():
    st = ConsoleState()
    spec = {"product": "bottle", "threshold": 0.5, "detector": "efficientad"}
    st.apply_serving("bottle", ServingEntry(product="bottle", model="m", version=2, threshold=0.5, spec=spec))
    st.apply_serving("gone", ServingEntry(product="gone", model="g", version=1, threshold=0.1, spec=spec))
    st.apply_serving("gone", None)  # tombstone
    ev = ModelEvent("released", "m", 2, product="bottle", artifact_uri="file:///x", sha256="a" * 64)
    st.apply_model_event(ev)
    st.apply_model_event(ev)  # replayed twice: once
    st.apply_model_event(ModelEvent("rolled_back", "m", 3, reasons=["error rate 0.2 > 0"]))
    st.apply_model_event(ModelEvent("promoted", "m", 2, product="bottle"))
    st.apply_feedback(fb("a", "false_alarm", 0.6, model="m", version="2"))
    st.apply_feedback(fb("b", "confirmed", 0.8, model="m", version="2"))
    m = st.models_view()
    assert [e["product"] for e in m["serving"]] == ["bottle"] and m["serving"][0]["version"] == 2
    (roll,) = m["rollouts"]
    assert roll["serving_version"] == 2 and [h["type"] for h in roll["history"]] == ["promoted", "rolled_back",
                                                                                    "released"]
    assert roll["history"][1]["reasons"] == ["error rate 0.2 > 0"]
    (p,) = m["proposals"]
    assert p["proposed"] == pytest.approx(0.7) and p["current"] == 0.5
    assert m["feedback"] == {"confirmed": 1, "false_alarm": 1}


def test_operator_reads_normalised_scores_warm_up_frames_are_no_camera_and_models_show_operating_points():
    st = ConsoleState()
    r = result(1, score=4.79e5, anomaly=True)
    r.score_normalized = 0.73
    st.apply_result(r)
    st.apply_result(result(2, camera="cam-2", score=0.2))  # an older worker: no normalised score
    (t1, t2) = st.camera_tiles()
    assert t1["score_normalized"] == 0.73 and t1["scores"] == [0.73] and t1["score"] == 4.79e5  # raw kept
    assert t2["score_normalized"] is None and t2["scores"] == [0.2]
    warm = result(3, camera="warmup", anomaly=True)
    warm.warmup = True
    assert st.apply_result(warm) is None
    assert st.apply_defect(DefectEvent(result=warm, heatmap_png_b64=heatmap_b64(), heatmap_scale=1.0,
                                       map_threshold=0.3, boxes=[])) is None
    assert [t["camera"] for t in st.camera_tiles()] == ["cam-1", "cam-2"] and "f3" not in st.defects
    assert st.totals["warmup_results"] == 1 and st.totals["results"] == 2
    ev = defect(4)
    ev.result.score_normalized = 0.81
    assert st.apply_defect(ev)["score_normalized"] == 0.81 and st.defect_detail("f4")["score"] == 0.9
    spec = {"model": "moleflow", "detector": "moleflow", "threshold": 0.0, "tasks": {
        "bottle": {"operating_point": {"threshold": 2.5, "target_false_alarm_rate": 0.01,
                                       "estimated_false_alarm_rate": 0.008, "estimated_recall": 0.93,
                                       "estimated_recall_by_family": {"scratch": 0.9}, "n_good": 120,
                                       "n_synthetic": 300}},
        "cable": {}}}
    for task in ("bottle", "cable"):
        st.apply_serving(task, ServingEntry(product=task, model="moleflow", version=4, threshold=0.0, spec=spec))
    bottle, cable = st.models_view()["serving"]
    assert bottle["threshold"] == 2.5 and cable["threshold"] == 0.0  # per task, not the spec's 0.0
    op = bottle["operating_point"]
    assert op["target_false_alarm_rate"] == 0.01 and op["estimated_recall"] == 0.93 and op["n_good"] == 120
    assert op["estimated_recall_by_family"] == {"scratch": 0.9} and not cable["operating_point"]["stated"]
    pages = (REPO / "stream/console/static/pages.js").read_text()
    assert pages.count("fmt.score(") >= 3 and "operating-points" in pages  # wall, gallery, detail; models


def test_drift_alerts_ring():
    st = ConsoleState(max_drift=2)
    for i in range(3):
        st.apply_drift({"detector": "anomaly_rate", "key": f"camera=c{i}", "statistic": 0.4, "ts_ms": i, "x": 1})
    st.apply_drift(["not", "an", "alert"])
    assert [a["key"] for a in st.drift_list()] == ["camera=c2", "camera=c1"] and "x" not in st.drift_list()[0]


# ---------------------------------------------------------------- HTTP layer (no Kafka)

async def _client(settings: Settings, st: ConsoleState):
    from aiohttp.test_utils import TestClient, TestServer

    from stream.console.app import build_app

    client = TestClient(TestServer(build_app(settings, "127.0.0.1:1", state=st, connect=False)))
    await client.start_server()
    return client


async def test_reads_are_open_actions_need_the_token_and_headers_are_strict():
    st = ConsoleState()
    st.apply_defect(defect(1))
    st.apply_result(result(1, anomaly=True, score=0.9))
    read_only = await _client(Settings(console_token=None), st)
    try:
        r = await read_only.get("/")
        assert r.status == 200 and "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff" and "console.js" in await r.text()
        for path in ("/static/console.js", "/static/pages.js", "/static/console.css"):
            assert (await read_only.get(path)).status == 200
        assert (await read_only.get("/static/../app.py")).status == 404
        assert (await (await read_only.get("/api/config")).json())["actions_enabled"] is False
        d = await (await read_only.get("/api/defects?camera=cam-1")).json()
        assert [x["frame_id"] for x in d["items"]] == ["f1"] and d["items"][0]["boxes"]
        assert (await read_only.get("/api/defects?since=soon")).status == 400
        cams = (await (await read_only.get("/api/cameras")).json())["cameras"]
        assert cams[0]["has_defect"] and cams[0]["boxes"]
        # images are the plant's data: never without a token (none configured here: 403)
        for path in ("/img/heatmap/f1.png", "/img/frame/f1.jpg", "/img/frame/f1.jpg?token=x"):
            assert (await read_only.get(path)).status == 403, path
        for path in ("/api/models", "/api/drift", "/api/throughput", "/api/defects/f1"):
            assert (await read_only.get(path)).status == 200, path
        assert b"linewatch_console_records_total" in await (await read_only.get("/metrics")).read()
        refused = await read_only.post("/api/defects/f1/feedback", json={"verdict": "confirmed"},
                                       headers={"Authorization": "Bearer x"})
        assert refused.status == 403 and "LINEWATCH_CONSOLE_TOKEN" in (await refused.json())["error"]
    finally:
        await read_only.close()
    acting = await _client(Settings(console_token="tok"), st)
    try:
        no = await acting.post("/api/defects/f1/feedback", json={"verdict": "confirmed"})
        assert no.status == 401 and no.headers["WWW-Authenticate"].startswith("Bearer")
        auth_h = {"Authorization": "Bearer tok"}
        # issue #26 item 7: an image URL without the token (or with a wrong one) is 401; the header or ?token= opens it
        for path in ("/img/heatmap/f1.png", "/img/frame/f1.jpg", "/img/heatmap/f1.png?token=wrong"):
            assert (await acting.get(path)).status == 401, path
        heat = await acting.get("/img/heatmap/f1.png?token=tok")
        assert heat.status == 200 and heat.content_type == "image/png" and "private" in heat.headers["Cache-Control"]
        assert (await acting.get("/img/heatmap/f1.png", headers=auth_h)).status == 200
        assert (await acting.get("/img/frame/f1.jpg?token=tok")).status == 404  # no frame bytes were buffered
        assert (await acting.post("/api/defects/zz/feedback", json={"verdict": "confirmed"}, headers=auth_h)).status == 404
        assert (await acting.post("/api/defects/f1/feedback", json={"verdict": "?"}, headers=auth_h)).status == 400
        big = await acting.post("/api/defects/f1/feedback", data=b"x" * 20000, headers=auth_h)
        assert big.status == 413
        # authorized, but no broker here: 503 and nothing recorded
        down = await acting.post("/api/defects/f1/feedback", json={"verdict": "confirmed"}, headers=auth_h)
        assert down.status == 503 and not st.feedback
    finally:
        await acting.close()


def test_hub_drops_the_oldest_events_of_a_client_that_falls_behind(monkeypatch):
    from stream.console import hub as hub_mod

    monkeypatch.setattr(hub_mod, "SSE_QUEUE", 2)
    m = ConsoleMetrics()
    hub = hub_mod.Hub(m)
    slow = hub.connect(token_holder=False)
    monkeypatch.setattr(hub_mod, "SSE_QUEUE", 10)
    fast = hub.connect(token_holder=True)
    for i in range(3):
        hub.publish("result", {"i": i})
    assert {slow, fast} == hub.clients and fast.queue.qsize() == 3 and slow.queue.qsize() == 2
    assert slow.dropped == 1 == hub.dropped and fast.dropped == 0
    assert [orjson_i(slow.queue.get_nowait()) for _ in range(2)] == [1, 2]  # the oldest went
    assert fast.queue.get_nowait().startswith(b"event: result\ndata: {")
    assert b"linewatch_console_sse_dropped_total 1.0" in m.render()[0]
    hub.close(slow)
    assert slow not in hub.clients and slow.queue.get_nowait() is None


def orjson_i(msg: bytes) -> int:
    return json.loads(msg.split(b"data: ", 1)[1])["i"]


def test_static_pages_never_write_server_text_as_html():
    static = REPO / "stream" / "console" / "static"
    for js in static.glob("*.js"):
        src = js.read_text()
        assert not re.search(r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write|\beval\(", src), js.name
    html = (static / "index.html").read_text()
    assert "<script>" not in html and "style=" not in html  # CSP: scripts and styles from files only


def test_console_verb_is_registered():
    from stream.ops.cli import build_parser

    a = build_parser().parse_args(["console", "--port", "0", "--host", "0.0.0.0", "--replay", "5"])
    assert a.func.__name__ == "_cmd_console" and a.port == 0 and a.replay == 5


def test_console_metrics_count_drift_alerts_and_feedback():
    m = ConsoleMetrics()
    m.observe("drift", {"detector": "anomaly_rate"})
    m.observe("feedback", {"verdict": "confirmed"})
    m.observe("stats", {})
    text = m.render()[0].decode()
    assert 'linewatch_console_drift_alerts_total{detector="anomaly_rate"} 1.0' in text
    assert 'linewatch_console_feedback_total{verdict="confirmed"} 1.0' in text
    assert 'linewatch_console_records_total{kind="drift"} 1.0' in text


def test_console_kafka_user_grants_what_the_console_touches(monkeypatch):
    from stream.ops.acls import console_grants, from_strimzi
    from tests.harness.k8s import RENDERER, RENDERER_MISSING, by_kind, render
    from tests.unit.test_kafka_acls import _settings_of

    require(RENDERER is not None, RENDERER_MISSING)
    base = render("base")
    user = from_strimzi(by_kind(base, "KafkaUser")["linewatch-console"]["spec"]["authorization"]["acls"])
    s = _settings_of(by_kind(base, "ConfigMap")["linewatch-config"]["data"], monkeypatch)
    assert user == console_grants(s)
    topics = {t["spec"].get("topicName", n) for n, t in by_kind(base, "KafkaTopic").items()}
    assert s.topic_feedback in topics
