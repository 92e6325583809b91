"""MoLE-Flow: frozen normalizing-flow base + one small adapter per product task (MoLE-Flow paper).

Pipeline (MoLE-Flow paper, eq. 1): image -> timm backbone (layers 2+3) -> Patch Maker: parameter-free
pooled patches on a 14x14 or 28x28 grid (3x3 local average, channel average-pooling to D only when D is
smaller than the backbone's channels) -> + 2D sin-cos PE (eq. 2) + scale context (a learned projection
that feeds only the additive depthwise context, never the main path) -> whitening adapter (eq. 3-6,
per task) -> spatial context mixer (per-task gate) -> M FrEIA affine couplings whose subnets are
MoLEContextSubnet (base Linear + per-task LoRA, eq. 12-13) -> per-task DIA -> patch NLL (eq. 20-25).

The main feature path has no learned parameters, so no product's statistics are baked into what a
later product's adapter sees, and the flow's density is over the backbone's own patch features.

Parameter ownership: everything not under a task container (``lora_A/lora_B/lora_bias``,
``wa_gamma/wa_beta``, ``scm_gate``, ``dia``) is *base*: trained with task 0, frozen afterwards.
Task ``t`` only ever owns entries keyed by its own name, so training it cannot change another
task's outputs (tested with ``torch.equal``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.moleflow.config import TASK_CONTAINERS, MoLEFlowConfig, TaskSwitch, check_task_name
from models.moleflow.layers import (
    LoRALinear,
    MoLEContextSubnet,
    SimpleSubnet,
    _coupling_stack,
    sincos_pos_embed_2d,
)


class RouterPrototype(nn.Module):
    """One task's router prototype (MoLE-Flow paper, Method §3.6.1): mean, covariance, precision (float64)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, prec: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("cov", cov, persistent=False)
        self.register_buffer("prec", prec, persistent=False)


