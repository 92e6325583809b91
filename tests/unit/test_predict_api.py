"""The Python API (issue #27 item 6): ``Detector.load(path).predict(image)`` on a real tiny exported model.

A tiny MoLE-Flow (two tasks, the unit tests' TINY configuration) is trained on synthetic images, exported
(models.moleflow.export) and calibrated by the ``linewatch-models calibrate`` verb for one task, as the
training job does. The API must give the score the serving scorer (``Detector.load_serving``, the code
Triton runs) gives for the same image, and the decision, map and boxes the worker derives from the
version's operating point (per task; routed when no task is named)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from contracts.config import Settings
from contracts.operating_point import anomaly_boxes, operating_point_of, prepare_map
from contracts.spec import InputSpec, to_tensor
from models import Detector, Prediction
from models.backbones import backbone_normalization
from models.moleflow.model import MoLEFlow, MoLEFlowConfig
from models.moleflow.store import save_model
from models.moleflow.train import TrainConfig, train_task
from models.registry import get

TINY = dict(grid=14, dim=16, subnet_hidden=16, lora_rank=4, lora_alpha=4.0, coupling_layers=2, dia_blocks=2, image_size=64)


def _images(rng: np.random.Generator, n: int, base: int, shape=(72, 80)) -> list[np.ndarray]:
    """Textured BGR uint8 images around grey level ``base`` (not the model's input size: predict resizes)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    stripes = (20 * np.sin(xx / 3.0) + 10 * np.cos(yy / 5.0))[..., None]
    return [np.clip(base + stripes + rng.normal(0, 6, (*shape, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def _defect(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    cv2.rectangle(out, (30, 20), (55, 45), (255, 0, 255), -1)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = MoLEFlow(MoLEFlowConfig(**TINY))
    mean, std = backbone_normalization(model.cfg.backbone)
    inp = InputSpec(height=64, width=64, color="RGB", dtype="FP32", mean=tuple(mean), std=tuple(std))
    cfg = TrainConfig(epochs=2, batch_size=4, progress=False)
    for task, base in (("a", 90), ("b", 170)):
        x = torch.from_numpy(np.stack([to_tensor(im, inp) for im in _images(rng, 8, base)]))
        train_task(model, task, x, cfg)
    save_model(model, tmp / "store")
    from models.moleflow.export import export_triton

    vdir = export_triton(tmp / "store", tmp / "repo", "moleflow")
    good = tmp / "good_a"
    good.mkdir()
    for i, im in enumerate(_images(rng, 10, 90)):
        cv2.imwrite(str(good / f"{i:02d}.png"), im)
    from models.cli import run

    assert run(["calibrate", "--version-dir", str(vdir.parent), "--good-dir", str(good), "--task", "a",
                "--target-false-alarm-rate", "0.05"], Settings()) == 0
    return vdir, rng


def test_predict_is_what_the_service_scores_and_decides(exported):
    vdir, rng = exported
    det = Detector.load(vdir.parent)  # a model dir: its newest version
    assert det.path == vdir and det.tasks == ("a", "b")
    op = det.operating_point("a")
    assert op == operating_point_of(det.spec.raw, "a") and op.target_false_alarm_rate == 0.05  # calibrated
    scorer = get("moleflow").load_serving(vdir)  # what Triton's model.py runs
    images = _images(rng, 4, 90) + [_defect(im) for im in _images(rng, 4, 90)] + [rng.integers(0, 256, (50, 60, 3), np.uint8)]
    preds = det.predict_batch(images, ["a"] * len(images))
    served = scorer(np.stack([to_tensor(im, det.spec) for im in images]), ["a"] * len(images))
    assert {p.is_anomaly for p in preds} == {True, False}, [(p.score, op.threshold) for p in preds]
    for j, (im, p) in enumerate(zip(images, preds, strict=True)):
        assert p.score == float(served["score"][j, 0]) and p.task == "a"
        assert p.is_anomaly == (p.score > op.threshold) and p.threshold == op.threshold
        assert p.normalised_score == op.normalised(p.score) and (p.normalised_score > 0.5) == p.is_anomaly
        prepared = prepare_map(served["anomaly_map"][j], (64, 64), op.map_sigma, op.map_border)
        assert p.boxes == (anomaly_boxes(prepared, op.box_threshold(), force=True) if p.is_anomaly else [])
        assert bool(p.boxes) == p.is_anomaly
        assert all(0 <= b["x"] <= 1 and 0 <= b["y"] <= 1 and 0 < b["w"] <= 1 and 0 < b["h"] <= 1 for b in p.boxes)
        assert p.anomaly_map.shape == im.shape[:2] and p.anomaly_map.dtype == np.float32
        score, is_anomaly, amap, boxes = p  # the 4-tuple an anomalib user unpacks
        assert (score, is_anomaly, boxes) == (p.score, p.is_anomaly, p.boxes) and amap is p.anomaly_map
    single = det.predict(images[0], task="a")
    assert isinstance(single, Prediction) and single.score == preds[0].score


def test_routed_prediction_uses_the_chosen_tasks_operating_point(exported):
    vdir, rng = exported
    det = Detector.load(vdir)
    scorer = get("moleflow").load_serving(vdir)
    images = _images(rng, 3, 90) + _images(rng, 3, 170)
    preds = det.predict_batch(images)  # no task: the prototype router chooses
    served = scorer(np.stack([to_tensor(im, det.spec) for im in images]), None)
    one = det.predict(images[-1])  # alone: the same up to float batching
    assert one.task == preds[-1].task and one.score == pytest.approx(preds[-1].score, rel=1e-4, abs=1e-5)
    for j, p in enumerate(preds):
        chosen = served["task"][j, 0].decode()
        assert p.task == chosen and p.score == float(served["score"][j, 0])
        assert p.route_distance == float(served["route_distance"][j, 0])
        assert p.operating_point == operating_point_of(det.spec.raw, chosen)
        assert p.is_anomaly == (p.score > p.operating_point.threshold)
    assert {p.task for p in preds} == {"a", "b"}  # the two textures route to their own tasks


def test_bad_input_is_refused_with_a_clear_error(exported):
    vdir, _ = exported
    det = Detector.load(vdir)
    ok = np.zeros((32, 32, 3), np.uint8)
    for bad in (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 4), np.uint8),
                [[0, 0, 0]]):
        with pytest.raises(ValueError, match="HxWx3 uint8 BGR"):
            det.predict(bad)
    with pytest.raises(ValueError, match="not a task of moleflow.*a, b"):
        det.predict(ok, task="zzz")
    with pytest.raises(ValueError, match="2 tasks for 1 images"):
        det.predict_batch([ok], ["a", "b"])
    with pytest.raises(ValueError, match="neither a version dir"):
        Detector.load(vdir / "adapters")
