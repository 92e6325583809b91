"""EfficientAD-specific export checks on real bottle images: tiny training with an official-layout PDN
teacher -> export -> the spec carries the teacher's ImageNet normalisation and the threshold, and the
exported artifact (loaded as Triton's model loads it) equals the eager module.

That Triton serves exactly what the exported artifact computes (plus manifest and spec round-trip) is
the detector contract, tests/integration/test_detector_contract.py, run for every registered detector;
together: Triton-served == eager EfficientAD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contracts.spec import normalise
from models.data import list_images, mvtec_category_dir
from models.efficientad.export import export_triton
from models.efficientad.fp16_gate import load_pixels
from models.efficientad.networks import pdn_small
from models.efficientad.train import TrainConfig, train_efficientad
from models.registry import get

pytestmark = pytest.mark.integration


def test_efficientad_export_matches_eager(shared_data, tmp_path):
    cat = mvtec_category_dir("bottle", shared_data)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher_small.pth"
    torch.save(pdn_small().state_dict(), teacher)  # official teacher_small.pth layout
    cfg = TrainConfig(steps=3, val_fraction=0.4, seed=0)
    model, meta = train_efficientad(list_images(cat / "train" / "good")[:5], cfg, teacher_weights=teacher)
    vdir = export_triton(model, tmp_path / "repo", "bottle", threshold=meta["threshold"],
                         map_threshold=meta["map_threshold"])
    det = get("efficientad")
    spec = det.spec(vdir)
    assert spec.threshold == pytest.approx(meta["threshold"]) and spec.raw["artifacts"]["model.pt"]
    assert spec.raw["artifacts"]["model.onnx"]
    # an official-layout teacher takes ImageNet-normalised inputs; the spec tells the worker so
    assert list(model.input_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(spec.input.mean) == pytest.approx(list(model.input_mean))

    test = cat / "test"
    paths = [sorted((test / "broken_large").glob("*.png"))[0], sorted((test / "good").glob("*.png"))[0]]
    px = load_pixels(paths, spec)  # one defective, one good image, UINT8 as the worker sends them
    assert px.dtype == np.uint8 and spec.input.dtype == "UINT8"
    with torch.no_grad():
        amap, score = model(torch.from_numpy(normalise(px, spec)))
    out = det.load_serving(vdir)(px)
    t_map, t_score = out["anomaly_map"], out["score"]
    assert t_map.dtype == np.float16 and t_map.shape[:2] == (2, 1) and t_score.shape == (2, 1)
    np.testing.assert_allclose(t_score[:, 0], score.numpy(), rtol=1e-4, atol=1e-5)
    # the native FP16 map, upsampled as the worker does for heat maps, is the eager full-resolution map
    up = F.interpolate(torch.from_numpy(t_map.astype(np.float32)), size=amap.shape[-2:], mode="bilinear",
                       align_corners=False)
    np.testing.assert_allclose(up.numpy(), amap.numpy(), rtol=2.0**-10, atol=1e-4)
