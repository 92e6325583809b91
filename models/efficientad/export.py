"""Export an EfficientAD model into the Triton model repository (docs/CONTRACTS.md).

Layout written:
  <repo>/efficientad_<product>/config.pbtxt           python backend, dynamic batching, KIND_CPU x1,
                                                       parameters.linewatch_spec = metadata JSON
  <repo>/efficientad_<product>/<version>/model.pt     TorchScript (torch.jit.trace, batch-dynamic)
  <repo>/efficientad_<product>/<version>/model.py     thin: subclasses models.efficientad.serving
  <repo>/efficientad_<product>/<version>/metadata.json  the manifest: linewatch_spec + sha256 of model.pt, model.py
The traced module takes ImageNet-normalised NCHW 256x256 images and returns
(anomaly_map [B,1,256,256], score [B]); quantile normalisation is baked in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contracts.artifact import CONFIG, MODEL_FILE, ArtifactError, TensorConfig, render_config, write_manifest
from contracts.logs import get_logger
from contracts.names import check_name
from models.artifacts import resolve_version
from models.efficientad.model import EfficientAD
from models.efficientad.serving import ARTIFACT, MODEL_PY

log = get_logger(__name__)


def trace_model(model: EfficientAD, size: int = 256) -> torch.jit.ScriptModule:
    model = model.eval()
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    return traced


def build_spec(model_name: str, product: str, version: int, threshold: float, map_threshold: float,
               size: int = 256, sha: str | None = None, extra: dict | None = None,
               mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "schema": 1,
        "model": model_name,
        "detector": "efficientad",
        "version": int(version),
        "product": product,
        "input": {"name": "image", "height": size, "width": size, "color": "RGB", "layout": "NCHW",
                  "dtype": "FP32", "scale": 255.0, "mean": list(mean), "std": list(std)},
        "outputs": {"anomaly_map": "anomaly_map", "score": "score"},
        "threshold": float(threshold),
        "map_threshold": float(map_threshold),
        "artifacts": {ARTIFACT: sha} if sha else {},
    }
    if extra:
        spec["efficientad"] = extra
    return spec


def config_pbtxt(model_name: str, spec: dict[str, Any], max_batch_size: int = 8, size: int = 256) -> str:
    """Python backend, dynamic batching, KIND_CPU x1, Triton's default version policy (latest 1)."""
    return render_config(
        model_name, max_batch_size=max_batch_size, spec=spec,
        inputs=[TensorConfig("image", "TYPE_FP32", (3, size, size))],
        outputs=[TensorConfig("anomaly_map", "TYPE_FP32", (1, size, size)), TensorConfig("score", "TYPE_FP32", (1,))])


def export_triton(
    model: EfficientAD,
    repository: str | Path,
    product: str,
    version: int | None = None,
    threshold: float = 0.0,
    map_threshold: float = 0.0,
    max_batch_size: int = 8,
    extra: dict | None = None,
) -> Path:
    """Write one version of ``efficientad_<product>``; returns the version directory.

    ``version=None`` picks (highest existing numeric version) + 1. The model-level config.pbtxt is
    (re)written to describe the newest version.
    """
    name = check_name(f"efficientad_{check_name(product, 'product name')}")  # contracts.names (ValueError)
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = resolve_version(model_dir, version)
    vdir = model_dir / str(version)
    if vdir.exists() and any(vdir.iterdir()):  # a leftover file would fail verify_artifact at load
        raise ArtifactError(f"version dir exists and is not empty: {vdir}")
    vdir.mkdir(parents=True, exist_ok=True)
    traced = trace_model(model)
    traced.save(str(vdir / ARTIFACT))
    (vdir / MODEL_FILE).write_text(MODEL_PY)
    spec = build_spec(name, product, version, threshold, map_threshold, extra=extra,
                      mean=model.input_mean, std=model.input_std)
    # the version's own config template, pinned by the manifest (config_sha256)
    meta = write_manifest(vdir, spec, [ARTIFACT, MODEL_FILE], config=config_pbtxt(name, spec, max_batch_size))
    (model_dir / CONFIG).write_text(config_pbtxt(name, meta, max_batch_size))
    log.info("efficientad_exported", model=name, version=version, dir=str(vdir), sha256=meta["artifacts"][ARTIFACT])
    return vdir
