"""Continual training of MoLE-Flow tasks from good images only (MoLE-Flow paper, Method §3.1.2 training strategy).

Task 0 trains the base (projection, scale context, SCM conv, coupling subnets incl. base Linears) and
its own adapter; task t >= 1 trains ONLY its adapter (LoRA_t, WA_t, SCM gate_t, DIA_t); the base and
other tasks are frozen and checked bit-identical after training. Backbone features are computed once
per image (frozen backbone, no augmentation), so an epoch costs only the flow.

Loss in the MoLE-Flow paper's units (eq. 22, per-patch NLL in nats):
  L = (1 - lambda_tail) mean(NLL) + lambda_tail mean(top-k% NLL)      tail-aware loss
      + lambda_logdet * mean(log|det J|^2)                            log-det regulariser (1e-4)
      + lambda_id * (mean((gamma_t - 1)^2) + mean(beta_t^2))          identity regulariser, t >= 1 (0.1)
and the whole sum is divided by D once, so the optimiser sees per-dimension magnitudes while every
term keeps the paper's relative strength.

Device (``train_task(..., device=)``, models.precision.train_device): backbone, flow, features and every
batch on it; the model ends on the CPU (the store saves CPU tensors). Unlike EfficientAD, MoLE-Flow
trains in FP32 on every device (no autocast): the flow's exp/log-det are precision-critical (serving
keeps the flow FP32 too), and the frozen backbone runs once per image, so bf16 there would save little
and fit the flow to other features than the FP32 serving backbone computes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from contracts.logs import get_logger
from models.moleflow.model import MoLEFlow, count_parameters
from models.precision import log_train_device, model_device

log = get_logger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 60  # MoLE-Flow paper, best ablation setting
    lr: float = 2e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    tail_weight: float = 0.5  # TopK5-TailW0.5 (MoLE-Flow paper, tail-loss ablation)
    tail_top: float = 0.05
    logdet_reg: float = 1e-4
    identity_reg: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.1  # held-out good images for the per-task threshold
    threshold_quantile: float = 0.99
    map_threshold_quantile: float = 0.999
    max_images: int | None = None
    seed: int = 0
    progress: bool = True
    time_budget_s: float | None = None  # shrink the epoch count (and cosine T_max) to fit this budget


def make_optimizer(params, lr: float, weight_decay: float):
    """AdamW, always: the optimiser must not change with what happens to be installed (the paper's AdamP is
    not a dependency; a run is reproducible from the lock of the [models] extra)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def load_images(paths: Sequence[str | Path], size: int, mean=None, std=None) -> torch.Tensor:
    """Images normalised with (mean, std); default: the default backbone's (tf_efficientnet_lite0)."""
    from models.data import DEFAULT_MEAN, DEFAULT_STD, load_image, normalize

    mean, std = mean or DEFAULT_MEAN, std or DEFAULT_STD
    return torch.stack([normalize(load_image(p, size), mean, std) for p in paths])


@torch.no_grad()
def extract_features(model: MoLEFlow, images, batch_size: int = 16, progress: bool = True, desc: str = "features"):
    """Backbone features for a tensor [N,3,S,S] or a list of paths (loaded in chunks), on the model's device."""
    dev = model_device(model)
    n = len(images)
    patches, globs = [], []
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = images[s:s + batch_size]
        x = chunk if isinstance(chunk, torch.Tensor) else load_images(chunk, model.cfg.image_size,
                                                                       *model.cfg.input_normalization())
        p, g = model.extract(x.to(dev))
        patches.append(p)
        globs.append(g)
    return torch.cat(patches), torch.cat(globs)


