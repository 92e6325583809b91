"""Export MoLE-Flow into the Triton model repository (docs/CONTRACTS.md).

Layout written (one model, all tasks)::

    <repo>/<name>/config.pbtxt                          python backend, dynamic batching, KIND_CPU x1,
                                                        optional BYTES input `task`, outputs anomaly_map,
                                                        score, task, route_distance; linewatch_spec
    <repo>/<name>/<version>/model.py                    thin: subclasses models.moleflow.serving
    <repo>/<name>/<version>/base.safetensors|base.json  frozen base (backbone included), stored once per version
    <repo>/<name>/<version>/adapters/<task>/adapter.safetensors|adapter.json
    <repo>/<name>/<version>/metadata.json               linewatch_spec + sha256 of every artifact

Live rollout of a new task adapter (no Triton restart): train it into the store
(``train-task --out <store>``), ``export`` again -> a NEW version dir (base/adapters hard-linked) and a
rewritten config.pbtxt whose spec lists the new task; then ``load_model(<name>)`` through explicit
model control. Triton loads the new version beside the serving one and switches when it is ready
(version_policy latest 1); a failed load leaves the old version serving. A version dir is immutable:
adapters are read once at load (``initialize``), never re-scanned while serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contracts.logs import get_logger
from models.artifacts import resolve_version
from models.backbones import backbone_normalization
from models.moleflow.serving import MODEL_PY
from models.moleflow.store import (
    ADAPTER_FILE,
    ADAPTER_META,
    ADAPTERS,
    BASE_FILE,
    BASE_META,
    ArtifactError,
    copy_store,
    list_adapters,
    read_json,
    sha256_file,
)

log = get_logger(__name__)


def build_spec(name: str, version: int, base_meta: dict, adapters: list[dict], artifacts: dict[str, str]) -> dict[str, Any]:
    cfg = base_meta["config"]
    size = int(cfg["image_size"])
    mean, std = backbone_normalization(cfg["backbone"])
    return {
        "schema": 1, "model": name, "detector": "moleflow", "version": int(version), "product": None,
        "input": {"name": "image", "height": size, "width": size, "color": "RGB", "layout": "NCHW", "dtype": "FP32",
                  "scale": 255.0, "mean": list(mean), "std": list(std)},
        "outputs": {"anomaly_map": "anomaly_map", "score": "score", "task": "task", "route_distance": "route_distance"},
        # served scores/maps are per-task calibrated (raw top-K NLL minus the task's threshold)
        "threshold": 0.0, "map_threshold": 0.0,
        "score_calibration": "raw_minus_task_threshold",
        "tasks": {a["task"]: {"index": a["index"], "threshold": a.get("threshold"), "map_threshold": a.get("map_threshold"),
                              "route_distance_threshold": a.get("route_distance_q99"), "adapter_sha256": a["sha256"]}
                  for a in adapters},
        "backbone": cfg["backbone"], "base_sha256": base_meta["sha256"],
        "artifacts": artifacts,
    }


def config_pbtxt(name: str, spec: dict[str, Any], max_batch_size: int = 8) -> str:
    size = spec["input"]["height"]
    spec_str = json.dumps(json.dumps(spec, separators=(",", ":")))  # quoted + escaped
    return f"""name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "image" data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] }},
  {{ name: "task" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "anomaly_map" data_type: TYPE_FP32 dims: [ 1, {size}, {size} ] }},
  {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "task" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "route_distance" data_type: TYPE_FP32 dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
parameters {{ key: "linewatch_spec" value {{ string_value: {spec_str} }} }}
"""


def export_triton(store: str | Path, repository: str | Path, name: str = "moleflow", version: int | None = None,
                  tasks: list[str] | None = None, max_batch_size: int = 8) -> Path:
    """Write a new version of ``<repository>/<name>`` from a MoLE-Flow store; returns the version dir."""
    store = Path(store)
    if not (store / BASE_META).is_file():
        raise ArtifactError(f"not a MoLE-Flow store (no {BASE_META}): {store}")
    if not name.replace("_", "a").replace("-", "a").isalnum():
        raise ValueError(f"bad model name: {name!r}")
    tasks = list_adapters(store) if tasks is None else list(tasks)
    if not tasks:
        raise ArtifactError(f"{store} holds no task adapters: train one with `moleflow train-task`")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = resolve_version(model_dir, version)
    vdir = model_dir / str(version)
    if vdir.exists() and any(vdir.iterdir()):
        raise ArtifactError(f"version dir exists and is not empty: {vdir}")
    copy_store(store, vdir, tasks)
    base_meta = read_json(vdir / BASE_META)
    adapters = [read_json(vdir / ADAPTERS / t / ADAPTER_META) for t in tasks]
    rels = [BASE_FILE, BASE_META] + [f"{ADAPTERS}/{t}/{f}" for t in tasks for f in (ADAPTER_FILE, ADAPTER_META)]
    artifacts = {r: sha256_file(vdir / r) for r in rels}
    spec = build_spec(name, version, base_meta, adapters, artifacts)
    (vdir / "model.py").write_text(MODEL_PY)
    (vdir / "metadata.json").write_text(json.dumps(spec, indent=2) + "\n")
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, spec, max_batch_size))
    log.info("moleflow_exported", model=name, version=version, tasks=tasks, dir=str(vdir))
    return vdir
