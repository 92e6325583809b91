"""Heat maps and boxes for defect events: an anomaly map -> small PNG + connected-region boxes.

The wire format (:class:`contracts.envelope.DefectEvent`, :func:`contracts.envelope.decode_heatmap`)
is a contract; building it from a map is the worker's job.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np

from contracts.envelope import DefectEvent, InspectionResult


def anomaly_boxes(amap: np.ndarray, map_threshold: float, *, min_area_frac: float = 0.0005, max_boxes: int = 16) -> list[dict[str, float]]:
    """Bounding boxes (normalised to [0,1]) of 8-connected regions where ``amap > map_threshold``."""
    a = np.asarray(amap, dtype=np.float32).squeeze()
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D after squeeze, got shape {amap.shape}")
    h, w = a.shape
    mask = (a > map_threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_area_frac * h * w:
            continue
        peak = float(a[labels == i].max())
        boxes.append({"x": x / w, "y": y / h, "w": bw / w, "h": bh / h, "area": area / (h * w), "peak": peak})
    boxes.sort(key=lambda b: b["peak"], reverse=True)
    return boxes[:max_boxes]


def encode_heatmap(amap: np.ndarray, *, size: int = 64, scale: float | None = None) -> tuple[str, float]:
    """Anomaly map -> (base64 uint8 PNG, scale). Pixel p encodes map value p/255*scale."""
    a = np.asarray(amap, dtype=np.float32).squeeze()
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    h, w = a.shape
    f = size / max(h, w)  # models send their native map (e.g. EfficientAD's 64x64 grid): fit it to ``size``
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


def make_defect_event(result: InspectionResult, amap: np.ndarray, map_threshold: float, *, size: int = 64) -> DefectEvent:
    b64, scale = encode_heatmap(amap, size=size)
    return DefectEvent(result=result, heatmap_png_b64=b64, heatmap_scale=scale,
                       map_threshold=float(map_threshold), boxes=anomaly_boxes(amap, map_threshold))
