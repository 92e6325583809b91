"""Message envelopes for every topic the worker reads or writes (orjson, versioned).

- ``frames``: value = encoded image bytes; metadata in Kafka headers (``frame_id``, ``camera_id``,
  ``line_id``, ``ts_ms``, optional ``product``/``task``, ``content_type``, plus free-form
  ``gt_label``/``gt_defect`` from replays and ``warmup`` = ``1`` on a warm-up frame (scored, and its result
  marked ``warmup``; no camera on the console). Key = camera id.
- ``inspection-results``: JSON :class:`InspectionResult` (key = camera id, idempotent by frame_id): the raw
  ``score`` and ``threshold`` of the served model's operating point (contracts/operating_point.py) and
  ``score_normalized`` in [0, 1], 0.5 at the threshold (absent on results written before it existed).
- ``defect-events``: JSON :class:`DefectEvent` = result + small uint8 heat-map PNG (base64) +
  bounding boxes of the connected regions above the map threshold (at the model's input resolution;
  a flagged frame has at least one).
- ``frames-dlq``: value = original bytes, original headers + ``error`` (reason) + ``error_detail``
  (a frame over the size limit keeps only its size and sha256: see :func:`dlq_record`).

Every decode error is an :class:`EnvelopeError` whose ``reason`` is a short machine-readable
code (it becomes the DLQ ``error`` header and a metric label) and whose ``detail`` names what is
wrong in words.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np
import orjson

SCHEMA_VERSION = 1

FRAME_REQUIRED_HEADERS = ("frame_id", "camera_id", "ts_ms")
CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp")
_ID_RE = re.compile(r"[A-Za-z0-9_.:@/\-]{1,128}")  # fullmatch only
MAX_HEADER_BYTES = 1024
WARMUP_HEADER = "warmup"  # frame header: "1" on a warm-up frame (e.g. the demo's first frame)

Headers = list[tuple[str, bytes]]


class EnvelopeError(ValueError):
    """A message that cannot be decoded. ``reason`` is a DLQ code, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- headers


def headers_to_dict(headers: Any) -> dict[str, bytes]:
    """Kafka headers (list of (str, bytes) pairs, a mapping, or None) -> {name: bytes} (last wins)."""
    if not headers:
        return {}
    items: Iterable = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, bytes] = {}
    for k, v in items:
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        if v is None:
            v = b""
        elif isinstance(v, str):
            v = v.encode()
        out[str(k)] = bytes(v)
    return out


def headers_to_list(headers: Mapping[str, Any]) -> Headers:
    out: Headers = []
    for k, v in headers.items():
        if v is None:
            continue
        if isinstance(v, bytes):
            out.append((k, v))
        else:
            out.append((k, str(v).encode()))
    return out


