"""MoLE-Flow building blocks: 2-D sin-cos position embedding, LoRA linear, soft clamp, and the FrEIA
coupling stack with its context-aware subnet (MoLE-Flow paper, eq. 2 and 12-13)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import AffineCouplingOneSided, PermuteRandom
from torch import nn

from models.moleflow.config import MoLEFlowConfig, TaskSwitch


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
        self.merged: nn.ModuleDict | None = None  # merge(): per-task dense weights for serving

    def add_task(self, name: str, gen: torch.Generator) -> None:
        # A ~ N(0, 1/r), B = 0 (MoLE-Flow paper, notation) -> the adapter starts as the identity on the base
        self.lora_A[name] = nn.Parameter(torch.randn(self.rank, self.in_f, generator=gen) / math.sqrt(self.rank))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_f, self.rank))
        self.lora_bias[name] = nn.Parameter(torch.zeros(self.out_f))

    def merge(self) -> None:
        """Serving: fold each task's adapter into one dense weight, W_t = W_base + (alpha/r) B_t A_t and
        b_t = b_base + b_t, so a forward is one matmul (same function; the LoRA factors stay for training)."""
        self.merged = nn.ModuleDict()
        with torch.no_grad():
            for t in self.lora_A:
                m = nn.Module()
                m.register_buffer("weight", self.base.weight + self.scaling * self.lora_B[t] @ self.lora_A[t],
                                  persistent=False)
                m.register_buffer("bias", self.base.bias + self.lora_bias[t], persistent=False)
                self.merged[t] = m

    def unmerge(self) -> None:
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._switch.task
        merged = getattr(self, "merged", None)
        if merged is not None and t in merged:
            return F.linear(x, merged[t].weight, merged[t].bias)
        y = self.base(x)
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
