"""``distill-teacher``: distil a product-independent PDN teacher from a frozen timm backbone.

EfficientAD paper, supplementary "Teacher pretraining" (Algorithm 3): the PDN regresses normalised
PatchCore features (WideResNet-101 layers 2+3, each 3x3 locally averaged, projected to 384
channels) of ImageNet images; the extractor sees 512x512 images, the PDN 256x256; MSE; Adam lr 1e-4,
weight decay 1e-5; 60,000 steps at batch 16. Here:

* the extractor is EfficientNet-Lite0 (``tf_efficientnet_lite0``: the TensorFlow port, inputs with
  mean = std = 0.5) at the stages whose receptive field a 33 px PDN can match, ``out_indices=(2, 3)``
  (stride 8 and 16, 40 + 112 channels): the analogue of WRN layers 2+3. The stride-32 stage is left
  out: its receptive field is far beyond the PDN's.
* PatchCore aggregation: 3x3 average pooling (stride 1) per level, bilinear resize to the 64x64
  grid of the 512 input's stride 8, concatenation, adaptive average pooling over channels to 384.
* the PDN without padding gives 56x56; its output cell i is centred on cell i+4 of the 64x64 grid,
  so the target is centre-cropped by 4 cells.
* images are augmented afresh at every step (random-resized crop, flips, rotation, colour jitter,
  grayscale), because 1,000 images are three orders of magnitude fewer than ImageNet.
* the target is standardised per channel with mean/std over un-augmented images (Alg. 3).
* progress is checkpointed (model, optimiser, schedule, RNG, loss history) and a rerun with the
  same output path resumes from it.
* ``device`` (models.precision.train_device): extractor, PDN and every batch on it; on CUDA the target
  and PDN passes run under bf16 autocast. Images are decoded and augmented on the CPU (same RNG draws
  on every device); checkpoint and teacher file are written from CPU tensors.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from contracts.logs import get_logger
from models.artifacts import sha256_file, write_sha256_sidecar
from models.backbones import backbone_normalization, create_backbone
from models.data import list_images, load_image
from models.efficientad.feature_teacher import FeatureTarget
from models.efficientad.networks import TEACHER_CHANNELS, pdn
from models.precision import autocast_args, log_train_device, native_bf16, to_cpu

log = get_logger(__name__)

TEACHER_FORMAT = "linewatch-pdn-teacher-v2"


@dataclass
class DistillConfig:
    backbone: str = "tf_efficientnet_lite0"
    backbone_weights: str | None = None
    out_indices: tuple[int, ...] = (2, 3)
    model_size: str = "small"
    steps: int = 60_000  # paper: 60,000
    batch_size: int = 16  # paper: 16
    lr: float = 1e-4  # paper: 1e-4 (Adam), cosine-annealed here to 1% over ``steps``
    weight_decay: float = 1e-5
    held_out: int = 50  # images kept out of training for the held-out loss
    stats_images: int = 200  # un-augmented images for the target's per-channel mean/std
    checkpoint_every_s: float = 120.0
    max_seconds: float | None = None  # wall budget for this run (resume continues later)
    max_images: int | None = None
    amp_bf16: bool | None = None  # None: bf16 autocast only where the CPU has native bf16
    seed: int = 0


def augmenter() -> v2.Compose:
    """Fresh views of a generic image (uint8 CHW -> uint8 CHW 512x512)."""
    return v2.Compose([
        v2.RandomResizedCrop(512, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(0.2),
        v2.RandomRotation(15),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        v2.RandomGrayscale(0.1),  # paper's distillation transform: RandomGrayscale(0.1)
    ])


def _load_uint8(path: Path) -> torch.Tensor:
    img = load_image(path, None)
    return torch.from_numpy(np.ascontiguousarray((img * 255.0).round().astype(np.uint8).transpose(2, 0, 1)))


def _norm(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    x = x_uint8.float() / 255.0
    dev = x.device
    return (x - torch.tensor(mean, device=dev).view(1, 3, 1, 1)) / torch.tensor(std, device=dev).view(1, 3, 1, 1)


def _checkpoint_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".ckpt")


def distill_teacher(image_folder: str | Path, out_path: str | Path, cfg: DistillConfig | None = None,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Distil (or resume distilling) a PDN teacher on ``device``; writes ``out_path`` (safetensors, fp16)
    with a ``.sha256`` sidecar and a ``.json`` provenance file. Returns the provenance."""
    from safetensors.torch import save_file

    cfg = cfg or DistillConfig()
    out_path = Path(out_path)
    ckpt_path = _checkpoint_path(out_path)
    device = torch.device(device)
    amp = autocast_args(device, native_bf16() if cfg.amp_bf16 is None else cfg.amp_bf16)
    bf16 = amp["enabled"]
    log_train_device(log, device, amp, job="distill_teacher")
    torch.manual_seed(cfg.seed)
    paths = list_images(image_folder, recursive=True)[: cfg.max_images or None]
    if len(paths) < 2:
        raise ValueError(f"need at least 2 images in {image_folder}")
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(paths), generator=gen).tolist()
    n_hold = min(cfg.held_out, len(paths) // 5)
    hold_paths = [paths[i] for i in order[:n_hold]]
    fit_paths = [paths[i] for i in order[n_hold:]]
    mean, std = backbone_normalization(cfg.backbone)
    target = FeatureTarget(create_backbone(cfg.backbone, cfg.backbone_weights, features_only=True,
                                           out_indices=cfg.out_indices)).to(device)
    t0 = time.time()
    images = [_load_uint8(p) for p in fit_paths]
    resize512 = v2.Resize((512, 512), antialias=True)
    hold = torch.stack([resize512(_load_uint8(p)) for p in hold_paths]) if hold_paths else None

    teacher = pdn(cfg.model_size, TEACHER_CHANNELS, padding=False).to(device)
    opt = torch.optim.Adam(teacher.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr * 0.01)
    state: dict[str, Any] = {"step": 0, "history": [], "seconds": 0.0}
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        teacher.load_state_dict(ck["teacher"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        if sched.T_max != cfg.steps:  # a resumed run may shorten or extend the plan: re-aim the cosine
            log.info("distill_schedule_changed", old_steps=sched.T_max, steps=cfg.steps)
            sched.T_max = cfg.steps
        state = ck["state"]
        t_mean, t_std = ck["t_mean"].to(device), ck["t_std"].to(device)
        torch.set_rng_state(ck["rng"])
        log.info("distill_resumed", step=state["step"], steps=cfg.steps, checkpoint=str(ckpt_path))
    else:
        stats = []
        for i in range(0, min(cfg.stats_images, len(images)), 8):
            batch = torch.stack([resize512(im) for im in images[i : i + 8]])
            stats.append(target(_norm(batch.to(device), mean, std)))
        y = torch.cat(stats)
        t_mean = y.mean(dim=(0, 2, 3), keepdim=True)
        t_std = y.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    aug = augmenter()

    def save_ckpt() -> None:
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"teacher": to_cpu(teacher.state_dict()), "opt": to_cpu(opt.state_dict()), "sched": sched.state_dict(),
                    "state": state, "t_mean": t_mean.cpu(), "t_std": t_std.cpu(), "rng": torch.get_rng_state(),
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt_path)

    @torch.no_grad()
    def held_out_loss() -> float | None:
        if hold is None:
            return None
        teacher.eval()
        losses = []
        for i in range(0, len(hold), 8):
            x512 = _norm(hold[i : i + 8].to(device), mean, std)
            y = (target(x512) - t_mean) / t_std
            x256 = F.interpolate(x512, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
            losses.append(float(F.mse_loss(teacher(x256), y)) * len(x512))
        teacher.train()
        return sum(losses) / len(hold)

    run_start = time.time()
    base_seconds = state["seconds"]
    last_ckpt = time.time()
    bs = min(cfg.batch_size, len(images))
    teacher.train()
    while state["step"] < cfg.steps:
        if cfg.max_seconds is not None and time.time() - run_start > cfg.max_seconds:
            log.warning("distill_budget_reached", step=state["step"], steps=cfg.steps)
            break
        idx = torch.randint(len(images), (bs,)).tolist()
        x512 = _norm(torch.stack([aug(images[i]) for i in idx]).to(device), mean, std)
        with torch.autocast(**amp):
            y = (target(x512).float() - t_mean) / t_std
        x256 = F.interpolate(x512, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
        with torch.autocast(**amp):
            out = teacher(x256).float()
        loss = F.mse_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        state["step"] += 1
        step = state["step"]
        if step % 10 == 0 or step == 1:
            state["history"].append({"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]})
            log.info("distill_progress", step=step, steps=cfg.steps, loss=round(float(loss.detach()), 4),
                     seconds=round(base_seconds + time.time() - run_start, 1))
        if step % 500 == 0:
            state["history"].append({"step": step, "held_out_loss": held_out_loss()})
        if time.time() - last_ckpt > cfg.checkpoint_every_s:
            state["seconds"] = base_seconds + time.time() - run_start
            save_ckpt()
            last_ckpt = time.time()
    state["seconds"] = base_seconds + time.time() - run_start
    save_ckpt()
    final_hold = held_out_loss()
    train_losses = [h["loss"] for h in state["history"] if "loss" in h]
    meta = {
        "format": TEACHER_FORMAT,
        "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
        "torch": torch.__version__,
        "config": {**asdict(cfg), "out_indices": list(cfg.out_indices)},
        "input_mean": list(mean),
        "input_std": list(std),
        "steps_done": state["step"],
        "complete": state["step"] >= cfg.steps,
        "amp_bf16": bf16,
        "device": str(device),
        "n_fit_images": len(fit_paths),
        "n_held_out": len(hold_paths),
        "image_folder": str(image_folder),
        "final_train_loss_mean_last100": float(np.mean(train_losses[-10:])) if train_losses else None,
        "held_out_loss": final_hold,
        "loop_seconds": state["seconds"],
        "setup_seconds_this_run": round(run_start - t0, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().to(torch.float16).contiguous() for k, v in teacher.state_dict().items()}
    save_file(sd, str(out_path), metadata={"format": TEACHER_FORMAT, "meta": json.dumps(meta)})
    write_sha256_sidecar(out_path)
    meta["sha256"] = sha256_file(out_path)
    out_path.with_suffix(".json").write_text(json.dumps({**meta, "history": state["history"]}, indent=1))
    log.info("teacher_distilled", out=str(out_path), steps=state["step"], held_out_loss=final_hold)
    return meta
