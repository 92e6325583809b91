"""Export an EfficientAD model into the Triton model repository (docs/CONTRACTS.md).

Layout written:
  <repo>/efficientad_<product>/config.pbtxt           python backend, dynamic batching, KIND_CPU x1,
                                                       parameters.linewatch_spec = metadata JSON
  <repo>/efficientad_<product>/<version>/model.pt     TorchScript of the serving graph (Python backend)
  <repo>/efficientad_<product>/<version>/model.onnx   the same graph as ONNX (onnxruntime/TensorRT backend)
  <repo>/efficientad_<product>/<version>/model.py     thin: subclasses models.efficientad.serving
  <repo>/efficientad_<product>/<version>/config.pbtxt the version's config template (pinned)
  <repo>/efficientad_<product>/<version>/metadata.json  the manifest: linewatch_spec + sha256 of model.pt,
                                                       model.onnx, model.py
Both artifacts are :class:`models.efficientad.onnx_graph.ServingGraph` (batch axis dynamic): input
``image`` UINT8 [B,3,H,W] (normalised in the graph with the model's mean/std, which the spec keeps),
outputs ``anomaly_map`` FP16 [B,1,h,w] on the native grid (64x64 for 256x256: the padded PDN grid before
the final upsample) and ``score`` FP32 [B,1] (max of the full-resolution map). The template keeps the
Python backend; the rollout's deployment block switches to the onnxruntime backend on ``model.onnx``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contracts.artifact import CONFIG, MODEL_FILE, TensorConfig, render_config, write_manifest
from contracts.logs import get_logger
from contracts.names import check_name
from models.artifacts import claim_version_dir
from models.efficientad.model import EfficientAD
from models.efficientad.onnx_graph import (
    ONNX_ARTIFACT,
    TRITON_TYPES,
    ServingGraph,
    export_onnx,
    map_shape,
    trace_graph,
)
from models.efficientad.serving import ARTIFACT, MODEL_PY

log = get_logger(__name__)
MAP_DTYPE = torch.float16  # the served anomaly map (the worker casts to float32 for heat maps)


def trace_model(model: EfficientAD, size: int = 256, map_dtype: torch.dtype = MAP_DTYPE) -> torch.jit.ScriptModule:
    """TorchScript of :class:`ServingGraph` (uint8 in, native map + score out)."""
    return trace_graph(ServingGraph(model, map_dtype=map_dtype), size)


def build_spec(model_name: str, product: str, version: int, threshold: float, map_threshold: float,
               size: int = 256, sha: str | None = None, extra: dict | None = None,
               mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
               dtype: str = "FP32", map_dims: tuple[int, ...] | None = None,
               map_type: str = "TYPE_FP32") -> dict[str, Any]:
    """The ``linewatch_spec``. Defaults describe a float-input module with a full-resolution FP32 map
    (test harness nets); :func:`export_triton` writes ``dtype="UINT8"`` with the native FP16 map."""
    spec: dict[str, Any] = {
        "schema": 1,
        "model": model_name,
        "detector": "efficientad",
        "version": int(version),
        "product": product,
        "input": {"name": "image", "height": size, "width": size, "color": "RGB", "layout": "NCHW",
                  "dtype": dtype, "scale": 255.0, "mean": list(mean), "std": list(std)},
        "outputs": {"anomaly_map": "anomaly_map", "score": "score"},
        "threshold": float(threshold),
        "map_threshold": float(map_threshold),
        "artifacts": {ARTIFACT: sha} if sha else {},
    }
    ead = dict(extra or {})
    if map_dims is not None:  # upsample: bilinear, half-pixel centres (cv2 INTER_LINEAR) gives the eager map
        ead["anomaly_map"] = {"dims": [int(d) for d in map_dims], "data_type": map_type, "upsample": "bilinear"}
    if ead:
        spec["efficientad"] = ead
    return spec


def config_pbtxt(model_name: str, spec: dict[str, Any], max_batch_size: int = 8, size: int | None = None) -> str:
    """Python backend, dynamic batching, KIND_CPU x1, Triton's default version policy (latest 1); tensor
    types and dims from the spec (input dtype; ``efficientad.anomaly_map``, else FP32 [1,H,W])."""
    i = spec["input"]
    h, w = (size, size) if size is not None else (int(i["height"]), int(i["width"]))
    amap = (spec.get("efficientad") or {}).get("anomaly_map") or {"dims": [1, h, w], "data_type": "TYPE_FP32"}
    return render_config(
        model_name, max_batch_size=max_batch_size, spec=spec,
        inputs=[TensorConfig("image", f"TYPE_{str(i.get('dtype', 'FP32')).upper()}", (3, h, w))],
        outputs=[TensorConfig("anomaly_map", amap["data_type"], tuple(amap["dims"])),
                 TensorConfig("score", "TYPE_FP32", (1,))])


def export_triton(
    model: EfficientAD,
    repository: str | Path,
    product: str,
    version: int | None = None,
    threshold: float = 0.0,
    map_threshold: float = 0.0,
    max_batch_size: int = 8,
    extra: dict | None = None,
    size: int = 256,
) -> Path:
    """Write one version of ``efficientad_<product>``; returns the version directory.

    ``version=None`` picks (highest existing numeric version) + 1. The model-level config.pbtxt is
    (re)written to describe the newest version.
    """
    name = check_name(f"efficientad_{check_name(product, 'product name')}")  # contracts.names (ValueError)
    model_dir = Path(repository) / name
    vdir = claim_version_dir(model_dir, version)
    version = int(vdir.name)
    graph = ServingGraph(model, map_dtype=MAP_DTYPE).eval()
    trace_graph(graph, size).save(str(vdir / ARTIFACT))
    export_onnx(graph, vdir / ONNX_ARTIFACT, size=size)
    (vdir / MODEL_FILE).write_text(MODEL_PY)
    spec = build_spec(name, product, version, threshold, map_threshold, size=size, extra=extra,
                      mean=model.input_mean, std=model.input_std, dtype="UINT8",
                      map_dims=map_shape(graph, size), map_type=TRITON_TYPES[MAP_DTYPE])
    # the version's own config template, pinned by the manifest (config_sha256)
    meta = write_manifest(vdir, spec, [ARTIFACT, ONNX_ARTIFACT, MODEL_FILE], config=config_pbtxt(name, spec, max_batch_size))
    (model_dir / CONFIG).write_text(config_pbtxt(name, meta, max_batch_size))
    log.info("efficientad_exported", model=name, version=version, dir=str(vdir), sha256=meta["artifacts"][ARTIFACT],
             onnx_sha256=meta["artifacts"][ONNX_ARTIFACT])
    return vdir
