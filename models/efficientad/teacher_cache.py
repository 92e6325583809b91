"""Teacher-output cache for EfficientAD training: the frozen teacher runs once per image, not per step.

EfficientAD paper, supplementary Algorithm 1, runs the teacher on the clean training image (its output
never changes) and on a freshly augmented copy I' at every step (§3.3: the autoencoder and the student's
second half regress T(I')). On a CPU the teacher pass per step was a large share of the step (the old
``lite0-features`` teacher at 512 px). Here, before the step loop:

* the clean image's teacher output is computed once (as before);
* ``K`` augmentations per training image are drawn once (:func:`ae_augment_draw`: the paper's
  brightness / contrast / saturation jitter, supp. §1.1) and the teacher's output on each is stored;
  a step picks one of the K copies and re-applies its draw to the image (a numpy op, exact), so a step
  costs the student's and the autoencoder's forward/backward only. The departure from the paper:
  K fixed augmentations per image instead of a fresh one per step.

Storage is fp16 and compact: for ``lite0-early`` the 64 backbone channels before the fixed 1x1
projection (:meth:`EfficientAD.teacher_code`; the projection and the Alg. 1 normalisation run per step,
~0.15 GMAC for the two targets), for the other kinds the 384-channel output. Memory:

    N_fit x (K + 1) x C x h x w x 2 bytes     (C = 64 lite0-early / 384 otherwise; h = w = 56 at 256 px)

e.g. bottle (188 fit images), K = 4: 377 MB with lite0-early, 2.26 GB with a 384-channel teacher. K is
cut so the augmented copies stay under ``max_bytes`` and to at most ceil(steps / N) (a step uses one
copy); K = 0 falls back to a live teacher pass on a fresh augmentation every step (the paper's loop).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from contracts.logs import get_logger
from models.data import normalize
from models.efficientad.model import EfficientAD
from models.precision import autocast_args, model_device

log = get_logger(__name__)

_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def ae_augment_draw(rng: random.Random) -> tuple[float, int]:
    """One draw of the autoencoder augmentation: (factor in [0.8, 1.2], kind 0/1/2)."""
    f = rng.uniform(0.8, 1.2)
    return f, rng.randrange(3)


def apply_ae_augment(img: np.ndarray, factor: float, kind: int) -> np.ndarray:
    """Supp. §1.1: brightness (0), contrast (1: blend with the mean grey level) or saturation (2: blend
    with the grey image) jitter by ``factor``."""
    if kind == 0:
        out = img * factor
    elif kind == 1:
        grey = (img @ _GREY).mean()
        out = (img - grey) * factor + grey
    else:
        grey = (img @ _GREY)[..., None]
        out = (img - grey) * factor + grey
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def ae_augment(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """Supp. §1.1: one of brightness / contrast / saturation jitter with factor in [0.8, 1.2]."""
    return apply_ae_augment(img, *ae_augment_draw(rng))


class TeacherCache:
    """Clean + ``k`` augmented teacher codes per training image (fp16, on the model's device)."""

    def __init__(self, model: EfficientAD, raw_imgs: Sequence[np.ndarray], rng: random.Random, k: int = 4, *,
                 steps: int | None = None, max_bytes: float = 1 << 30, amp_bf16: bool = False, batch: int = 8):
        self.model = model
        self.raw_imgs = raw_imgs
        self.mean, self.std = model.input_mean, model.input_std
        dev = model_device(model)
        n = len(raw_imgs)
        with torch.no_grad():
            probe = model.teacher_code(self._input(raw_imgs[0]))
        self.per_copy_bytes = n * probe[0].numel() * 2
        k_mem = int(max_bytes // self.per_copy_bytes)
        k_steps = math.ceil(steps / n) if steps is not None else k
        self.k = max(0, min(k, k_mem, k_steps))
        self.draws = [[ae_augment_draw(rng) for _ in range(self.k)] for _ in range(n)]
        self.codes = torch.empty((n, 1 + self.k, *probe.shape[1:]), dtype=torch.float16, device=dev)
        jobs = [(i, j) for i in range(n) for j in range(1 + self.k)]
        amp = autocast_args(dev, amp_bf16)
        with torch.no_grad():
            for s in range(0, len(jobs), batch):
                chunk = jobs[s : s + batch]
                x = torch.cat([self._input(self.image(i, j - 1)) for i, j in chunk])
                with torch.autocast(**amp):
                    out = model.teacher_code(x).float()
                for (i, j), o in zip(chunk, out, strict=True):
                    self.codes[i, j] = o.half()
        self.nbytes = self.codes.numel() * 2
        log.info("efficientad_teacher_cache", images=n, k=self.k, k_asked=k, mb=round(self.nbytes / 2**20, 1))

    def _input(self, img: np.ndarray) -> torch.Tensor:
        return normalize(img, self.mean, self.std)[None].to(model_device(self.model))

    def image(self, i: int, k: int) -> np.ndarray:
        """Training image ``i``: clean for ``k == -1``, else its ``k``-th cached augmentation (float [0, 1] HWC)."""
        return self.raw_imgs[i] if k < 0 else apply_ae_augment(self.raw_imgs[i], *self.draws[i][k])

    def augmented_input(self, i: int, k: int) -> torch.Tensor:
        """The normalised [1,3,H,W] input of augmentation ``k`` of image ``i`` (what its cached code saw)."""
        return self._input(self.image(i, k))

    @torch.no_grad()
    def set_normalization(self, batch: int = 16) -> None:
        """Alg. 1: per-channel mean/std of the teacher's output over the clean training images
        (streamed in float64, so no full-size fp32 copy of the outputs is ever held)."""
        m = self.model
        s1 = s2 = None
        count = 0
        for i in range(0, len(self.codes), batch):
            raw = m.teacher_raw_from_code(self.codes[i : i + batch, 0].float()).double()
            a, b = raw.sum(dim=(0, 2, 3)), (raw**2).sum(dim=(0, 2, 3))
            s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
            count += raw.shape[0] * raw.shape[2] * raw.shape[3]
        mean = s1 / count
        var = (s2 / count - mean**2).clamp_min(0)
        m.teacher_mean.copy_(mean.float().reshape(m.teacher_mean.shape))
        m.teacher_std.copy_(var.sqrt().float().clamp_min(1e-6).reshape(m.teacher_std.shape))

    @torch.no_grad()
    def clean_target(self, i: int) -> torch.Tensor:
        """Normalised teacher features of clean image ``i`` [1,C,h,w] fp32."""
        return self.model.teacher_from_code(self.codes[i : i + 1, 0].float())

    @torch.no_grad()
    def targets(self, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised teacher features of clean image ``i`` and of its augmentation ``k`` ([1,C,h,w] fp32 each)."""
        t = self.model.teacher_from_code(self.codes[i, [0, 1 + k]].float())
        return t[:1], t[1:]
