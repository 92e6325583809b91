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


def _blob_mask(h: int, w: int, rng: random.Random, area: tuple[float, float]) -> np.ndarray:
    """A smooth irregular blob (thresholded low-frequency noise, as in DRAEM's Perlin masks) covering a
    fraction ``area`` of the image, as float [0, 1] with soft edges."""
    target = rng.uniform(*area)
    for _ in range(8):
        cells = rng.choice((4, 6, 8))
        nrng = np.random.default_rng(rng.randrange(2**31))
        noise = cv2.resize(nrng.standard_normal((cells, cells)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        # a noise field centred on one spot so the blob is one region, not scattered speckle
        field = noise - ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.08 * h * w)
        t = float(np.quantile(field, 1.0 - target))
        m = (field > t).astype(np.float32)
        if m.sum() >= 16:
            return cv2.GaussianBlur(m, (0, 0), sigmaX=max(1.0, 0.01 * max(h, w)))
    return np.zeros((h, w), np.float32)


def colour_patch(img: np.ndarray, rng: random.Random, area: tuple[float, float] = (0.01, 0.06)) -> tuple[np.ndarray, np.ndarray]:
    """A defect that changes colour or intensity, not shape: an irregular blob whose pixels get a hue
    shift, a saturation and a brightness change (stains, discolouration, burn marks). HxWx3 float [0,1]
    -> (image, uint8 mask)."""
    h, w = img.shape[:2]
    m = _blob_mask(h, w, rng, area)
    hsv = cv2.cvtColor(np.clip(img, 0, 1).astype(np.float32), cv2.COLOR_RGB2HSV)  # H in [0, 360)
    # a mild-to-moderate change (real discolouration is subtle: the family real products scored lowest on)
    hsv[..., 0] = (hsv[..., 0] + rng.choice((-1, 1)) * rng.uniform(15, 60)) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.uniform(0.05, 0.3), 0, 1)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.choice((rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.35))), 0, 1)
    shifted = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    out = img * (1 - m[..., None]) + shifted * m[..., None]
    return np.clip(out, 0, 1).astype(np.float32), (m > 0.5).astype(np.uint8)


# families of synthetic defects for held-out recall estimates (models/operating_point.py)
FAMILIES = {"cutpaste": cut_paste, "colour": colour_patch}