class MoLEFlow(nn.Module):
    def __init__(self, cfg: MoLEFlowConfig | None = None, backbone_weights: str | Path | None = None,
                 backbone: nn.Module | None = None):
        super().__init__()
        from models.backbones import create_backbone

        self.cfg = cfg = cfg or MoLEFlowConfig()
        self.switch = TaskSwitch()
        self.backbone = backbone if backbone is not None else create_backbone(
            cfg.backbone, backbone_weights, features_only=True, out_indices=cfg.out_indices)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        chans = list(self.backbone.feature_info.channels())
        self.feat_channels = int(sum(chans))
        if cfg.dim is None:
            cfg.dim = self.feat_channels
        if cfg.dim > self.feat_channels:
            raise ValueError(f"dim {cfg.dim} exceeds the backbone's {self.feat_channels} channels")
        torch.manual_seed(cfg.seed)
        D, g = cfg.dim, cfg.grid
        # scale context (paper §3.3.3): F_scale = DWConv(W_proj . Concat(Pool(F_L2), F_L3) + b_proj); the
        # learned projection feeds this additive context only.
        self.proj = nn.Linear(self.feat_channels, D)
        self.scale_ctx = nn.Conv2d(D, D, cfg.scale_kernel, padding=cfg.scale_kernel // 2, groups=D)
        self.register_buffer("pos", sincos_pos_embed_2d(D, g, g), persistent=False)
        k = cfg.spatial_kernel
        self.scm_conv = nn.Conv2d(D, D, k, padding=k // 2, groups=D, bias=False)  # spatial context mixer
        self.wa_gamma = nn.ParameterDict()
        self.wa_beta = nn.ParameterDict()
        self.scm_gate = nn.ParameterDict()
        self.dia = nn.ModuleDict()
        self.subnets: list[MoLEContextSubnet] = []

        def subnet(c_in, c_out):
            s = MoLEContextSubnet(c_in, c_out, cfg, self.switch)
            self.subnets.append(s)
            return s

        self.flow = _coupling_stack(D, cfg.coupling_layers, subnet, cfg.clamp, cfg.seed)
        self.tasks: list[str] = []
        # per task: the router's Gaussian prototype as buffers, so .to(device) moves them with the flow
        # (non-persistent: the adapter file stores them under router.* keys, see models/moleflow/store.py)
        self.router = nn.ModuleDict()
        self._pooled: tuple[tuple[str, ...], torch.Tensor] | None = None
        self.thresholds: dict[str, dict] = {}

    # ------------------------------------------------------------------ tasks / parameters
    def add_task(self, name: str) -> None:
        check_task_name(name)
        if name in self.tasks:
            raise ValueError(f"task {name!r} already exists")
        idx = len(self.tasks)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + idx + 1)
        D = self.cfg.dim
        if self.tasks:  # later tasks start from task 0's whitening (MoLE-Flow paper, Method §3.3.1 init)
            t0 = self.tasks[0]
            g_raw = self.wa_gamma[t0].detach().clone()
            b_raw = self.wa_beta[t0].detach().clone()
        else:  # gamma_raw = -0.7 -> gamma = 0.5 + 1.5 sigmoid(-0.7) ~= 1.0; beta = 0
            g_raw = torch.full((D,), -0.7)
            b_raw = torch.zeros(D)
        self.wa_gamma[name] = nn.Parameter(g_raw)
        self.wa_beta[name] = nn.Parameter(b_raw)
        self.scm_gate[name] = nn.Parameter(torch.zeros(1))  # theta_gate = 0 -> alpha = 0.5
        for sn in self.subnets:
            for lin in sn.lora_layers():
                lin.add_task(name, gen)

        torch.manual_seed(self.cfg.seed * 1000 + idx + 1)
        # DIA_t: N affine coupling blocks with their own subnets, permutations between blocks (§3.4.3)
        self.dia[name] = _coupling_stack(D, self.cfg.dia_blocks, lambda ci, co: SimpleSubnet(ci, co, self.cfg.clamp),
                                         self.cfg.clamp, self.cfg.seed * 1000 + idx + 1)
        self.tasks.append(name)

    @staticmethod
    def _task_of_key(key: str) -> str | None:
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in TASK_CONTAINERS:
                return parts[i + 1]
        return None

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self._task_of_key(k) == name}

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if self._task_of_key(k) is None}

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for k, p in self.named_parameters() if self._task_of_key(k) == name and p.is_floating_point()]

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for k, p in self.named_parameters()
                if self._task_of_key(k) is None and not k.startswith("backbone.") and p.is_floating_point()]

    # ------------------------------------------------------------------ features
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen BN statistics, always
        return self

    @torch.no_grad()
    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features: (patch features [B, C, g, g], image-level router features [B, C]).

        Patch Maker (paper §3.2.2): each level 3x3 locally averaged, then average-pooled (finer level)
        or bilinearly resized (coarser level) to the g x g grid; no learned parameters."""
        dtype = next(self.backbone.parameters()).dtype  # FP16 on a GPU server (serving.fp16), else FP32
        feats = [f.float() for f in self.backbone(x.to(dtype))]  # the flow always runs in FP32
        g = self.cfg.grid
        grid = []
        for f in feats:
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-1] >= g:
                grid.append(F.adaptive_avg_pool2d(f, (g, g)))
            else:
                grid.append(F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False))
        patch = torch.cat(grid, dim=1)
        image = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)  # global pool per layer
        return patch, image

    def embed(self, patch: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] pooled patches -> F^(1') = F + P + F_scale as [B, H, W, D] (paper eq. 2, §3.3.3)."""
        f = patch.permute(0, 2, 3, 1)
        if f.shape[-1] != self.cfg.dim:  # parameter-free channel reduction (PatchCore-style)
            b, h, w, c = f.shape
            f = F.adaptive_avg_pool1d(f.reshape(-1, 1, c), self.cfg.dim).reshape(b, h, w, self.cfg.dim)
        proj = self.proj(patch.permute(0, 2, 3, 1))
        f_scale = self.scale_ctx(proj.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return f + self.pos + f_scale

    def adapt(self, f1: torch.Tensor, task: str) -> torch.Tensor:
        """Whitening adapter (§3.3.1) then spatial context mixer (§3.3.2) -> F^(3) [B, H, W, D]."""
        # LayerNorm without affine over D, per patch: batch-independent, so a frame's result does not
        # depend on the rest of its dynamic batch (the seed's batch/spatial stats would).
        white = F.layer_norm(f1, (f1.shape[-1],), eps=1e-5)
        gamma = 0.5 + 1.5 * torch.sigmoid(self.wa_gamma[task])  # gamma_t in [0.5, 2]
        beta = 2.0 * torch.tanh(self.wa_beta[task])  # beta_t in [-2, 2]
        f2 = gamma * white + beta
        c = self.scm_conv(f2.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        a = torch.sigmoid(self.scm_gate[task])
        return (1 - a) * f2 + a * c  # F^(3) = (1 - alpha) F^(2) + alpha C

    def flow_forward(self, patch: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x = F^(3) [N, D], z [N, D], log|det J| [N]) with N = B*H*W rows in (B, H, W) order."""
        x = self.adapt(self.embed(patch), task).reshape(-1, self.cfg.dim)
        z, ld = self.transform(x, task)
        return x, z, ld

    def transform(self, x: torch.Tensor, task: str, rev: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Base flow (+ LoRA_t) then DIA_t (rev: inverse). MoLE-Flow paper, Eq. 19: log|det J| = flow + DIA."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {self.tasks}")
        self.switch.task = task
        try:
            if not rev:
                z0, j0 = self.flow(x)
                z, j1 = self.dia[task](z0)
                return z, j0 + j1
            z0, j1 = self.dia[task](x, rev=True)
            z, j0 = self.flow(z0, rev=True)
            return z, j0 + j1
        finally:
            self.switch.task = None

    def patch_nll(self, patch: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch NLL [B, H, W] (MoLE-Flow paper eq. 20-21, 25) and per-patch log-det [B, H, W]."""
        _, z, ld = self.flow_forward(patch, task)
        D = self.cfg.dim
        nll = 0.5 * (z**2).sum(1) + 0.5 * D * math.log(2 * math.pi) - ld
        b = patch.shape[0]
        g = self.cfg.grid
        return nll.reshape(b, g, g), ld.reshape(b, g, g)

    def image_score(self, nll: torch.Tensor) -> torch.Tensor:
        k = min(self.cfg.k_patches, nll[0].numel())
        return nll.flatten(1).topk(k, dim=1).values.mean(1)  # top-K mean (MoLE-Flow paper eq. 28)

    def upsample(self, nll: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.cfg.image_size
        return F.interpolate(nll[:, None], size=(size, size), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ router
    def set_prototype(self, task: str, feats: torch.Tensor) -> None:
        """Gaussian prototype of task's good images: mean + Ledoit-Wolf shrunk covariance + lambda_reg I
        (MoLE-Flow paper, Method §3.6.1), kept as covariance and precision."""
        from sklearn.covariance import ledoit_wolf

        f = feats.double().cpu().numpy()
        mu = f.mean(0)
        if f.shape[0] >= 2:
            cov, _ = ledoit_wolf(f)
        else:
            cov = np.diag(np.full(f.shape[1], max(float(np.var(f)), 1e-3)))
        cov = cov + self.cfg.router_reg * np.eye(cov.shape[0]) * max(np.trace(cov) / cov.shape[0], 1e-12)
        prec = np.linalg.inv(cov)
        self.set_router(task, torch.from_numpy(mu), torch.from_numpy(cov), torch.from_numpy(0.5 * (prec + prec.T)))

    def set_router(self, task: str, mean: torch.Tensor, cov: torch.Tensor, prec: torch.Tensor) -> None:
        """Install ``task``'s prototype (float64 mean, covariance, precision) on the flow's device."""
        dev = self.pos.device
        self.router[task] = RouterPrototype(mean.to(dev), cov.to(dev), prec.to(dev))
        self._pooled = None

    def _pooled_precision(self) -> torch.Tensor:
        key = (*self.tasks, str(self.pos.device))  # a cached precision never outlives a .to(device)
        if self._pooled is None or self._pooled[0] != key:
            cov = torch.stack([self.router[t].cov.double() for t in self.tasks]).mean(0)
            prec = torch.linalg.inv(cov)
            self._pooled = (key, 0.5 * (prec + prec.T))
        return self._pooled[1]

    @staticmethod
    def _maha(f: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
        d = f - mu
        return torch.sqrt(torch.clamp(((d @ prec) * d).sum(1), min=0))

    def route_distances(self, image_feats: torch.Tensor, tasks: list[str] | None = None,
                        pooled: bool = False) -> torch.Tensor:
        """Mahalanobis distances [B, T] (MoLE-Flow paper eq. 23) in float64.

        ``pooled=False``: each task's own precision (the ``route_distance`` output: depends on that
        task's adapter only, so it is bit-stable when tasks are added). ``pooled=True``: the precision
        of the mean within-task covariance of the loaded tasks, used for the argmin decision (a tight
        task, e.g. bottle, would otherwise lose its own defective images to a broad task, e.g. ELPV)."""
        tasks = tasks or self.tasks
        f = image_feats.double()
        if pooled:
            prec = self._pooled_precision()
            return torch.stack([self._maha(f, self.router[t].mean.double(), prec) for t in tasks], dim=1)
        return torch.stack([self._maha(f, self.router[t].mean.double(), self.router[t].prec.double())
                            for t in tasks], dim=1)

    def route(self, image_feats: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """(argmin task under the pooled metric, distance to that task under its own precision)."""
        if not self.tasks:
            raise RuntimeError("no tasks: train one first")
        idx = self.route_distances(image_feats, pooled=True).argmin(1)
        own = self.route_distances(image_feats)
        return [self.tasks[i] for i in idx.tolist()], own.gather(1, idx[:, None])[:, 0].float()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, x: torch.Tensor, tasks: list[str | None] | None = None, calibrated: bool = False) -> dict:
        """Full inference. ``tasks[i]`` empty/None -> routed. Returns anomaly_map [B,1,S,S], score [B],
        task list, route_distance [B] (to the chosen task's prototype), routed flags, patch_nll [B,H,W].

        ``calibrated``: subtract the task's threshold from score and map_threshold from the map, so one
        threshold (0.0) serves every task (what the Triton model returns)."""
        patch, image = self.extract(x)
        return self.predict_features(patch, image, tasks, calibrated, size=x.shape[-1])

    def merge_lora(self) -> None:
        """Serving: every LoRA linear folds each task's adapter into one dense weight (layers.LoRALinear.merge)."""
        for sn in self.subnets:
            for lin in sn.lora_layers():
                lin.merge()

    @torch.no_grad()
    def predict_features(self, patch, image, tasks=None, calibrated=False, size=None) -> dict:
        """As :meth:`predict` from extracted features; ``size=0``: the map at the grid's native resolution."""
        b = patch.shape[0]
        tasks = list(tasks) if tasks is not None else [None] * b
        if len(tasks) != b:
            raise ValueError(f"{len(tasks)} tasks for {b} images")
        for t in tasks:
            if t and t not in self.tasks:
                raise KeyError(f"unknown task {t!r}; known: {self.tasks}")
        routed_tasks, _ = self.route(image)
        chosen = [t if t else r for t, r in zip(tasks, routed_tasks, strict=True)]
        dist_all = self.route_distances(image)
        rd = torch.stack([dist_all[i, self.tasks.index(t)] for i, t in enumerate(chosen)]).float()
        g, dev = self.cfg.grid, patch.device
        nll = torch.empty(b, g, g, device=dev)
        for t in dict.fromkeys(chosen):  # one flow pass per task present in the batch
            sel = torch.tensor([i for i, c in enumerate(chosen) if c == t], device=dev)
            nll[sel] = self.patch_nll(patch[sel], t)[0]
        score = self.image_score(nll)
        amap = nll[:, None] if size == 0 else self.upsample(nll, size)
        if calibrated:
            thr = torch.tensor([self.thresholds.get(t, {}).get("threshold", 0.0) for t in chosen], device=dev)
            mthr = torch.tensor([self.thresholds.get(t, {}).get("map_threshold", 0.0) for t in chosen], device=dev)
            score = score - thr
            amap = amap - mthr[:, None, None, None]
        return {"anomaly_map": amap, "score": score, "task": chosen, "route_distance": rd,
                "routed": [not t for t in tasks], "patch_nll": nll}

__all__ = ["TASK_CONTAINERS", "MoLEFlow", "MoLEFlowConfig", "TaskSwitch", "check_task_name", "count_parameters"]


def count_parameters(params) -> int:
    return int(sum(p.numel() for p in params))


__all__ = ["MoLEFlow", "MoLEFlowConfig", "LoRALinear", "MoLEContextSubnet", "SimpleSubnet",
           "sincos_pos_embed_2d", "check_task_name", "count_parameters", "TASK_CONTAINERS"]
