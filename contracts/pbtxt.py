"""Triton config.pbtxt rendering and rewriting (torch- and faust-free; re-exported by contracts.artifact).

:func:`config_sha256` is the digest the manifest pins (``metadata.json`` ``config_sha256``): the
template with its ``linewatch_spec`` parameter removed (the rollout replaces that parameter with the
sha-verified metadata.json, which embeds the digest, so pinning it would be circular).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class TensorConfig:
    """One ``input``/``output`` entry of a Triton model config."""

    name: str
    data_type: str  # Triton type name: "TYPE_FP32", "TYPE_STRING", ...
    dims: tuple[int, ...]
    optional: bool = False

    def render(self) -> str:
        opt = " optional: true" if self.optional else ""
        dims = ", ".join(str(int(d)) for d in self.dims)
        return f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{opt} }}'


def _pbtxt_string(s: str) -> str:
    return orjson.dumps(s).decode()  # JSON string escaping is valid protobuf text-format escaping


def _spec_parameter(spec: Mapping[str, Any]) -> str:
    quoted = _pbtxt_string(orjson.dumps(spec, option=_JSON_OPTS).decode())
    return f'parameters {{ key: "linewatch_spec" value {{ string_value: {quoted} }} }}'


def _version_policy(versions: Sequence[int] | None = None, latest: int | None = None) -> str | None:
    if versions is not None and latest is not None:
        raise ValueError("a version policy is either specific versions or the latest N, not both")
    if versions is not None:
        return "version_policy: { specific: { versions: [ " + ", ".join(str(int(v)) for v in versions) + " ] } }"
    if latest is not None:
        return f"version_policy: {{ latest: {{ num_versions: {int(latest)} }} }}"
    return None


def render_config(name: str, *, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig],
                  max_batch_size: int = 8, backend: str = "python", instance_kind: str = "KIND_CPU",
                  instance_count: int = 1, max_queue_delay_us: int | None = 2000,
                  versions: Sequence[int] | None = None, latest: int | None = None,
                  spec: Mapping[str, Any] | None = None, parameters: Mapping[str, str] | None = None) -> str:
    """A Triton config.pbtxt: ``dynamic_batching`` unless ``max_queue_delay_us`` is None, version policy
    ``specific: versions`` or ``latest: latest`` (neither: Triton's default, the latest 1), string
    ``parameters`` and the ``linewatch_spec`` parameter (the manifest, JSON)."""
    def block(key: str, ts: Sequence[TensorConfig]) -> list[str]:
        return [f"{key} [", ",\n".join(f"  {t.render()}" for t in ts), "]"]

    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {int(max_batch_size)}",
             *block("input", inputs), *block("output", outputs)]
    if max_queue_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}")
    lines.append(f"instance_group [ {{ kind: {instance_kind} count: {int(instance_count)} }} ]")
    policy = _version_policy(versions, latest)
    if policy:
        lines.append(policy)
    for k, v in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_pbtxt_string(k)} value {{ string_value: {_pbtxt_string(str(v))} }} }}")
    if spec is not None:
        lines.append(_spec_parameter(spec))
    return "\n".join(lines) + "\n"


_NAME_RE = re.compile(r'^\s*name\s*:\s*"[^"]*"\s*$', re.M)
_POLICY_RE = re.compile(r"^\s*version_policy\s*:.*$", re.M)


def rewrite_config(text: str, name: str, versions: list[int] | None, spec: dict[str, Any] | None = None) -> str:
    """config.pbtxt with ``name`` replaced, ``version_policy`` = specific ``versions`` (None: keep) and the
    ``linewatch_spec`` parameter replaced by ``spec`` (metadata.json is the sha-verified source of truth)."""
    if spec is not None:
        text = "\n".join(ln for ln in text.splitlines() if '"linewatch_spec"' not in ln) + "\n"
        text += _spec_parameter(spec) + "\n"
    text = _NAME_RE.sub(f'name: "{name}"', text, count=1) if _NAME_RE.search(text) else f'name: "{name}"\n{text}'
    policy = _version_policy(versions)
    if policy is not None:
        text = _POLICY_RE.sub(policy, text, count=1) if _POLICY_RE.search(text) else text.rstrip("\n") + "\n" + policy + "\n"
    return text


def _without_spec(text: str) -> str:
    return "\n".join(ln.rstrip() for ln in text.splitlines() if '"linewatch_spec"' not in ln).strip() + "\n"


def config_sha256(text: str) -> str:
    """sha256 of a config.pbtxt template minus its ``linewatch_spec`` parameter (what the manifest pins)."""
    return hashlib.sha256(_without_spec(text).encode()).hexdigest()


# -- the deployment block: written by the rollout when it materialises a version (stream/lifecycle/repository.py)
_DEPLOY_BEGIN, _DEPLOY_END = "# linewatch:deployment begin", "# linewatch:deployment end"
_GROUP_RE = re.compile(r"^\s*instance_group\s*\[.*?\]\s*$", re.M)
_BACKEND_RE = re.compile(r'^\s*backend\s*:\s*"[^"]*"\s*$', re.M)
_INPUTS_RE = re.compile(r"^input \[\n(.*?)\n\]", re.M | re.S)
_TENSOR_RE = re.compile(r'name: "(\w+)" data_type: (TYPE_\w+) dims: \[ ([\d, ]+) \]( optional: true)?')
ONNX_FILE = "model.onnx"


def _without_deployment(text: str) -> str:
    out, inside = [], False
    for ln in text.splitlines():
        if ln.strip() == _DEPLOY_BEGIN:
            inside = True
        elif ln.strip() == _DEPLOY_END:
            inside = False
        elif not inside:
            out.append(ln)
    return "\n".join(out) + "\n"


def _warmup(text: str) -> str | None:
    """One zero batch of every required non-string input: Triton marks the model READY only after it ran
    (on a GPU: after CUDA initialised and the first kernels compiled)."""
    m = _INPUTS_RE.search(text)
    ins = [t for t in _TENSOR_RE.findall(m.group(1)) if not t[3] and t[1] != "TYPE_STRING"] if m else []
    if not ins:
        return None
    body = " ".join(f'inputs {{ key: "{n}" value: {{ data_type: {dt} dims: [ {dims} ] zero_data: true }} }}'
                    for n, dt, dims, _ in ins)
    return f'model_warmup [ {{ name: "zeros" batch_size: 1 {body} }} ]'


def apply_deployment(text: str, *, device: str = "cpu", instances: int = 1, gpus: Sequence[int] = (),
                     fp16: bool = True, onnxruntime: bool = False, trt_cache_dir: str = "/trt-cache") -> str:
    """``text`` with the deployment's ``instance_group`` (KIND_GPU on ``gpus`` or KIND_CPU), a warmup batch,
    and for ``onnxruntime`` (EfficientAD on GPUs) the onnxruntime backend on ``model.onnx`` with the
    TensorRT accelerator (FP16 when ``fp16``, engine cache in ``trt_cache_dir``). Idempotent: the block
    it writes replaces the one an earlier call wrote."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    if onnxruntime and device != "gpu":
        raise ValueError("the onnxruntime/TensorRT backend is the GPU path")
    text = _GROUP_RE.sub("", _without_deployment(text)).replace("\n\n", "\n")
    lines = [_DEPLOY_BEGIN]
    if device == "gpu":
        on = f" gpus: [ {', '.join(str(int(g)) for g in gpus)} ]" if gpus else ""
        lines.append(f"instance_group [ {{ kind: KIND_GPU count: {int(instances)}{on} }} ]")
    else:
        lines.append(f"instance_group [ {{ kind: KIND_CPU count: {int(instances)} }} ]")
    text = _BACKEND_RE.sub(f'backend: "{"onnxruntime" if onnxruntime else "python"}"', text, count=1)
    if onnxruntime:
        trt = [("precision_mode", "FP16" if fp16 else "FP32"), ("max_workspace_size_bytes", str(1 << 30)),
               ("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", trt_cache_dir)]
        params = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in trt)
        lines += [f'default_model_filename: "{ONNX_FILE}"',
                  "optimization { execution_accelerators { gpu_execution_accelerator : [ "
                  f'{{ name : "tensorrt" {params} }} ] }} }}']
    elif device == "gpu":  # Python backend: inputs may arrive in GPU memory (DLPack, models/serving_device.py)
        lines.append('parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value { string_value: "no" } }')
    lines.append(f'parameters {{ key: "linewatch_fp16" value {{ string_value: "{int(bool(fp16 and device == "gpu"))}" }} }}')
    warm = _warmup(text)
    if warm:
        lines.append(warm)
    lines.append(_DEPLOY_END)
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
