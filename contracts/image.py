"""Bounded image decoding for frames (OpenCV), shared by the worker and the training job.

Dimensions are read from the PNG/JPEG/BMP header *before* decoding so a decompression bomb
(a tiny file declaring a huge image) is rejected without allocating it. Grayscale, alpha and
16-bit images are accepted and converted. Every failure is an
:class:`~contracts.envelope.EnvelopeError` with a DLQ reason.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from contracts.envelope import EnvelopeError

DEFAULT_MAX_SIDE = 8192
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


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
