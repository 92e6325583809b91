"""MoLE-Flow evaluation: per-task metrics (routed and oracle task id), routing accuracy, the continual
accuracy matrix R[i][j] (metric on task j after training task i), forgetting and BWT.

Uses the shared metrics of :mod:`models.evaluation`. Forgetting_j = max_{i<T-1} R[i][j] - R[T-1][j];
BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.evaluation import evaluate
from models.moleflow.model import MoLEFlow


@dataclass
class TaskTestSet:
    task: str
    patch: torch.Tensor  # backbone patch features [N, C, H, W]
    image: torch.Tensor  # router features [N, C]
    labels: list[int]
    defect_types: list[str]
    masks: np.ndarray | None = None  # [N, S, S] at the model input size, None = image-level only
    paths: list[str] = field(default_factory=list)


@torch.no_grad()
def predict_set(model: MoLEFlow, ts: TaskTestSet, oracle: bool, batch_size: int = 32) -> dict:
    maps, scores, tasks, dists = [], [], [], []
    for s in range(0, len(ts.labels), batch_size):
        p, im = ts.patch[s:s + batch_size], ts.image[s:s + batch_size]
        out = model.predict_features(p, im, [ts.task] * len(p) if oracle else None, size=model.cfg.image_size)
        maps.append(out["anomaly_map"][:, 0].numpy() if ts.masks is not None else None)
        scores.append(out["score"].numpy())
        tasks += out["task"]
        dists.append(out["route_distance"].numpy())
    return {"scores": np.concatenate(scores), "maps": np.concatenate(maps) if ts.masks is not None else None,
            "tasks": tasks, "route_distance": np.concatenate(dists)}


def evaluate_task(model: MoLEFlow, ts: TaskTestSet) -> dict:
    """Routed metrics (task-agnostic, the deployed mode), oracle metrics (true task id) and routing accuracy."""
    routed = predict_set(model, ts, oracle=False)
    routing_acc = float(np.mean([t == ts.task for t in routed["tasks"]]))
    if routing_acc == 1.0:
        oracle = routed
    else:
        oracle = predict_set(model, ts, oracle=True)
    res_r = evaluate(routed["scores"], ts.labels, ts.defect_types, maps=routed["maps"], masks=ts.masks,
                     threshold=None)
    res_o = evaluate(oracle["scores"], ts.labels, ts.defect_types, maps=oracle["maps"], masks=ts.masks)
    gap = res_o["overall"]["image_auroc"] - res_r["overall"]["image_auroc"]
    return {"task": ts.task, "n_images": len(ts.labels), "routing_accuracy": routing_acc,
            "routed": res_r, "oracle": res_o, "oracle_minus_routed_image_auroc": gap,
            "routed_to": {t: int(sum(1 for x in routed["tasks"] if x == t)) for t in model.tasks},
            "_scores_routed": routed["scores"]}


def forgetting_bwt(matrix: list[list[float]]) -> dict:
    """``matrix[i][j]`` = metric on evaluated task j after training step i (nan before j was learned)."""
    R = np.asarray(matrix, dtype=np.float64)
    T = R.shape[0]
    forg, bwt = [], []
    for j in range(R.shape[1]):
        rows = [i for i in range(T) if not math.isnan(R[i, j])]
        if not rows or rows[0] == T - 1 or math.isnan(R[T - 1, j]):
            continue
        first = rows[0]
        forg.append(float(max(R[first:T - 1, j]) - R[T - 1, j]))
        bwt.append(float(R[T - 1, j] - R[first, j]))
    return {"forgetting_per_task": forg, "forgetting": float(np.mean(forg)) if forg else 0.0,
            "max_forgetting": float(np.max(forg)) if forg else 0.0, "bwt": float(np.mean(bwt)) if bwt else 0.0}


def save_matrix_png(matrix: list[list[float]], tasks: list[str], path: str | Path, title: str = "image AUROC") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(tasks), 1.4 + 1.1 * len(tasks)))
    im = ax.imshow(np.ma.masked_invalid(R), vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not math.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", color="w" if R[i, j] < 0.8 else "k")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def strip_private(d):
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [strip_private(v) for v in d]
    return d
