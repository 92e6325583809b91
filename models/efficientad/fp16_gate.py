"""FP16 gate: does serving EfficientAD in FP16 change its decisions? (tests, benchmarks)

The GPU deployment runs ``model.onnx`` on onnxruntime with TensorRT in FP16 (contracts.pbtxt
``apply_deployment``). This gate measures what FP16 does to a trained model on real images, on the CPU:
the FP32 serving graph and an FP16 one (:func:`fp16_graph`: every weight, buffer and activation in
float16; uint8 in, FP32 score out) are exported to ONNX and run with onnxruntime. onnxruntime's CPU
provider has no FP16 kernel for most of these ops, so it inserts casts: tensors are rounded to FP16
between ops and each op computes in FP32, the pattern of FP16 tensor-core kernels (FP16 storage, FP32
accumulation). Measured: image AUROC of both, its change, and the number of decisions
(``score > threshold``, the worker's rule) that flip at a threshold chosen on held-out *good* images
(never test labels).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from contracts.spec import ModelSpec, to_tensor
from models.efficientad.model import EfficientAD
from models.efficientad.onnx_graph import ServingGraph, export_onnx, onnx_session, run_onnx
from models.evaluation import image_auroc

RUNTIME = "onnxruntime-cpu: fp32 graph vs fp16 graph (model.half(); fp16 tensors between ops, fp32 math in each op)"
MAX_ABS_DAUROC = 0.005  # bounds of the gate (docs: tests/unit/test_efficientad_onnx.py measurements)
MAX_FLIPS = 1


def fp16_graph(model: EfficientAD) -> ServingGraph:
    """The serving graph with a float16 copy of ``model`` (uint8 in; fp16 map, fp32 score out)."""
    return ServingGraph(copy.deepcopy(model).half().eval(), map_dtype=torch.float16, compute_dtype=torch.float16)


def load_pixels(paths: Sequence[str | Path], spec: ModelSpec) -> np.ndarray:
    """uint8 [N,C,H,W]: OpenCV-decoded images through the spec's preprocess (contracts.spec.to_tensor)."""
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image: {p}")
        out.append(to_tensor(img, spec))
    return np.stack(out)


def score_session(session, pixels: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly maps, scores [N]) of uint8 ``pixels`` through an onnxruntime session, ``batch`` at a time."""
    maps, scores = [], []
    for i in range(0, len(pixels), batch):
        m, s = run_onnx(session, pixels[i : i + batch])
        maps.append(m)
        scores.append(s.reshape(-1))
    return np.concatenate(maps), np.concatenate(scores)


@dataclass
class GateResult:
    runtime: str
    n_images: int
    n_anomalous: int
    threshold: float
    threshold_source: str
    auroc_fp32: float
    auroc_fp16: float
    d_auroc: float
    flips: int
    max_abs_score_diff: float
    max_abs_map_diff: float  # native map, fp16 graph vs fp32 graph (both cast to float32)
    seconds_fp32: float
    seconds_fp16: float
    flipped: list[int] = field(default_factory=list)  # indices of the images whose decision flips
    scores_fp32: list[float] = field(default_factory=list, repr=False)
    scores_fp16: list[float] = field(default_factory=list, repr=False)

    def reasons(self, max_abs_dauroc: float = MAX_ABS_DAUROC, max_flips: int = MAX_FLIPS) -> list[str]:
        """Why the gate fails (empty: it passes)."""
        out = []
        if not abs(self.d_auroc) <= max_abs_dauroc:
            out.append(f"|AUROC fp16 - fp32| = {abs(self.d_auroc):.4f} > {max_abs_dauroc}")
        if self.flips > max_flips:
            out.append(f"{self.flips} decisions flip at threshold {self.threshold:.5g} (> {max_flips})")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def fp16_gate(model: EfficientAD, pixels: np.ndarray, labels: Sequence[int], threshold: float, workdir: str | Path,
              *, threshold_source: str = "given", size: int = 256, batch: int = 8,
              fp32_session=None) -> GateResult:
    """Score uint8 ``pixels`` (labels 0 good / 1 anomalous) with the FP32 and FP16 ONNX graphs of ``model``.
    ``fp32_session``: an onnxruntime session on the FP32 graph already exported (else exported here)."""
    workdir = Path(workdir)
    if fp32_session is None:
        fp32_session = onnx_session(export_onnx(ServingGraph(model, map_dtype=torch.float32),
                                                workdir / "fp32.onnx", size=size))
    t0 = time.perf_counter()
    maps32, s32 = score_session(fp32_session, pixels, batch)
    t1 = time.perf_counter()
    fp16_session = onnx_session(export_onnx(fp16_graph(model), workdir / "fp16.onnx", size=size))
    t2 = time.perf_counter()
    maps16, s16 = score_session(fp16_session, pixels, batch)
    t3 = time.perf_counter()
    y = np.asarray(labels, dtype=np.int64)
    a32, a16 = image_auroc(y, s32), image_auroc(y, s16)
    flipped = np.flatnonzero((s32 > threshold) != (s16 > threshold))
    return GateResult(
        runtime=RUNTIME, n_images=len(y), n_anomalous=int(y.sum()), threshold=float(threshold),
        threshold_source=threshold_source, auroc_fp32=a32, auroc_fp16=a16, d_auroc=a16 - a32,
        flips=len(flipped), max_abs_score_diff=float(np.abs(s16.astype(np.float64) - s32).max()),
        max_abs_map_diff=float(np.abs(maps16.astype(np.float32) - maps32.astype(np.float32)).max()),
        seconds_fp32=t1 - t0, seconds_fp16=t3 - t2, flipped=[int(i) for i in flipped],
        scores_fp32=s32.tolist(), scores_fp16=s16.tolist())


__all__ = ["GateResult", "MAX_ABS_DAUROC", "MAX_FLIPS", "RUNTIME", "fp16_gate", "fp16_graph", "load_pixels",
           "score_session"]
