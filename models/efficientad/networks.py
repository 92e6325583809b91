"""EfficientAD networks (paper Tables 1-2 and supplementary Table 3 = autoencoder).

Layouts are ``nn.Sequential`` with the same indices as the official reference implementation
(github.com/nelson1425/EfficientAD ``common.py``), so an official ``teacher_small.pth`` /
``teacher_medium.pth`` state_dict loads as-is:

* PDN-S keys: ``0.weight/bias`` (Conv-1 128x3x4x4), ``3.*`` (Conv-2 256x128x4x4),
  ``6.*`` (Conv-3 256x256x3x3), ``8.*`` (Conv-4 384x256x4x4).
* PDN-M keys: ``0.*`` (256x3x4x4), ``3.*`` (512x256x4x4), ``6.*`` (512x512x1x1),
  ``8.*`` (512x512x3x3), ``10.*`` (384x512x4x4), ``12.*`` (384x384x1x1).

``padding=False`` (default; the official PDN and anomalib train without padding) drops the table's paddings: a 256x256 input gives a 56x56
feature map, the autoencoder's output size; maps are padded by 4 and upsampled to the input later.
"""

from __future__ import annotations

from torch import nn

TEACHER_CHANNELS = 384  # Table 1/2: Conv-4 (S) / Conv-5,6 (M) of the teacher have 384 kernels
STUDENT_CHANNELS = 768  # "the student has 768 kernels instead of 384": 384 imitate T + 384 imitate AE
OUT_SIZE_NOPAD = 56  # PDN output and AE output for a 256x256 input with padding off


def pdn_small(out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN of EfficientAD-S (Table 1). Receptive field 33x33."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, kernel_size=4, padding=3 * p),  # Conv-1 4x4, 128, pad 3, ReLU
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),  # AvgPool-1 2x2 stride 2, pad 1
        nn.Conv2d(128, 256, kernel_size=4, padding=3 * p),  # Conv-2 4x4, 256, pad 3, ReLU
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),  # AvgPool-2 2x2 stride 2, pad 1
        nn.Conv2d(256, 256, kernel_size=3, padding=1 * p),  # Conv-3 3x3, 256, pad 1, ReLU
        nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, kernel_size=4),  # Conv-4 4x4, 384 (student 768), pad 0, no act.
    )


def pdn_medium(out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN of EfficientAD-M (Table 2)."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, kernel_size=4, padding=3 * p),  # Conv-1 4x4, 256, pad 3, ReLU
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),  # AvgPool-1
        nn.Conv2d(256, 512, kernel_size=4, padding=3 * p),  # Conv-2 4x4, 512, pad 3, ReLU
        nn.ReLU(inplace=True),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),  # AvgPool-2
        nn.Conv2d(512, 512, kernel_size=1),  # Conv-3 1x1, 512, pad 0, ReLU
        nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, kernel_size=3, padding=1 * p),  # Conv-4 3x3, 512, pad 1, ReLU
        nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, kernel_size=4),  # Conv-5 4x4, 384 (student 768), ReLU
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),  # Conv-6 1x1, 384 (student 768), no act.
    )


def pdn(size: str, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> nn.Sequential:
    if size in ("s", "small"):
        return pdn_small(out_channels, padding)
    if size in ("m", "medium"):
        return pdn_medium(out_channels, padding)
    raise ValueError(f"model size must be 'small' or 'medium', not {size!r}")


def autoencoder(out_channels: int = TEACHER_CHANNELS, out_size: int = OUT_SIZE_NOPAD) -> nn.Sequential:
    """Autoencoder of EfficientAD (supplementary Table 3).

    Encoder: EncConv-1..5 4x4 stride 2 pad 1 (32,32,64,64,64) + ReLU, EncConv-6 8x8 (64), no act.
    Decoder: 6x [bilinear resize -> DecConv 4x4 stride 1 pad 2, 64, ReLU -> Dropout 0.2] with
    sizes 3, 8, 15, 32, 63, 127, then bilinear resize to the PDN output size (56 with padding off,
    64 with it), DecConv-7 3x3 pad 1 (64) + ReLU, DecConv-8 3x3 pad 1 (384), no act.
    """

    def dec(size: int) -> list[nn.Module]:
        return [
            nn.Upsample(size=size, mode="bilinear"),
            nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        ]

    return nn.Sequential(
        # encoder
        nn.Conv2d(3, 32, kernel_size=4, stride=2, padding=1),  # EncConv-1 -> 128
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, kernel_size=4, stride=2, padding=1),  # EncConv-2 -> 64
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=4, stride=2, padding=1),  # EncConv-3 -> 32
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1),  # EncConv-4 -> 16
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, kernel_size=4, stride=2, padding=1),  # EncConv-5 -> 8
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, kernel_size=8),  # EncConv-6 -> 1x1 latent (64)
        # decoder
        *dec(3),  # Bilinear-1 + DecConv-1 (+Dropout)
        *dec(8),  # Bilinear-2 + DecConv-2
        *dec(15),  # Bilinear-3 + DecConv-3
        *dec(32),  # Bilinear-4 + DecConv-4
        *dec(63),  # Bilinear-5 + DecConv-5
        *dec(127),  # Bilinear-6 + DecConv-6
        nn.Upsample(size=out_size, mode="bilinear"),  # Bilinear-7
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),  # DecConv-7
        nn.ReLU(inplace=True),
        nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1),  # DecConv-8, 384, no act.
    )


def expected_teacher_keys(size: str) -> dict[str, tuple[int, ...]]:
    """Official teacher state_dict layout (key -> shape) for ``size``; used to validate weight files."""
    return {k: tuple(v.shape) for k, v in pdn(size).state_dict().items()}
