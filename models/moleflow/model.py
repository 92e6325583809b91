"""MoLE-Flow: frozen normalizing-flow base + one small adapter per product task (seeds 002-004).

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
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AffineCouplingOneSided, PermuteRandom
from torch import nn

TASK_CONTAINERS = ("lora_A", "lora_B", "lora_bias", "wa_gamma", "wa_beta", "scm_gate", "dia")
_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_RE.match(name):
        raise ValueError(f"bad task name {name!r}: use letters, digits, '_' or '-' (max 64)")
    return name


@dataclass
class MoLEFlowConfig:
    backbone: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (2, 3)  # stride 8 + 16 feature maps (the paper's layer2 + layer3)
    image_size: int = 224
    grid: int = 28  # MoLE-Flow paper: the layer-2 (stride 8) resolution, 28x28 at 224; 14 halves it (CPU quick)
    dim: int | None = None  # D; None = the backbone's channel count (40 + 112 = 152 for Lite0 2+3)
    coupling_layers: int = 8  # M = 8 (MoLE-Flow paper, defaults table)
    subnet_hidden: int = 256
    lora_rank: int = 64  # r = 64, alpha = r -> scaling 1 (§3.4.1)
    lora_alpha: float = 64.0
    dia_blocks: int = 6  # N = 6 (MoLE-Flow paper, best ablation setting)
    clamp: float = 1.9  # alpha_clamp (§3.4.3)
    scale_kernel: int = 3  # scale context kernel 3 (Ultimate-Combo2)
    spatial_kernel: int = 3  # spatial context mixer kernel (§3.3.2)
    ctx_alpha_max: float = 1.0  # MoLEContextSubnet ctx gate: alpha = alpha_max * sigmoid(theta)
    top_k: int = 10  # image score = mean of top-K patch NLLs (MoLE-Flow paper eq. 26-28, k=10)
    router_reg: float = 1e-5  # lambda_reg on the covariance diagonal (MoLE-Flow paper, defaults table)
    seed: int = 0

    def input_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from models.backbones import backbone_normalization

        return backbone_normalization(self.backbone)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MoLEFlowConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "out_indices" in known:
            known["out_indices"] = tuple(known["out_indices"])
        return cls(**known)


class TaskSwitch:
    """Shared holder of the active task name, read by every LoRALinear (not a module)."""

    def __init__(self) -> None:
        self.task: str | None = None


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """2D sin-cos positional encoding P in R^{H x W x D} (MoLE-Flow paper, Method §3.2.2: F' = F + P)."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for 2D sin-cos PE, got {dim}")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float64) / q))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    oy = ys.reshape(-1, 1) * omega[None]
    ox = xs.reshape(-1, 1) * omega[None]
    pe = torch.cat([torch.sin(oy), torch.cos(oy), torch.sin(ox), torch.cos(ox)], dim=1)
    return pe.reshape(h, w, dim).float()


class LoRALinear(nn.Module):
    """h(x) = W_base x + b_base + (alpha/r) B_t A_t x + b_t (MoLE-Flow paper, Method §3.4.1 LoRALinear)."""

    def __init__(self, in_f: int, out_f: int, rank: int, alpha: float, switch: TaskSwitch, zero_base: bool = False):
        super().__init__()
        self.base = nn.Linear(in_f, out_f)
        if zero_base:
            nn.init.zeros_(self.base.weight)
            nn.init.zeros_(self.base.bias)
        self.in_f, self.out_f, self.rank = in_f, out_f, rank
        self.scaling = alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        self._switch = switch

    def add_task(self, name: str, gen: torch.Generator) -> None:
        # A ~ N(0, 1/r), B = 0 (MoLE-Flow paper, notation) -> the adapter starts as the identity on the base
        self.lora_A[name] = nn.Parameter(torch.randn(self.rank, self.in_f, generator=gen) / math.sqrt(self.rank))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_f, self.rank))
        self.lora_bias[name] = nn.Parameter(torch.zeros(self.out_f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        t = self._switch.task
        if t is not None and t in self.lora_A:
            y = y + self.scaling * F.linear(F.linear(x, self.lora_A[t]), self.lora_B[t]) + self.lora_bias[t]
        return y


class SoftClamp:
    """FrEIA clamp activation so that s~ = clamp * tanh(s / clamp) (MoLE-Flow paper, Method §3.5.1 soft clamping)."""

    def __init__(self, clamp: float):
        self.clamp = clamp

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u / self.clamp)


def _coupling_stack(dim: int, n: int, subnet, clamp: float, seed: int) -> SequenceINN:
    """n x [FrEIA AffineCouplingOneSided (y2 = x2 * exp(clamp tanh(s/clamp)) + t) -> PermuteRandom]."""
    flow = SequenceINN(dim)
    state = np.random.get_state()  # PermuteRandom seeds numpy's global RNG: restore it afterwards
    for i in range(n):
        flow.append(AffineCouplingOneSided, subnet_constructor=subnet, clamp=clamp,
                    clamp_activation=SoftClamp(clamp))
        flow.append(PermuteRandom, seed=seed * 7919 + i)
    np.random.set_state(state)
    return flow


class MoLEContextSubnet(nn.Module):
    """Coupling subnet: s-net sees [x; ctx], t-net sees x (MoLE-Flow paper, Method §3.4.1).

    Rows arrive ordered (B, H, W); the 1D input is reshaped to the patch grid for the 3x3
    depthwise context conv. ctx only depends on the passive half, so the coupling stays invertible
    and the Jacobian stays block-triangular (per-patch log-det = sum of that patch's s).
    """

    def __init__(self, c_in: int, c_out: int, cfg: MoLEFlowConfig, switch: TaskSwitch):
        super().__init__()
        self.grid = cfg.grid
        self.clamp = cfg.clamp
        k = cfg.spatial_kernel
        self.ctx_conv = nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in)
        self.ctx_theta = nn.Parameter(torch.zeros(1))
        self.ctx_alpha_max = cfg.ctx_alpha_max
        h, r, a = cfg.subnet_hidden, cfg.lora_rank, cfg.lora_alpha
        half = c_out // 2
        self.s1 = LoRALinear(2 * c_in, h, r, a, switch)
        self.s2 = LoRALinear(h, half, r, a, switch, zero_base=True)
        self.t1 = LoRALinear(c_in, h, r, a, switch)
        self.t2 = LoRALinear(h, half, r, a, switch, zero_base=True)

    def lora_layers(self) -> list[LoRALinear]:
        return [self.s1, self.s2, self.t1, self.t2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape
        hw = self.grid * self.grid
        b = n // hw
        xs = x.reshape(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        alpha = self.ctx_alpha_max * torch.sigmoid(self.ctx_theta)
        ctx = alpha * self.ctx_conv(xs).permute(0, 2, 3, 1).reshape(n, c)  # ctx = alpha * c(x)
        s = self.s2(F.relu(self.s1(torch.cat([x, ctx], dim=1))))
        t = self.t2(F.relu(self.t1(x)))
        return torch.cat([s, t], dim=1)


class SimpleSubnet(nn.Module):
    """DIA subnet: D/2 -> D/2 (ReLU) -> (s, t); Xavier-uniform weights, zero biases, zero output layer."""

    def __init__(self, c_in: int, c_out: int, clamp: float):
        super().__init__()
        self.clamp = clamp
        self.fc1 = nn.Linear(c_in, c_in)
        self.fc2 = nn.Linear(c_in, c_out)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc2(F.relu(self.fc1(x)))
        return a  # [s, t]


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
        self.router_mean: dict[str, torch.Tensor] = {}
        self.router_prec: dict[str, torch.Tensor] = {}
        self.router_cov: dict[str, torch.Tensor] = {}
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
        feats = self.backbone(x)
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
        """Base flow (+ LoRA_t) then DIA_t (rev: inverse). Seed 003 eq. 19: log|det J| = flow + DIA."""
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
        k = min(self.cfg.top_k, nll[0].numel())
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
        self.router_mean[task] = torch.from_numpy(mu)
        self.router_cov[task] = torch.from_numpy(cov)
        self.router_prec[task] = torch.from_numpy(0.5 * (prec + prec.T))
        self._pooled = None

    def _pooled_precision(self) -> torch.Tensor:
        key = tuple(self.tasks)
        if self._pooled is None or self._pooled[0] != key:
            cov = torch.stack([self.router_cov[t].double() for t in self.tasks]).mean(0)
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
            return torch.stack([self._maha(f, self.router_mean[t].double(), prec) for t in tasks], dim=1)
        return torch.stack([self._maha(f, self.router_mean[t].double(), self.router_prec[t].double())
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

    @torch.no_grad()
    def predict_features(self, patch, image, tasks=None, calibrated=False, size=None) -> dict:
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
        g = self.cfg.grid
        nll = torch.empty(b, g, g)
        for t in dict.fromkeys(chosen):  # one flow pass per task present in the batch
            sel = torch.tensor([i for i, c in enumerate(chosen) if c == t])
            nll[sel] = self.patch_nll(patch[sel], t)[0]
        score = self.image_score(nll)
        amap = self.upsample(nll, size)
        if calibrated:
            thr = torch.tensor([self.thresholds.get(t, {}).get("threshold", 0.0) for t in chosen])
            mthr = torch.tensor([self.thresholds.get(t, {}).get("map_threshold", 0.0) for t in chosen])
            score = score - thr
            amap = amap - mthr[:, None, None, None]
        return {"anomaly_map": amap, "score": score, "task": chosen, "route_distance": rd,
                "routed": [not t for t in tasks], "patch_nll": nll}


def count_parameters(params) -> int:
    return int(sum(p.numel() for p in params))


__all__ = ["MoLEFlow", "MoLEFlowConfig", "LoRALinear", "MoLEContextSubnet", "SimpleSubnet",
           "sincos_pos_embed_2d", "check_task_name", "count_parameters", "TASK_CONTAINERS"]
