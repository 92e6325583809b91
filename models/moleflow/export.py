"""Export MoLE-Flow into the Triton model repository (docs/CONTRACTS.md).

Layout written (one model, all tasks)::

    <repo>/<name>/config.pbtxt                          python backend, dynamic batching, KIND_CPU x1,
                                                        UINT8 `image` + optional BYTES `task` in, outputs
                                                        anomaly_map (FP16, grid), score, task,
                                                        route_distance; linewatch_spec
    <repo>/<name>/<version>/model.py                    thin: subclasses models.moleflow.serving
    <repo>/<name>/<version>/base.safetensors|base.json  frozen base (backbone included), stored once per version
    <repo>/<name>/<version>/adapters/<task>/adapter.safetensors|adapter.json
    <repo>/<name>/<version>/metadata.json               the manifest: linewatch_spec + sha256 of every file

Live rollout of a new task adapter (no Triton restart): train it into the store
(``train-task --out <store>``), ``export`` again -> a NEW version dir (base/adapters hard-linked) and a
rewritten config.pbtxt whose spec lists the new task; then ``load_model(<name>)`` through explicit
model control. Triton loads the new version beside the serving one and switches when it is ready
(version_policy latest 1); a failed load leaves the old version serving. A version dir is immutable:
adapters are read once at load (``initialize``), never re-scanned while serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contracts.artifact import CONFIG, MODEL_FILE, TensorConfig, render_config, write_manifest
from contracts.logs import get_logger
from contracts.names import check_name
from models.artifacts import claim_version_dir
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
)

log = get_logger(__name__)


def build_spec(name: str, version: int, base_meta: dict, adapters: list[dict]) -> dict[str, Any]:
    """linewatch_spec of one version (its ``artifacts`` are added by :func:`contracts.artifact.write_manifest`)."""
    cfg = base_meta["config"]
    size = int(cfg["image_size"])
    mean, std = backbone_normalization(cfg["backbone"])
    return {
        "schema": 1, "model": name, "detector": "moleflow", "version": int(version), "product": None,
        "input": {"name": "image", "height": size, "width": size, "color": "RGB", "layout": "NCHW", "dtype": "UINT8",
                  "scale": 255.0, "mean": list(mean), "std": list(std)},
        "outputs": {"anomaly_map": "anomaly_map", "score": "score", "task": "task", "route_distance": "route_distance"},
        # served scores/maps are per-task calibrated (raw top-K NLL minus the task's threshold)
        "threshold": 0.0, "map_threshold": 0.0,
        "score_calibration": "raw_minus_task_threshold",
        "tasks": {a["task"]: {"index": a["index"], "threshold": a.get("threshold"), "map_threshold": a.get("map_threshold"),
                              "route_distance_threshold": a.get("route_distance_q99"), "adapter_sha256": a["sha256"],
                              "schedule": {k: a.get(k) for k in ("epochs", "train_seconds", "device", "n_train")}}
                  for a in adapters},
        "backbone": cfg["backbone"], "base_sha256": base_meta["sha256"], "grid": int(cfg["grid"]),
    }


def config_pbtxt(name: str, spec: dict[str, Any], max_batch_size: int = 8) -> str:
    """Python backend, dynamic batching, KIND_CPU x1 (the controller writes the deployment's instance group),
    UINT8 images + optional BYTES ``task`` in; FP16 anomaly map at the flow grid, latest 1 version."""
    size, grid = spec["input"]["height"], spec["grid"]
    fp32 = "TYPE_FP32"
    return render_config(
        name, max_batch_size=max_batch_size, latest=1, spec=spec,
        inputs=[TensorConfig("image", "TYPE_UINT8", (3, size, size)), TensorConfig("task", "TYPE_STRING", (1,), optional=True)],
        outputs=[TensorConfig("anomaly_map", "TYPE_FP16", (1, grid, grid)), TensorConfig("score", fp32, (1,)),
                 TensorConfig("task", "TYPE_STRING", (1,)), TensorConfig("route_distance", fp32, (1,))])


def export_triton(store: str | Path, repository: str | Path, name: str = "moleflow", version: int | None = None,
                  tasks: list[str] | None = None, max_batch_size: int = 8) -> Path:
    """Write a new version of ``<repository>/<name>`` from a MoLE-Flow store; returns the version dir."""
    check_name(name)  # contracts.names: no '..', '/', leading '.'; a ValueError
    store = Path(store)
    if not (store / BASE_META).is_file():
        raise ArtifactError(f"not a MoLE-Flow store (no {BASE_META}): {store}")
    tasks = list_adapters(store) if tasks is None else list(tasks)
    for t in tasks:
        check_name(t, "task name")
    if not tasks:
        raise ArtifactError(f"{store} holds no task adapters: train one with `moleflow train-task`")
    model_dir = Path(repository) / name
    vdir = claim_version_dir(model_dir, version)
    version = int(vdir.name)
    copy_store(store, vdir, tasks)
    base_meta = read_json(vdir / BASE_META)
    adapters = [read_json(vdir / ADAPTERS / t / ADAPTER_META) for t in tasks]
    (vdir / MODEL_FILE).write_text(MODEL_PY)
    rels = [BASE_FILE, BASE_META] + [f"{ADAPTERS}/{t}/{f}" for t in tasks for f in (ADAPTER_FILE, ADAPTER_META)]
    spec = build_spec(name, version, base_meta, adapters)
    # the version's own config template, pinned by the manifest (config_sha256)
    meta = write_manifest(vdir, spec, [*rels, MODEL_FILE], config=config_pbtxt(name, spec, max_batch_size))
    (model_dir / CONFIG).write_text(config_pbtxt(name, meta, max_batch_size))
    log.info("moleflow_exported", model=name, version=version, tasks=tasks, dir=str(vdir))
    return vdir
