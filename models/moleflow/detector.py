"""MoLE-Flow as a models.detector.Detector: ONE Triton model whose tasks are products (contracts/detectors.py).

The checkpoint is a training store (frozen base + one adapter per task, models/moleflow/store.py): every
``train`` adds the product's task adapter to it, ``export`` writes a new Triton version with all of them.
Thin: the CLI verbs (models/moleflow/cli.py), export (export.py) and the Triton serving class
(serving.py) do the work; torch is imported inside the methods only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contracts.config import Settings
from models.detector import DetectorBase, Recipe, Scorer, demo_split, serving_instance


class MoLEFlowDetector(DetectorBase):
    name = "moleflow"
    budget_flag = "--time-budget-s"

    def train(self, train_dir: Path, out: Path, *, product: str, settings: Settings,
              calibration_dir: Path | None = None, extra: Sequence[str] = ()) -> Path:
        from models.cli import run

        cal = ["--calibration-dir", str(calibration_dir)] if calibration_dir else []
        run([self.name, "train-task", "--data-dir", str(train_dir), "--task", product, "--out", str(out), *cal, *extra],
            settings)
        return Path(out)

    def export(self, checkpoint: Path, repository: Path, name: str, *, version: int | None = None,
               max_batch_size: int = 8, require_sha256: bool = False) -> Path:
        from models.moleflow.export import export_triton

        # require_sha256 needs nothing here: every file of a MoLE-Flow store is digest-checked on load
        return export_triton(checkpoint, repository, name, version, None, max_batch_size)

    def load_serving(self, version_dir: Path) -> Scorer:
        from models.moleflow.serving import MoLEFlowServing

        srv = serving_instance(MoLEFlowServing, version_dir)

        def score(x: np.ndarray, tasks: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
            return srv.run(x, [t or None for t in tasks] if tasks is not None else [None] * len(x))

        return score

    def quick_recipe(self, *, data_dir: Path, product: str, workdir: Path, repository: Path,
                     steps: int | None = None, max_images: int | None = None) -> Recipe:
        store = Path(workdir) / "artifacts" / self.name  # re-runs keep an existing task (train-task is idempotent)
        tdir, hdir = demo_split(Path(data_dir) / "mvtec" / product / "train" / "good", workdir, max_images)
        schedule = [*(["--epochs", str(steps)] if steps else []), *(["--max-images", str(max_images)] if max_images else [])]
        train = (self.name, "train-task", "--data-dir", str(tdir), "--task", product, "--out", str(store),
                 "--calibration-dir", str(hdir), "--quick", *schedule)
        export = (self.name, "export", "--checkpoint", str(store), "--repo", str(repository), "--name", self.info.model)
        calibrate = ("calibrate", "--version-dir", str(Path(repository) / self.info.model), "--good-dir", str(hdir),
                     "--task", product)
        return Recipe(self.info.model_name(product), (train, export, calibrate))


DETECTOR = MoLEFlowDetector()
