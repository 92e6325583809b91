"""models.evaluation: hand-worked AUPRO, metric conventions, per-defect breakdown, writers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models import evaluation as ev


def _hand_case():
    # two regions: A = {(0,0),(0,1)} (area 2) and B = {(2,3)} (area 1); 9 defect-free pixels
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=np.uint8)
    amap = np.full((3, 4), 0.1)
    amap[0, 0], amap[0, 1], amap[2, 3] = 0.9, 0.5, 0.7  # region pixels
    amap[0, 2], amap[0, 3] = 0.8, 0.6  # two defect-free pixels score high
    return mask[None], amap[None]


def test_pro_curve_hand_case():
    masks, maps = _hand_case()
    fprs, pros = ev.pro_curve(masks, maps)
    # thresholds 0.9, 0.8, 0.7, 0.6, 0.5, 0.1 -> (fpr, pro) worked out by hand
    np.testing.assert_allclose(fprs, [0, 0, 1 / 9, 1 / 9, 2 / 9, 2 / 9, 1])
    np.testing.assert_allclose(pros, [0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0])


def test_aupro_hand_case():
    masks, maps = _hand_case()
    # area to FPR 0.3: 0.25*(1/9) + 0.75*(1/9) + 1.0*(0.3 - 2/9) = 0.3 - 1/9; normalised by 0.3
    assert ev.aupro(masks, maps, fpr_limit=0.3) == pytest.approx((0.3 - 1 / 9) / 0.3, abs=1e-12)
    # full integration: 0.25/9 + 0.75/9 + 7/9
    assert ev.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(8 / 9, abs=1e-12)


def test_aupro_perfect_and_8_connectivity():
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 2, 3] = 1  # diagonal neighbours: ONE region (8-connectivity)
    assert ev.aupro(mask, mask.astype(float)) == pytest.approx(1.0)
    amap = np.zeros((1, 8, 8))
    amap[0, 1, 1] = 1.0
    fprs, pros = ev.pro_curve(mask, amap)
    # one region of area 3 -> overlap 1/3 (with 4-connectivity it would be 2 regions -> 0.5)
    assert pros[1] == pytest.approx(1 / 3) and fprs[1] == 0.0


def test_image_metrics():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.5, 0.9]
    assert ev.image_auroc(labels, scores) == pytest.approx(5 / 6)
    f1, thr = ev.f1_max(labels, scores)
    # threshold 0.5 -> TP=2, FP=1, FN=0 -> F1=0.8 (best); threshold 0.9 -> F1=2/3
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.5)
    assert np.isnan(ev.image_auroc([0, 0], [0.1, 0.2]))


def test_pixel_metrics_perfect():
    masks, maps = _hand_case()
    perfect = masks.astype(float)
    assert ev.pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert ev.pixel_ap(masks, perfect) == pytest.approx(1.0)
    assert 0.5 < ev.pixel_auroc(masks, maps) < 1.0


def test_evaluate_per_defect_and_writers(tmp_path):
    rng = np.random.default_rng(0)
    types = ["good"] * 4 + ["crack"] * 3 + ["scratch"] * 3
    labels = [0 if t == "good" else 1 for t in types]
    masks = np.zeros((10, 16, 16), np.uint8)
    for i in range(4, 10):
        masks[i, 4:8, 4:8] = 1
    maps = rng.random((10, 16, 16)) * 0.1 + masks * 1.0
    scores = maps.reshape(10, -1).max(1)
    res = ev.evaluate(scores, labels, types, maps=maps, masks=masks, threshold=0.5)
    assert res["overall"]["image_auroc"] == pytest.approx(1.0)
    assert res["overall"]["aupro_30"] == pytest.approx(1.0)
    assert res["overall"]["accuracy_at_threshold"] == pytest.approx(1.0)
    assert set(res["per_defect"]) == {"crack", "scratch"}
    assert res["per_defect"]["crack"]["n_images"] == 7
    out = ev.write_results_json({"r": res, "nan": float("nan"), "np": np.float32(1.5)}, tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert data["nan"] is None and data["np"] == 1.5
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    png = ev.save_heatmap_overlay(img, maps[5], tmp_path / "o.png", mask=masks[5], title="x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
