"""The EfficientAD detector module: teacher + student + autoencoder + map normalisation.

``EfficientAD.forward(x)`` takes NCHW images (256x256) normalised with ``input_mean``/``input_std``
(the teacher's distillation normalisation: 0.5/0.5 for the default Lite0 teacher) and returns
``(anomaly_map [B,1,H,W], score [B])`` with quantile normalisation baked in, so the eager module,
the TorchScript export and the Triton model compute the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.artifacts import safe_load_safetensors, safe_torch_load, write_sha256_sidecar
from models.efficientad.feature_teacher import lite0_feature_teacher
from models.efficientad.networks import STUDENT_CHANNELS, TEACHER_CHANNELS, autoencoder, pdn

CHECKPOINT_FORMAT = "linewatch-efficientad-v1"


TEACHER_KINDS = ("pdn", "lite0-features")


class EfficientAD(nn.Module):
    """``teacher_kind``: ``"pdn"`` (a distilled PDN teacher, EfficientAD paper §3.1) or
    ``"lite0-features"`` (the frozen Lite0 distillation target itself, models.efficientad.feature_teacher)."""

    def __init__(self, model_size: str = "small", out_channels: int = TEACHER_CHANNELS, padding: bool = False,
                 input_mean: tuple[float, ...] = (0.5, 0.5, 0.5), input_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 teacher_kind: str = "pdn"):
        super().__init__()
        if teacher_kind not in TEACHER_KINDS:
            raise ValueError(f"teacher_kind must be one of {TEACHER_KINDS}, got {teacher_kind!r}")
        if teacher_kind == "lite0-features" and (out_channels != TEACHER_CHANNELS or padding):
            raise ValueError("the lite0-features teacher gives 384 channels on the unpadded 56x56 grid")
        self.teacher_kind = teacher_kind
        self.input_mean = tuple(float(v) for v in input_mean)
        self.input_std = tuple(float(v) for v in input_std)
        self.model_size = model_size
        self.out_channels = out_channels
        self.padding = padding
        self.teacher = pdn(model_size, out_channels, padding) if teacher_kind == "pdn" else lite0_feature_teacher()
        self.student = pdn(model_size, 2 * out_channels, padding)  # 768 = 384 (T) + 384 (AE)
        self.autoencoder = autoencoder(out_channels, out_size=64 if padding else 56)
        # teacher feature normalisation (Alg. 1: per-channel mean/std over the training images)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        # quantile map normalisation (§3.4): q_a (0.9) and q_b (0.995) of M_ST and M_AE on validation
        self.register_buffer("q_st_a", torch.tensor(0.0))
        self.register_buffer("q_st_b", torch.tensor(0.1))
        self.register_buffer("q_ae_a", torch.tensor(0.0))
        self.register_buffer("q_ae_b", torch.tensor(0.1))
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the teacher is frozen and always in eval mode
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised local (M_ST) and global (M_AE) maps at PDN resolution [B,1,56,56]."""
        c = self.out_channels
        t = self.teacher_features(x)
        s = self.student(x)
        a = self.autoencoder(x)
        map_st = torch.mean((t - s[:, :c]) ** 2, dim=1, keepdim=True)  # local: teacher vs student[:384]
        map_ae = torch.mean((a - s[:, c:]) ** 2, dim=1, keepdim=True)  # global: AE vs student[384:]
        return map_st, map_ae

    def combine(self, map_st: torch.Tensor, map_ae: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Raw [B,1,h,w] maps -> combined, quantile-normalised map at ``size`` (the input size).

        Padding off: PDN output cell i is centred on input pixel ~4i+16 (receptive field 33, stride 4),
        i.e. the 56x56 map covers the image minus a 16-pixel border. The raw maps are padded by 4 cells
        with 0 (a squared distance of 0 = "no anomaly", the least anomalous value a raw map can take),
        so the 64x64 grid (stride 4) lines up with the 256x256 input, then bilinearly upsampled
        (Fig. 5). The padding must happen *before* the quantile normalisation: normalised maps are
        negative below q_a (90% of normal pixels), so a 0 pad after it would make the whole uncovered
        border more anomalous than 90% of the normal image (this was the bottle pixel-AUROC bug).
        """
        if not self.padding:
            map_st = F.pad(map_st, (4, 4, 4, 4))
            map_ae = F.pad(map_ae, (4, 4, 4, 4))
        # §3.4: M^_ST = 0.1 (M_ST - q_a^ST)/(q_b^ST - q_a^ST); same for AE; M = 0.5 M^_ST + 0.5 M^_AE
        m_st = 0.1 * (map_st - self.q_st_a) / (self.q_st_b - self.q_st_a)
        m_ae = 0.1 * (map_ae - self.q_ae_a) / (self.q_ae_b - self.q_ae_a)
        m = 0.5 * m_st + 0.5 * m_ae
        return F.interpolate(m, size=size, mode="bilinear", align_corners=False)  # Fig. 5: bilinear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_st, map_ae = self.raw_maps(x)
        amap = self.combine(map_st, map_ae, (x.shape[-2], x.shape[-1]))
        score = torch.amax(amap, dim=(1, 2, 3))  # image score = max of the anomaly map
        return amap, score


def save_checkpoint(model: EfficientAD, path: str | Path, meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_size": model.model_size,
            "out_channels": model.out_channels,
            "padding": model.padding,
            "teacher_kind": model.teacher_kind,
            "input_mean": list(model.input_mean),
            "input_std": list(model.input_std),
            "state_dict": model.state_dict(),
            "meta": meta,
        },
        str(path),
    )
    write_sha256_sidecar(path)  # <path>.sha256: verified by load_checkpoint before deserialising
    return path


def load_checkpoint(path: str | Path, sha256: str | None = None, *,
                    require_sha256: bool = False) -> tuple[EfficientAD, dict[str, Any]]:
    """sha256-verified (``sha256`` or the ``.sha256`` sidecar), then ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ck = safe_torch_load(path, sha256=sha256, require_sha256=require_sha256)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an EfficientAD checkpoint")
    model = EfficientAD(ck["model_size"], ck["out_channels"], ck["padding"],
                        input_mean=ck.get("input_mean", (0.5, 0.5, 0.5)), input_std=ck.get("input_std", (0.5, 0.5, 0.5)),
                        teacher_kind=ck.get("teacher_kind", "pdn"))
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck["meta"]


DEFAULT_TEACHER = Path(__file__).resolve().parent / "weights" / "teacher_small_lite0_imagenet.safetensors"


def load_teacher_weights(model: EfficientAD, path: str | Path, sha256: str | None = None, *,
                         require_sha256: bool = False) -> dict[str, Any]:
    """Load a PDN teacher and return its provenance (empty for foreign files).

    Accepts the official nelson1425 ``teacher_small.pth``/``teacher_medium.pth`` layout (keys ``0.*``,
    ``3.*``, ``6.*``, ``8.*`` (+ ``10.*``, ``12.*`` for medium), see
    :func:`models.efficientad.networks.expected_teacher_keys`; inputs ImageNet-normalised) and our
    ``distill-teacher`` output (safetensors, fp16, provenance and input normalisation in its metadata).
    The sha256 is checked first when known (``sha256``, a ``.sha256`` sidecar or a torch-hub name)."""
    from models.data import IMAGENET_MEAN, IMAGENET_STD

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}")
    meta: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        sd = safe_load_safetensors(path, sha256=sha256, require_sha256=require_sha256)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("meta", "{}"))
    else:
        sd = safe_torch_load(path, sha256=sha256, require_sha256=require_sha256)  # verified first (models.artifacts), weights_only=True
        if isinstance(sd, dict) and "teacher" in sd and isinstance(sd["teacher"], dict):
            sd = sd["teacher"]
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if model.teacher_kind != "pdn":
        raise ValueError(f"{path}: PDN teacher weights given to a {model.teacher_kind} teacher")
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items()}
    own = model.teacher.state_dict()
    if set(sd) != set(own) or any(tuple(sd[k].shape) != tuple(own[k].shape) for k in own):
        raise ValueError(
            f"{path}: teacher keys/shapes do not match PDN-{model.model_size} "
            f"(expected {sorted(own)} with 384 output channels)"
        )
    model.teacher.load_state_dict(sd)
    model.input_mean = tuple(meta.get("input_mean", IMAGENET_MEAN))
    model.input_std = tuple(meta.get("input_std", IMAGENET_STD))
    return meta


def load_feature_teacher_weights(model: EfficientAD, backbone_weights: str | Path, *,
                                 require_sha256: bool = False) -> dict[str, Any]:
    """Fill a ``lite0-features`` teacher from the local EfficientNet-Lite0 file (a plain state dict,
    loaded weights-only by models.backbones); inputs at mean = std = 0.5 (the TensorFlow port's normalisation)."""
    from models.efficientad.feature_teacher import LITE0, LITE0_STAGES

    if model.teacher_kind != "lite0-features":
        raise ValueError("load_feature_teacher_weights needs teacher_kind='lite0-features'")
    model.teacher = lite0_feature_teacher(backbone_weights, require_sha256=require_sha256)
    model.input_mean = model.input_std = (0.5, 0.5, 0.5)
    return {"teacher": "lite0-features", "backbone": LITE0, "out_indices": list(LITE0_STAGES),
            "backbone_weights": str(backbone_weights)}


__all__ = ["EfficientAD", "TEACHER_KINDS", "load_feature_teacher_weights", "save_checkpoint", "load_checkpoint",
           "load_teacher_weights", "DEFAULT_TEACHER",
           "STUDENT_CHANNELS"]
