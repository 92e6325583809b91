"""EfficientAD as a models.detector.Detector: one Triton model per product (contracts/detectors.py).

Thin: the CLI verbs (models/efficientad/cli.py), export (export.py) and the Triton serving class
(serving.py) do the work; torch is imported inside the methods only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contracts.config import Settings
from models.detector import DetectorBase, Recipe, Scorer, demo_split, serving_instance


class EfficientADDetector(DetectorBase):
    name = "efficientad"
    budget_flag = "--max-seconds"

    def train(self, train_dir: Path, out: Path, *, product: str, settings: Settings,
              calibration_dir: Path | None = None, extra: Sequence[str] = ()) -> Path:
        # calibration_dir unused: the threshold comes from train's own held-out split (train.py)
        from models.cli import run

        run([self.name, "train", "--train-dir", str(train_dir), "--out", str(out), *extra], settings)
        return Path(out)

    def export(self, checkpoint: Path, repository: Path, name: str, *, version: int | None = None,
               max_batch_size: int = 8, require_sha256: bool = False) -> Path:
        from models.efficientad.export import export_triton
        from models.efficientad.model import load_checkpoint

        product = self.info.product_of(name)
        if product is None:
            raise ValueError(f"EfficientAD model names are {self.info.model!r}, got {name!r}")
        model, meta = load_checkpoint(checkpoint, require_sha256=require_sha256)
        return export_triton(model, repository, product, version, threshold=meta.get("threshold", 0.0),
                             map_threshold=meta.get("map_threshold", 0.0), max_batch_size=max_batch_size,
                             extra={"quantiles": meta.get("quantiles"),
                                    "threshold_source": meta.get("threshold_source"),
                                    "schedule": {k: meta.get(k) for k in ("steps_done", "selected_step", "train_seconds",
                                                                          "device")}})

    def load_serving(self, version_dir: Path) -> Scorer:
        from models.efficientad.serving import EfficientADServing

        srv = serving_instance(EfficientADServing, version_dir)

        def score(x: np.ndarray, tasks: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
            amap, s = srv.run(x)
            return {srv.map_name: amap, srv.score_name: s}

        return score

    def quick_recipe(self, *, data_dir: Path, product: str, workdir: Path, repository: Path,
                     steps: int | None = None, max_images: int | None = None) -> Recipe:
        ckpt = Path(workdir) / "artifacts" / f"{self.info.model_name(product)}.pt"
        tdir, hdir = demo_split(Path(data_dir) / "mvtec" / product / "train" / "good", workdir, max_images or 100)
        # the CLI's defaults: its default teacher (product-independent, local weights) and its penalty setting
        train = (self.name, "train", "--train-dir", str(tdir), "--out", str(ckpt), "--steps", str(steps or 300),
                 "--max-train-images", str(max_images or 100))
        export = (self.name, "export", "--checkpoint", str(ckpt), "--repository", str(repository), "--product", product)
        calibrate = ("calibrate", "--version-dir", str(Path(repository) / self.info.model_name(product)),
                     "--good-dir", str(hdir))
        return Recipe(self.info.model_name(product), (train, export, calibrate))


DETECTOR = EfficientADDetector()
