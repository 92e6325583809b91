"""MoLE-Flow configuration (defaults from the MoLE-Flow paper), task names and the task switch."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

TASK_CONTAINERS = ("lora_A", "lora_B", "lora_bias", "wa_gamma", "wa_beta", "scm_gate", "dia")
_TASK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # fullmatch only


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_RE.fullmatch(name):
        raise ValueError(f"bad task name {name!r}: use letters, digits, '_' or '-' (max 64)")
    return name


@dataclass
class MoLEFlowConfig:
    backbone: str = "tf_efficientnet_lite0"
    # stride 4 + 8 + 16 feature maps: the paper's layer2 + layer3 plus the stride-4 stage, which keeps the colour
    # and intensity changes the deeper stages wash out (benchmarks/results/moleflow_features.json: held-out
    # synthetic colour defects 0.95 -> 0.99 on cells, 0.90 -> 0.99 on screw; mean over 3 products 0.947 -> 0.960)
    out_indices: tuple[int, ...] = (1, 2, 3)
    image_size: int = 224
    grid: int = 28  # MoLE-Flow paper: the layer-2 (stride 8) resolution, 28x28 at 224; 14 halves it (CPU quick)
    dim: int | None = None  # D; None = the backbone's channel count (24 + 40 + 112 = 176 for Lite0 1+2+3)
    coupling_layers: int = 8  # M = 8 (MoLE-Flow paper, defaults table)
    subnet_hidden: int = 256
    lora_rank: int = 64  # r = 64, alpha = r -> scaling 1 (§3.4.1)
    lora_alpha: float = 64.0
    dia_blocks: int = 6  # N = 6 (MoLE-Flow paper, best ablation setting)
    clamp: float = 1.9  # alpha_clamp (§3.4.3)
    scale_kernel: int = 3  # scale context kernel 3 (Ultimate-Combo2)
    spatial_kernel: int = 3  # spatial context mixer kernel (§3.3.2)
    ctx_alpha_max: float = 1.0  # MoLEContextSubnet ctx gate: alpha = alpha_max * sigmoid(theta)
    # image score = mean of the top-K patch NLLs (MoLE-Flow paper eq. 26-28: k=10 of 196 patches); None = sized
    # to the grid, the same 5% share of the image at every grid (39 of 784 at grid 28; the diagnostic's best)
    top_k: int | None = None
    router_reg: float = 1e-5  # lambda_reg on the covariance diagonal (MoLE-Flow paper, defaults table)
    seed: int = 0

    @property
    def k_patches(self) -> int:
        return self.top_k if self.top_k else max(1, round(0.05 * self.grid * self.grid))

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
