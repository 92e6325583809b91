"""EfficientAD training (paper Alg. 1 of the supplement; official hyper-parameters).

Teacher frozen; its normalised outputs for every training image (clean + ``aug_variants`` AE
augmentations) are computed once and cached (fp16), so each step only runs student + autoencoder.
Loss per step (batch size 1 as in the paper):
  L_hard  = mean of D_ST entries >= their 0.999-quantile                     (§3.2, hard feature loss)
  L_pen   = mean(S(P)[:384]^2) for an image P of the penalty folder (optional, §3.2 pretraining penalty)
  L_AE    = mean((T(I') - A(I'))^2),  L_STAE = mean((A(I') - S(I')[384:])^2)  (§3.3, I' augmented)
  L = L_hard + L_pen + L_AE + L_STAE
Adam lr 1e-4, weight decay 1e-5, LR x0.1 after 95% of the steps (§4.1 / supp.).
Afterwards: quantiles q_a=0.9, q_b=0.995 of M_ST and M_AE over a held-out split of the good train
images (§3.4), and the decision threshold from the held-out good images (or F1-optimal when
anomalous validation images are given).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.data import ImageFolderDataset, list_images, load_image, normalize, split_train_val
from models.efficientad.model import EfficientAD, load_teacher_weights
from stream.logs import get_logger

log = get_logger(__name__)


@dataclass
class TrainConfig:
    model_size: str = "small"
    steps: int = 70_000  # paper: 70,000 iterations
    lr: float = 1e-4
    weight_decay: float = 1e-5
    hard_q: float = 0.999  # p_hard (Table 3 default)
    q_a: float = 0.9
    q_b: float = 0.995
    val_fraction: float = 0.1  # held-out good train images for map normalisation + threshold
    aug_variants: int = 2  # cached AE-augmented copies per training image
    penalty_dir: str | None = None  # image folder for the pretraining penalty (paper: ImageNet)
    threshold_quantile: float = 1.0  # quantile of held-out good image scores used as the threshold
    map_threshold_quantile: float = 0.999  # pixel quantile of held-out good maps
    seed: int = 0
    image_size: int = 256
    max_train_images: int | None = None  # cap (tests / CPU benchmarks)
    max_train_seconds: float | None = None  # wall-clock budget for the step loop (CPU benchmarks);
    # with a budget the x0.1 LR drop happens at 95% of the steps OR 95% of the budget, whichever first
    amp_bf16: bool = False  # bf16 autocast for the teacher cache and the student/AE passes of the
    # step loop (CPU speed-up, cache stored fp16 anyway); map quantiles and inference stay fp32
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hard_feature_loss(t: torch.Tensor, s: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """§3.2: d_hard = q-quantile of D = (T - S)^2; loss = mean of the D entries >= d_hard."""
    d = (t - s) ** 2
    d_hard = torch.quantile(d.detach().flatten().float(), q) if d.numel() <= 16_000_000 else _big_quantile(d, q)
    return torch.mean(d[d >= d_hard])


def _big_quantile(d: torch.Tensor, q: float) -> torch.Tensor:
    flat = d.detach().flatten()
    k = max(1, int(round((1 - q) * flat.numel())))
    return torch.topk(flat, k).values.min()


def ae_augment(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Supp. §1.1: one of brightness / contrast / saturation jitter with factor in [0.8, 1.2]."""
    f = rng.uniform(0.8, 1.2)
    kind = rng.randrange(3)
    if kind == 0:  # brightness
        out = img * f
    elif kind == 1:  # contrast: blend with the mean grey level
        grey = (img @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
        out = (img - grey) * f + grey
    else:  # saturation: blend with the grey image
        grey = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        out = (img - grey) * f + grey
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@torch.no_grad()
def _teacher_outputs(model: EfficientAD, images: torch.Tensor, desc: str, batch: int = 4, amp_bf16: bool = False) -> torch.Tensor:
    outs = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp_bf16):
            outs.append(model.teacher(images[i : i + batch]).float())
    return torch.cat(outs)


