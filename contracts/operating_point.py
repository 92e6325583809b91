"""The operating point of a served model: decision threshold, normalised score and defect boxes.

One definition shared by the training job that chooses it (models/operating_point.py), the worker that
applies it to every frame (stream/worker/pipeline.py) and the console/CLI that show it. It lives in a
version's metadata.json (``linewatch_spec``): per-product detectors at the top level
(``spec["operating_point"]``), multi-task ones per task (``spec["tasks"][task]["operating_point"]``),
both in the units of the *served* ``score`` output. Versions written before it existed fall back to
the spec's ``threshold`` / ``map_threshold``.

- Decision: ``is_anomaly = score > threshold``; the threshold targets a stated false-alarm rate on good
  parts, estimated on held-out good images (models/operating_point.py).
- Normalised score in [0, 1] with the decision at exactly 0.5 (anomalib's convention; the raw score
  stays on the result): a logistic of ``(score - threshold) / score_scale``, where ``score_scale`` puts the
  median held-out good part at 0.1.
- Boxes: the native anomaly map is resized to the model's input resolution (bilinear), smoothed with a
  Gaussian of ``map_sigma`` input pixels, a ring of ``map_border`` (fraction of the side) is excluded
  (zero-padded convolutions see past the image edge), and every 8-connected region above
  ``map_threshold`` is one box, drawn around the region's core (its pixels at or above half the region's
  height over the map's median). ``map_threshold`` is calibrated on the same held-out good images as the
  image decision (the prepared map's maximum of those images at the same false-alarm target), so an
  unflagged good frame rarely has a region above it; a flagged frame always gets at least one box
  (the region around the map's peak when nothing passes the map threshold).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

# the median held-out good part maps to this normalised score
GOOD_MEDIAN_NORMALISED = 0.1


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    score_scale: float = 1.0
    map_threshold: float | None = None  # None: boxes use the image threshold (older versions)
    map_sigma: float = 4.0
    map_border: float = 0.0
    target_false_alarm_rate: float | None = None
    estimates: dict[str, Any] = field(default_factory=dict, compare=False)  # FAR / recall estimates, n, method

    def normalised(self, score: float) -> float:
        """Score in [0, 1]; exactly 0.5 at the threshold, monotone in ``score``."""
        z = (float(score) - self.threshold) / max(self.score_scale, 1e-12)
        if not math.isfinite(z):
            return 1.0 if z > 0 or math.isnan(z) else 0.0
        z = max(-60.0, min(60.0, z))
        return 1.0 / (1.0 + math.exp(-z))

    def is_anomaly(self, score: float) -> bool:
        return bool(score > self.threshold)

    def box_threshold(self) -> float:
        return self.threshold if self.map_threshold is None else self.map_threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_scale_for(threshold: float, good_median: float) -> float:
    """The logistic scale that maps ``good_median`` to GOOD_MEDIAN_NORMALISED (and ``threshold`` to 0.5)."""
    gap = float(threshold) - float(good_median)
    logit = math.log(1.0 / GOOD_MEDIAN_NORMALISED - 1.0)
    return max(abs(gap) / logit, 1e-6)


def parse_operating_point(d: dict[str, Any] | None, fallback_threshold: float,
                          fallback_map_threshold: float | None = None) -> OperatingPoint:
    if not isinstance(d, dict) or "threshold" not in d:
        return OperatingPoint(threshold=float(fallback_threshold),
                              score_scale=max(abs(float(fallback_threshold)) * 0.1, 1.0),
                              map_threshold=None if fallback_map_threshold is None else float(fallback_map_threshold),
                              map_sigma=0.0)
    known = {"threshold", "score_scale", "map_threshold", "map_sigma", "map_border", "target_false_alarm_rate"}
    mt = d.get("map_threshold")
    return OperatingPoint(threshold=float(d["threshold"]), score_scale=float(d.get("score_scale", 1.0)),
                          map_threshold=None if mt is None else float(mt), map_sigma=float(d.get("map_sigma", 4.0)),
                          map_border=float(d.get("map_border", 0.0)),
                          target_false_alarm_rate=d.get("target_false_alarm_rate"),
                          estimates={k: v for k, v in d.items() if k not in known})


def operating_point_of(spec_raw: dict[str, Any], task: str | None = None) -> OperatingPoint:
    """The operating point a spec (``linewatch_spec`` dict) applies to ``task`` (multi-task models) or to
    the model (per-product models)."""
    tasks = spec_raw.get("tasks")
    thr = float(spec_raw.get("threshold", 0.0) or 0.0)
    mthr = spec_raw.get("map_threshold")
    if task and isinstance(tasks, dict) and isinstance(tasks.get(task), dict):
        return parse_operating_point(tasks[task].get("operating_point"), thr, None if mthr is None else float(mthr))
    return parse_operating_point(spec_raw.get("operating_point"), thr, None if mthr is None else float(mthr))


# ------------------------------------------------------------------------------------------- boxes
def prepare_map(amap: np.ndarray, size: tuple[int, int], sigma: float, border: float) -> np.ndarray:
    """Native anomaly map -> float32 [H, W] at the model input resolution ``size`` (H, W), smoothed with a
    Gaussian of ``sigma`` pixels, the border ring of ``border`` x side set to the map's minimum."""
    a = np.nan_to_num(np.asarray(amap, dtype=np.float32).squeeze(), nan=0.0, posinf=0.0, neginf=0.0)
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D after squeeze, got shape {np.shape(amap)}")
    h, w = int(size[0]), int(size[1])
    if a.shape != (h, w):
        a = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        a = cv2.GaussianBlur(a, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)
    if border > 0:
        by, bx = int(round(border * h)), int(round(border * w))
        if by or bx:
            floor = float(a[by:h - by or h, bx:w - bx or w].min()) if (h > 2 * by and w > 2 * bx) else float(a.min())
            a[:by], a[h - by:], a[:, :bx], a[:, w - bx:] = floor, floor, floor, floor
    return a


