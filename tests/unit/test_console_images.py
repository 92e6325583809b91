"""The console's pictures: bounded thumbnails that refuse what does not decode, heat-map overlays transparent
where the map is zero, the bounded frame buffer and image cache."""

from __future__ import annotations

import base64
import struct
import zlib

import cv2
import numpy as np

from stream.console.images import LRU, FrameBuffer, heatmap_overlay, thumbnail
from tests.harness.pictures import heatmap_b64

# ---------------------------------------------------------------- pictures

def _png(img) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


def test_thumbnail_is_bounded_and_refuses_what_does_not_decode():
    img = np.random.default_rng(0).integers(0, 255, (600, 900, 3), dtype=np.uint8)
    jpg = thumbnail(_png(img))
    out = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert jpg[:2] == b"\xff\xd8" and out.shape == (213, 320, 3)
    assert thumbnail(b"definitely not an image") is None
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # a 10.8 GB decompression bomb, by its header
    bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF))
    assert thumbnail(bomb) is None
    assert thumbnail(_png(img), max_bytes=100) is None


def test_heatmap_overlay_is_transparent_where_the_map_is_zero():
    png = heatmap_overlay(heatmap_b64(), size=64)
    rgba = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (64, 64, 4) and rgba[0, 0, 3] == 0 and rgba[24, 24, 3] > 150
    # above the map threshold the boxes were cut at: opaque; below it: faint
    hm = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    b64 = base64.b64encode(cv2.imencode(".png", hm)[1].tobytes()).decode()
    a = cv2.imdecode(np.frombuffer(heatmap_overlay(b64, map_threshold=0.5, heatmap_scale=1.0, size=16), np.uint8),
                     cv2.IMREAD_UNCHANGED)[0, :, 3]
    assert a[:7].max() <= 64 and a[9:].min() >= 110 and a[-1] >= 210
    assert heatmap_overlay("!!!not base64") is None and heatmap_overlay(base64.b64encode(b"nope").decode()) is None


def test_frame_buffer_and_cache_are_bounded():
    buf = FrameBuffer(max_bytes=100)
    for i in range(5):
        buf.put(f"f{i}", b"x" * 40)
    assert buf.bytes <= 100 and "f4" in buf and "f0" not in buf and len(buf) == 2
    buf.put("huge", b"x" * 101)
    assert "huge" not in buf
    lru = LRU(2)
    lru.put("a", b"1")
    lru.put("b", b"2")
    lru.get("a")
    lru.put("c", b"3")
    assert lru.get("b") is None and lru.get("a") == b"1"