@torch.no_grad()
def compute_teacher_normalization(model: EfficientAD, raw: torch.Tensor) -> None:
    """Per-channel mean/std of teacher outputs over the training images (Alg. 1)."""
    mean = raw.float().mean(dim=(0, 2, 3), keepdim=True)[:1]
    var = ((raw.float() - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    model.teacher_mean.copy_(mean.reshape(model.teacher_mean.shape))
    model.teacher_std.copy_(var.sqrt().clamp_min(1e-6).reshape(model.teacher_std.shape))


@torch.no_grad()
def compute_map_quantiles(model: EfficientAD, images: torch.Tensor, q_a: float, q_b: float, batch: int = 4):
    model.eval()
    sts, aes = [], []
    for i in range(0, len(images), batch):
        m_st, m_ae = model.raw_maps(images[i : i + batch])
        sts.append(m_st.flatten())
        aes.append(m_ae.flatten())
    st, ae = torch.cat(sts), torch.cat(aes)
    qs = torch.tensor([q_a, q_b])
    st_q, ae_q = torch.quantile(st, qs), torch.quantile(ae, qs)
    model.q_st_a.copy_(st_q[0])
    model.q_st_b.copy_(torch.maximum(st_q[1], st_q[0] + 1e-8))
    model.q_ae_a.copy_(ae_q[0])
    model.q_ae_b.copy_(torch.maximum(ae_q[1], ae_q[0] + 1e-8))
    return {"q_st_a": float(st_q[0]), "q_st_b": float(st_q[1]), "q_ae_a": float(ae_q[0]), "q_ae_b": float(ae_q[1])}


@torch.no_grad()
def predict(model: EfficientAD, images: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch):
        m, s = model(images[i : i + batch])
        maps.append(m)
        scores.append(s)
    return torch.cat(maps), torch.cat(scores)


def _load_stack(paths, size) -> torch.Tensor:
    return torch.stack([normalize(load_image(p, size)) for p in tqdm(paths, desc="load", leave=False)])


def train_efficientad(
    train_paths: list[Path],
    cfg: TrainConfig,
    teacher_weights: str | Path | None = None,
    anomalous_val_paths: list[Path] | None = None,
    callback: Callable[[int, EfficientAD], None] | None = None,
    callback_every: int = 0,
) -> tuple[EfficientAD, dict[str, Any]]:
    """Train student + AE on good images; returns the model (eval mode) and metadata.

    ``callback(steps_done, model)`` runs every ``callback_every`` steps (schedule studies); it gets
    the model in train mode and must restore that mode itself if it evaluates.
    """
    t0 = time.time()
    seed_everything(cfg.seed)
    if len(train_paths) < 2:
        raise ValueError("need at least 2 good training images")
    fit_paths, val_paths = split_train_val(sorted(train_paths), cfg.val_fraction, cfg.seed)
    if cfg.max_train_images:
        fit_paths = fit_paths[: cfg.max_train_images]
    model = EfficientAD(cfg.model_size)
    if teacher_weights is not None:
        load_teacher_weights(model, teacher_weights)
    else:
        log.warning("efficientad_random_teacher", note="no teacher weights given: teacher is random (tests only)")
    model.train()
    rng = random.Random(cfg.seed)
    raw_imgs = [load_image(p, cfg.image_size) for p in tqdm(fit_paths, desc="load train", leave=False)]
    clean = torch.stack([normalize(im) for im in raw_imgs])
    aug = torch.stack(
        [normalize(ae_augment(im, rng)) for im in raw_imgs for _ in range(cfg.aug_variants)]
    ) if cfg.aug_variants > 0 else clean
    # cache the frozen teacher: raw outputs -> per-channel stats -> normalised fp16 cache
    t_clean = _teacher_outputs(model, clean, "teacher(clean)", amp_bf16=cfg.amp_bf16)
    compute_teacher_normalization(model, t_clean)
    t_clean = ((t_clean - model.teacher_mean) / model.teacher_std).half()
    t_aug = (
        ((_teacher_outputs(model, aug, "teacher(aug)", amp_bf16=cfg.amp_bf16) - model.teacher_mean) / model.teacher_std).half()
        if cfg.aug_variants > 0
        else t_clean
    )
    n_var = max(cfg.aug_variants, 1)
    penalty = ImageFolderDataset(cfg.penalty_dir, size=2 * cfg.image_size) if cfg.penalty_dir else None

    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * cfg.steps)), gamma=0.1)
    c = model.out_channels
    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc="efficientad train")
    t_loop = time.time()
    lr_dropped = False
    steps_done = 0
    for step in bar:
        if cfg.max_train_seconds is not None:
            elapsed = time.time() - t_loop
            if elapsed > cfg.max_train_seconds:
                log.warning("efficientad_train_budget_reached", steps_done=step, steps=cfg.steps)
                break
            if not lr_dropped and elapsed > 0.95 * cfg.max_train_seconds and step < int(0.95 * cfg.steps):
                for g in opt.param_groups:
                    g["lr"] *= 0.1
                lr_dropped = True
        i = rng.randrange(len(clean))
        v = rng.randrange(n_var)
        x_st, x_ae = clean[i : i + 1], aug[i * n_var + v : i * n_var + v + 1] if cfg.aug_variants > 0 else clean[i : i + 1]
        t_st = t_clean[i : i + 1].float()
        t_ae = t_aug[i * n_var + v : i * n_var + v + 1].float() if cfg.aug_variants > 0 else t_st
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp_bf16):
            s_both = model.student(torch.cat([x_st, x_ae])).float()  # one batched student pass for I and I'
        loss_hard = hard_feature_loss(t_st, s_both[:1, :c], cfg.hard_q)
        loss = loss_hard
        loss_pen = torch.zeros(())
        if penalty is not None:
            p = penalty[rng.randrange(len(penalty))]["image"]
            off = (p.shape[-1] - cfg.image_size) // 2  # Resize(512) + CenterCrop(256) as the paper
            p = p[:, off : off + cfg.image_size, off : off + cfg.image_size]
            if rng.random() < 0.3:  # RandomGrayscale(0.3)
                p = p.mean(0, keepdim=True).expand(3, -1, -1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp_bf16):
                s_pen = model.student(p[None]).float()
            loss_pen = torch.mean(s_pen[:, :c] ** 2)
            loss = loss + loss_pen
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp_bf16):
            a = model.autoencoder(x_ae).float()
        loss_ae = torch.mean((t_ae - a) ** 2)
        loss_stae = torch.mean((a - s_both[1:, c:]) ** 2)
        loss = loss + loss_ae + loss_stae
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not lr_dropped:
            sched.step()
        steps_done = step + 1
        if callback is not None and callback_every > 0 and steps_done % callback_every == 0:
            callback(steps_done, model)
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": float(loss.detach()), "hard": float(loss_hard.detach()), "penalty": float(loss_pen.detach()),
                   "ae": float(loss_ae.detach()), "stae": float(loss_stae.detach())}
            history.append(rec)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    t_loop_end = time.time()
    model.eval()
    val = _load_stack(val_paths, cfg.image_size) if val_paths else clean[:1]
    quantiles = compute_map_quantiles(model, val, cfg.q_a, cfg.q_b)
    maps, scores = predict(model, val)
    threshold = float(torch.quantile(scores, cfg.threshold_quantile))
    map_threshold = float(torch.quantile(maps.flatten()[:: max(1, maps.numel() // 4_000_000)], cfg.map_threshold_quantile))
    threshold_source = "max_good_val" if cfg.threshold_quantile >= 1.0 else f"q{cfg.threshold_quantile}_good_val"
    if anomalous_val_paths:
        from models.evaluation import f1_max

        _, bad_scores = predict(model, _load_stack(anomalous_val_paths, cfg.image_size))
        y = [0] * len(scores) + [1] * len(bad_scores)
        _, threshold = f1_max(y, torch.cat([scores, bad_scores]).numpy())
        threshold_source = "f1_max_val"
    meta = {
        "config": asdict(cfg),
        "steps_done": steps_done,
        "n_fit_images": len(fit_paths),
        "n_val_images": len(val_paths),
        "val_paths": [str(p) for p in val_paths],
        "teacher_weights": str(teacher_weights) if teacher_weights else None,
        "quantiles": quantiles,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "map_threshold": map_threshold,
        "train_seconds": time.time() - t0,
        "loop_seconds": t_loop_end - t_loop,
        "history": history[-50:],
    }
    log.info("efficientad_trained", steps=cfg.steps, threshold=threshold, seconds=round(meta["train_seconds"], 1))
    return model, meta


def image_paths(folder: str | Path) -> list[Path]:
    return list_images(folder)