def map_peak(amap: np.ndarray, size: tuple[int, int], sigma: float, border: float) -> float:
    """The prepared map's maximum: what the map threshold is calibrated on."""
    return float(prepare_map(amap, size, sigma, border).max())


def anomaly_boxes(prepared: np.ndarray, map_threshold: float, *, force: bool = False,
                  min_area_frac: float = 0.0005, max_boxes: int = 16) -> list[dict[str, float]]:
    """Boxes (normalised to [0, 1]) of the 8-connected regions of a prepared map above ``map_threshold``,
    highest peak first. ``force`` (a flagged frame): when no region passes, the region around the peak
    above the midpoint between the map's median and its peak is returned, so a flagged frame has a box."""
    a = np.asarray(prepared, dtype=np.float32)
    h, w = a.shape
    boxes = _regions(a, float(map_threshold), min_area_frac)
    if not boxes and force:
        peak = float(a.max())
        level = 0.5 * (float(np.median(a)) + peak)
        boxes = _regions(a, level, 0.0) if peak > level else []
        if not boxes:  # a flat map: the whole frame
            boxes = [{"x": 0.0, "y": 0.0, "w": 1.0, "h": 1.0, "area": 1.0, "peak": peak}]
        boxes = boxes[:1]
    return boxes[:max_boxes]


def _regions(a: np.ndarray, level: float, min_area_frac: float) -> list[dict[str, float]]:
    """One box per 8-connected region above ``level``, drawn around the region's core: its pixels at or above
    half the region's height over the map's background (its median; full width at half maximum) and above
    ``level``, so a defect far above the threshold gets a box around what drove its score, not around the
    whole low plateau it stands on."""
    h, w = a.shape
    bg = float(np.median(a))
    mask = (a > level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_area_frac * h * w:
            continue
        sub = a[y:y + bh, x:x + bw]
        region = labels[y:y + bh, x:x + bw] == i
        peak = float(sub[region].max())
        ys, xs = np.nonzero(region & (sub >= max(level, bg + 0.5 * (peak - bg))))
        x0, y0, x1, y1 = x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1
        out.append({"x": x0 / w, "y": y0 / h, "w": (x1 - x0) / w, "h": (y1 - y0) / h, "area": area / (h * w),
                    "peak": peak})
    out.sort(key=lambda b: b["peak"], reverse=True)
    return out