def _hstr(h: dict[str, bytes], name: str, *, required: bool) -> str | None:
    raw = h.get(name)
    if raw is None or raw == b"":
        if required:
            raise EnvelopeError("missing_header", f"frame header '{name}' is missing or empty")
        return None
    if len(raw) > MAX_HEADER_BYTES:
        raise EnvelopeError("bad_header", f"frame header '{name}' is {len(raw)} bytes (max {MAX_HEADER_BYTES})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("bad_header", f"frame header '{name}' is not valid UTF-8") from None


# ----------------------------------------------------------------------------- frames


@dataclass
class Frame:
    frame_id: str
    camera_id: str
    ts_ms: int
    image: bytes
    line_id: str | None = None
    product: str | None = None
    task: str | None = None
    content_type: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # gt_label, gt_defect, source, ...

    @property
    def key(self) -> bytes:
        return self.camera_id.encode()

    @property
    def warmup(self) -> bool:
        """A warm-up frame (header ``warmup``: 1/true): scored like any other, its result marked ``warmup``."""
        return self.extra.get(WARMUP_HEADER, "").strip().lower() in ("1", "true", "yes")


def new_frame_id() -> str:
    return uuid.uuid4().hex


def encode_frame(frame: Frame) -> tuple[bytes, bytes, Headers]:
    """-> (key, value, headers) ready for a Kafka producer."""
    h: dict[str, Any] = {
        "schema": str(SCHEMA_VERSION),
        "frame_id": frame.frame_id,
        "camera_id": frame.camera_id,
        "line_id": frame.line_id,
        "ts_ms": str(int(frame.ts_ms)),
        "product": frame.product,
        "task": frame.task,
        "content_type": frame.content_type,
    }
    for k, v in frame.extra.items():
        h.setdefault(k, v)
    return frame.key, frame.image, headers_to_list(h)


def is_valid_id(value: str) -> bool:
    """A frame or camera id as :func:`decode_frame` accepts it: 1-128 chars of ``[A-Za-z0-9_.:@/-]``."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def decode_frame(key: bytes | None, value: bytes | None, headers: Any) -> Frame:
    """Validate a ``frames`` record. Raises :class:`EnvelopeError` naming what is wrong."""
    h = headers_to_dict(headers)
    schema = _hstr(h, "schema", required=False)
    if schema is not None and schema != str(SCHEMA_VERSION):
        raise EnvelopeError("unsupported_schema", f"frame schema '{schema}' is not supported (want {SCHEMA_VERSION})")
    frame_id = _hstr(h, "frame_id", required=True)
    camera_id = _hstr(h, "camera_id", required=True)
    for name, v in (("frame_id", frame_id), ("camera_id", camera_id)):
        if not _ID_RE.fullmatch(v):
            raise EnvelopeError("bad_header", f"frame header '{name}'={v[:64]!r} has characters outside [A-Za-z0-9_.:@/-] or is too long")
    ts_raw = _hstr(h, "ts_ms", required=True)
    try:
        ts_ms = int(ts_raw)
    except ValueError:
        raise EnvelopeError("bad_header", f"frame header 'ts_ms'={ts_raw[:32]!r} is not an integer") from None
    if ts_ms < 0:
        raise EnvelopeError("bad_header", f"frame header 'ts_ms'={ts_ms} is negative")
    ctype = _hstr(h, "content_type", required=False)
    if ctype is not None and ctype.lower() not in CONTENT_TYPES:
        raise EnvelopeError("unsupported_content_type", f"content_type '{ctype}' is not one of {', '.join(CONTENT_TYPES)}")
    if value is None or len(value) == 0:
        raise EnvelopeError("empty_payload", "frame value is empty (expected encoded image bytes)")
    if key is not None and key != b"" and key.decode("utf-8", "replace") != camera_id:
        # not fatal: the header is authoritative, but the key decides the partition/order
        pass
    known = {"schema", "frame_id", "camera_id", "line_id", "ts_ms", "product", "task", "content_type"}
    extra = {}
    for k, v in h.items():
        if k not in known and len(v) <= MAX_HEADER_BYTES:
            try:
                extra[k] = v.decode("utf-8")
            except UnicodeDecodeError:
                pass
    return Frame(
        frame_id=frame_id,
        camera_id=camera_id,
        ts_ms=ts_ms,
        image=bytes(value),
        line_id=_hstr(h, "line_id", required=False),
        product=_hstr(h, "product", required=False),
        task=_hstr(h, "task", required=False),
        content_type=ctype.lower() if ctype else None,
        extra=extra,
    )


def peek_ids(headers: Any, max_chars: int | None = 128) -> tuple[str | None, str | None]:
    """Best-effort (frame_id, camera_id) of a possibly malformed frame, for logs and the DLQ
    (cut to ``max_chars``; ``None`` keeps them whole, as accounting matches them)."""
    h = headers_to_dict(headers)

    def s(n):
        v = h.get(n)
        return v.decode("utf-8", "replace")[:max_chars] if v else None

    return s("frame_id"), s("camera_id")


# ----------------------------------------------------------------------------- results


@dataclass
class InspectionResult:
    frame_id: str
    camera: str
    line: str | None
    model: str
    model_version: str
    task: str
    routed: bool
    route_distance: float | None
    score: float
    threshold: float
    is_anomaly: bool
    shadow: bool = False
    product: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, queue, infer, total, e2e
    ts_ms: int = 0  # frame timestamp (from the camera)
    processed_ts_ms: int = 0
    gt_label: str | None = None
    gt_defect: str | None = None
    # in [0, 1], 0.5 at ``threshold`` (contracts.operating_point.OperatingPoint.normalised); None: an older writer
    score_normalized: float | None = None
    warmup: bool = False  # the frame carried the ``warmup`` header: not a camera of the line
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)


_RESULT_REQUIRED = {
    "frame_id": str, "camera": str, "model": str, "task": str, "routed": bool,
    "score": (int, float), "threshold": (int, float), "is_anomaly": bool,
}
_RESULT_OPTIONAL = {"score_normalized": (int, float), "warmup": bool}  # absent or null: the field's default


def _validate(d: Any, required: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise EnvelopeError("bad_json", f"{what} is a JSON {type(d).__name__}, expected an object")
    if d.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise EnvelopeError("unsupported_schema", f"{what} schema {d.get('schema')!r} is not {SCHEMA_VERSION}")
    for name, typ in required.items():
        if name not in d:
            raise EnvelopeError("missing_field", f"{what} field '{name}' is missing")
        v = d[name]
        if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
            raise EnvelopeError("bad_field", f"{what} field '{name}' is {type(d[name]).__name__}, expected {typ}")
    for name, typ in _RESULT_OPTIONAL.items():
        v = d.get(name)
        if v is not None and (not isinstance(v, typ) or (typ is not bool and isinstance(v, bool))):
            raise EnvelopeError("bad_field", f"{what} field '{name}' is {type(v).__name__}, expected {typ} or null")
    return d


def _loads(value: bytes, what: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise EnvelopeError("bad_json", f"{what} is not valid JSON: {e}") from None


def decode_result(value: bytes) -> InspectionResult:
    d = _validate(_loads(value, "inspection result"), _RESULT_REQUIRED, "inspection result")
    names = {f.name for f in fields(InspectionResult)}
    kw = {k: v for k, v in d.items() if k in names}
    kw.setdefault("line", None)
    kw.setdefault("model_version", "")
    kw.setdefault("route_distance", None)
    if kw.get("warmup") is None:
        kw.pop("warmup", None)
    return InspectionResult(**kw)


# ----------------------------------------------------------------------------- defect events


@dataclass
class DefectEvent:
    result: InspectionResult
    heatmap_png_b64: str  # uint8 PNG, at most heatmap_size px on the long side
    heatmap_scale: float  # map value = pixel / 255 * heatmap_scale (pixel 0 = map min clipped at 0)
    map_threshold: float
    boxes: list[dict[str, float]]  # normalised [0,1] x, y, w, h + area fraction + peak map value
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = self.result.to_dict()
        d.update(
            heatmap_png_b64=self.heatmap_png_b64,
            heatmap_scale=self.heatmap_scale,
            map_threshold=self.map_threshold,
            boxes=self.boxes,
            schema=self.schema,
        )
        return d

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)


def decode_heatmap(b64: str) -> np.ndarray:
    buf = np.frombuffer(base64.b64decode(b64), dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise EnvelopeError("bad_heatmap", "heat map is not a decodable PNG")
    return img


def decode_defect_event(value: bytes) -> DefectEvent:
    d = _validate(_loads(value, "defect event"), {**_RESULT_REQUIRED, "heatmap_png_b64": str, "boxes": list},
                  "defect event")
    names = {f.name for f in fields(InspectionResult)}
    res = {k: v for k, v in d.items() if k in names}
    res.setdefault("line", None)
    res.setdefault("model_version", "")
    res.setdefault("route_distance", None)
    if res.get("warmup") is None:
        res.pop("warmup", None)
    return DefectEvent(result=InspectionResult(**res), heatmap_png_b64=d["heatmap_png_b64"],
                       heatmap_scale=float(d.get("heatmap_scale", 1.0)),
                       map_threshold=float(d.get("map_threshold", 0.0)), boxes=d["boxes"])


# ----------------------------------------------------------------------------- DLQ


DLQ_MAX_HEADERS = 64
DLQ_MAX_HEADER_VALUE = 8 * MAX_HEADER_BYTES


def dlq_record(key: bytes | None, value: bytes | None, headers: Any, reason: str, detail: str,
               *, stage: str = "decode", max_value_bytes: int | None = None) -> tuple[bytes | None, bytes, Headers]:
    """Original bytes + original headers + ``error``/``error_detail``/``error_stage``/``error_ts_ms``.

    The DLQ record must itself fit the producer's request size, or publishing it would fail
    forever: a value larger than ``max_value_bytes`` (the worker's frame size limit) is replaced by
    an empty value plus ``error_original_bytes`` and ``error_original_sha256``; original headers
    beyond the first ``DLQ_MAX_HEADERS`` or longer than ``DLQ_MAX_HEADER_VALUE`` bytes are left out
    (``error_dropped_headers`` counts them)."""
    h: Headers = []
    dropped = 0
    for k, v in headers_to_dict(headers).items():
        if k.startswith("error"):
            continue
        if len(h) >= DLQ_MAX_HEADERS or len(v) > DLQ_MAX_HEADER_VALUE or len(k) > MAX_HEADER_BYTES:
            dropped += 1
            continue
        h.append((k, v))
    value = value or b""
    if max_value_bytes is not None and len(value) > max_value_bytes:
        h += [("error_original_bytes", str(len(value)).encode()),
              ("error_original_sha256", hashlib.sha256(value).hexdigest().encode())]
        value = b""
    if dropped:
        h.append(("error_dropped_headers", str(dropped).encode()))
    h += [
        ("error", reason.encode()),
        ("error_detail", detail.encode("utf-8", "replace")[:MAX_HEADER_BYTES]),
        ("error_stage", stage.encode()),
        ("error_ts_ms", str(int(time.time() * 1000)).encode()),
    ]
    return key, value, h


def dlq_reason(headers: Any) -> tuple[str | None, str | None]:
    h = headers_to_dict(headers)
    r, d = h.get("error"), h.get("error_detail")
    return (r.decode() if r else None), (d.decode("utf-8", "replace") if d else None)
