"""Shared anomaly-detection evaluation used by every detector (EfficientAD, MoLE-Flow).

Stable API (import from ``models.evaluation``):

* :func:`image_auroc` (labels, scores) -> float
* :func:`pixel_auroc` (masks, maps) -> float
* :func:`pixel_ap` (masks, maps) -> float
* :func:`aupro` (masks, maps, fpr_limit=0.3) -> float   (MVTec AD definition, normalised by fpr_limit)
* :func:`pro_curve` (masks, maps) -> (fprs, pros)
* :func:`f1_max` (labels, scores) -> (f1, threshold)
* :func:`evaluate` (scores, labels, defect_types, maps=None, masks=None, ...) -> dict
  (overall metrics + ``per_defect`` breakdown: each defect type against the good test images)
* :func:`save_heatmap_overlay` (image, anomaly_map, path, ...) -> Path
* :func:`write_results_json` (results, path) -> Path

Conventions: ``labels`` are 0 (good) / 1 (anomalous); ``scores`` higher = more anomalous.
``maps`` / ``masks`` are arrays [N, H, W] (or lists of [H, W]); masks are binarised with ``> 0``.
Metric functions return ``float('nan')`` when a metric is undefined (e.g. only one class present).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from scipy import ndimage
from sklearn import metrics as skm

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "pro_curve",
    "aupro",
    "f1_max",
    "trapezoid",
    "evaluate",
    "save_heatmap_overlay",
    "write_results_json",
]


def _as_1d(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _stack(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    else:
        arr = np.stack([np.asarray(a) for a in x])
    if arr.ndim == 4 and arr.shape[1] == 1:  # [N,1,H,W] -> [N,H,W]
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected maps/masks of shape [N,H,W], got {arr.shape}")
    return arr


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and y.min() != y.max()


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Image-level ROC AUC (sklearn ``roc_auc_score``)."""
    y = _as_1d(labels).astype(np.int64)
    s = _as_1d(scores)
    if not _both_classes(y):
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level ROC AUC over all pixels of all images."""
    y = (_stack(masks) > 0).reshape(-1)
    s = _stack(maps).astype(np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"masks {y.shape} and maps {s.shape} differ")
    if not _both_classes(y.astype(np.int8)):
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def pixel_ap(masks: Any, maps: Any) -> float:
    """Pixel-level average precision (sklearn ``average_precision_score``)."""
    y = (_stack(masks) > 0).reshape(-1)
    s = _stack(maps).astype(np.float64).reshape(-1)
    if not y.any():
        return float("nan")
    return float(skm.average_precision_score(y, s))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it (predict anomalous if score >= t)."""
    y = _as_1d(labels).astype(np.int64)
    s = _as_1d(scores)
    if not y.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    # precision/recall have one more entry than thresholds (the (1, 0) end point): drop it
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(thresholds[i])


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve as in the MVTec AD evaluation code (``compute_pro``).

    Every connected component (8-connectivity, ``scipy.ndimage.label`` with a 3x3 structure) of
    every ground-truth mask is one region. For a threshold t, the per-region overlap is the mean over
    all regions of (fraction of the region's pixels with score >= t); the FPR is the fraction of
    all defect-free pixels (in all images) with score >= t. Thresholds run over every distinct score.
    Returns (fprs, pros), both starting at 0 and increasing.
    """
    gts = _stack(masks) > 0
    amaps = _stack(maps).astype(np.float64)
    if gts.shape != amaps.shape:
        raise ValueError(f"masks {gts.shape} and maps {amaps.shape} differ")
    structure = np.ones((3, 3), dtype=int)
    num_ok = int((~gts).sum())
    fp_changes = np.zeros(gts.shape, dtype=np.float64)
    fp_changes[~gts] = 1.0 / max(num_ok, 1)
    pro_changes = np.zeros(gts.shape, dtype=np.float64)
    regions: list[tuple[int, np.ndarray]] = []
    for i, gt in enumerate(gts):
        labeled, n = ndimage.label(gt, structure)
        for k in range(1, n + 1):
            regions.append((i, labeled == k))
    n_regions = len(regions)
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks")
    for i, region in regions:
        pro_changes[i][region] = 1.0 / (region.sum() * n_regions)
    flat = amaps.reshape(-1)
    order = np.argsort(flat, kind="mergesort")[::-1]  # descending score
    scores_sorted = flat[order]
    fprs = np.cumsum(fp_changes.reshape(-1)[order])
    pros = np.cumsum(pro_changes.reshape(-1)[order])
    # only keep the last index of each run of equal scores (a threshold includes all of them)
    keep = np.append(np.diff(scores_sorted) != 0, True)
    fprs = np.clip(np.concatenate([[0.0], fprs[keep]]), 0.0, 1.0)
    pros = np.clip(np.concatenate([[0.0], pros[keep]]), 0.0, 1.0)
    return fprs, pros


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under y(x) with the trapezoid rule up to ``x_max`` (y linearly interpolated at x_max)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x_max is not None:
        if x_max not in x:
            ins = int(np.searchsorted(x, x_max))
            if 0 < ins < len(x):
                y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
                x = np.concatenate([x[:ins], [x_max]])
                y = np.concatenate([y[:ins], [y_interp]])
            else:
                x, y = x[:ins], y[:ins]
        else:
            mask = x <= x_max
            x, y = x[mask], y[mask]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit`` FPR, normalised by ``fpr_limit`` (MVTec AD)."""
    fprs, pros = pro_curve(masks, maps)
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _metrics_block(scores, labels, maps, masks, fpr_limit) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_images": int(len(labels)),
        "n_anomalous": int(np.sum(labels)),
        "image_auroc": image_auroc(labels, scores),
    }
    f1, thr = f1_max(labels, scores)
    out["image_f1_max"] = f1
    out["image_f1_threshold"] = thr
    if maps is not None and masks is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["pixel_ap"] = pixel_ap(masks, maps)
        try:
            out[f"aupro_{int(round(fpr_limit * 100))}"] = aupro(masks, maps, fpr_limit)
        except ValueError:
            out[f"aupro_{int(round(fpr_limit * 100))}"] = float("nan")
        pf1, pthr = f1_max(np.asarray(masks).reshape(-1) > 0, np.asarray(maps).reshape(-1))
        out["pixel_f1_max"] = pf1
        out["pixel_f1_threshold"] = pthr
    return out


