"""`linewatch demo`, the README's main command, on a small slice: from an empty model repository it trains
the default detector's quick recipe (one step/epoch on 8 real bottle images), exports and calibrates it,
starts the embedded stack (Tansu + tritonserver), a worker and the console, streams 16 real bottle test
frames (good and defective mixed) and prints its summary. Every frame must come back scored by the
model it trained, with an operating point, and the summary must say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.detectors import DETECTORS, detector_info

pytestmark = pytest.mark.integration

LINEWATCH = str(Path(sys.executable).with_name("linewatch"))
FRAMES = 16


def test_linewatch_demo_on_a_small_slice(shared_data, tmp_path):
    work, repo = tmp_path / "demo", tmp_path / "triton_repo"
    env = {**os.environ, "LINEWATCH_DATA_DIR": str(shared_data), "LINEWATCH_DEMO_STEPS": "1",
           "LINEWATCH_STACK_WORKDIR": str(tmp_path / "stack")}
    r = subprocess.run([LINEWATCH, "demo", "--workdir", str(work), "--model-repository", str(repo),
                        "--limit", str(FRAMES), "--max-images", "8", "--fps", "20"],
                       env=env, capture_output=True, text=True, timeout=840)
    out = r.stdout + r.stderr[-4000:]
    assert r.returncode == 0, out
    summary = json.loads((work / "summary.json").read_text())
    info = detector_info(next(iter(DETECTORS)))  # the demo trains the first registered detector
    assert summary["model"] == info.model_name("bottle") and summary["train_s"] > 0, summary
    assert (summary["frames_in"], summary["results"], summary["dlq"]) == (FRAMES, FRAMES, 0), summary
    assert isinstance(summary["auroc"], float), summary  # computed: good and defective frames both streamed
    assert "=== linewatch demo summary ===" in r.stdout and f"frames in        : {FRAMES}" in r.stdout, out
    # the model it trained carries the operating point calibrated on the held-out good images
    spec = json.loads(next((repo / summary["model"]).glob("*/metadata.json")).read_text())
    op = (spec.get("tasks") or {}).get("bottle", spec).get("operating_point")
    assert op and op["target_false_alarm_rate"] > 0 and op["n_good"] >= 20, spec
    if summary["flagged"]:
        assert summary["grid_png"] and Path(summary["grid_png"]).is_file(), summary
