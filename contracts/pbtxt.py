"""Triton model configs (config.pbtxt) built, edited and pinned as Triton's own ``ModelConfig`` message.

Every config is a ``inference.ModelConfig`` (Triton's model_config.proto, shipped compiled with
tritonclient as ``tritonclient.grpc.model_config_pb2``) written and read with protobuf's text format
(``google.protobuf.text_format``), the format and schema tritonserver itself parses. So a config this
module writes names only fields Triton knows, with values of the right type (an unknown field or data
type fails here, with the line and column, not in Triton's load log), and a config edited by hand (on
several lines, with comments, in any field order) parses and edits like one this module wrote. Edits
do not keep comments: the edited message is written out again.

The schema is the contract, so it is imported here (the one ``contracts -> tritonclient`` import,
allowed by name in pyproject's import-linter contracts; every image installs tritonclient[grpc]).
It is imported on first use: ``tritonclient.grpc``'s package init loads the whole gRPC client, a cost
the many importers of contracts.artifact that never touch a config do not pay.

:func:`config_sha256` is the digest the manifest pins (``metadata.json`` ``config_sha256``): of the
config's message minus its ``linewatch_spec`` parameter (the rollout replaces that parameter with the
sha-verified metadata.json, which embeds the digest, so pinning it would be circular), serialised
deterministically, so comments, layout and field order do not change it. :func:`config_pinned` also
accepts the digest versions exported before configs were messages pinned (their text minus the spec lines).

:func:`apply_deployment` owns the fields a deployment decides (written by the rollout when it
materialises a version, stream/lifecycle/repository.py): ``instance_group``, ``backend``, the onnxruntime
``default_model_filename`` and TensorRT accelerator, the ``FORCE_CPU_ONLY_INPUT_TENSORS`` and
``linewatch_fp16`` parameters and the ``zeros`` warmup; applying it again replaces them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from types import ModuleType

    from tritonclient.grpc.model_config_pb2 import ModelConfig

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
SPEC_PARAMETER = "linewatch_spec"
ONNX_FILE = "model.onnx"
WARMUP_NAME = "zeros"
_DEPLOYMENT_PARAMETERS = ("FORCE_CPU_ONLY_INPUT_TENSORS", "linewatch_fp16")


class ConfigError(ValueError):
    """A config.pbtxt that is not a valid Triton ``ModelConfig`` (the message names the line and field)."""


@functools.cache
def schema() -> ModuleType:
    """Triton's compiled model_config.proto (``ModelConfig``, ``DataType``, ``ModelInstanceGroup`` ...)."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


@dataclass(frozen=True)
class TensorConfig:
    """One ``input``/``output`` entry of a Triton model config."""

    name: str
    data_type: str  # Triton type name: "TYPE_FP32", "TYPE_STRING", ...
    dims: tuple[int, ...]
    optional: bool = False

    def fill(self, msg: Any) -> None:
        """Set a ``ModelInput``/``ModelOutput`` message's fields from this entry."""
        msg.name = self.name
        msg.data_type = _enum(schema().DataType, self.data_type, f"{self.name}.data_type")
        msg.dims.extend(int(d) for d in self.dims)
        if self.optional:
            if not hasattr(msg, "optional"):
                raise ConfigError(f"output {self.name!r}: only inputs may be optional")
            msg.optional = True


