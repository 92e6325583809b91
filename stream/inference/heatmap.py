"""Defect events: an anomaly map -> boxes (the operating point's, at the model's input resolution) + a small PNG.

The wire format (:class:`contracts.envelope.DefectEvent`, :func:`contracts.envelope.decode_heatmap`) and the
box semantics (:func:`contracts.operating_point.prepare_map` / :func:`~contracts.operating_point.anomaly_boxes`:
resize to the input resolution, smooth, drop the border ring, regions above the map threshold, at least one
box on a flagged frame) are contracts; building the event from a served map is the worker's job.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

from contracts.envelope import DefectEvent, InspectionResult
from contracts.operating_point import OperatingPoint, anomaly_boxes, prepare_map


def encode_heatmap(amap: np.ndarray, *, size: int = 64, scale: float | None = None) -> tuple[str, float]:
    """Anomaly map -> (base64 uint8 PNG, scale). Pixel p encodes map value p/255*scale."""
    a = np.asarray(amap, dtype=np.float32).squeeze()
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    h, w = a.shape
    f = size / max(h, w)  # fit the map (native grid or input resolution) to ``size`` on its long side
    if f != 1:
        a = cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    if scale is None:
        scale = float(max(a.max(), 1e-6))
    u8 = np.clip(a / scale * 255.0, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", u8)
    if not ok:
        raise RuntimeError("cv2.imencode failed for heat map")
    return base64.b64encode(buf.tobytes()).decode("ascii"), scale


def make_defect_event(result: InspectionResult, amap: np.ndarray, op: OperatingPoint, input_size: tuple[int, int],
                      *, size: int = 64) -> DefectEvent:
    """The defect event of a flagged frame: ``amap`` (the model's native map) prepared at ``input_size`` (H, W)
    with the operating point's smoothing and border, boxes above ``op.box_threshold()`` (forced: >= 1 box),
    and the prepared map as the heat map, so the overlay, its threshold and the boxes are one map."""
    prepared = prepare_map(amap, input_size, op.map_sigma, op.map_border)
    thr = op.box_threshold()
    b64, scale = encode_heatmap(prepared, size=size)
    return DefectEvent(result=result, heatmap_png_b64=b64, heatmap_scale=scale, map_threshold=float(thr),
                       boxes=anomaly_boxes(prepared, thr, force=True))
