"""The FP16 gate on a trained EfficientAD (GPU-serving issue, deliver 2): does serving in FP16 change decisions?

Trains EfficientAD-S on MVTec bottle train/good with the recipe onboarding ships (the training job's
held-out split and CPU budget), picks the threshold on the held-out good images the way a release does
(models/operating_point.tail_threshold at Settings.target_false_alarm_rate; never test labels), exports the serving graph to ONNX in FP32
and FP16, and scores the 83 bottle test images once with both (onnxruntime, models/efficientad/fp16_gate.py):
image AUROC change, threshold decisions that flip, max score and map differences.

    .venv/bin/python benchmarks/fp16_gate.py --seconds 600

Writes benchmarks/results/fp16_gate.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import bottle_test_dir, git_state, machine  # noqa: E402
from contracts.config import Settings  # noqa: E402
from contracts.logs import get_logger  # noqa: E402
from contracts.spec import parse_spec  # noqa: E402

log = get_logger("benchmarks.fp16_gate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=70_000)
    ap.add_argument("--seconds", type=float, default=None,
                    help="training wall budget (default: Settings.train_budget_cpu_s, what onboarding gives a CPU)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--select-every", type=int, default=0, help="CutPaste selection every N steps (0: as onboarding)")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of good training images kept out (min 20)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    s = Settings()
    test = bottle_test_dir(s.data_dir)
    if test is None:
        return 2
    from models.data import data_root, list_images, split_good
    from models.efficientad.export import build_spec
    from models.efficientad.fp16_gate import fp16_gate, load_pixels, score_session
    from models.efficientad.model import DEFAULT_TEACHER
    from models.efficientad.onnx_graph import ServingGraph, export_onnx, onnx_session
    from models.efficientad.train import TrainConfig, train_efficientad
    from models.operating_point import tail_threshold
    from models.precision import native_bf16

    torch.set_num_threads(2)
    good = list_images(test.parent / "train" / "good")
    fit, hold = split_good(good, a.holdout, seed=0)
    seconds = a.seconds if a.seconds is not None else float(s.train_budget_cpu_s)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=0, max_train_seconds=seconds, select_every=a.select_every,
                      amp_bf16=native_bf16(), penalty_dir=str(data_root(s) / "imagenet-sample"))
    t0 = time.time()
    model, meta = train_efficientad(fit, cfg, teacher_weights=DEFAULT_TEACHER)
    train_s = time.time() - t0
    spec = parse_spec(build_spec("efficientad_bottle", "bottle", 1, 0.0, 0.0, mean=model.input_mean,
                                 std=model.input_std, dtype="UINT8"))
    paths, labels = [], []
    for d in sorted(p for p in test.iterdir() if p.is_dir()):
        imgs = list_images(d)
        paths += imgs
        labels += [0 if d.name == "good" else 1] * len(imgs)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = onnx_session(export_onnx(ServingGraph(model, map_dtype=torch.float32), Path(tmp) / "fp32.onnx"))
        _, hold_scores = score_session(fp32, load_pixels(hold, spec))
        threshold, how = tail_threshold(hold_scores, s.target_false_alarm_rate)
        res = fp16_gate(model, load_pixels(paths, spec), labels, threshold, tmp,
                        threshold_source=f"released operating point ({how}) at target false-alarm rate "
                                         f"{s.target_false_alarm_rate} on {len(hold)} held-out good training images",
                        fp32_session=fp32)
    out = {"command": "benchmarks/fp16_gate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           **git_state(), "machine": machine(),
           "weights": f"EfficientAD-S trained here on bottle ({len(fit)} good images), generic teacher "
                      f"{DEFAULT_TEACHER.name}",
           "train": {"budget_s": seconds, "seconds": round(train_s, 1), "steps_done": meta["steps_done"],
                     "selected_step": meta["selected_step"], "selection": meta["selection"]},
           "gate": res.as_dict(), "gate_reasons": res.reasons(), "passed": not res.reasons()}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fp16_gate.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot(res, a.out / "fp16_gate.png")
    log.info("fp16_gate_done", auroc_fp32=res.auroc_fp32, auroc_fp16=res.auroc_fp16, flips=res.flips,
             passed=out["passed"], json=str(a.out / "fp16_gate.json"))
    return 0


def _plot(res, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s32, s16 = np.asarray(res.scores_fp32), np.asarray(res.scores_fp16)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(s32, s16, s=10)
    lim = [min(s32.min(), s16.min()), max(s32.max(), s16.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.axvline(res.threshold, color="r", lw=0.8)
    ax.axhline(res.threshold, color="r", lw=0.8)
    ax.set_xlabel("FP32 score")
    ax.set_ylabel("FP16 score")
    ax.set_title(f"bottle test: AUROC {res.auroc_fp32:.4f} -> {res.auroc_fp16:.4f}, {res.flips} flips")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
