"""Bounded image decoding for frames (OpenCV), shared by the worker and the training job.

Dimensions, channels and bit depth are read from the PNG/JPEG/BMP header *before* decoding
(:func:`read_header`), so a decompression bomb (a tiny file declaring a huge image) is rejected
without allocating it, and the bytes a decode will need are known up front (:func:`plan_decode`;
the worker admits decodes against a memory budget with it, stream/worker/budget.py).

Every image is decoded straight to 8-bit BGR (``IMREAD_COLOR``): grayscale is replicated, alpha
dropped (the colour channels are kept as-is, *not* composited), 16-bit reduced to its high byte by
libpng while it decodes, so a 16-bit RGBA frame never exists at full depth in memory (the same
pixels as decoding it unchanged and converting, without the 16-bit and 8-bit full-size copies).
A JPEG much larger than the model input is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT
(``IMREAD_REDUCED_COLOR_*``) when the result is still at least the model's input size.

Pixel cap: ``max_pixels`` is the explicit upper bound; the worker passes :func:`model_pixel_cap`
of it, i.e. at most ``factor`` x the model input's H x W (settings ``max_image_pixels_per_input``,
default 576 = 24 x 24: a 256x256 model takes up to 37.7 MP, a 128x128 one 9.4 MP).

Every failure is an :class:`~contracts.envelope.EnvelopeError` with a DLQ reason.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from contracts.envelope import EnvelopeError

DEFAULT_MAX_SIDE = 8192
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

# peak bytes of a decode per byte of its 8-bit BGR output, measured with OpenCV 4.11 (VmHWM):
# its PNG decoder holds a second full-size buffer, libjpeg writes rows into the output; BMP assumed 2x
CODEC_PEAK_FACTOR = {"png": 2.0, "jpeg": 1.0, "bmp": 2.0}
CODEC_SLACK_BYTES = 1 << 20  # libjpeg / zlib working memory, row buffers
_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # pixels as stored (no EXIF rotation), like UNCHANGED
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


@dataclass(frozen=True)
class ImageHeader:
    fmt: str  # png | jpeg | bmp
    width: int
    height: int
    channels: int  # as stored (PNG palette: 3)
    bytes_per_sample: int  # 2 for 16-bit PNG / 12-bit JPEG

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def raw_bytes(self) -> int:
        """w * h * channels * bytes per sample: what a full-depth (IMREAD_UNCHANGED) decode allocates."""
        return self.width * self.height * self.channels * self.bytes_per_sample


# ----------------------------------------------------------------------------- header sniffing

_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
_SOF = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def read_header(data: bytes) -> ImageHeader:
    """Format, size, channels and sample depth from the file header without decoding.
    EnvelopeError if unknown/corrupt."""
    if len(data) < 24:
        raise EnvelopeError("undecodable_image", f"payload is {len(data)} bytes, too short for an image header")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR" or len(data) < 26:
            raise EnvelopeError("undecodable_image", "PNG without IHDR chunk")
        w, h = struct.unpack(">II", data[16:24])
        depth, ctype = data[24], data[25]
        return ImageHeader("png", w, h, _PNG_CHANNELS.get(ctype, 4), 2 if depth == 16 else 1)
    if data[:2] == b"\xff\xd8":
        return _jpeg_header(data)
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        bits = struct.unpack("<H", data[28:30])[0] if len(data) >= 30 else 24
        return ImageHeader("bmp", abs(w), abs(h), 4 if bits == 32 else 3, 1)
    raise EnvelopeError("unsupported_format", f"payload is not PNG, JPEG or BMP (magic {data[:4].hex()})")


def sniff_image(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the file header without decoding. EnvelopeError if unknown/corrupt."""
    h = read_header(data)
    return h.fmt, h.width, h.height


