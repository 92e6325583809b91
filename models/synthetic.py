"""Synthetic anomalies for choosing schedules and early stopping without test labels.

CutPaste (Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization",
CVPR 2021): a rectangle cut from the image itself, colour-jittered, optionally rotated, pasted at
another place. Held-out *good* images plus their CutPaste copies form a labelled validation set that
never touches the test split.
"""

from __future__ import annotations

import random

import cv2
import numpy as np


def cut_paste(img: np.ndarray, rng: random.Random, area: tuple[float, float] = (0.02, 0.10),
              aspect: tuple[float, float] = (0.3, 3.3)) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 float [0,1] -> (image with one pasted patch, uint8 mask of the pasted region)."""
    h, w = img.shape[:2]
    a = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    ph = int(min(h - 2, max(4, round(np.sqrt(a / r)))))
    pw = int(min(w - 2, max(4, round(np.sqrt(a * r)))))
    sy, sx = rng.randrange(0, h - ph), rng.randrange(0, w - pw)
    patch = img[sy:sy + ph, sx:sx + pw].copy()
    # colour jitter of the patch (CutPaste: brightness/contrast/saturation/hue 0.1)
    patch = np.clip(patch * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1), 0.0, 1.0)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = np.ascontiguousarray(cv2.rotate(patch, cv2.ROTATE_180))
    ty, tx = rng.randrange(0, h - ph), rng.randrange(0, w - pw)
    out = img.copy()
    out[ty:ty + ph, tx:tx + pw] = patch
    mask = np.zeros((h, w), np.uint8)
    mask[ty:ty + ph, tx:tx + pw] = 1
    return out.astype(np.float32), mask
