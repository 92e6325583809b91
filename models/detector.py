"""The interface every detector implements (``models/<detector>/detector.py`` exposes ``DETECTOR``).

Resolved through models/registry.py from the entries of contracts/detectors.py; the models CLI, the
train job (models/jobs/train_job.py), the demo (devstack/demo.py) and the detector contract test
(tests/integration/test_detector_contract.py) use only this interface, never a detector's name.

A checkpoint is whatever ``train`` writes and ``export`` reads (EfficientAD: a checkpoint file;
MoLE-Flow: a training store of the frozen base + one adapter per task, extended by every ``train``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from contracts.config import Settings
    from contracts.detectors import DetectorInfo
    from contracts.spec import ModelSpec


@runtime_checkable
class Scorer(Protocol):
    """Eager scoring of an exported version dir, exactly what Triton serves from it.

    ``x``: float32 [n, C, H, W] preprocessed per the spec (contracts.spec.to_tensor); ``tasks``: per image
    the task (None / "" = the model routes; ignored by per-product detectors). Returns every Triton
    output as numpy, keyed and shaped as Triton serves it: at least ``anomaly_map`` [n, 1, H, W] and
    ``score`` [n, 1] (output names per the spec's ``outputs``)."""

    def __call__(self, x: np.ndarray, tasks: Sequence[str | None] | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Recipe:
    """Short-schedule train + export for the demo: ``linewatch-models`` argv per step, and the Triton
    model the steps leave in the repository."""

    model: str
    steps: tuple[tuple[str, ...], ...]


@runtime_checkable
class Detector(Protocol):
    name: str
    info: DetectorInfo

    def register_cli(self, subparsers: argparse._SubParsersAction) -> None:
        """Add the detector's ``linewatch-models <name> VERB`` group (verbs set ``func(args)``)."""

    def train(self, train_dir: Path, out: Path, *, product: str, settings: Settings,
              calibration_dir: Path | None = None, extra: Sequence[str] = ()) -> Path:
        """Train on the good images in ``train_dir`` into checkpoint ``out`` (returned); ``extra``: more
        arguments of the detector's train verb."""

    def budget_args(self, seconds: float) -> list[str]:
        """Arguments of the train verb that fit the detector's full recipe into ``seconds`` of wall time."""

    def export(self, checkpoint: Path, repository: Path, name: str, *, version: int | None = None,
               max_batch_size: int = 8, require_sha256: bool = False) -> Path:
        """Write a new version of Triton model ``name`` into ``repository``; returns the version dir.
        ``require_sha256`` (Settings.require_sha256): refuse input weights whose digest is not known."""

    def spec(self, version_dir: Path) -> ModelSpec:
        """The version's ``linewatch_spec`` (metadata.json) as contracts.spec.ModelSpec."""

    def load_serving(self, version_dir: Path) -> Scorer:
        """Verify the version's artifacts and load them the way the Triton model does."""

    def quick_recipe(self, *, data_dir: Path, product: str, workdir: Path, repository: Path,
                     steps: int | None = None, max_images: int | None = None) -> Recipe:
        """Demo recipe: a short schedule on ``<data_dir>/mvtec/<product>``, artifacts under ``workdir``,
        exported into ``repository``. ``steps`` / ``max_images``: the schedule's length (EfficientAD
        steps, MoLE-Flow epochs) and training-image cap (None: the detector's demo schedule)."""


class DetectorBase:
    """What every detector shares: its registry entry, its CLI group (``models/<name>/cli.py``
    ``register``) and the spec read from a version's metadata.json. Subclasses set ``name``."""

    name: str
    budget_flag: str  # the train verb's wall-budget option

    @property
    def info(self) -> DetectorInfo:
        from contracts.detectors import detector_info

        return detector_info(self.name)

    def register_cli(self, subparsers: argparse._SubParsersAction) -> None:
        import importlib

        importlib.import_module(f"models.{self.name}.cli").register(subparsers)

    def spec(self, version_dir: Path) -> ModelSpec:
        return read_spec(version_dir)

    def budget_args(self, seconds: float) -> list[str]:
        return [self.budget_flag, f"{float(seconds):g}"]


def demo_split(good_dir: Path, workdir: Path, max_images: int | None = None) -> tuple[Path, Path]:
    """A quick recipe's split of a product's good images into symlink folders ``<workdir>/split/{train,holdout}``:
    the held-out quarter (at least 20, at most half; the training job's rule) calibrates the exported version
    (models/jobs/calibrate.py), the rest trains (capped at ``max_images``)."""
    from models.data import split_good

    if not Path(good_dir).is_dir():
        raise ValueError(f"no good images for the demo recipe: {good_dir} is missing (set LINEWATCH_DATA_DIR)")
    paths = [Path(p) for p in sorted(Path(good_dir).iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")]
    train, hold = split_good(paths, 0.25, 0)
    out = Path(workdir) / "split" / Path(good_dir).parent.parent.name  # <data>/mvtec/<product>/train/good
    if max_images:  # a tiny schedule (tests): a held-out set to match, the estimator's minimum of 20 at least
        train, hold = train[:max_images], hold[:max(20, max_images)]
    for name, files in (("train", train), ("holdout", hold)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        for f in files:
            (d / f.name).symlink_to(f.resolve())
    return out / "train", out / "holdout"


def read_spec(version_dir: Path) -> ModelSpec:
    """The shared ``spec`` implementation: metadata.json of a version dir, parsed (contracts.spec)."""
    from contracts.artifact import read_artifact
    from contracts.spec import parse_spec

    return parse_spec(read_artifact(version_dir).metadata)


def serving_instance(serving_cls: type, version_dir: Path):
    """A Triton Python-backend model class (``models/<detector>/serving.py``) initialised in-process on a
    version dir, exactly as Triton's ``initialize`` does it (artifact sha256 verified, then loaded)."""
    vdir = Path(version_dir)
    srv = serving_cls()
    srv.initialize({"model_repository": str(vdir.parent), "model_version": vdir.name})
    return srv
