"""EfficientAD training (EfficientAD paper, supplementary Algorithm 1; official hyper-parameters).

Teacher frozen; its normalised outputs for the clean training images are computed once (they never
change). Every step draws a *fresh* autoencoder augmentation of the image and runs the teacher on it.
Loss per step (batch size 1 as in the paper):
  L_hard  = mean of D_ST entries >= their 0.999-quantile                     (§3.2, hard feature loss)
  L_pen   = mean(S(P)[:384]^2) for an image P of the penalty folder            (§3.2 pretraining penalty)
  L_AE    = mean((T(I') - A(I'))^2),  L_STAE = mean((A(I') - S(I')[384:])^2)  (§3.3, I' augmented)
  L = L_hard + L_pen + L_AE + L_STAE
Adam lr 1e-4, weight decay 1e-5, LR x0.1 after 95% of the steps. fp32 unless bf16 is asked for (only
worth it where the CPU has native bf16, see :mod:`models.precision`).
Afterwards: quantiles q_a=0.9, q_b=0.995 of M_ST and M_AE over a held-out split of the good train
images (§3.4), and the decision threshold from the held-out good images.
Early stopping (optional, ``select_every``): every N steps the model is scored on the held-out good
images and their CutPaste copies (:mod:`models.synthetic`); the best state by that AUROC is kept.
Test labels are never used.
Device (``device``, models.precision.train_device): the model, the cached teacher outputs and every batch
live on it; on CUDA the step loop's teacher/student/AE passes run under bf16 autocast (no GradScaler:
bf16 keeps fp32's range), map quantiles and thresholds stay fp32. Images are decoded and augmented on
the CPU with the same RNG draws on every device; the returned model is on the CPU.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from contracts.logs import get_logger
from models.data import ImageFolderDataset, load_image, normalize, split_train_val
from models.efficientad.model import (
    DEFAULT_TEACHER,
    EfficientAD,
    load_feature_teacher_weights,
    load_teacher_weights,
)
from models.precision import autocast_args, log_train_device, model_device
from models.synthetic import cut_paste

log = get_logger(__name__)


@dataclass
class TrainConfig:
    model_size: str = "small"
    teacher_kind: str = "pdn"  # "pdn": a distilled PDN teacher file; "lite0-features": frozen Lite0 stages 2+3
    backbone_weights: str | None = None  # the local EfficientNet-Lite0 file (lite0-features only)
    require_sha256: bool = False  # Settings.require_sha256: refuse teacher/backbone files of unknown digest
    steps: int = 70_000  # paper: 70,000 iterations
    lr: float = 1e-4
    weight_decay: float = 1e-5
    hard_q: float = 0.999  # p_hard (Table 3 default)
    q_a: float = 0.9
    q_b: float = 0.995
    val_fraction: float = 0.1  # held-out good train images for map normalisation + threshold
    penalty_dir: str | None = None  # image folder for the pretraining penalty (paper: ImageNet)
    threshold_quantile: float = 1.0  # quantile of held-out good image scores used as the threshold
    map_threshold_quantile: float = 0.999  # pixel quantile of held-out good maps
    seed: int = 0
    image_size: int = 256
    max_train_images: int | None = None  # cap (tests / CPU benchmarks)
    max_train_seconds: float | None = None  # wall-clock budget for the step loop (CPU benchmarks);
    # with a budget the x0.1 LR drop happens at 95% of the steps OR 95% of the budget, whichever first
    amp_bf16: bool = False  # bf16 autocast for the teacher and student/AE passes of the step loop; only
    # where the CPU has native bf16 (models.precision.native_bf16); map quantiles and inference stay fp32
    select_every: int = 0  # >0: score held-out good + CutPaste every N steps, keep the best state
    # >0: the student's passes see a random student_crop x student_crop window per step (a multiple of 4,
    # aligned to the PDN's stride: its output is exactly the full map's cells under the window), ~(256/crop)^2
    # times cheaper on a CPU; the autoencoder and the teacher still see whole images. 0: whole images (paper)
    student_crop: int = 0
    synthetic_seed: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def student_window(crop: int, n_cells: int, rng: random.Random) -> tuple[tuple, tuple]:
    """(pixel window, cell window) as index tuples for [B, C, H, W] tensors: a random ``crop`` px square whose
    offset is a multiple of the PDN's stride 4, and the cells of the (padding-free) PDN's ``n_cells`` map that the
    student's output on it equals. ``crop`` 0: the whole image and map."""
    whole = (slice(None),) * 4
    if not crop:
        return whole, whole
    k = crop // 4 - 8  # PDN output cells of a crop (no padding: 256 px -> 56)
    if crop % 4 or not 0 < k <= n_cells:
        raise ValueError(f"student_crop must be a multiple of 4 in [36, {4 * (n_cells + 8)}], got {crop}")
    u, v = rng.randrange(n_cells - k + 1), rng.randrange(n_cells - k + 1)
    return ((slice(None), slice(None), slice(4 * u, 4 * u + crop), slice(4 * v, 4 * v + crop)),
            (slice(None), slice(None), slice(u, u + k), slice(v, v + k)))


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
    """Raw teacher outputs on the model's device (bf16 autocast there on CUDA, on the CPU when ``amp_bf16``)."""
    dev = model_device(model)
    outs = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        with torch.autocast(**autocast_args(dev, amp_bf16)):
            outs.append(model.teacher(images[i : i + batch].to(dev)).float())
    return torch.cat(outs)