def evaluate(
    scores: Any,
    labels: Any,
    defect_types: Sequence[str] | None = None,
    maps: Any = None,
    masks: Any = None,
    threshold: float | None = None,
    fpr_limit: float = 0.3,
    good_name: str = "good",
) -> dict[str, Any]:
    """All metrics, overall and per defect type (each defect type evaluated against all good images).

    ``maps``/``masks`` ([N,H,W], same resolution) are optional; without them only image metrics
    are computed. With ``threshold`` (the model's stored operating point) accuracy, TPR and FPR at
    that threshold are reported too.
    """
    s = _as_1d(scores)
    y = _as_1d(labels).astype(np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    mp = _stack(maps) if maps is not None else None
    mk = (_stack(masks) > 0) if masks is not None else None
    result: dict[str, Any] = {"overall": _metrics_block(s, y, mp, mk, fpr_limit)}
    if threshold is not None:
        pred = s >= threshold
        result["overall"]["threshold"] = float(threshold)
        result["overall"]["accuracy_at_threshold"] = float(np.mean(pred == (y == 1)))
        result["overall"]["tpr_at_threshold"] = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
        result["overall"]["fpr_at_threshold"] = float(pred[y == 0].mean()) if (y == 0).any() else float("nan")
    if defect_types is not None:
        types = np.asarray(list(defect_types))
        if len(types) != len(s):
            raise ValueError(f"{len(types)} defect types but {len(s)} scores")
        per: dict[str, Any] = {}
        good = types == good_name
        for d in sorted(set(types.tolist()) - {good_name}):
            sel = good | (types == d)
            per[d] = _metrics_block(
                s[sel], y[sel], mp[sel] if mp is not None else None, mk[sel] if mk is not None else None, fpr_limit
            )
        result["per_defect"] = per
    return result


def save_heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    path: str | Path,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Write ``image`` (HxWx3 uint8 RGB, or float in [0,1]) blended with a JET-coloured anomaly map as PNG.

    The map is resized to the image; ``vmin``/``vmax`` fix the colour scale (defaults: map min/max).
    An optional ground-truth ``mask`` is drawn as a white contour; ``title`` as text in the corner.
    """
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    h, w = img.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32).squeeze()
    amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    lo = float(np.min(amap)) if vmin is None else float(vmin)
    hi = float(np.max(amap)) if vmax is None else float(vmax)
    norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
    heat_bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    img_bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(img_bgr, 1 - alpha, heat_bgr, alpha, 0)
    if mask is not None:
        m = (cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)) * 255
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    if title:
        cv2.putText(out, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), out):
        raise OSError(f"could not write {path}")
    return path


def write_results_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write results as indented JSON (numpy scalars/arrays supported; NaN/inf become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    data = orjson.loads(orjson.dumps(results, default=default, option=orjson.OPT_SERIALIZE_NUMPY))
    path.write_bytes(orjson.dumps(_nan_to_none(data), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return path


def region_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) pixel boxes (exclusive ends) of a mask's 8-connected regions."""
    labeled, n = ndimage.label(np.asarray(mask) > 0, np.ones((3, 3), int))
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labeled) if s is not None]


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_hits(boxes: Sequence[dict], mask: np.ndarray, iou: float = 0.3) -> bool:
    """Whether any predicted box (normalised x, y, w, h as in defect events) overlaps a ground-truth
    region's bounding box with IoU >= ``iou``."""
    h, w = np.asarray(mask).shape[:2]
    gts = region_boxes(mask)
    for b in boxes:
        pb = (b["x"] * w, b["y"] * h, (b["x"] + b["w"]) * w, (b["y"] + b["h"]) * h)
        if any(box_iou(pb, g) >= iou for g in gts):
            return True
    return False
