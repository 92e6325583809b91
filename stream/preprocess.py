"""OpenCV decode + preprocess per the model's ``linewatch_spec`` (docs/CONTRACTS.md).

decode -> convert to ``color`` -> resize to (width, height) (INTER_AREA when shrinking,
INTER_LINEAR when growing) -> float32 / scale -> (x - mean) / std -> CHW.

Dimensions are read from the PNG/JPEG/BMP header *before* decoding so a decompression bomb
(a tiny file declaring a huge image) is rejected without allocating it. Grayscale, alpha and
16-bit images are accepted and converted. Every failure is an
:class:`~stream.envelope.EnvelopeError` with a DLQ reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import orjson

from stream.envelope import EnvelopeError

DEFAULT_MAX_SIDE = 8192
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


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


# ----------------------------------------------------------------------------- header sniffing


def sniff_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the file header without decoding. EnvelopeError if unknown/corrupt."""
    if len(data) < 24:
        raise EnvelopeError("undecodable_image", f"payload is {len(data)} bytes, too short for an image header")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR":
            raise EnvelopeError("undecodable_image", "PNG without IHDR chunk")
        w, h = struct.unpack(">II", data[16:24])
        return "png", w, h
    if data[:2] == b"\xff\xd8":
        return ("jpeg", *_jpeg_size(data))
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return "bmp", abs(w), abs(h)
    raise EnvelopeError("unsupported_format", f"payload is not PNG, JPEG or BMP (magic {data[:4].hex()})")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker == 0xD9 or seglen < 2:
            break
        i += 2 + seglen
    raise EnvelopeError("undecodable_image", "JPEG without a readable SOF header")


# ----------------------------------------------------------------------------- decode


def decode_image(data: bytes, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Bytes -> uint8 BGR (H, W, 3) image. Grayscale -> BGR, alpha dropped (composited on black
    is *not* done: the colour channels are kept as-is), 16-bit -> 8-bit (>> 8)."""
    if len(data) > max_bytes:
        raise EnvelopeError("too_large", f"payload is {len(data)} bytes (max {max_bytes})")
    fmt, w, h = sniff_image(data)
    if w <= 0 or h <= 0:
        raise EnvelopeError("undecodable_image", f"{fmt} header declares {w}x{h}")
    if w > max_side or h > max_side or w * h > max_pixels:
        raise EnvelopeError("too_large", f"{fmt} header declares {w}x{h} (max side {max_side}, max pixels {max_pixels})")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise EnvelopeError("undecodable_image", f"OpenCV could not decode the {fmt} payload ({len(data)} bytes)")
    if img.shape[0] != h or img.shape[1] != w:
        raise EnvelopeError("undecodable_image", f"decoded size {img.shape[1]}x{img.shape[0]} != header {w}x{h}")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype == np.float32:
        img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise EnvelopeError("unsupported_format", f"pixel type {img.dtype} is not supported")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif img.shape[2] != 3:
        raise EnvelopeError("unsupported_format", f"{img.shape[2]} channels not supported")
    return img


def to_tensor(img_bgr: np.ndarray, spec: InputSpec | ModelSpec) -> np.ndarray:
    """uint8 BGR (H, W, 3) -> float32 (C, height, width) per the spec."""
    s = spec.input if isinstance(spec, ModelSpec) else spec
    h, w = img_bgr.shape[:2]
    interp = cv2.INTER_AREA if (w > s.width or h > s.height) else cv2.INTER_LINEAR
    x = cv2.resize(img_bgr, (s.width, s.height), interpolation=interp)
    if s.color == "RGB":
        x = cv2.cvtColor(x, cv2.COLOR_BGR2RGB)
    elif s.color in ("GRAY", "GRAYSCALE", "L"):
        x = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)[:, :, None]
    x = x.astype(np.float32) * np.float32(1.0 / s.scale)
    x -= np.asarray(s.mean, dtype=np.float32)
    x /= np.asarray(s.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(data: bytes, spec: ModelSpec, **limits) -> np.ndarray:
    return to_tensor(decode_image(data, **limits), spec)
