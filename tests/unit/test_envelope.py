import base64

import cv2
import numpy as np
import orjson
import pytest

from contracts.envelope import (
    SCHEMA_VERSION,
    EnvelopeError,
    Frame,
    InspectionResult,
    decode_defect_event,
    decode_frame,
    decode_heatmap,
    decode_result,
    dlq_reason,
    dlq_record,
    encode_frame,
    headers_to_dict,
)
from contracts.operating_point import OperatingPoint, anomaly_boxes
from stream.inference.heatmap import make_defect_event


def _frame(**kw):
    base = dict(frame_id="f1", camera_id="cam-1", ts_ms=1700000000000, image=b"\x89PNG....", line_id="L1",
                product="bottle", content_type="image/png", extra={"gt_label": "good"})
    base.update(kw)
    return Frame(**base)


def test_frame_roundtrip():
    f = _frame()
    key, value, headers = encode_frame(f)
    assert key == b"cam-1" and value == f.image
    h = headers_to_dict(headers)
    assert h["schema"] == str(SCHEMA_VERSION).encode() and h["frame_id"] == b"f1"
    g = decode_frame(key, value, headers)
    assert g == f


def test_frame_optional_headers_absent():
    key, value, headers = encode_frame(_frame(line_id=None, product=None, content_type=None, extra={}))
    g = decode_frame(key, value, headers)
    assert g.product is None and g.line_id is None and g.task is None


@pytest.mark.parametrize("drop,reason,word", [("frame_id", "missing_header", "frame_id"),
                                              ("camera_id", "missing_header", "camera_id"),
                                              ("ts_ms", "missing_header", "ts_ms")])
def test_frame_missing_headers(drop, reason, word):
    key, value, headers = encode_frame(_frame())
    headers = [(k, v) for k, v in headers if k != drop]
    with pytest.raises(EnvelopeError) as ei:
        decode_frame(key, value, headers)
    assert ei.value.reason == reason and word in ei.value.detail


@pytest.mark.parametrize("name,val,reason", [("ts_ms", b"yesterday", "bad_header"), ("ts_ms", b"-5", "bad_header"),
                                             ("frame_id", b"a b", "bad_header"), ("frame_id", b"\xff\xfe", "bad_header"),
                                             ("content_type", b"text/plain", "unsupported_content_type"),
                                             ("schema", b"99", "unsupported_schema")])
def test_frame_bad_headers(name, val, reason):
    key, value, headers = encode_frame(_frame())
    headers = [(k, v) for k, v in headers if k != name] + [(name, val)]
    with pytest.raises(EnvelopeError) as ei:
        decode_frame(key, value, headers)
    assert ei.value.reason == reason and name in ei.value.detail


def test_frame_empty_payload():
    key, _, headers = encode_frame(_frame())
    for v in (b"", None):
        with pytest.raises(EnvelopeError) as ei:
            decode_frame(key, v, headers)
        assert ei.value.reason == "empty_payload"


def test_headers_accepts_dict_and_bytes_keys():
    assert headers_to_dict({"a": "x", b"b": b"y", "c": None}) == {"a": b"x", "b": b"y", "c": b""}
    assert headers_to_dict(None) == {}


def _result(**kw):
    base = dict(frame_id="f1", camera="cam-1", line="L1", model="efficientad_bottle", model_version="1", task="",
                routed=False, route_distance=None, score=1.5, threshold=1.0, is_anomaly=True,
                latency_ms={"infer": 3.0}, ts_ms=1)
    base.update(kw)
    return InspectionResult(**base)


def test_result_roundtrip_and_validation():
    r = _result()
    assert decode_result(r.to_json()) == r
    d = orjson.loads(r.to_json())
    assert d["schema"] == SCHEMA_VERSION and d["frame_id"] == "f1"
    del d["score"]
    with pytest.raises(EnvelopeError) as ei:
        decode_result(orjson.dumps(d))
    assert ei.value.reason == "missing_field" and "score" in ei.value.detail
    d = orjson.loads(r.to_json())
    d["is_anomaly"] = "yes"
    with pytest.raises(EnvelopeError) as ei:
        decode_result(orjson.dumps(d))
    assert "is_anomaly" in ei.value.detail
    d = orjson.loads(r.to_json())
    d["score"] = True
    with pytest.raises(EnvelopeError):
        decode_result(orjson.dumps(d))
    with pytest.raises(EnvelopeError) as ei:
        decode_result(b"{not json")
    assert ei.value.reason == "bad_json"


def test_anomaly_boxes_two_regions():
    a = np.zeros((100, 200), np.float32)
    a[10:20, 30:50] = 5.0
    a[60:90, 150:190] = 3.0
    boxes = anomaly_boxes(a, 1.0)
    assert len(boxes) == 2
    assert boxes[0]["peak"] == 5.0
    assert boxes[0]["x"] == pytest.approx(30 / 200) and boxes[0]["w"] == pytest.approx(20 / 200)
    assert boxes[1]["y"] == pytest.approx(60 / 100) and boxes[1]["h"] == pytest.approx(30 / 100)
    assert anomaly_boxes(a, 10.0) == []


def test_result_score_normalized_and_warmup_are_optional_on_decode():
    r = _result(score_normalized=0.73, warmup=True)
    assert decode_result(r.to_json()) == r
    d = orjson.loads(_result().to_json())
    for k in ("score_normalized", "warmup"):
        d.pop(k)  # a result written before the fields existed
    back = decode_result(orjson.dumps(d))
    assert back.score_normalized is None and back.warmup is False and back.score == 1.5
    d["score_normalized"] = "high"
    with pytest.raises(EnvelopeError) as ei:
        decode_result(orjson.dumps(d))
    assert ei.value.reason == "bad_field" and "score_normalized" in ei.value.detail


def test_warmup_header_marks_the_frame():
    assert decode_frame(*encode_frame(_frame(extra={"warmup": "1"}))).warmup
    assert not decode_frame(*encode_frame(_frame())).warmup


def test_defect_event_roundtrip_heatmap_small():
    amap = np.zeros((1, 256, 256), np.float32)
    amap[0, 100:140, 50:90] = 4.0
    op = OperatingPoint(threshold=1.0, map_threshold=1.0, map_sigma=0.0)
    ev = make_defect_event(_result(), amap, op, (256, 256), size=64)
    back = decode_defect_event(ev.to_json())
    assert back.result == ev.result and len(back.boxes) == 1 and back.map_threshold == 1.0
    hm = decode_heatmap(back.heatmap_png_b64)
    assert hm.dtype == np.uint8 and hm.shape == (64, 64) and hm.max() == 255
    assert len(base64.b64decode(back.heatmap_png_b64)) < 4096
    assert cv2.imdecode(np.frombuffer(base64.b64decode(back.heatmap_png_b64), np.uint8), 0) is not None


def test_dlq_record_keeps_original():
    key, value, headers = encode_frame(_frame())
    k, v, h = dlq_record(key, value, headers + [("error", b"old")], "undecodable_image", "OpenCV could not decode")
    assert k == key and v == value
    hd = headers_to_dict(h)
    assert hd["frame_id"] == b"f1" and hd["camera_id"] == b"cam-1"
    assert dlq_reason(h) == ("undecodable_image", "OpenCV could not decode")
    assert [n for n, _ in h].count("error") == 1
