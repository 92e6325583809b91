"""Issue 24 item 5: the worker judges, normalises and boxes every frame with the served version's operating point
(contracts/operating_point.py): boxes at the model's input resolution (tight around the defect, never on the
border ring, at least one on a flagged frame), a normalised score that is 0.5 at the threshold, per task for a
multi-task model, and the spec's threshold for versions written before operating points existed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np
import orjson
import pytest

from contracts.envelope import Frame, InspectionResult, decode_defect_event, decode_heatmap, decode_result
from contracts.operating_point import (
    GOOD_MEDIAN_NORMALISED,
    OperatingPoint,
    anomaly_boxes,
    operating_point_of,
    prepare_map,
    score_scale_for,
)
from contracts.spec import parse_spec
from stream.inference.heatmap import make_defect_event
from stream.inference.routing import Route
from stream.inference.triton_client import InferOutput
from stream.worker.pipeline import Pipeline
from stream.worker.records import Prepared, RawRecord

H = W = 256


def _result(**kw) -> InspectionResult:
    base = dict(frame_id="f1", camera="cam-1", line="L1", model="efficientad_bottle", model_version="1", task="",
                routed=False, route_distance=None, score=2.0, threshold=1.0, is_anomaly=True)
    return InspectionResult(**{**base, **kw})


def _native(grid: int, blob: tuple[int, int, int, int], noise: float = 0.02, seed: int = 0) -> np.ndarray:
    """A model's native map (grid x grid, [1, h, w]) of a defect covering ``blob`` = (y0, y1, x0, x1) input pixels."""
    y0, y1, x0, x1 = blob
    full = np.zeros((H, W), np.float32)
    full[y0:y1, x0:x1] = 1.0
    a = cv2.resize(full, (grid, grid), interpolation=cv2.INTER_AREA)
    a += np.random.default_rng(seed).normal(0, noise, a.shape).astype(np.float32)
    return a[None]


def _iou(box: dict, blob: tuple[int, int, int, int]) -> float:
    y0, y1, x0, x1 = blob
    bx, by, bw, bh = box["x"] * W, box["y"] * H, box["w"] * W, box["h"] * H
    ix = max(0.0, min(bx + bw, x1) - max(bx, x0))
    iy = max(0.0, min(by + bh, y1) - max(by, y0))
    inter = ix * iy
    return inter / (bw * bh + (x1 - x0) * (y1 - y0) - inter)


# ---------------------------------------------------------------- boxes


@pytest.mark.parametrize("grid", [64, 14])  # EfficientAD's PDN grid, MoLE-Flow's flow grid
@pytest.mark.parametrize("blob", [(100, 140, 60, 120), (30, 90, 150, 230), (120, 200, 100, 180)])
def test_box_is_at_input_resolution_and_tight_around_the_blob(grid, blob):
    op = OperatingPoint(threshold=1.0, map_threshold=0.5, map_sigma=4.0, map_border=0.05)
    ev = make_defect_event(_result(), _native(grid, blob), op, (H, W), size=64)
    assert ev.map_threshold == 0.5 and len(ev.boxes) == 1
    assert _iou(ev.boxes[0], blob) >= 0.5
    # coordinates at input resolution: finer than the native grid's cell (1/14 of the side for MoLE-Flow)
    b = ev.boxes[0]
    assert abs(b["x"] * W - blob[2]) < W / grid and abs(b["y"] * H - blob[0]) < H / grid


def test_a_flagged_frame_always_gets_a_box():
    op = OperatingPoint(threshold=1.0, map_threshold=50.0, map_sigma=4.0, map_border=0.05)  # nothing passes
    blob = (100, 140, 60, 120)
    ev = make_defect_event(_result(), _native(64, blob), op, (H, W))
    assert len(ev.boxes) == 1 and _iou(ev.boxes[0], blob) >= 0.5  # the region around the peak
    flat = make_defect_event(_result(), np.zeros((1, 14, 14), np.float32), op, (H, W))
    assert len(flat.boxes) == 1 and flat.boxes[0]["w"] == 1.0  # a flat map: the whole frame
    assert anomaly_boxes(prepare_map(np.zeros((14, 14)), (H, W), 4.0, 0.05), 50.0) == []  # not forced: none


