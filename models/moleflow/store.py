"""MoLE-Flow artifacts: the base stored once, one small adapter per task (safetensors + JSON + sha256).

Layout of a store directory (also the layout of a Triton version directory, see export.py)::

    <dir>/base.safetensors          backbone + projection + scale context + SCM conv + base flow
    <dir>/base.json                 {"format": "moleflow-base", "config": {...}, "sha256": ..., "tasks": [...]}
    <dir>/adapters/<task>/adapter.safetensors   LoRA A/B/bias, WA gamma/beta, SCM gate, DIA, router mean/precision
    <dir>/adapters/<task>/adapter.json          {"task", "index", "base_sha256", "sha256", "threshold", ...}

Loading verifies every sha256 (``contracts.artifact.check_sha256``) and the adapter's ``base_sha256``
before reading tensors; tensors are read with safetensors only (no pickle). Errors are
``contracts.artifact.ArtifactError`` (re-exported here for the CLI). Any subset of tasks can be loaded
(:func:`load_model`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from contracts.artifact import ArtifactError, check_sha256, sha256_file
from contracts.logs import get_logger
from models.moleflow.model import MoLEFlow, MoLEFlowConfig, check_task_name

log = get_logger(__name__)

BASE_FILE = "base.safetensors"
BASE_META = "base.json"
ADAPTERS = "adapters"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_META = "adapter.json"


def _contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_base(model: MoLEFlow, out_dir: str | Path, extra: dict | None = None) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / BASE_FILE
    save_file(_contig(model.base_state_dict()), str(path), metadata={"format": "moleflow-base"})
    sha = sha256_file(path)
    meta = {"format": "moleflow-base", "schema": 1, "config": model.cfg.to_dict(), "sha256": sha,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
    (out / BASE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return sha


def save_adapter(model: MoLEFlow, task: str, out_dir: str | Path, base_sha256: str, extra: dict | None = None) -> Path:
    check_task_name(task)
    adir = Path(out_dir) / ADAPTERS / task
    adir.mkdir(parents=True, exist_ok=True)
    sd = _contig(model.task_state_dict(task))
    proto = model.router[task]
    sd["router.mean"] = proto.mean.cpu().contiguous()
    sd["router.precision"] = proto.prec.cpu().contiguous()
    sd["router.covariance"] = proto.cov.cpu().contiguous()
    path = adir / ADAPTER_FILE
    save_file(sd, str(path), metadata={"format": "moleflow-adapter", "task": task})
    meta = {"format": "moleflow-adapter", "schema": 1, "task": task, "index": model.tasks.index(task),
            "base_sha256": base_sha256, "sha256": sha256_file(path),
            "n_parameters": int(sum(v.numel() for k, v in sd.items() if not k.startswith("router."))),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **model.thresholds.get(task, {}), **(extra or {})}
    (adir / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return adir


def save_model(model: MoLEFlow, out_dir: str | Path, tasks: list[str] | None = None) -> Path:
    """Write base (if changed) + the given adapters (default: all). Existing adapters are kept."""
    out = Path(out_dir)
    sha = save_base_if_needed(model, out)
    for t in tasks or model.tasks:
        save_adapter(model, t, out, sha)
    return out


def save_base_if_needed(model: MoLEFlow, out: Path) -> str:
    """The base is frozen after task 0: rewrite it only if its tensors differ from the stored file."""
    meta_p = out / BASE_META
    if meta_p.is_file() and (out / BASE_FILE).is_file():
        stored = load_file(str(out / BASE_FILE))
        cur = model.base_state_dict()
        if stored.keys() == cur.keys() and all(torch.equal(stored[k], cur[k].cpu()) for k in cur):
            return json.loads(meta_p.read_text())["sha256"]
    return save_base(model, out)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"corrupt JSON {path}: {exc}") from None


def list_adapters(store: str | Path) -> list[str]:
    """Adapters present in ``store``, ordered by their training index."""
    adir = Path(store) / ADAPTERS
    if not adir.is_dir():
        return []
    found = []
    for d in adir.iterdir():
        if (d / ADAPTER_META).is_file():
            found.append((read_json(d / ADAPTER_META).get("index", 1 << 30), d.name))
    return [n for _, n in sorted(found)]


def load_model(store: str | Path, tasks: list[str] | None = None, backbone_weights=None) -> MoLEFlow:
    """Load the base and the adapters ``tasks`` (default: every adapter in the store), verifying sha256."""
    store = Path(store)
    if not store.is_dir():
        raise ArtifactError(f"MoLE-Flow store not found: {store}")
    meta = read_json(store / BASE_META)
    check_sha256(store / BASE_FILE, meta["sha256"])
    cfg = MoLEFlowConfig.from_dict(meta["config"])
    base_sd = load_file(str(store / BASE_FILE))
    # random-init backbone: its weights come from the base artifact (self-contained, nothing downloaded)
    model = MoLEFlow(cfg)
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    missing = [k for k in missing if model._task_of_key(k) is None]
    if missing or unexpected:
        raise ArtifactError(f"base artifact does not match the model: missing {missing[:3]} unexpected {unexpected[:3]}")
    wanted = list_adapters(store) if tasks is None else list(tasks)
    for t in wanted:
        load_adapter(model, store / ADAPTERS / check_task_name(t), meta["sha256"])
    model.eval()
    return model


def load_adapter(model: MoLEFlow, adir: str | Path, base_sha256: str) -> str:
    adir = Path(adir)
    meta = read_json(adir / ADAPTER_META)
    if meta.get("base_sha256") != base_sha256:
        raise ArtifactError(f"adapter {adir.name} was trained on base {str(meta.get('base_sha256'))[:12]}, "
                            f"not {base_sha256[:12]}")
    check_sha256(adir / ADAPTER_FILE, meta["sha256"])
    sd = load_file(str(adir / ADAPTER_FILE))
    task = meta["task"]
    model.add_task(task)
    model.set_router(task, sd.pop("router.mean"), sd.pop("router.covariance"), sd.pop("router.precision"))
    own = model.task_state_dict(task)
    if set(own) != set(sd):
        raise ArtifactError(f"adapter {task} keys do not match the model ({len(sd)} vs {len(own)})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        bufs = dict(model.named_buffers())
        for k, v in sd.items():
            (params.get(k) if k in params else bufs[k]).copy_(v)
    model.thresholds[task] = {k: meta[k] for k in ("threshold", "map_threshold", "score_stats") if k in meta}
    return task


def copy_store(src: str | Path, dst: str | Path, tasks: list[str] | None = None) -> None:
    """Copy base + chosen adapters (hard links where possible; artifacts are immutable)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    def cp(a: Path, b: Path):
        b.parent.mkdir(parents=True, exist_ok=True)
        if b.exists():
            b.unlink()
        try:
            b.hardlink_to(a)
        except OSError:
            shutil.copy2(a, b)

    for f in (BASE_FILE, BASE_META):
        cp(src / f, dst / f)
    for t in (list_adapters(src) if tasks is None else tasks):
        for f in (ADAPTER_FILE, ADAPTER_META):
            cp(src / ADAPTERS / t / f, dst / ADAPTERS / t / f)
