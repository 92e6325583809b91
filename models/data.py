"""Datasets shared by every detector: MVTec-AD-layout folders and plain image folders.

API (import from ``models.data``):

* :func:`data_root` (settings) -> Path: the ``data_dir`` setting (LINEWATCH_DATA_DIR, default
  ``<repo>/../shared/data``; contracts/config.py, docs/CONTRACTS.md)
* :func:`mvtec_category_dir` (category, root) -> Path of ``<root>/mvtec/<category>``
* :func:`list_images` (folder, recursive=False) -> sorted image paths
* :class:`Sample` (path, label, defect_type, mask_path)
* :func:`mvtec_samples` (category_dir, split="train"|"test") -> list[Sample]
* :func:`split_train_val` (items, val_fraction=0.1, seed=0) -> (train, val) deterministic
* :func:`split_good` (paths, holdout, seed) -> (train, held-out) as the training job splits good images
* :func:`load_image` (path, size) -> float32 RGB HxWx3 in [0, 1] (resize like stream/preprocess)
* :func:`load_mask` (path, size) -> uint8 HxW {0,1} (nearest resize); zeros when path is None
* :func:`normalize` (img, mean, std) / :data:`DEFAULT_MEAN` / :data:`IMAGENET_MEAN`: HWC [0,1] -> CHW tensor
* :class:`MVTecDataset` (category_dir, split, size=256, samples=None): items are dicts
  ``{"image": FloatTensor[3,S,S] normalised, "mask": uint8 Tensor[S,S], "label": int,
  "defect_type": str, "path": str}``
* :class:`ImageFolderDataset` (folder or list of paths, size=256, transform=None, recursive=True):
  items ``{"image": Tensor[3,S,S], "path": str}``; ``transform`` gets/returns HWC float [0,1] numpy.

Images are read with OpenCV, converted to RGB, resized to ``size`` x ``size`` (INTER_AREA when
shrinking, INTER_LINEAR when growing) and normalised with the model's mean/std (default 0.5/0.5: tf_efficientnet_lite0), i.e. exactly the
serving preprocess contract, so training, evaluation and Triton see the same tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from contracts.config import Settings

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The default backbone (tf_efficientnet_lite0, a TensorFlow port) and the default EfficientAD teacher
# distilled from it take inputs scaled to mean 0.5 / std 0.5.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


class DataError(Exception):
    """Missing or malformed dataset folder / image (CLI turns it into a one-line error)."""


def data_root(settings: Settings) -> Path:
    """The shared data folder (MVTec, weights, ImageNet sample) of the entry point's settings."""
    return Path(settings.data_dir)


def mvtec_category_dir(category: str, root: str | Path) -> Path:
    return Path(root) / "mvtec" / category


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect_type: str  # "good" or the defect folder name
    mask_path: Path | None = None


def mvtec_samples(category_dir: str | Path, split: str = "train") -> list[Sample]:
    """Samples of an MVTec-AD-layout folder: ``train/good``, ``test/<type>``, ``ground_truth/<type>``."""
    root = Path(category_dir)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"MVTec folder missing: {split_dir}")
    samples: list[Sample] = []
    for type_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        dtype = type_dir.name
        for p in list_images(type_dir):
            if dtype == "good":
                samples.append(Sample(p, 0, "good", None))
            else:
                mp = root / "ground_truth" / dtype / f"{p.stem}_mask.png"
                samples.append(Sample(p, 1, dtype, mp if mp.is_file() else None))
    if not samples:
        raise DataError(f"no images under {split_dir}")
    return samples


def split_train_val(items: Sequence, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic shuffle split; at least one item in val when ``val_fraction`` > 0 and len > 1."""
    items = list(items)
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(items) * val_fraction))
    if val_fraction > 0 and len(items) > 1:
        n_val = max(1, n_val)
    val_idx = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def split_good(paths: list[Path], holdout: float, seed: int, min_holdout: int = 20) -> tuple[list[Path], list[Path]]:
    """(train, held-out) of a product's good images, deterministic in ``seed``: the held-out share is
    ``holdout`` of them, at least ``min_holdout`` and at most half (the training job calibrates on it)."""
    paths = sorted(paths)
    rng = random.Random(seed)
    idx = list(range(len(paths)))
    rng.shuffle(idx)
    n_hold = min(max(min_holdout, int(round(len(paths) * holdout))), len(paths) // 2)
    hold = sorted(paths[i] for i in idx[:n_hold])
    train = sorted(paths[i] for i in idx[n_hold:])
    return train, hold


def _resize(img: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    w, h = (size, size) if isinstance(size, int) else (size[1], size[0])
    if img.shape[0] == h and img.shape[1] == w:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if (w < img.shape[1] and h < img.shape[0]) else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def load_image(path: str | Path, size: int | tuple[int, int] | None = 256) -> np.ndarray:
    """RGB float32 HxWx3 in [0, 1], resized to ``size`` (int = square, tuple = (H, W))."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"cannot read image: {path}")
    if img.dtype == np.uint16:
        img = (img / 257.0).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if size is not None:
        img = _resize(img, size)
    return img.astype(np.float32) / 255.0


def load_mask(path: str | Path | None, size: int | tuple[int, int]) -> np.ndarray:
    if path is None:
        h, w = (size, size) if isinstance(size, int) else size
        return np.zeros((h, w), np.uint8)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"cannot read mask: {path}")
    return (_resize(m, size, nearest=True) > 127).astype(np.uint8)


def normalize(img: np.ndarray, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> torch.Tensor:
    """HWC float [0,1] -> normalised CHW float tensor."""
    x = (img - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float()


def denormalize(x: torch.Tensor, mean=DEFAULT_MEAN, std=DEFAULT_STD) -> np.ndarray:
    """CHW normalised tensor -> HWC uint8 RGB."""
    arr = x.detach().cpu().numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(arr * 255.0, 0, 255).astype(np.uint8)


class MVTecDataset(Dataset):
    def __init__(
        self,
        category_dir: str | Path,
        split: str = "test",
        size: int = 256,
        samples: Sequence[Sample] | None = None,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)
        self.samples = list(samples) if samples is not None else mvtec_samples(category_dir, split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {
            "image": normalize(load_image(s.path, self.size), self.mean, self.std),
            "mask": torch.from_numpy(load_mask(s.mask_path, self.size)),
            "label": s.label,
            "defect_type": s.defect_type,
            "path": str(s.path),
        }


class ImageFolderDataset(Dataset):
    def __init__(
        self,
        folder: str | Path | Sequence[str | Path],
        size: int = 256,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        recursive: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        if isinstance(folder, str | Path):
            self.paths = list_images(folder, recursive=recursive)
        else:
            self.paths = [Path(p) for p in folder]
        if not self.paths:
            raise DataError(f"no images in {folder}")
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        img = load_image(self.paths[i], self.size)
        if self.transform is not None:
            img = self.transform(img)
        return {"image": normalize(img, self.mean, self.std), "path": str(self.paths[i])}