def _jpeg_header(data: bytes) -> ImageHeader:
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
        if marker in _SOF:
            if i + 9 > n:
                break
            precision = data[i + 4]
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            comps = data[i + 9] if i + 9 < n else 3
            return ImageHeader("jpeg", w, h, comps or 3, 2 if precision > 8 else 1)
        if marker == 0xD9 or seglen < 2:
            break
        i += 2 + seglen
    raise EnvelopeError("undecodable_image", "JPEG without a readable SOF header")


# ----------------------------------------------------------------------------- plan + decode


def model_pixel_cap(max_pixels: int, factor: int, width: int, height: int) -> int:
    """The pixel cap for frames of a model with a ``width`` x ``height`` input: ``factor`` x its
    pixels, never above the explicit ``max_pixels`` (``factor`` 0: the explicit cap alone)."""
    return min(max_pixels, factor * width * height) if factor else max_pixels


def jpeg_reduction(width: int, height: int, target: tuple[int, int] | None) -> int:
    """The largest libjpeg scale-down (8, 4, 2) whose result still covers ``target`` (w, h); else 1."""
    if not target:
        return 1
    tw, th = target
    for f in (8, 4, 2):
        if -(-width // f) >= tw and -(-height // f) >= th:
            return f
    return 1


@dataclass(frozen=True)
class DecodePlan:
    header: ImageHeader
    reduce: int  # 1, or the JPEG scale-down 2/4/8
    out_width: int
    out_height: int

    @property
    def out_bytes(self) -> int:
        """The decoded 8-bit BGR image."""
        return self.out_width * self.out_height * 3

    @property
    def cost_bytes(self) -> int:
        """Estimated peak bytes while decoding (the output + the codec's own buffers)."""
        return int(self.out_bytes * CODEC_PEAK_FACTOR[self.header.fmt]) + CODEC_SLACK_BYTES


def plan_decode(data: bytes, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES, target: tuple[int, int] | None = None,
                reduce: bool = True) -> DecodePlan:
    """Check the limits from the payload size and the header; how the payload will be decoded.
    ``target``: the model input (width, height), for JPEG reduced decoding (``reduce``)."""
    if len(data) > max_bytes:
        raise EnvelopeError("too_large", f"payload is {len(data)} bytes (max {max_bytes})")
    hd = read_header(data)
    fmt, w, h = hd.fmt, hd.width, hd.height
    if w <= 0 or h <= 0:
        raise EnvelopeError("undecodable_image", f"{fmt} header declares {w}x{h}")
    if w > max_side or h > max_side or w * h > max_pixels:
        raise EnvelopeError("too_large", f"{fmt} header declares {w}x{h} (max side {max_side}, max pixels {max_pixels})")
    f = jpeg_reduction(w, h, target) if reduce and fmt == "jpeg" else 1
    return DecodePlan(hd, f, -(-w // f), -(-h // f))


def decode_image(data: bytes, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, target: tuple[int, int] | None = None,
                 plan: DecodePlan | None = None) -> np.ndarray:
    """Bytes -> uint8 BGR (H, W, 3) image (see the module docstring). ``plan``: from :func:`plan_decode`
    (the limits were checked there); else it is made here from the limits and ``target``."""
    p = plan or plan_decode(data, max_side=max_side, max_pixels=max_pixels, max_bytes=max_bytes, target=target)
    flags = _FLAGS | _REDUCED[p.reduce] if p.reduce > 1 else _FLAGS
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    fmt = p.header.fmt
    if img is None:
        raise EnvelopeError("undecodable_image", f"OpenCV could not decode the {fmt} payload ({len(data)} bytes)")
    if img.shape[0] != p.out_height or img.shape[1] != p.out_width:
        raise EnvelopeError("undecodable_image", f"decoded size {img.shape[1]}x{img.shape[0]} != header "
                                                 f"{p.header.width}x{p.header.height}" + (f" / {p.reduce}" if p.reduce > 1 else ""))
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:  # IMREAD_COLOR guarantees it; never trust it
        raise EnvelopeError("unsupported_format", f"decoded {img.dtype} {img.shape} is not 8-bit BGR")
    return img