def test_nothing_on_the_border_ring():
    a = np.zeros((64, 64), np.float32)
    a[:, :3] = 5.0  # zero-padding artefacts along the edges, stronger than the defect
    a[-2:, :] = 5.0
    a[28:36, 28:36] = 1.0
    border = 0.1
    op = OperatingPoint(threshold=1.0, map_threshold=0.3, map_sigma=4.0, map_border=border)
    boxes = make_defect_event(_result(), a[None], op, (H, W)).boxes
    assert boxes, "the defect inside the ring is boxed"
    for b in boxes:
        assert b["x"] >= border - 1e-6 and b["y"] >= border - 1e-6
        assert b["x"] + b["w"] <= 1 - border + 1e-6 and b["y"] + b["h"] <= 1 - border + 1e-6
    assert len(boxes) == 1 and _iou(boxes[0], (112, 144, 112, 144)) >= 0.5


def test_heat_map_is_the_prepared_map_the_boxes_were_cut_from():
    op = OperatingPoint(threshold=1.0, map_threshold=0.5, map_sigma=4.0, map_border=0.05)
    ev = decode_defect_event(make_defect_event(_result(), _native(14, (100, 140, 60, 120)), op, (H, W),
                                               size=64).to_json())
    hm = decode_heatmap(ev.heatmap_png_b64)
    assert hm.shape == (64, 64)
    y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)
    b = ev.boxes[0]
    assert b["x"] <= (x + 0.5) / 64 <= b["x"] + b["w"] and b["y"] <= (y + 0.5) / 64 <= b["y"] + b["h"]
    assert 0.0 < ev.map_threshold / ev.heatmap_scale < 1.0


# ---------------------------------------------------------------- normalised score


def test_normalised_score_is_half_at_the_threshold_monotone_and_bounded():
    op = OperatingPoint(threshold=4.0, score_scale=score_scale_for(4.0, good_median=1.0))
    assert op.normalised(4.0) == 0.5
    assert op.normalised(1.0) == pytest.approx(GOOD_MEDIAN_NORMALISED)
    xs = np.linspace(-1e6, 1e6, 2001).tolist() + np.linspace(-20, 20, 401).tolist()
    ys = [op.normalised(x) for x in sorted(xs)]
    assert all(0.0 <= y <= 1.0 for y in ys) and all(a <= b for a, b in zip(ys, ys[1:], strict=False))
    assert op.normalised(math.inf) == 1.0 and op.normalised(-math.inf) == 0.0 and op.normalised(math.nan) == 1.0
    assert op.normalised(4.0 + 1e-9) > 0.5 and op.is_anomaly(4.0 + 1e-9) and not op.is_anomaly(4.0)


# ---------------------------------------------------------------- which operating point


def _spec(**over) -> dict:
    d = {"schema": 1, "model": "efficientad_bottle", "detector": "efficientad", "version": 3, "product": "bottle",
         "input": {"name": "image", "height": H, "width": W, "color": "RGB", "dtype": "UINT8"},
         "threshold": 2.0, "map_threshold": 1.5}
    d.update(over)
    return d


def test_old_spec_without_operating_point_falls_back_to_its_thresholds():
    op = operating_point_of(_spec())
    assert op.threshold == 2.0 and op.box_threshold() == 1.5 and op.normalised(2.0) == 0.5
    assert op.target_false_alarm_rate is None and op.estimates == {}
    no_map = operating_point_of({k: v for k, v in _spec().items() if k != "map_threshold"})
    assert no_map.box_threshold() == 2.0  # boxes at the image threshold


def test_multi_task_spec_has_one_operating_point_per_task():
    spec = _spec(model="moleflow", detector="moleflow", product=None, threshold=0.0, map_threshold=0.0, tasks={
        "bottle": {"operating_point": {"threshold": 3.0, "score_scale": 2.0, "map_threshold": 2.5, "map_sigma": 6.0,
                                       "map_border": 0.04, "target_false_alarm_rate": 0.01,
                                       "estimated_false_alarm_rate": 0.008, "estimated_recall": 0.93, "n_good": 120}},
        "cable": {}})
    b = operating_point_of(spec, "bottle")
    assert (b.threshold, b.box_threshold(), b.map_sigma, b.map_border) == (3.0, 2.5, 6.0, 0.04)
    assert b.target_false_alarm_rate == 0.01 and b.estimates["estimated_recall"] == 0.93
    assert operating_point_of(spec, "cable").threshold == 0.0  # a task without one: the spec's threshold


