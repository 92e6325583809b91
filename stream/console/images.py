"""Pictures the console serves: frame thumbnails (bounded decode of untrusted frame bytes, contracts.image)
and defect heat maps coloured for an overlay (transparent where the map is low)."""

from __future__ import annotations

import base64
from collections import OrderedDict

import cv2
import numpy as np

from contracts.envelope import EnvelopeError
from contracts.image import decode_image

THUMB_WIDTH = 320


def thumbnail(data: bytes, *, width: int = THUMB_WIDTH, max_side: int = 8192, max_pixels: int = 40_000_000,
              max_bytes: int = 32 * 1024 * 1024) -> bytes | None:
    """JPEG thumbnail (``width`` px wide) of an encoded frame, or None when it does not decode within the limits."""
    try:
        img = decode_image(data, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes,
                           target=(width, width))
    except EnvelopeError:
        return None
    h, w = img.shape[:2]
    th = max(1, round(h * width / w))
    small = cv2.resize(img, (width, th), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes() if ok else None


def heatmap_overlay(png_b64: str, *, map_threshold: float = 0.0, heatmap_scale: float = 1.0,
                    size: int = 256) -> bytes | None:
    """The defect event's uint8 heat map (base64 PNG; pixel p = map value p / 255 * ``heatmap_scale``) as an RGBA
    PNG for an overlay: JET colours; faint (alpha <= 25%) below the map threshold the boxes were cut at, 45-85%
    opaque above it; resized to ``size`` px on the long side."""
    try:
        raw = base64.b64decode(png_b64, validate=True)
    except (ValueError, TypeError):
        return None
    if len(raw) > 4 * 1024 * 1024:
        return None
    hm = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
    if hm is None or hm.ndim != 2 or hm.shape[0] > 1024 or hm.shape[1] > 1024:
        return None
    h, w = hm.shape
    scale = size / max(h, w)
    hm = cv2.resize(hm, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(hm, cv2.COLORMAP_JET)
    t = 0.0 if heatmap_scale <= 0 else float(np.clip(map_threshold / heatmap_scale * 255.0, 0.0, 254.0))
    v = hm.astype(np.float32)
    below = v / max(t, 1.0) * 0.25
    above = 0.45 + (v - t) / (255.0 - t) * 0.40
    alpha = np.where(v >= t, above, below) if t > 0 else v / 255.0 * 0.85
    ok, buf = cv2.imencode(".png", np.dstack([colour, np.clip(alpha * 255.0, 0, 255).astype(np.uint8)]))
    return buf.tobytes() if ok else None


class FrameBuffer:
    """The most recent frames' encoded bytes, bounded by ``max_bytes`` (oldest dropped first), by frame id."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._frames: OrderedDict[str, bytes] = OrderedDict()

    def put(self, frame_id: str, data: bytes) -> None:
        if not data or len(data) > self.max_bytes:
            return
        old = self._frames.pop(frame_id, None)
        if old is not None:
            self.bytes -= len(old)
        self._frames[frame_id] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, dropped = self._frames.popitem(last=False)
            self.bytes -= len(dropped)

    def get(self, frame_id: str) -> bytes | None:
        return self._frames.get(frame_id)

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._frames

    def __len__(self) -> int:
        return len(self._frames)


class LRU:
    """A small bounded cache (thumbnails by frame id)."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: str, value: bytes) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
