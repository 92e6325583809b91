"""Detection floors: each detector, trained with its shipped configuration on a few real good images for a
fixed small schedule (steps/epochs, never seconds: the result must not depend on the machine's speed),
scores real test images of two products above an image-AUROC floor. A change that breaks detection
(features, losses, scores, normalisation) fails here, not only in benchmarks/accuracy.py.

The floors sit well below what these schedules measured on the development VM (the measured values are in
each test's docstring) and well above chance (0.5), so noise from BLAS threading cannot flip them but a
detector that no longer detects cannot pass. MoLE-Flow learns bottle then cells continually in one model;
cells' first task must still score the same after the second is added (zero forgetting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import list_images, mvtec_samples
from models.evaluation import image_auroc
from tests.harness.cpu import cpu_threads

pytestmark = pytest.mark.slow

N_TRAIN = 24
N_TEST_CELLS = 40  # per class; bottle: its whole test set (20 good, 63 defective)


def _bottle(shared_data: Path):
    good = list_images(shared_data / "mvtec" / "bottle" / "train" / "good")[:N_TRAIN]
    samples = mvtec_samples(shared_data / "mvtec" / "bottle", "test")
    return good, [s.path for s in samples], [s.label for s in samples]


def _cells():
    from models.moleflow.datasets import elpv_split

    train, test = elpv_split(N_TRAIN, N_TEST_CELLS, N_TEST_CELLS)
    return list(train), [p for p, _ in test], [lab for _, lab in test]


@pytest.fixture(scope="module")
def products(shared_data):
    return {"bottle": _bottle(shared_data), "cells": _cells()}


def test_moleflow_floor_bottle_then_cells(products, shared_data):
    """MoLE-Flow defaults (Lite0 stages 1+2+3, grid 28), 3 epochs per task on 24 good images. Measured on the
    2-core AVX2 VM: bottle 0.999 (whole test set), cells 0.723 (40 good + 40 defective)."""
    from models.backbones import LITE0_WEIGHTS
    from models.moleflow.evaluate import TaskTestSet, evaluate_task
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.moleflow.train import TrainConfig, extract_features, train_task

    torch.manual_seed(0)
    torch.set_num_threads(cpu_threads())
    model = MoLEFlow(MoLEFlowConfig(), backbone_weights=shared_data / LITE0_WEIGHTS)
    aurocs, sets = {}, {}
    for task in ("bottle", "cells"):
        train, test, labels = products[task]
        train_task(model, task, train, TrainConfig(epochs=3, progress=False))
        pt, it = extract_features(model, test, progress=False)
        sets[task] = TaskTestSet(task, pt, it, labels, ["good" if y == 0 else "defect" for y in labels])
        aurocs[task] = evaluate_task(model, sets[task])["routed"]["overall"]["image_auroc"]
    again = evaluate_task(model, sets["bottle"])["routed"]["overall"]["image_auroc"]
    print("moleflow floor:", aurocs, "bottle after cells:", again)
    assert aurocs["bottle"] >= FLOORS["moleflow"]["bottle"], aurocs
    assert aurocs["cells"] >= FLOORS["moleflow"]["cells"], aurocs
    assert again == aurocs["bottle"]  # zero forgetting


@pytest.mark.parametrize(("product", "steps"), [("bottle", 40), ("cells", 20)])
def test_efficientad_floor(products, product, steps, shared_data):
    """EfficientAD-S with the CLI's default teacher (frozen Lite0 features), a few steps on 24 good images.
    Measured on the 2-core AVX2 VM: bottle 0.813 after 40 steps (whole test set), cells 0.800 after 20."""
    from models.backbones import LITE0_WEIGHTS
    from models.data import load_image, normalize
    from models.efficientad.cli import DEFAULT_TEACHER_KIND
    from models.efficientad.train import TrainConfig, predict, train_efficientad

    torch.manual_seed(0)
    torch.set_num_threads(cpu_threads())
    train, test, labels = products[product]
    cfg = TrainConfig(steps=steps, seed=0, teacher_kind=DEFAULT_TEACHER_KIND,
                      backbone_weights=str(shared_data / LITE0_WEIGHTS))
    model, _ = train_efficientad(train, cfg)
    scores = []
    for i in range(0, len(test), 8):
        x = torch.stack([normalize(load_image(q, cfg.image_size), model.input_mean, model.input_std)
                         for q in test[i:i + 8]])
        scores.append(predict(model, x)[1].numpy().reshape(-1))
    auroc = image_auroc(labels, np.concatenate(scores))
    print(f"efficientad floor {product}: {auroc:.3f}")
    assert auroc >= FLOORS["efficientad"][product], auroc


FLOORS = {"moleflow": {"bottle": 0.95, "cells": 0.62}, "efficientad": {"bottle": 0.7, "cells": 0.6}}
