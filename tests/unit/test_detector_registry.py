"""The detector registry: every entry of contracts/detectors.py resolves to an implementation of
models.detector.Detector, its CLI group and demo recipe parse, and contracts/ stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from contracts.detectors import DETECTORS, detector_info
from models.cli import build_parser
from models.detector import Detector, Recipe, Scorer
from models.registry import all_detectors, get, names

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(DETECTORS))
def test_entry_resolves_and_satisfies_the_protocol(name, tmp_path):
    det = get(name)
    assert isinstance(det, Detector) and det.name == name and det.info is DETECTORS[name]
    for method in ("register_cli", "train", "export", "spec", "load_serving", "quick_recipe"):
        assert callable(getattr(det, method)), method
    # its CLI group is registered in linewatch-models
    group = build_parser()._subparsers._group_actions[0].choices[name]
    assert group.format_help()
    # the demo recipe is real linewatch-models argv that leaves the detector's model for the product
    good = tmp_path / "data" / "mvtec" / "bottle" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(10):
        cv2.imwrite(str(good / f"{i:03d}.png"), np.full((16, 16, 3), 10 * i, np.uint8))
    r = det.quick_recipe(data_dir=tmp_path / "data", product="bottle", workdir=tmp_path / "w",
                         repository=tmp_path / "repo", steps=3, max_images=8)
    assert isinstance(r, Recipe) and r.model == det.info.model_name("bottle") and len(r.steps) >= 2
    for argv in r.steps:
        args = build_parser().parse_args(list(argv))
        assert args.group in (name, "calibrate") and callable(args.func)
    assert r.steps[-1][0] == "calibrate"  # the demo's model gets an operating point too
    assert get(name) is det  # resolved once


def test_registry_lists_every_entry_in_order():
    assert names() == list(DETECTORS) and [d.name for d in all_detectors()] == list(DETECTORS)
    with pytest.raises(ValueError, match="unknown detector"):
        detector_info("nope")


def test_naming():
    per = [d for d in DETECTORS.values() if not d.multi_task]
    multi = [d for d in DETECTORS.values() if d.multi_task]
    for d in per:
        assert d.product_of(d.model_name("bottle")) == "bottle" and d.task_of("bottle") is None
        assert d.product_of("unrelated") is None
        with pytest.raises(ValueError):
            d.model_name(None)
    for d in multi:
        assert d.model_name("bottle") == d.model_name() and d.task_of("bottle") == "bottle"


def test_scorer_is_a_protocol():
    def f(x, tasks=None):
        return {}

    assert isinstance(f, Scorer)


def test_contracts_and_registry_resolution_import_no_torch():
    code = ("import sys, contracts.detectors, stream.inference.routing; assert 'torch' not in sys.modules; "
            "import models.registry as r; r.all_detectors(); assert 'torch' not in sys.modules, 'torch'")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