def tail_aware_loss(nll: torch.Tensor, ld: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Paper eq. 22 plus the log-det regulariser, in nats per patch (not yet divided by D)."""
    per = nll.flatten(1)  # [B, HW]
    k = max(1, math.ceil(cfg.tail_top * per.shape[1]))
    tail = per.topk(k, dim=1).values.mean()
    loss = (1 - cfg.tail_weight) * per.mean() + cfg.tail_weight * tail
    if cfg.logdet_reg:
        loss = loss + cfg.logdet_reg * (ld**2).mean()
    return loss


def identity_loss(model: MoLEFlow, task: str) -> torch.Tensor:
    """Keeps a later task's whitening adapter near the identity: mean((gamma-1)^2) + mean(beta^2)."""
    gamma = 0.5 + 1.5 * torch.sigmoid(model.wa_gamma[task])
    beta = 2.0 * torch.tanh(model.wa_beta[task])
    return ((gamma - 1) ** 2).mean() + (beta**2).mean()


def _snapshot(model: MoLEFlow, exclude_task: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if model._task_of_key(k) != exclude_task}


@torch.no_grad()
def patch_nll_batched(model: MoLEFlow, patch: torch.Tensor, task: str, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([model.patch_nll(patch[s:s + batch_size], task)[0] for s in range(0, len(patch), batch_size)])


def train_task(model: MoLEFlow, task: str, images, cfg: TrainConfig | None = None, features=None,
               calibration_images=None, device: torch.device | str | None = None) -> dict:
    """Add ``task`` and train it on good ``images`` (paths or [N,3,S,S] tensor). Returns metadata.

    ``features``: precomputed (patch, image) backbone features (skips extraction).
    ``calibration_images``: held-out good images (e.g. a training job's split) that set the task's
    thresholds; then every training image trains and none is split off for validation.
    ``device``: where training runs (None: where the model is); the model ends on the CPU."""
    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    device = model_device(model) if device is None else torch.device(device)
    model.to(device)
    log_train_device(log, device, {"enabled": False}, job="moleflow_train_task", task=task)  # FP32
    if features is None:
        if cfg.max_images is not None:
            images = images[: cfg.max_images]
        if len(images) < 2:
            raise ValueError(f"task {task!r}: need at least 2 good images, got {len(images)}")
        patch, image = extract_features(model, images, progress=cfg.progress, desc=f"{task}: features")
    else:
        patch, image = features[0].to(device), features[1].to(device)
    t_feat = time.perf_counter() - t0
    n = len(patch)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=g)
    n_val = int(round(n * cfg.val_fraction)) if n >= 10 and calibration_images is None else 0
    val_idx, tr_idx = order[:n_val], order[n_val:]

    first = not model.tasks
    model.add_task(task)
    model.set_prototype(task, image)  # router: all good images of the task
    model.to(device)  # the new task's adapter and prototype are created on the CPU
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.task_parameters(task) + (model.base_parameters() if first else [])
    for p in params:
        p.requires_grad_(True)
    frozen_before = None if first else _snapshot(model, task)
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs))  # MoLE-Flow paper: cosine
    model.train()
    D = model.cfg.dim
    t0_task = model.tasks[0]
    losses = []
    epochs = max(1, cfg.epochs)
    bar = tqdm(total=epochs, desc=f"{task}: train", disable=not cfg.progress, unit="ep")
    t_train0 = time.perf_counter()
    epoch = 0
    while epoch < epochs:
        perm = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        tot, cnt = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            nll, ld = model.patch_nll(patch[idx.to(device)], task)
            loss = tail_aware_loss(nll, ld, cfg)
            if not first and cfg.identity_reg:
                loss = loss + cfg.identity_reg * identity_loss(model, task)
            loss = loss / D
            if not torch.isfinite(loss):
                raise FloatingPointError(f"task {task!r}: non-finite loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            tot += loss.item() * len(idx)
            cnt += len(idx)
        sched.step()
        losses.append(tot / max(cnt, 1))
        epoch += 1
        if epoch == 1 and cfg.time_budget_s:
            per_epoch = time.perf_counter() - t_train0
            fit = max(1, int(cfg.time_budget_s // max(per_epoch, 1e-6)))
            if fit < epochs:
                epochs = fit
                sched.T_max = epochs
                bar.total = epochs
                log.info("moleflow_epochs_reduced", task=task, epochs=epochs, per_epoch_s=round(per_epoch, 2))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    for p in params:
        p.requires_grad_(False)
    if frozen_before is not None:  # parameter isolation: nothing outside task's adapter may change
        after = _snapshot(model, task)
        changed = [k for k in frozen_before if not torch.equal(frozen_before[k], after[k])]
        if changed:
            raise RuntimeError(f"training task {task!r} changed frozen tensors: {changed[:3]}")
    # per-task operating point from held-out good images (training images when too few)
    if calibration_images is not None and len(calibration_images):
        cal_patch, _ = extract_features(model, calibration_images, progress=cfg.progress, desc=f"{task}: calibration")
        source = "calibration"
    else:
        cal_patch, source = patch[(val_idx if n_val > 0 else tr_idx).to(device)], ("val" if n_val else "train")
    nll = patch_nll_batched(model, cal_patch, task)
    scores = model.image_score(nll).cpu().numpy()
    thr = float(np.quantile(scores, cfg.threshold_quantile))
    up = model.upsample(nll).cpu().numpy()
    mthr = float(np.quantile(up, cfg.map_threshold_quantile))
    model.thresholds[task] = {"threshold": thr, "map_threshold": mthr,
                              "score_stats": {"mean": float(scores.mean()), "std": float(scores.std()),
                                              "n": int(len(scores)), "source": source}}
    rd = model.route_distances(image, [task])[:, 0].cpu().numpy()
    model.cpu()
    meta = {
        "task": task, "index": model.tasks.index(task), "first_task": first, "base_task": t0_task,
        "n_images": n, "n_train": int(len(tr_idx)), "n_val": int(n_val), "epochs": epoch,
        "final_loss": losses[-1] if losses else None, "losses": losses,
        "trainable_parameters": count_parameters(params),
        "adapter_parameters": count_parameters(model.task_parameters(task)),
        "route_distance_q99": float(np.quantile(rd, 0.99)),
        "feature_seconds": round(t_feat, 2), "train_seconds": round(time.perf_counter() - t0 - t_feat, 2),
        "train_config": asdict(cfg), "device": str(device),
        **model.thresholds[task],
    }
    log.info("moleflow_task_trained", task=task, epochs=epoch, n=n, loss=meta["final_loss"],
             threshold=thr, seconds=meta["train_seconds"])
    return meta
