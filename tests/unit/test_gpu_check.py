"""benchmarks/gpu_check.py end to end on the CPU (--tiny, real bottle + imagenet-sample images), and its
one-line exit 2 when CUDA is asked for on a machine without it.

A tiny CPU run measures nothing (narrowed random models, 2 iterations, no GPU): the test checks that every
section is written, finite and consistent with itself, not that any target passes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(args: list[str], data_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "LINEWATCH_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _numbers(obj, path=""):
    """Every int/float in a JSON document with its path (bools excluded)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, obj


def _latency_rows(doc: dict):
    for label, precs in doc["efficientad"]["models"].items():
        for prec, rows in precs.items():
            for b, r in rows.items():
                yield f"{label}/{prec}/b{b}", int(b), r
    for mode, rows in doc["moleflow"]["latency"].items():
        for b, r in rows.items():
            yield f"moleflow/{mode}/b{b}", int(b), r


def test_tiny_cpu_run_writes_every_section(shared_data, tmp_path):
    # --tiny takes ~20 s on one slow core; the timeout is only an upper bound
    p = _run(["--device", "cpu", "--tiny", "--out", str(tmp_path)], shared_data, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    events = [json.loads(line)["event"] for line in p.stderr.splitlines() if line.startswith("{")]
    assert {"gpu_check_start", "efficientad_latency", "moleflow_latency", "gpu_check_done"} <= set(events)
    doc = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    png = tmp_path / "gpu_check_cpu.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    env = doc["environment"]
    for k in ("driver_version", "gpu_name", "torch", "torch_cuda", "cudnn", "device", "commit", "dirty", "machine"):
        assert k in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["commit"] and env["machine"]
    assert isinstance(env["dirty"], bool)  # run from the checkout: git can tell
    for path, v in _numbers(doc):
        assert math.isfinite(v), path

    ead = doc["efficientad"]
    assert set(ead["models"]) == {"EfficientAD-S", "EfficientAD-M"}
    assert "random init" in ead["weights"] and "bfloat16" in ead["half_mode"]
    for label in ead["models"]:
        assert set(ead["models"][label]) == {"fp32", "half"}
        assert set(ead["models"][label]["fp32"]) == {"1"}
    rows = list(_latency_rows(doc))
    assert {b for name, b, _ in rows if name.startswith("moleflow")} == {1, 8}
    for name, b, r in rows:
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"], name
        assert r["images_per_s"] > 0 and r["iters"] >= 1 and r["timer"] == "perf_counter", name
        assert r["ms_per_image_p50"] == pytest.approx(r["p50_ms"] / b), name

    # no second device on cpu: the agreement rows compare two CPU implementations (oneDNN off vs on), say so,
    # and two fp32 implementations of one model agree to float rounding (relative to the map's magnitude)
    for label, d in ead["gpu_vs_cpu"].items():
        assert d["comparison"] == "cpu-without-onednn-vs-cpu" and d["images"] >= 1, label
        assert d["map_max_abs_value"] > 0 and d["score_max_abs_value"] > 0, label  # fitted: maps not all zero
        assert 0 <= d["map_max_abs_diff"] <= 1e-4 * d["map_max_abs_value"], label
        assert 0 <= d["score_max_abs_diff"] <= 1e-4 * d["map_max_abs_value"], label  # a score is a map value
    mole = doc["moleflow"]
    assert set(mole["tasks"]) == {"bottle", "imagenet"}
    agree = mole["gpu_vs_cpu"]
    assert agree["comparison"] == "cpu-without-onednn-vs-cpu" and agree["images"] >= 2
    assert 0.0 <= agree["routing_agreement"] <= 1.0 and 0.0 <= agree["routing_correct_cpu"] <= 1.0
    if agree["routing_agreement"] > 0:  # the map diff is over the images both paths routed alike
        assert 0 <= agree["map_max_abs_diff"] <= 1e-4 * agree["map_max_abs_value"]
        assert agree["score_max_abs_diff"] >= 0
    else:
        assert agree["map_max_abs_diff"] is None and agree["score_max_abs_diff"] is None

    assert doc["peak_gpu_memory_bytes"] is None and mole["peak_gpu_memory_bytes"] is None
    # targets: each row's value is the figure it names and its verdict is that value against the target
    # (whether a tiny CPU run passes says nothing, so it is not asserted)
    tg = doc["targets"]
    worst = max(max(d["map_max_abs_diff"], d["score_max_abs_diff"]) for d in ead["gpu_vs_cpu"].values())
    values = {"efficientad_s_b1_half_p50_ms": (ead["models"]["EfficientAD-S"]["half"]["1"]["p50_ms"], 1),
              "moleflow_routed_b8_ms_per_image": (mole["latency"]["routed"]["8"]["ms_per_image_p50"], 1),
              "efficientad_fp32_max_abs_diff": (worst, 1),
              "moleflow_fp32_map_max_abs_diff": (agree["map_max_abs_diff"], 1),
              "moleflow_routing_identical": (agree["routing_agreement"], -1)}  # -1: passes at value >= target
    for k, (value, sign) in values.items():
        row = tg[k]
        assert row["device"] == "cpu" and row["value"] == value and row["target"] > 0, k
        assert row["pass"] == (None if value is None else sign * (value - row["target"]) <= 0), k
    assert "not GPU" in tg["note"] and "--tiny" in tg["note"]
    assert "narrower" in doc["tiny_reductions"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_exit_2(shared_data, tmp_path):
    p = _run(["--device", "cuda", "--tiny", "--out", str(tmp_path)], shared_data, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks/gpu_check.py: error: ") and "cuda" in lines[0]
    assert not any(tmp_path.iterdir())


def test_bad_argument_is_one_line_exit_2(shared_data, tmp_path):
    p = _run(["--device", "tpu", "--out", str(tmp_path)], shared_data, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
