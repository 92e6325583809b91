"""``distill-teacher``: distil a PDN teacher from a timm backbone over an image folder.

Paper (supp. §1.2, Alg. 3): the PDN teacher is trained to regress normalised WideResNet-101
layer-2+3 features (PatchCore-style, locally 3x3-averaged, projected to 384 channels) of ImageNet
images; the extractor sees 512x512 images, the PDN 256x256. Adam lr 1e-4, wd 1e-5, MSE.

Here the only ImageNet weights are EfficientNet-Lite0 (shared/data/weights). Our target:
* backbone levels ``out_indices=(2, 3, 4)`` (strides 8/16/32: 40, 112, 320 channels at 512 input
  -> 64, 32, 16 px): mid-level texture plus more semantic context, like WRN layers 2+3;
* each level 3x3 average-pooled (stride 1) for local neighbourhood aggregation (as PatchCore),
  bilinearly resized to the 64x64 grid of the padded PDN, concatenated (472 channels);
* reduced to 384 channels by adaptive average pooling over the channel axis (PatchCore's
  projection: deterministic, no fitted parameters, keeps every level's contribution);
* centre-cropped by 4 cells to 56x56 because the padding-free PDN's output cell i is centred on
  input pixel 4i+16.5, i.e. on cell i+4 of the stride-4 64x64 grid;
* standardised per channel with mean/std over the folder (Alg. 3).
The backbone is frozen, so targets are computed once and cached (fp16).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.artifacts import write_sha256_sidecar
from models.backbones import create_backbone
from models.data import list_images, load_image, normalize
from models.efficientad.networks import TEACHER_CHANNELS, pdn
from stream.logs import get_logger

log = get_logger(__name__)


class FeatureTarget(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, out_channels: int = TEACHER_CHANNELS, grid: int = 64, crop: int = 4):
        super().__init__()
        self.backbone = backbone.eval()
        self.out_channels = out_channels
        self.grid = grid
        self.crop = crop

    @torch.no_grad()
    def forward(self, x512: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x512)
        feats = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in feats]
        feats = [F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False) for f in feats]
        f = torch.cat(feats, dim=1)  # [B, 472, 64, 64]
        b, c, h, w = f.shape
        f = f.permute(0, 2, 3, 1).reshape(-1, 1, c)
        f = F.adaptive_avg_pool1d(f, self.out_channels).reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        k = self.crop
        return f[:, :, k : h - k, k : w - k].contiguous() if k else f


def distill_teacher(
    image_folder: str | Path,
    out_path: str | Path,
    backbone: str = "efficientnet_lite0",
    backbone_weights: str | Path | None = None,
    model_size: str = "small",
    steps: int = 60_000,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    out_indices: tuple[int, ...] = (2, 3, 4),
    max_images: int | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
    amp_bf16: bool = False,
) -> dict[str, Any]:
    """``max_seconds`` caps the wall time of the step loop (CPU schedules); ``amp_bf16`` runs the PDN
    passes under bf16 autocast (CPU speed-up; targets and loss stay fp32)."""
    t0 = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    paths = list_images(image_folder, recursive=True)
    if max_images:
        paths = paths[:max_images]
    if not paths:
        raise ValueError(f"no images in {image_folder}")
    bb = create_backbone(backbone, backbone_weights, features_only=True, out_indices=out_indices)
    target = FeatureTarget(bb)
    rng = random.Random(seed)
    imgs256, targets = [], []
    for p in tqdm(paths, desc="distill targets"):
        img = load_image(p, 512)
        if rng.random() < 0.1:  # RandomGrayscale(0.1) as in the paper's distillation transform
            img = np.repeat(img.mean(2, keepdims=True), 3, axis=2)
        x512 = normalize(img)[None]
        targets.append(target(x512)[0].half())
        imgs256.append(F.interpolate(x512, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)[0])
    y = torch.stack(targets).float()
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    std = y.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    y = ((y - mean) / std).half()
    x = torch.stack(imgs256)
    teacher = pdn(model_size, TEACHER_CHANNELS, padding=False)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, len(x))
    losses = []
    bar = tqdm(range(steps), desc="distill teacher")
    t_targets = time.time() - t0
    t_loop = time.time()
    steps_done = 0
    for step in bar:
        if max_seconds is not None and time.time() - t_loop > max_seconds:
            log.warning("distill_budget_reached", steps_done=step, steps=steps)
            break
        idx = rng.sample(range(len(x)), bs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp_bf16):
            out = teacher(x[idx]).float()
        loss = F.mse_loss(out, y[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps_done = step + 1
        if step % 10 == 0 or step == steps - 1:
            losses.append((step, float(loss.detach())))
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    meta = {
        "backbone": backbone,
        "backbone_weights": str(backbone_weights) if backbone_weights else None,
        "out_indices": list(out_indices),
        "model_size": model_size,
        "steps": steps,
        "steps_done": steps_done,
        "amp_bf16": amp_bf16,
        "batch_size": bs,
        "n_images": len(paths),
        "image_folder": str(image_folder),
        "final_loss": losses[-1][1] if losses else None,
        "target_seconds": t_targets,
        "loop_seconds": time.time() - t_loop,
        "seconds": time.time() - t0,
    }
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": teacher.state_dict(), "meta": meta}, str(out_path))
    write_sha256_sidecar(out_path)
    log.info("teacher_distilled", out=str(out_path), **{k: meta[k] for k in ("steps", "final_loss", "seconds")})
    return meta
