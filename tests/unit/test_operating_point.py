"""The operating point chosen on held-out good images (models/operating_point.py) and synthetic defects."""

from __future__ import annotations

import random

import numpy as np
import pytest

from contracts.operating_point import operating_point_of
from models.operating_point import (
    choose_operating_point,
    cross_fitted_false_alarm_rate,
    synthetic_defects,
    tail_threshold,
)
from models.synthetic import FAMILIES, colour_patch


@pytest.mark.parametrize("n", [26, 60, 200])
def test_tail_threshold_meets_the_target_rate_on_fresh_good_parts(n):
    """Fitted on n held-out scores of a skewed distribution, the threshold's false-alarm rate on fresh
    parts of the same distribution is near the 1% target on average (not 0, as the max of n would be
    for small n, and not 5x the target)."""
    rng = np.random.default_rng(0)
    fars = []
    for _ in range(60):
        t, _ = tail_threshold(rng.lognormal(0, 0.5, n), 0.01)
        fars.append(np.mean(rng.lognormal(0, 0.5, 5000) > t))
    assert 0.004 < np.median(fars) < 0.02, np.median(fars)
    assert np.mean(fars) < 0.03


def test_tail_threshold_is_empirical_with_enough_images():
    s = np.arange(1000, dtype=float)
    t, method = tail_threshold(s, 0.01)
    assert method.startswith("empirical") and t == 990.0


def test_tail_threshold_refuses_no_scores():
    with pytest.raises(ValueError):
        tail_threshold([float("nan")], 0.01)


def test_cross_fitted_rate_is_out_of_sample():
    rng = np.random.default_rng(1)
    s = rng.normal(0, 1, 80)
    r = cross_fitted_false_alarm_rate(s, 0.05)
    assert 0.0 <= r < 0.2
    assert np.isnan(cross_fitted_false_alarm_rate(s[:3], 0.05))


def test_colour_patch_changes_colour_inside_its_mask_only():
    img = np.full((96, 96, 3), 0.5, np.float32)
    img[..., 0] = 0.6
    out, mask = colour_patch(img, random.Random(3))
    assert mask.any() and mask.mean() < 0.3
    diff = np.abs(out - img).sum(-1)
    assert diff[mask > 0].mean() > 0.05
    far = np.ones_like(mask, bool)
    import cv2

    far[cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0] = False  # soft edges: skip the blob's border
    assert diff[far].max() < 1e-6


def test_synthetic_defects_one_per_family_and_image():
    goods = [np.full((40, 50, 3), 100, np.uint8) for _ in range(3)]
    syn = synthetic_defects(goods, (32, 32))
    assert set(syn) == set(FAMILIES)
    assert all(len(v) == 3 and v[0].shape == (32, 32, 3) and v[0].dtype == np.uint8 for v in syn.values())


def test_choose_operating_point_on_a_detector_that_sees_brightness_changes():
    """A toy detector (score = largest deviation from the image's median grey) on textured good images:
    the chosen threshold passes most good parts, flags the synthetic defects and writes every field the
    serving contract reads back."""
    rng = np.random.default_rng(0)
    goods = [np.clip(120 + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(40)]

    def score(imgs):
        maps = [np.abs(im.astype(np.float32).mean(-1) - np.median(im)) for im in imgs]
        return np.array([float(m.max()) for m in maps]), np.stack(maps)

    op = choose_operating_point(score, goods, (64, 64), target_false_alarm_rate=0.05)
    g, _ = score(goods)
    assert np.mean(g > op["threshold"]) <= 0.1
    assert op["estimated_recall"] > 0.5 and set(op["estimated_recall_by_family"]) == set(FAMILIES)
    assert op["n_good"] == 40 and op["n_synthetic"] == 80
    served = operating_point_of({"threshold": 0.0, "operating_point": op})
    assert served.threshold == op["threshold"] and served.map_threshold == op["map_threshold"]
    assert served.normalised(op["threshold"]) == pytest.approx(0.5)
    assert served.normalised(op["good_median"]) == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError):
        choose_operating_point(score, goods, (64, 64), target_false_alarm_rate=0.7)


def test_box_is_around_the_core_that_drove_the_score_not_the_plateau():
    """A defect far above the map threshold, standing on a wide low plateau that also passes it: one region,
    one box, drawn around the peak's core (what an operator looks for), not the plateau."""
    from contracts.operating_point import anomaly_boxes, prepare_map

    a = np.zeros((224, 224), np.float32)
    a[40:200, 40:200] = 2.0  # a wide plateau just over the map threshold (1.0)
    a[100:120, 60:90] = 100.0  # the defect
    boxes = anomaly_boxes(prepare_map(a, (224, 224), 2.0, 0.0), 1.0, force=True)
    assert len(boxes) == 1
    b = boxes[0]
    x0, y0, x1, y1 = b["x"] * 224, b["y"] * 224, (b["x"] + b["w"]) * 224, (b["y"] + b["h"]) * 224
    assert abs(x0 - 60) <= 3 and abs(x1 - 90) <= 3 and abs(y0 - 100) <= 3 and abs(y1 - 120) <= 3