@torch.no_grad()
def compute_teacher_normalization(model: EfficientAD, raw: torch.Tensor) -> None:
    """Per-channel mean/std of teacher outputs over the training images (Alg. 1)."""
    mean = raw.float().mean(dim=(0, 2, 3), keepdim=True)[:1]
    var = ((raw.float() - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    model.teacher_mean.copy_(mean.reshape(model.teacher_mean.shape))
    model.teacher_std.copy_(var.sqrt().clamp_min(1e-6).reshape(model.teacher_std.shape))


@torch.no_grad()
def _raw_maps(model: EfficientAD, images: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-normalised (M_ST, M_AE) maps of ``images`` on the CPU; batches run on the model's device."""
    model.eval()
    dev = model_device(model)
    sts, aes = [], []
    for i in range(0, len(images), batch):
        m_st, m_ae = model.raw_maps(images[i : i + batch].to(dev))
        sts.append(m_st.cpu())
        aes.append(m_ae.cpu())
    return torch.cat(sts), torch.cat(aes)


@torch.no_grad()
def _set_map_quantiles(model: EfficientAD, st: torch.Tensor, ae: torch.Tensor, q_a: float, q_b: float) -> dict[str, float]:
    qs = torch.tensor([q_a, q_b])
    st_q, ae_q = torch.quantile(st.flatten(), qs), torch.quantile(ae.flatten(), qs)
    model.q_st_a.copy_(st_q[0])
    model.q_st_b.copy_(torch.maximum(st_q[1], st_q[0] + 1e-8))
    model.q_ae_a.copy_(ae_q[0])
    model.q_ae_b.copy_(torch.maximum(ae_q[1], ae_q[0] + 1e-8))
    return {"q_st_a": float(st_q[0]), "q_st_b": float(st_q[1]), "q_ae_a": float(ae_q[0]), "q_ae_b": float(ae_q[1])}


@torch.no_grad()
def _combined(model: EfficientAD, st: torch.Tensor, ae: torch.Tensor, size: tuple[int, int],
              batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, scores) on the CPU from raw maps: exactly what ``model(x)`` gives, without the networks again."""
    dev = model_device(model)
    maps = torch.cat([model.combine(st[i : i + batch].to(dev), ae[i : i + batch].to(dev), size).cpu()
                      for i in range(0, len(st), batch)])
    return maps, torch.amax(maps, dim=(1, 2, 3))


@torch.no_grad()
def compute_map_quantiles(model: EfficientAD, images: torch.Tensor, q_a: float, q_b: float, batch: int = 4):
    """§3.4 map quantiles over ``images`` (any device: batches run on the model's; quantiles on the CPU)."""
    return _set_map_quantiles(model, *_raw_maps(model, images, batch), q_a, q_b)


@torch.no_grad()
def calibrate_and_predict(model: EfficientAD, images: torch.Tensor, q_a: float, q_b: float,
                          batch: int = 4) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """:func:`compute_map_quantiles` then :func:`predict` on the same images with one pass of the networks:
    (quantiles, maps, scores)."""
    st, ae = _raw_maps(model, images, batch)
    quantiles = _set_map_quantiles(model, st, ae, q_a, q_b)
    return (quantiles, *_combined(model, st, ae, (images.shape[-2], images.shape[-1]), batch))


@torch.no_grad()
def predict(model: EfficientAD, images: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps, scores) on the CPU; batches run on the model's device."""
    model.eval()
    dev = model_device(model)
    maps, scores = [], []
    for i in range(0, len(images), batch):
        m, s = model(images[i : i + batch].to(dev))
        maps.append(m.cpu())
        scores.append(s.cpu())
    return torch.cat(maps), torch.cat(scores)


def _load_stack(paths, size, mean, std) -> torch.Tensor:
    return torch.stack([normalize(load_image(p, size), mean, std) for p in tqdm(paths, desc="load", leave=False)])


@torch.no_grad()
def synthetic_auroc(model: EfficientAD, good_raw: list[np.ndarray], seed: int, q_a: float, q_b: float) -> float:
    """Image AUROC of held-out good images against their CutPaste copies (no test labels)."""
    from models.evaluation import image_auroc

    rng = random.Random(seed)
    bad_raw = [cut_paste(im, rng)[0] for im in good_raw]
    norm = [normalize(im, model.input_mean, model.input_std) for im in good_raw + bad_raw]
    x = torch.stack(norm)
    was_training = model.training
    _, _, good_scores = calibrate_and_predict(model, x[: len(good_raw)], q_a, q_b)
    _, bad_scores = predict(model, x[len(good_raw):])
    scores = torch.cat([good_scores, bad_scores])
    model.train(was_training)
    return image_auroc([0] * len(good_raw) + [1] * len(bad_raw), scores.numpy())


def train_efficientad(
    train_paths: list[Path],
    cfg: TrainConfig,
    teacher_weights: str | Path | None = DEFAULT_TEACHER,
    anomalous_val_paths: list[Path] | None = None,
    callback: Callable[[int, EfficientAD], None] | None = None,
    callback_every: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[EfficientAD, dict[str, Any]]:
    """Train student + AE on good images; returns the model (eval mode) and metadata.

    ``teacher_weights``: a PDN teacher file (default: the generic teacher distilled over the ImageNet
    sample, committed with the package); ``None`` = random teacher (tests only). With
    ``cfg.teacher_kind == "lite0-features"`` the teacher is the frozen Lite0 target filled from
    ``cfg.backbone_weights`` and ``teacher_weights`` is ignored.
    ``callback(steps_done, model)`` runs every ``callback_every`` steps; it gets the model in train
    mode (on ``device``) and must restore that mode itself if it evaluates.
    ``device``: where training runs (models.precision.train_device); the returned model is on the CPU.
    """
    t0 = time.time()
    device = torch.device(device)
    autocast = autocast_args(device, cfg.amp_bf16)
    log_train_device(log, device, autocast, job="efficientad_train")
    seed_everything(cfg.seed)
    if len(train_paths) < 2:
        raise ValueError("need at least 2 good training images")
    fit_paths, val_paths = split_train_val(sorted(train_paths), cfg.val_fraction, cfg.seed)
    if cfg.max_train_images:
        fit_paths = fit_paths[: cfg.max_train_images]
    model = EfficientAD(cfg.model_size, teacher_kind=cfg.teacher_kind)
    if cfg.student_crop and model.padding:
        raise ValueError("student_crop needs the padding-free PDN (its output cells are then the crop's exactly)")
    teacher_meta: dict[str, Any] = {}
    if cfg.teacher_kind == "lite0-features":
        if not cfg.backbone_weights:
            raise ValueError("the lite0-features teacher needs backbone_weights (the local EfficientNet-Lite0 file)")
        teacher_meta = load_feature_teacher_weights(model, cfg.backbone_weights, require_sha256=cfg.require_sha256)
        teacher_weights = None
    elif teacher_weights is not None:
        teacher_meta = load_teacher_weights(model, teacher_weights, require_sha256=cfg.require_sha256)
    else:
        log.warning("efficientad_random_teacher", note="no teacher weights given: teacher is random (tests only)")
    for p in model.teacher.parameters():
        p.requires_grad_(False)
    model.to(device)
    mean, std = model.input_mean, model.input_std
    model.train()
    rng = random.Random(cfg.seed)
    raw_imgs = [load_image(p, cfg.image_size) for p in tqdm(fit_paths, desc="load train", leave=False)]
    clean = torch.stack([normalize(im, mean, std) for im in raw_imgs]).to(device)
    # the frozen teacher on the clean images: raw outputs -> per-channel stats -> normalised cache
    t_clean = _teacher_outputs(model, clean, "teacher(clean)", amp_bf16=cfg.amp_bf16)
    compute_teacher_normalization(model, t_clean)
    t_clean = (t_clean - model.teacher_mean) / model.teacher_std
    penalty = (ImageFolderDataset(cfg.penalty_dir, size=2 * cfg.image_size, mean=mean, std=std)
               if cfg.penalty_dir else None)
    val_raw = [load_image(p, cfg.image_size) for p in val_paths]

    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * cfg.steps)), gamma=0.1)
    c = model.out_channels
    history: list[dict[str, float]] = []
    selection: list[dict[str, float]] = []
    best: tuple[float, int, dict] | None = None
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
        x_st = clean[i : i + 1]
        x_ae = normalize(ae_augment(raw_imgs[i], rng), mean, std)[None].to(device)  # fresh augmentation every step
        t_st = t_clean[i : i + 1]
        with torch.no_grad(), torch.autocast(**autocast):
            t_ae = (model.teacher(x_ae).float() - model.teacher_mean) / model.teacher_std
        px, cell = student_window(cfg.student_crop, t_st.shape[-1], rng)
        with torch.autocast(**autocast):  # one batched student pass for I and I'
            s_both = model.student(torch.cat([x_st, x_ae])[px]).float()
        loss_hard = hard_feature_loss(t_st[cell], s_both[:1, :c], cfg.hard_q)
        loss = loss_hard
        loss_pen = torch.zeros((), device=device)
        if penalty is not None:
            p = penalty[rng.randrange(len(penalty))]["image"].to(device)
            off = (p.shape[-1] - cfg.image_size) // 2  # Resize(512) + CenterCrop(256) as the paper
            p = p[:, off : off + cfg.image_size, off : off + cfg.image_size]
            if rng.random() < 0.3:  # RandomGrayscale(0.3)
                p = p.mean(0, keepdim=True).expand(3, -1, -1)
            with torch.autocast(**autocast):
                s_pen = model.student(p[None][px]).float()
            loss_pen = torch.mean(s_pen[:, :c] ** 2)
            loss = loss + loss_pen
        with torch.autocast(**autocast):
            a = model.autoencoder(x_ae).float()
        loss_ae = torch.mean((t_ae - a) ** 2)
        loss_stae = torch.mean((a[cell] - s_both[1:, c:]) ** 2)
        loss = loss + loss_ae + loss_stae
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not lr_dropped:
            sched.step()
        steps_done = step + 1
        if callback is not None and callback_every > 0 and steps_done % callback_every == 0:
            callback(steps_done, model)
        if cfg.select_every > 0 and val_raw and steps_done % cfg.select_every == 0:
            auc = synthetic_auroc(model, val_raw, cfg.synthetic_seed, cfg.q_a, cfg.q_b)
            selection.append({"step": steps_done, "synthetic_auroc": auc})
            log.info("efficientad_selection", step=steps_done, synthetic_auroc=round(auc, 4))
            if best is None or auc > best[0]:
                best = (auc, steps_done, copy.deepcopy(model.state_dict()))
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "loss": float(loss.detach()), "hard": float(loss_hard.detach()), "penalty": float(loss_pen.detach()),
                   "ae": float(loss_ae.detach()), "stae": float(loss_stae.detach())}
            history.append(rec)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    t_loop_end = time.time()
    selected_step = steps_done
    if best is not None:
        final_auc = synthetic_auroc(model, val_raw, cfg.synthetic_seed, cfg.q_a, cfg.q_b)
        selection.append({"step": steps_done, "synthetic_auroc": final_auc})
        if best[0] > final_auc:
            model.load_state_dict(best[2])
            selected_step = best[1]
    model.eval()
    val = _load_stack(val_paths, cfg.image_size, mean, std) if val_paths else clean[:1]
    quantiles, maps, scores = calibrate_and_predict(model, val, cfg.q_a, cfg.q_b)
    threshold = float(torch.quantile(scores, cfg.threshold_quantile))
    map_threshold = float(torch.quantile(maps.flatten()[:: max(1, maps.numel() // 4_000_000)], cfg.map_threshold_quantile))
    threshold_source = "max_good_val" if cfg.threshold_quantile >= 1.0 else f"q{cfg.threshold_quantile}_good_val"
    if anomalous_val_paths:
        from models.evaluation import f1_max

        _, bad_scores = predict(model, _load_stack(anomalous_val_paths, cfg.image_size, mean, std))
        y = [0] * len(scores) + [1] * len(bad_scores)
        _, threshold = f1_max(y, torch.cat([scores, bad_scores]).numpy())
        threshold_source = "f1_max_val"
    model.cpu()
    meta = {
        "config": asdict(cfg),
        "device": str(device),
        "amp": "bf16" if autocast["enabled"] else "fp32",  # the step loop's passes (cfg.amp_bf16: the CPU's choice)
        "steps_done": steps_done,
        "selected_step": selected_step,
        "selection": selection,
        "n_fit_images": len(fit_paths),
        "n_val_images": len(val_paths),
        "val_paths": [str(p) for p in val_paths],
        "teacher_weights": str(teacher_weights) if teacher_weights else None,
        "teacher_provenance": {k: v for k, v in teacher_meta.items() if k != "history"},
        "input_mean": list(mean),
        "input_std": list(std),
        "quantiles": quantiles,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "map_threshold": map_threshold,
        "train_seconds": time.time() - t0,
        "loop_seconds": t_loop_end - t_loop,
        "history": history[-50:],
    }
    log.info("efficientad_trained", steps=steps_done, selected_step=selected_step, threshold=threshold,
             seconds=round(meta["train_seconds"], 1))
    return model, meta
