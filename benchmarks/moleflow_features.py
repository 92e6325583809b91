"""Which frozen features keep what defects change: a no-training diagnostic for MoLE-Flow's patch maker.

For every product (bottle, cells, screw) and every variant of the patch maker (backbone stages, grid,
whitening, top-k), a diagonal Gaussian per grid position is fitted on the good training images' patch
features (no flow, no training) and scored on *held-out* good training images against their synthetic
defects (CutPaste and colour blobs, models/synthetic.py): image AUROC per family. No test image is read:
this chooses MoLE-Flow's feature defaults (models/moleflow/config.py); the flow itself is measured by
benchmarks/accuracy.py.

    .venv/bin/python benchmarks/moleflow_features.py [--products bottle cells screw] [--holdout 0.25]

Writes benchmarks/results/moleflow_features.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import WEIGHTS, _cpu_model, products  # noqa: E402
from benchmarks.common import git_state  # noqa: E402
from models.data import normalize, split_train_val  # noqa: E402
from models.evaluation import image_auroc, write_results_json  # noqa: E402

VARIANTS = {  # name -> (out_indices, grid)
    "stages2+3_grid14": ((2, 3), 14),
    "stages2+3_grid28": ((2, 3), 28),
    "stages1+2+3_grid28": ((1, 2, 3), 28),
}
WHITENING = ("layernorm", "task_stats")
TOPK_FRACTION = (0.0, 0.01, 0.05)  # 0: the single worst patch


def features(model, imgs: list[np.ndarray], norm) -> torch.Tensor:
    out = []
    for i in range(0, len(imgs), 16):
        x = torch.stack([normalize(im, *norm) for im in imgs[i:i + 16]])
        out.append(model.extract(x)[0])
    return torch.cat(out)  # [N, C, g, g]


def whiten(f: torch.Tensor, kind: str, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if kind == "layernorm":  # the seed's per-patch LayerNorm over channels
        return F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],)).permute(0, 3, 1, 2)
    mean, std = stats  # per-task channel statistics of the good training patches
    return (f - mean[None, :, None, None]) / std[None, :, None, None]


def gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    mu = train.mean(0)
    var = train.var(0) + 1e-3
    return 0.5 * (((test - mu) ** 2) / var + var.log()).sum(1)  # [N, g, g]


def topk_score(nll: torch.Tensor, frac: float) -> np.ndarray:
    k = max(1, int(round(frac * nll[0].numel())))
    return nll.flatten(1).topk(k, dim=1).values.mean(1).numpy()


def main(argv=None) -> int:
    from models.data import load_image
    from models.moleflow.model import MoLEFlow, MoLEFlowConfig
    from models.synthetic import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", nargs="+", default=["bottle", "cells", "screw"])
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--elpv-train", type=int, default=150)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import random

    t0 = time.time()
    rows: dict = {}
    for p in [q for q in products(args.elpv_train, 60) if q.name in args.products]:
        fit, hold = split_train_val(sorted(p.train), args.holdout, 0)
        rng = random.Random(1)
        fit_imgs = [load_image(q, 224) for q in fit]
        good = [load_image(q, 224) for q in hold]
        synth = {f: [fn(im, rng)[0] for im in good] for f, fn in FAMILIES.items()}
        for vname, (idx, grid) in VARIANTS.items():
            cfg = MoLEFlowConfig(out_indices=idx, grid=grid)
            model = MoLEFlow(cfg, backbone_weights=WEIGHTS).eval()
            norm = cfg.input_normalization()
            with torch.no_grad():
                ftr = features(model, fit_imgs, norm)
                fg = features(model, good, norm)
                fs = {f: features(model, ims, norm) for f, ims in synth.items()}
            chan = ftr.permute(1, 0, 2, 3).flatten(1)
            stats = (chan.mean(1), chan.std(1) + 1e-6)
            for wk, frac in itertools.product(WHITENING, TOPK_FRACTION):
                tr = whiten(ftr, wk, stats)
                sg = topk_score(gaussian_nll(tr, whiten(fg, wk, stats)), frac)
                res = {}
                for f, x in fs.items():
                    ss = topk_score(gaussian_nll(tr, whiten(x, wk, stats)), frac)
                    res[f] = image_auroc([0] * len(sg) + [1] * len(ss), np.r_[sg, ss])
                res["mean"] = float(np.mean(list(res.values())))
                key = f"{vname}|{wk}|top{frac:g}"
                rows.setdefault(key, {})[p.name] = res
                print(f"{p.name} {key}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    summary = {k: float(np.mean([v["mean"] for v in per.values()])) for k, per in rows.items()}
    best = max(summary, key=summary.get)
    st = git_state()
    result = {"commit": st["commit"], "dirty": st["dirty"],
              "command": " ".join(["benchmarks/moleflow_features.py", *(argv or sys.argv[1:])]),
              "machine": {"cpu": _cpu_model(), "threads": 1}, "weights": str(WEIGHTS),
              "method": "diagonal Gaussian per grid position on frozen features; held-out good vs synthetic "
                        "defects (CutPaste, colour blobs) of the same images; no test image read",
              "variants": rows, "mean_synthetic_auroc": summary, "best": best,
              "wall_seconds": round(time.time() - t0, 1)}
    out = Path(args.out_dir) / "moleflow_features.json"
    write_results_json(result, out)
    _plot(summary, out.with_suffix(".png"))
    print(json.dumps({"best": best, "mean": summary[best]}), f"-> {out}")
    return 0


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(summary, key=summary.get)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(keys) + 1))
    ax.barh(range(len(keys)), [summary[k] for k in keys])
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("mean synthetic-defect AUROC (held-out, 3 products)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