def _enum(enum: Any, value: str, what: str) -> int:
    try:
        return enum.Value(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not one of Triton's {', '.join(enum.keys())}") from None


# ----------------------------------------------------------------------------- text <-> message
def parse_config(text: str) -> ModelConfig:
    """config.pbtxt text -> ``ModelConfig``; :class:`ConfigError` (line:column and the field) when Triton's
    schema would refuse it (unknown field, wrong type, a singular field set twice, bad syntax)."""
    from google.protobuf import text_format

    cfg = schema().ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise ConfigError(f"config.pbtxt is not a valid Triton ModelConfig: {e}") from None
    return cfg


def format_config(cfg: ModelConfig) -> str:
    """``ModelConfig`` -> config.pbtxt text (protobuf text format, fields in schema order)."""
    from google.protobuf import text_format

    return text_format.MessageToString(cfg, as_utf8=True)


def _set_parameter(cfg: ModelConfig, key: str, value: str) -> None:
    cfg.parameters[key].string_value = value


def _set_spec(cfg: ModelConfig, spec: Mapping[str, Any]) -> None:
    _set_parameter(cfg, SPEC_PARAMETER, orjson.dumps(spec, option=_JSON_OPTS).decode())


def _set_version_policy(cfg: ModelConfig, versions: Sequence[int] | None = None, latest: int | None = None) -> None:
    if versions is not None and latest is not None:
        raise ValueError("a version policy is either specific versions or the latest N, not both")
    if versions is not None:
        cfg.version_policy.ClearField("specific")  # oneof: clears ``latest``/``all`` too
        cfg.version_policy.specific.versions.extend(int(v) for v in versions)
    elif latest is not None:
        cfg.version_policy.latest.num_versions = int(latest)


# ----------------------------------------------------------------------------- templates
def build_config(name: str, *, inputs: Sequence[TensorConfig], outputs: Sequence[TensorConfig],
                 max_batch_size: int = 8, backend: str = "python", instance_kind: str = "KIND_CPU",
                 instance_count: int = 1, max_queue_delay_us: int | None = 2000,
                 versions: Sequence[int] | None = None, latest: int | None = None,
                 spec: Mapping[str, Any] | None = None, parameters: Mapping[str, str] | None = None) -> ModelConfig:
    """A Triton ``ModelConfig``: ``dynamic_batching`` unless ``max_queue_delay_us`` is None, version policy
    ``specific: versions`` or ``latest: latest`` (neither: Triton's default, the latest 1), string
    ``parameters`` and the ``linewatch_spec`` parameter (the manifest, JSON)."""
    pb = schema()
    cfg = pb.ModelConfig(name=name, backend=backend, max_batch_size=int(max_batch_size))
    for t in inputs:
        t.fill(cfg.input.add())
    for t in outputs:
        t.fill(cfg.output.add())
    if max_queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    cfg.instance_group.add(kind=_enum(pb.ModelInstanceGroup.Kind, instance_kind, "instance_group.kind"),
                           count=int(instance_count))
    _set_version_policy(cfg, versions, latest)
    for k, v in (parameters or {}).items():
        _set_parameter(cfg, str(k), str(v))
    if spec is not None:
        _set_spec(cfg, spec)
    return cfg


def render_config(name: str, **kw: Any) -> str:
    """:func:`build_config` as config.pbtxt text."""
    return format_config(build_config(name, **kw))


def rewrite_config(text: str, name: str, versions: list[int] | None, spec: dict[str, Any] | None = None) -> str:
    """config.pbtxt with ``name`` replaced, ``version_policy`` = specific ``versions`` (None: keep) and the
    ``linewatch_spec`` parameter replaced by ``spec`` (None: keep; metadata.json is the sha-verified source
    of truth)."""
    cfg = parse_config(text)
    cfg.name = name
    if versions is not None:
        _set_version_policy(cfg, versions)
    if spec is not None:
        _set_spec(cfg, spec)
    return format_config(cfg)


# ----------------------------------------------------------------------------- the manifest's pin
def config_sha256(text: str) -> str:
    """sha256 of a config.pbtxt template's message minus its ``linewatch_spec`` parameter (what the manifest
    pins), deterministically serialised: comments, layout and field order do not change it."""
    cfg = parse_config(text)
    if SPEC_PARAMETER in cfg.parameters:
        del cfg.parameters[SPEC_PARAMETER]
    return hashlib.sha256(cfg.SerializeToString(deterministic=True)).hexdigest()


def _text_sha256(text: str) -> str:
    """The pin of versions exported before configs were messages: the text minus its spec lines."""
    kept = "\n".join(ln.rstrip() for ln in text.splitlines() if f'"{SPEC_PARAMETER}"' not in ln).strip() + "\n"
    return hashlib.sha256(kept.encode()).hexdigest()


def config_pinned(text: str, pinned: object) -> bool:
    """Is ``text`` the template a manifest's ``config_sha256`` ``pinned`` (its message digest, or for a
    version exported before configs were messages, its text digest)? False for a text that does not parse."""
    if not isinstance(pinned, str):
        return False
    if pinned == _text_sha256(text):
        return True
    try:
        return pinned == config_sha256(text)
    except ConfigError:
        return False


# ----------------------------------------------------------------------------- the deployment
def _warmup(cfg: ModelConfig) -> Any | None:
    """One zero batch of every required non-string input: Triton marks the model READY only after it ran
    (on a GPU: after CUDA initialised and the first kernels compiled). None: no such input."""
    pb = schema()
    ins = [t for t in cfg.input if not t.optional and t.data_type != pb.TYPE_STRING]
    if not ins:
        return None
    warm = pb.ModelWarmup(name=WARMUP_NAME, batch_size=1)
    for t in ins:
        warm.inputs[t.name].CopyFrom(pb.ModelWarmup.Input(data_type=t.data_type, dims=list(t.dims), zero_data=True))
    return warm


def _clear_deployment(cfg: ModelConfig) -> None:
    cfg.ClearField("instance_group")
    if cfg.default_model_filename == ONNX_FILE:
        cfg.ClearField("default_model_filename")
    if cfg.HasField("optimization"):  # our TensorRT accelerator; the containers only when left empty
        opt = cfg.optimization
        if opt.HasField("execution_accelerators"):
            accel = opt.execution_accelerators.gpu_execution_accelerator
            keep = [a for a in accel if a.name != "tensorrt"]
            del accel[:]
            accel.extend(keep)
            if not opt.execution_accelerators.ListFields():
                opt.ClearField("execution_accelerators")
        if not opt.ListFields():
            cfg.ClearField("optimization")
    for k in _DEPLOYMENT_PARAMETERS:
        if k in cfg.parameters:
            del cfg.parameters[k]
    keep_warm = [w for w in cfg.model_warmup if w.name != WARMUP_NAME]
    del cfg.model_warmup[:]
    cfg.model_warmup.extend(keep_warm)


def apply_deployment(text: str, *, device: str = "cpu", instances: int = 1, gpus: Sequence[int] = (),
                     fp16: bool = True, onnxruntime: bool = False, trt_cache_dir: str = "/trt-cache") -> str:
    """``text`` with the deployment's ``instance_group`` (KIND_GPU on ``gpus`` or KIND_CPU), a warmup batch,
    and for ``onnxruntime`` (EfficientAD on GPUs) the onnxruntime backend on ``model.onnx`` with the
    TensorRT accelerator (FP16 when ``fp16``, engine cache in ``trt_cache_dir``). Idempotent: the fields
    it owns (module docstring) are replaced, the rest of the config is kept."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    if onnxruntime and device != "gpu":
        raise ValueError("the onnxruntime/TensorRT backend is the GPU path")
    pb = schema()
    cfg = parse_config(text)
    _clear_deployment(cfg)
    group = cfg.instance_group.add(count=int(instances))
    if device == "gpu":
        group.kind = pb.ModelInstanceGroup.KIND_GPU
        group.gpus.extend(int(g) for g in gpus)
    else:
        group.kind = pb.ModelInstanceGroup.KIND_CPU
    cfg.backend = "onnxruntime" if onnxruntime else "python"
    if onnxruntime:
        cfg.default_model_filename = ONNX_FILE
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters.update({"precision_mode": "FP16" if fp16 else "FP32",
                               "max_workspace_size_bytes": str(1 << 30), "trt_engine_cache_enable": "1",
                               "trt_engine_cache_path": trt_cache_dir})
    elif device == "gpu":  # Python backend: inputs may arrive in GPU memory (DLPack, models/serving_device.py)
        _set_parameter(cfg, "FORCE_CPU_ONLY_INPUT_TENSORS", "no")
    _set_parameter(cfg, "linewatch_fp16", str(int(bool(fp16 and device == "gpu"))))
    warm = _warmup(cfg)
    if warm is not None:
        cfg.model_warmup.append(warm)
    return format_config(cfg)
