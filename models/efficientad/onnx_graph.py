"""The EfficientAD serving graph (uint8 in, native-resolution map out) and its ONNX export.

:class:`ServingGraph` wraps a trained :class:`~models.efficientad.model.EfficientAD` for serving
(docs/CONTRACTS.md, ``input.dtype == "UINT8"``):

* input ``image`` uint8 [B,3,H,W] RGB (contracts.spec.to_tensor: resized and colour-converted only);
  normalised in-graph exactly as the FP32 preprocess does: ``x.float() * (1/scale)``, ``- mean``,
  ``/ std`` (the model's ``input_mean``/``input_std``; the spec keeps them for documentation);
* output ``anomaly_map`` [B,1,h,w]: the combined, quantile-normalised map on the grid *before* the
  final upsample (:meth:`EfficientAD.combine` minus its ``F.interpolate``: the PDN grid padded by 4
  cells, 64x64 for a 256x256 input with padding off), cast to ``map_dtype`` (fp16 by default). A
  bilinear, half-pixel-centred upsample (``cv2.resize(..., INTER_LINEAR)``, torch
  ``align_corners=False``) of it to (H, W) is the eager model's full-resolution map;
* output ``score`` fp32 [B,1]: the max of the full-resolution map, computed in-graph, so it equals
  the eager model's score.

:func:`export_onnx` writes the graph with a dynamic batch axis; :func:`onnx_session` /
:func:`run_onnx` run it with onnxruntime (the checker the tests and the FP16 gate use).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.efficientad.model import EfficientAD

ONNX_ARTIFACT = "model.onnx"
ONNX_OPSET = 18
INPUT_NAME, MAP_NAME, SCORE_NAME = "image", "anomaly_map", "score"
# onnx tensor element type -> Triton data type (for the config template)
TRITON_TYPES = {torch.float16: "TYPE_FP16", torch.float32: "TYPE_FP32", torch.uint8: "TYPE_UINT8"}


class ServingGraph(nn.Module):
    """uint8 [B,3,H,W] -> (``anomaly_map`` [B,1,h,w] ``map_dtype``, ``score`` fp32 [B,1])."""

    def __init__(self, model: EfficientAD, map_dtype: torch.dtype = torch.float16, scale: float = 255.0,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.eval()
        self.map_dtype = map_dtype
        self.compute_dtype = compute_dtype  # the model's own dtype (float16: the FP16 gate's graph)
        self.register_buffer("inv_scale", torch.tensor(1.0 / float(scale), dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(model.input_mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(model.input_std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 -> the float input :class:`EfficientAD` takes (same op order as contracts.spec.to_tensor)."""
        x = (image.to(torch.float32) * self.inv_scale - self.mean) / self.std
        return x if self.compute_dtype == torch.float32 else x.to(self.compute_dtype)

    def native_map(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`EfficientAD.combine` without the final upsample (same formula, same order)."""
        m = self.model
        map_st, map_ae = m.raw_maps(x)
        if not m.padding:
            map_st = F.pad(map_st, (4, 4, 4, 4))
            map_ae = F.pad(map_ae, (4, 4, 4, 4))
        m_st = 0.1 * (map_st - m.q_st_a) / (m.q_st_b - m.q_st_a)
        m_ae = 0.1 * (map_ae - m.q_ae_a) / (m.q_ae_b - m.q_ae_a)
        return 0.5 * m_st + 0.5 * m_ae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise(image)
        amap = self.native_map(x)
        full = F.interpolate(amap, size=(x.shape[-2], x.shape[-1]), mode="bilinear", align_corners=False)
        score = torch.amax(full, dim=(2, 3))  # [B,1]: max of the full-resolution map (the eager score)
        return amap.to(self.map_dtype), score.to(torch.float32)


def example_input(batch: int = 2, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


@torch.no_grad()
def map_shape(graph: ServingGraph, size: int = 256) -> tuple[int, int, int]:
    """The native map's per-image dims [1,h,w] for a ``size`` x ``size`` input (measured by one forward)."""
    amap, _ = graph(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return tuple(int(d) for d in amap.shape[1:])  # type: ignore[return-value]


def trace_graph(graph: ServingGraph, size: int = 256) -> torch.jit.ScriptModule:
    """TorchScript of the serving graph (traced at batch 2; the batch axis stays dynamic)."""
    graph = graph.eval()
    with torch.no_grad():
        return torch.jit.trace(graph, example_input(2, size), check_trace=False)


def export_onnx(model: EfficientAD | ServingGraph, path: str | Path, size: int = 256, opset: int = ONNX_OPSET,
                map_dtype: torch.dtype = torch.float16) -> Path:
    """Write the serving graph as ONNX: input ``image`` uint8 [B,3,size,size], outputs ``anomaly_map``
    [B,1,h,w] (``map_dtype``) and ``score`` fp32 [B,1]; the batch axis is dynamic."""
    graph = model if isinstance(model, ServingGraph) else ServingGraph(model, map_dtype=map_dtype)
    graph = graph.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            graph, (example_input(2, size),), str(path), input_names=[INPUT_NAME],
            output_names=[MAP_NAME, SCORE_NAME], opset_version=opset, dynamo=True, external_data=False,
            dynamic_shapes={"image": {0: batch}}, optimize=True, verbose=False,
        )
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's optimiser logs every pass at INFO (one JSON line each through the root handler)."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # "[torch.onnx] Obtain model graph ..." progress lines
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session on ``path`` (``threads``: intra-op threads, None = onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly_map, score) of uint8 [B,3,H,W] ``images`` through an onnxruntime session."""
    amap, score = session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)})
    return amap, score


__all__ = ["ONNX_ARTIFACT", "ONNX_OPSET", "ServingGraph", "TRITON_TYPES", "example_input", "export_onnx",
           "map_shape", "onnx_session", "run_onnx", "trace_graph"]