# ---------------------------------------------------------------- the worker's score stage


class _Triton:
    def __init__(self, spec):
        self.spec = parse_spec(spec)

    def spec_at(self, model, version):
        return self.spec

    def spec_for(self, model):
        return self.spec


def _pipeline(spec: dict) -> Pipeline:
    p = Pipeline.__new__(Pipeline)  # only what score() reads
    hist = SimpleNamespace(observe=lambda v: None)
    p.triton = _Triton(spec)
    p.metrics = SimpleNamespace(stage_latency=SimpleNamespace(labels=lambda **k: hist))
    p.heatmap_size = 64
    p._ops = {}
    return p


def _prepared(extra: dict | None = None, task: str = "") -> Prepared:
    f = Frame(frame_id="f1", camera_id="cam-1", ts_ms=1, image=b"x", line_id="L1", product="bottle",
              extra=extra or {})
    return Prepared(RawRecord(0, b"cam-1", b"x", [], None), f, Route("moleflow", task, "bottle", not task),
                    np.zeros((3, H, W), np.uint8), {})


def _out(scores, maps, tasks=None) -> InferOutput:
    return InferOutput(scores=np.asarray(scores, np.float32), maps=np.asarray(maps, np.float16), tasks=tasks,
                       route_distance=None, infer_ms=1.0, attempts=1, versions=None)


def test_worker_judges_normalises_and_boxes_with_the_tasks_operating_point():
    spec = _spec(model="moleflow", detector="moleflow", product=None, threshold=0.0, map_threshold=0.0, tasks={
        "bottle": {"operating_point": {"threshold": 3.0, "score_scale": 2.0, "map_threshold": 0.5,
                                       "map_sigma": 4.0, "map_border": 0.05}},
        "cable": {"operating_point": {"threshold": 10.0, "score_scale": 2.0}}})
    p = _pipeline(spec)
    blob = (100, 140, 60, 120)
    maps = np.concatenate([_native(14, blob)] * 2)
    out = _out([4.0, 4.0], maps, tasks=["bottle", "cable"])
    flagged = p.score(_prepared(), out, 0, 0.0)
    r = decode_result(flagged.result_json)
    assert r.is_anomaly and r.threshold == 3.0 and r.score == 4.0 and 0.5 < r.score_normalized < 1.0
    assert r.score_normalized == pytest.approx(1 / (1 + math.exp(-0.5)))
    ev = decode_defect_event(flagged.defect_json)
    assert ev.map_threshold == 0.5 and len(ev.boxes) >= 1 and _iou(ev.boxes[0], blob) >= 0.5
    quiet = p.score(_prepared(), out, 1, 0.0)  # same score, the other task's threshold: not flagged
    rq = decode_result(quiet.result_json)
    assert not rq.is_anomaly and rq.threshold == 10.0 and rq.score_normalized < 0.5 and quiet.defect_json is None
    assert not r.warmup
    assert set(p._ops) == {("moleflow", "3", "bottle"), ("moleflow", "3", "cable")}


def test_worker_falls_back_for_an_old_spec_and_marks_warm_up_frames():
    p = _pipeline(_spec())  # no operating_point: threshold 2.0, boxes at 1.5, on a flagged frame at least one
    out = _out([2.5, 1.0], np.zeros((2, 1, 64, 64)))
    s = p.score(_prepared({"warmup": "1"}), out, 0, 0.0)
    r = decode_result(s.result_json)
    assert r.is_anomaly and r.threshold == 2.0 and r.score_normalized > 0.5 and r.warmup
    ev = decode_defect_event(s.defect_json)
    assert ev.map_threshold == 1.5 and len(ev.boxes) == 1
    low = decode_result(p.score(_prepared(), out, 1, 0.0).result_json)
    assert not low.is_anomaly and low.score_normalized < 0.5 and not low.warmup
    assert "score_normalized" in orjson.loads(s.result_json)
