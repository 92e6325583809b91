"""Task image sources for MoLE-Flow jobs: MVTec-layout folders, plain folders, ELPV solar cells.

ELPV (PyPI wheel ``elpv-dataset``, CC BY-NC-SA 4.0) has image-level defect probabilities
0 / 0.33 / 0.67 / 1 and no masks. Here: good = probability 0, defective = probability >= 0.5;
the uncertain 0.33 cells are left out of the test split. Images are read in place (never copied).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from models.data import DataError, list_images


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("ELPV images need the `elpv-dataset` package (pip install elpv-dataset)") from None
    return Path(elpv_dataset.__file__).parent / "data"


def elpv_table() -> list[tuple[Path, float, str]]:
    root = elpv_root()
    data = np.genfromtxt(root / "labels.csv", dtype=["|S19", "<f8", "|S4"], names=["path", "prob", "type"])
    return [(root / p.decode(), float(pr), t.decode()) for p, pr, t in zip(data["path"], data["prob"], data["type"],
                                                                           strict=True)]


def elpv_split(n_train: int = 150, n_test_good: int = 60, n_test_bad: int = 60, seed: int = 0,
               cell_type: str | None = None) -> tuple[list[Path], list[tuple[Path, int]]]:
    """(train good paths, test [(path, label)]) with disjoint good cells; deterministic."""
    rows = [r for r in elpv_table() if cell_type is None or r[2] == cell_type]
    good = [r[0] for r in rows if r[1] == 0.0]
    bad = [r[0] for r in rows if r[1] >= 0.5]
    rng = random.Random(seed)
    rng.shuffle(good)
    rng.shuffle(bad)
    if n_train + n_test_good > len(good):
        raise DataError(f"ELPV has only {len(good)} good cells")
    train = good[:n_train]
    test = [(p, 0) for p in good[n_train:n_train + n_test_good]] + [(p, 1) for p in bad[:n_test_bad]]
    return train, test


def task_images(data_dir: str | Path, task: str) -> list[Path]:
    """Good training images of ``task``: ``<dir>/<task>/train/good`` (MVTec root), ``<dir>/train/good``
    (category dir), ``elpv`` keyword, or a plain image folder (recursive)."""
    if str(data_dir) == "elpv":
        return elpv_split()[0]
    d = Path(data_dir)
    for cand in (d / task / "train" / "good", d / "train" / "good"):
        if cand.is_dir():
            return list_images(cand)
    if not d.is_dir():
        raise DataError(f"data folder not found: {d}")
    return list_images(d, recursive=True)
