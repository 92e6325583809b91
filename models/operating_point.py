"""Choosing a served model's operating point on held-out good images and synthetic defects (no test labels).

The decision threshold targets a stated false-alarm rate on good parts (Settings.target_false_alarm_rate,
default 1%). A quantile of a few dozen held-out scores is their maximum, whatever the target, so the
tail is estimated instead: the held-out good scores are made Gaussian with a Yeo-Johnson power
transform (fitted by maximum likelihood; scores are right-skewed), the (1 - rate) quantile of the fitted
normal is mapped back. The estimate is reported with the empirical false-alarm rate of the held-out
images at that threshold. Recall at the threshold is estimated on synthetic defects made from the same
held-out images: CutPaste (shape/structure) and colour blobs (colour and intensity: the family real
products scored lowest on), per family. The map threshold for defect boxes comes from the same images:
the same estimator on each image's prepared-map peak (contracts.operating_point.prepare_map), so boxes
and the image decision agree. Both detectors get it through the training job (models/jobs/train_job.py),
scored by the exported artifact exactly as Triton serves it; benchmarks/accuracy.py uses it the same way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import optimize, stats

from contracts.operating_point import prepare_map, score_scale_for
from models.synthetic import FAMILIES

# box geometry: Gaussian smoothing in input pixels (EfficientAD's paper smooths its map with sigma 4) and
# the excluded border ring (a fraction of the side: the padding ring of the convolutions)
MAP_SIGMA = 4.0
MAP_BORDER = 0.03


def tail_threshold(scores: Sequence[float], rate: float) -> tuple[float, str]:
    """The (1 - rate) quantile of the distribution behind ``scores`` (held-out good images)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite held-out good score to set a threshold on")
    if s.size * rate >= 5:  # enough images above the quantile: the empirical one
        return float(np.quantile(s, 1.0 - rate, method="higher")), f"empirical q{1 - rate:g} of {s.size}"
    if s.size < 8 or float(np.std(s)) == 0.0:
        return float(s.max()), f"max of {s.size} (too few to fit a tail)"
    med = float(np.median(s))
    scale = float(np.subtract(*np.percentile(s, [75, 25])) / 1.349) or float(np.std(s))
    z = (s - med) / scale
    zt, lam = stats.yeojohnson(z)
    target = float(np.mean(zt) + stats.norm.ppf(1.0 - rate) * np.std(zt, ddof=1))
    f = lambda x: float(stats.yeojohnson(np.array([x]), lmbda=lam)[0]) - target  # noqa: E731 (monotone in x)
    hi = max(1.0, float(z.max()))
    while f(hi) < 0 and hi < 1e6:
        hi *= 2
    x = optimize.brentq(f, float(z.min()) - 1.0, hi) if f(hi) >= 0 else hi
    return med + x * scale, f"yeo-johnson normal tail of {s.size} (lambda {lam:.3g})"


def cross_fitted_false_alarm_rate(scores: np.ndarray, rate: float, seed: int = 0, folds: int = 2,
                                  repeats: int = 5) -> float:
    """Out-of-sample false-alarm rate of :func:`tail_threshold`: fit on one fold of the held-out good
    scores, count alarms on the other (``folds``-fold, ``repeats`` random splits, averaged)."""
    s = np.asarray(scores, np.float64)
    if s.size < 2 * folds:
        return float("nan")
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(repeats):
        idx = rng.permutation(s.size)
        for k in range(folds):
            test = idx[k::folds]
            fit = np.setdiff1d(idx, test)
            t, _ = tail_threshold(s[fit], rate)
            rates.append(float(np.mean(s[test] > t)))
    return float(np.mean(rates))


def _as_rgb01(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    x = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA if bgr.shape[0] > h else cv2.INTER_LINEAR)
    return cv2.cvtColor(x, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def _to_bgr8(rgb01: np.ndarray) -> np.ndarray:
    return cv2.cvtColor((np.clip(rgb01, 0, 1) * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)


def synthetic_defects(good_bgr: Sequence[np.ndarray], size: tuple[int, int], seed: int = 0,
                      families: Sequence[str] = tuple(FAMILIES)) -> dict[str, list[np.ndarray]]:
    """One synthetic defect per held-out good image and family, as BGR uint8 at the model's input size."""
    rng = random.Random(seed)
    out: dict[str, list[np.ndarray]] = {f: [] for f in families}
    for img in good_bgr:
        rgb = _as_rgb01(img, size)
        for f in families:
            out[f].append(_to_bgr8(FAMILIES[f](rgb, rng)[0]))
    return out


Scorer = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]]  # BGR images -> (scores [n], maps [n,h,w])


def choose_operating_point(score: Scorer, good_bgr: Sequence[np.ndarray], size: tuple[int, int], *,
                           target_false_alarm_rate: float = 0.01, seed: int = 0,
                           map_sigma: float = MAP_SIGMA, map_border: float = MAP_BORDER) -> dict[str, Any]:
    """The ``operating_point`` dict of a spec (contracts.operating_point) for held-out good images
    ``good_bgr`` scored by ``score`` (the served artifact); ``size`` = the model input (H, W)."""
    if not 0 < target_false_alarm_rate < 0.5:
        raise ValueError(f"target false-alarm rate must be in (0, 0.5), got {target_false_alarm_rate}")
    g_scores, g_maps = score(good_bgr)
    g_scores = np.asarray(g_scores, np.float64).reshape(-1)
    thr, method = tail_threshold(g_scores, target_false_alarm_rate)
    peaks = np.array([prepare_map(m, size, map_sigma, map_border).max() for m in g_maps], np.float64)
    map_thr, _ = tail_threshold(peaks, target_false_alarm_rate)
    synth = synthetic_defects(good_bgr, size, seed=seed)
    by_family, n_syn, hits = {}, 0, 0
    for fam, imgs in synth.items():
        s, _ = score(imgs)
        s = np.asarray(s, np.float64).reshape(-1)
        by_family[fam] = round(float(np.mean(s > thr)), 4)
        n_syn += s.size
        hits += int(np.sum(s > thr))
    return {
        "threshold": float(thr),
        "score_scale": score_scale_for(thr, float(np.median(g_scores))),
        "map_threshold": float(map_thr),
        "map_sigma": float(map_sigma),
        "map_border": float(map_border),
        "target_false_alarm_rate": float(target_false_alarm_rate),
        "estimated_false_alarm_rate": round(cross_fitted_false_alarm_rate(g_scores, target_false_alarm_rate, seed), 4),
        "estimated_recall": round(hits / max(n_syn, 1), 4),
        "estimated_recall_by_family": by_family,
        "n_good": int(g_scores.size),
        "n_synthetic": int(n_syn),
        "good_median": float(np.median(g_scores)),
        "method": method,
    }
