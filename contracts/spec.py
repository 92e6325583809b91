"""The model spec (``linewatch_spec`` in a model's config.pbtxt) and the preprocessing it defines.

Training, export and the worker all turn an image into model input through :func:`to_tensor`,
so served scores match the evaluated ones (docs/CONTRACTS.md):
decode (contracts.image) -> convert to ``color`` -> resize to (width, height) (INTER_AREA when shrinking,
INTER_LINEAR when growing) -> CHW, then for ``input.dtype`` FP32: float32 / scale -> (x - mean) / std.
A UINT8 model (every export since the GPU-serving change) takes the resized uint8 pixels and normalises
in its graph with the same scale/mean/std, so a frame crosses the wire at a quarter of the FP32 size.

Every failure is an :class:`~contracts.envelope.EnvelopeError` with a DLQ reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import orjson

from contracts.image import decode_image

INPUT_DTYPES = {"FP32": np.float32, "UINT8": np.uint8}  # Triton type name -> numpy dtype of the model input


@dataclass(frozen=True)
class InputSpec:
    name: str = "image"
    height: int = 256
    width: int = 256
    color: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "FP32"
    scale: float = 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    @property
    def np_dtype(self) -> type:
        return INPUT_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelSpec:
    model: str
    detector: str
    version: int | str
    input: InputSpec
    product: str | None = None
    outputs: dict[str, str] = field(default_factory=lambda: {"anomaly_map": "anomaly_map", "score": "score"})
    threshold: float = 0.0
    map_threshold: float = 0.0
    tasks: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def channels(self) -> int:
        return 1 if self.input.color.upper() in ("GRAY", "GRAYSCALE", "L") else 3


def parse_spec(spec: str | bytes | dict) -> ModelSpec:
    """Parse and validate a ``linewatch_spec`` JSON; ValueError names the bad field."""
    d = orjson.loads(spec) if isinstance(spec, str | bytes) else dict(spec)
    for k in ("model", "detector", "input"):
        if k not in d:
            raise ValueError(f"linewatch_spec: field '{k}' is missing")
    i = d["input"]
    if not isinstance(i, dict):
        raise ValueError("linewatch_spec: 'input' must be an object")
    for k in ("height", "width"):
        if not isinstance(i.get(k), int) or i[k] <= 0:
            raise ValueError(f"linewatch_spec: input.{k} must be a positive integer, got {i.get(k)!r}")
    color = str(i.get("color", "RGB")).upper()
    if color not in ("RGB", "BGR", "GRAY", "GRAYSCALE", "L"):
        raise ValueError(f"linewatch_spec: input.color {color!r} not in RGB/BGR/GRAY")
    if str(i.get("layout", "NCHW")).upper() not in ("NCHW", "CHW"):
        raise ValueError(f"linewatch_spec: input.layout {i.get('layout')!r} unsupported (NCHW only)")
    if str(i.get("dtype", "FP32")).upper() not in INPUT_DTYPES:
        raise ValueError(f"linewatch_spec: input.dtype {i.get('dtype')!r} not in {'/'.join(INPUT_DTYPES)}")
    nch = 1 if color in ("GRAY", "GRAYSCALE", "L") else 3
    mean = tuple(float(x) for x in i.get("mean", [0.0] * nch))
    std = tuple(float(x) for x in i.get("std", [1.0] * nch))
    if len(mean) not in (1, nch) or len(std) not in (1, nch):
        raise ValueError(f"linewatch_spec: input.mean/std need 1 or {nch} values")
    if any(s == 0 for s in std):
        raise ValueError("linewatch_spec: input.std contains 0")
    inp = InputSpec(name=i.get("name", "image"), height=i["height"], width=i["width"], color=color,
                    layout="NCHW", dtype=str(i.get("dtype", "FP32")).upper(), scale=float(i.get("scale", 255.0)),
                    mean=mean, std=std)
    tasks = d.get("tasks") or []
    if isinstance(tasks, dict):
        tasks = list(tasks)
    return ModelSpec(model=d["model"], detector=d["detector"], version=d.get("version", 1), input=inp,
                     product=d.get("product"), outputs=d.get("outputs") or {"anomaly_map": "anomaly_map", "score": "score"},
                     threshold=float(d.get("threshold", 0.0)), map_threshold=float(d.get("map_threshold", d.get("threshold", 0.0))),
                     tasks=tuple(str(t) for t in tasks), raw=d)


def to_pixels(img_bgr: np.ndarray, spec: InputSpec | ModelSpec) -> np.ndarray:
    """uint8 BGR (H, W, 3) -> uint8 (C, height, width) in the spec's colour and size."""
    s = spec.input if isinstance(spec, ModelSpec) else spec
    h, w = img_bgr.shape[:2]
    interp = cv2.INTER_AREA if (w > s.width or h > s.height) else cv2.INTER_LINEAR
    x = cv2.resize(img_bgr, (s.width, s.height), interpolation=interp)
    if s.color == "RGB":
        x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
    elif s.color in ("GRAY", "GRAYSCALE", "L"):
        x = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)[:, :, None]
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def normalise(pixels: np.ndarray, spec: InputSpec | ModelSpec) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 / scale -> (x - mean) / std (what a UINT8 model does in its graph)."""
    s = spec.input if isinstance(spec, ModelSpec) else spec
    x = pixels.astype(np.float32) * np.float32(1.0 / s.scale)
    x -= np.asarray(s.mean, dtype=np.float32).reshape(-1, 1, 1)
    x /= np.asarray(s.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray(x)


def to_tensor(img_bgr: np.ndarray, spec: InputSpec | ModelSpec) -> np.ndarray:
    """uint8 BGR (H, W, 3) -> the model input (C, height, width): uint8 pixels for a UINT8 model, else
    float32 normalised."""
    s = spec.input if isinstance(spec, ModelSpec) else spec
    x = to_pixels(img_bgr, s)
    return x if s.dtype == "UINT8" else normalise(x, s)


def model_input(batch: np.ndarray, spec: InputSpec | ModelSpec) -> np.ndarray:
    """A batch as the model takes it: the worker keeps uint8 pixels (:func:`to_pixels`) until it sends, so
    a rollout from an FP32 version to a UINT8 one needs no second decode; float input is FP32-only."""
    s = spec.input if isinstance(spec, ModelSpec) else spec
    if batch.dtype == np.uint8:
        return batch if s.dtype == "UINT8" else normalise(batch, s)
    if s.dtype == "UINT8":
        raise ValueError(f"model input {s.name!r} is UINT8 pixels; got {batch.dtype} (normalised) input")
    return np.ascontiguousarray(batch, dtype=np.float32)


def preprocess(data: bytes, spec: ModelSpec, **limits) -> np.ndarray:
    return to_tensor(decode_image(data, **limits), spec)
