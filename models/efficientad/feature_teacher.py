"""Teacher features from a frozen backbone (EfficientAD paper, supplementary "Teacher pretraining").

``FeatureTarget`` is the distillation target: backbone stages at 512 px, PatchCore 3x3 local
aggregation, resized to the 64x64 stride-8 grid, channel-pooled to 384, centre-cropped by 4 cells
to the PDN's 56x56 output grid. ``FrozenFeatureTeacher`` uses that target directly as the teacher.

The paper distils a PDN because its extractor (WideResNet-101) is far slower than the PDN; with
EfficientNet-Lite0 the extractor costs about what the PDN does on a CPU, so the frozen features
are a teacher in their own right (``teacher_kind="lite0-features"``).
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
