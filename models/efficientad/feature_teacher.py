"""Teacher features from a frozen backbone (EfficientAD paper, supplementary "Teacher pretraining").

``FeatureTarget`` is the distillation target: backbone stages at 512 px, PatchCore 3x3 local
aggregation, resized to the 64x64 stride-8 grid, channel-pooled to 384, centre-cropped by 4 cells
to the PDN's 56x56 output grid. ``FrozenFeatureTeacher`` uses that target directly as the teacher.

The paper distils a PDN because its extractor (WideResNet-101) is far slower than the PDN; with
EfficientNet-Lite0 the extractor costs about what the PDN does on a CPU, so the frozen features
are a teacher in their own right (``teacher_kind="lite0-features"``). Its receptive field (stages 2+3
at 512 px: ~195 px of the 256 input) is far beyond the PDN-S student's 33 px, so the student cannot
match it; ``Lite0EarlyTeacher`` (``teacher_kind="lite0-early"``, the CLI default) uses the early stages
on the 256 input instead, with reflect padding and a fixed channel projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.backbones import create_backbone
from models.efficientad.networks import TEACHER_CHANNELS

LITE0 = "tf_efficientnet_lite0"
LITE0_STAGES = (2, 3)  # stride 8 + 16: the analogue of WideResNet layers 2+3


class FeatureTarget(torch.nn.Module):
    """Backbone features at 512 px -> PatchCore-aggregated 384-channel target on the PDN's 56x56 grid."""

    def __init__(self, backbone: torch.nn.Module, out_channels: int = TEACHER_CHANNELS, grid: int = 64, crop: int = 4):
        super().__init__()
        self.backbone = backbone.eval()
        self.out_channels = out_channels
        self.grid = grid
        self.crop = crop

    @torch.no_grad()
    def forward(self, x512: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x512)
        feats = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in feats]  # PatchCore local 3x3 aggregation
        feats = [F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False) for f in feats]
        f = torch.cat(feats, dim=1)
        b, c, h, w = f.shape
        f = f.permute(0, 2, 3, 1).reshape(-1, 1, c)
        f = F.adaptive_avg_pool1d(f, self.out_channels).reshape(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        k = self.crop
        return f[:, :, k : h - k, k : w - k].contiguous() if k else f


class FrozenFeatureTeacher(torch.nn.Module):
    """The backbone target itself as the teacher (a 256 input upsampled to 512, as the distillation
    feeds the extractor): EfficientAD's teacher without the PDN approximation."""

    def __init__(self, target: FeatureTarget):
        super().__init__()
        self.target = target

    def forward(self, x256: torch.Tensor) -> torch.Tensor:
        x512 = F.interpolate(x256, scale_factor=2, mode="bilinear", align_corners=False)
        return self.target(x512)


def lite0_feature_teacher(backbone_weights=None, *, require_sha256: bool = False) -> FrozenFeatureTeacher:
    """Frozen ``tf_efficientnet_lite0`` stages 2+3 as a 384-channel teacher, parameters without
    gradients (random weights when ``backbone_weights`` is None: a checkpoint's state dict fills them)."""
    target = FeatureTarget(create_backbone(LITE0, backbone_weights, features_only=True, out_indices=LITE0_STAGES,
                                           require_sha256=require_sha256))
    return FrozenFeatureTeacher(target).eval().requires_grad_(False)


# --- lite0-early: a teacher whose receptive field the PDN-S student can match ---------------------

LITE0_EARLY_STAGES = (1, 2)  # timm feature levels of stride 4 (24 ch) and 8 (40 ch)
LITE0_EARLY_STAGE2_BLOCKS = 1  # blocks of stage 2 kept: its first (strided) block only, see Lite0EarlyTeacher
LITE0_EARLY_CHANNELS = 24 + 40  # concatenated feature channels before the projection
PROJECTION_SEED = 20240  # the fixed 64 -> 384 projection (a buffer: checkpoints and exports carry it)


def reflect_padding(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every padded (k > 1) convolution for the same convolution with symmetric ``k // 2`` reflect
    padding (same parameters, same keys), so no zero ring: a zero-padded backbone sees past the image
    edge, which the unpadded PDN student cannot imitate. timm's TF-"same" strided convs pad right/bottom
    only; the symmetric pad keeps the output size for odd kernels and puts stride-s cell g on pixel s*g."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.kernel_size) > 1:
            if any(k % 2 == 0 for k in child.kernel_size) or any(d != 1 for d in child.dilation):
                raise ValueError(f"{name}: reflect padding needs odd kernels without dilation")
            conv = torch.nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                   tuple(k // 2 for k in child.kernel_size), groups=child.groups,
                                   bias=child.bias is not None, padding_mode="reflect")
            conv.weight = child.weight
            conv.bias = child.bias
            setattr(module, name, conv)
        else:
            reflect_padding(child)
    return module


def _aggregate(f: torch.Tensor) -> torch.Tensor:
    """PatchCore local aggregation: 3x3 average, stride 1 (reflect-padded; the cells the teacher keeps
    never touch the pad)."""
    return F.avg_pool2d(F.pad(f, (1, 1, 1, 1), mode="reflect"), 3, stride=1)


class Lite0EarlyTeacher(torch.nn.Module):
    """EfficientNet-Lite0 stage 1 (stride 4) + the first block of stage 2 (stride 8) on the 256 input
    (no upsampling), reflect-padded, PatchCore 3x3 aggregation, on the PDN's unpadded 56x56 grid,
    384 channels by a fixed orthogonal projection of the 64 feature channels.

    Receptive field (input px at 256, theoretical / 90% of the effective |gradient| mass, measured on
    bottle images): PDN-S 33 / 27-29; this teacher 59 / ~37 (stage 1 with aggregation 27, stage 2's first
    block with aggregation and the half-cell interpolation 59); with all of stage 2 it would be 91 / 45,
    the old lite0-features teacher (stages 2+3 at 512) 195 / 75.

    Grid: the PDN-S output cell i sees input pixels 4i..4i+32 (centre 4i+16, EfficientAD paper Table 1,
    no padding); with symmetric padding stage-1 cell g is centred on pixel 4g and stage-2 cell h on 8h, so
    the teacher cell i is stage-1 cell i+4 and stage-2 position (i+4)/2 (an align_corners bilinear resize
    to 2h-1 cells lands on it exactly).

    ``features`` gives the 64 channels before the projection (what the training cache stores);
    ``project`` is the fixed 1x1 projection; ``forward`` = project(features)."""

    def __init__(self, backbone: torch.nn.Module, out_channels: int = TEACHER_CHANNELS, seed: int = PROJECTION_SEED):
        super().__init__()
        blocks = backbone.blocks
        self.stem = torch.nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.stage1 = torch.nn.Sequential(blocks[0], blocks[1])
        self.stage2 = blocks[2][:LITE0_EARLY_STAGE2_BLOCKS]
        reflect_padding(self)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(out_channels, LITE0_EARLY_CHANNELS, generator=g, dtype=torch.float64))
        self.register_buffer("projection", q.float().reshape(out_channels, LITE0_EARLY_CHANNELS, 1, 1))
        self.out_channels = out_channels

    def features(self, x256: torch.Tensor) -> torch.Tensor:
        s1 = self.stage1(self.stem(x256))
        s2 = self.stage2(s1)
        a1 = _aggregate(s1)
        h2, w2 = s2.shape[-2:]
        a2 = F.interpolate(_aggregate(s2), size=(2 * h2 - 1, 2 * w2 - 1), mode="bilinear", align_corners=True)
        h, w = s1.shape[-2] - 8, s1.shape[-1] - 8  # the unpadded PDN's grid: 56x56 at 256 px
        return torch.cat([a1[:, :, 4 : 4 + h, 4 : 4 + w], a2[:, :, 4 : 4 + h, 4 : 4 + w]], dim=1)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        return F.conv2d(f, self.projection)

    def forward(self, x256: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x256))


def lite0_early_teacher(backbone_weights=None, *, require_sha256: bool = False) -> Lite0EarlyTeacher:
    """Frozen ``tf_efficientnet_lite0`` stage 1 + first block of stage 2 as a 384-channel teacher
    (random backbone weights when ``backbone_weights`` is None: a checkpoint's state dict fills them)."""
    backbone = create_backbone(LITE0, backbone_weights, features_only=True, out_indices=LITE0_EARLY_STAGES,
                               require_sha256=require_sha256)
    return Lite0EarlyTeacher(backbone).eval().requires_grad_(False)
