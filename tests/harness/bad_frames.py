"""The bad-input corpus for tests/integration/test_bad_input.py: over 1,000 malformed frames built
in memory (crafted PNG/JPEG/BMP headers, truncations, bombs, bad headers) mixed with real MVTec
bottle frames and images that must be converted, each with its expected outcome."""

from __future__ import annotations

import struct
import time
import uuid
import zlib
from pathlib import Path

import cv2
import numpy as np

RESULT = "RESULT"  # expected outcome: a scored result (not the DLQ)
MB = 1024 * 1024


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_declaring(w: int, h: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A syntactically valid PNG header declaring w x h with a tiny IDAT (a decompression bomb's shape)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 256)) + _png_chunk(b"IEND", b""))


def _jpeg_declaring(jpg: bytes, w: int, h: int) -> bytes:
    i = jpg.find(b"\xff\xc0")
    assert i > 0, "baseline JPEG expected"
    b = bytearray(jpg)
    b[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def _bmp_declaring(w: int, h: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def _seg(jpg: bytes, marker: int) -> int:
    i = jpg.find(bytes([0xFF, marker]))
    assert i > 0
    return i


def _enc(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


class Corpus:
    """Records to publish + the expected outcome per test_id (a DLQ reason or RESULT)."""

    def __init__(self, moleflow_serving: bool, bottle_test: Path):
        self.rng = np.random.default_rng(20240601)
        self.records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.expect: dict[str, str | frozenset] = {}
        self.kind_of: dict[str, str] = {}
        self.value_of: dict[str, bytes | None] = {}
        self.unknown_expect = RESULT if moleflow_serving else "unknown_product"
        self.ts = int(time.time() * 1000)
        self.bottle_test = bottle_test

    def add(self, kind: str, expect, value: bytes | None, *, headers: dict | None = None, drop=(),
            raw_headers: list[tuple[str, bytes]] | None = None, key: bytes | None = b"cam-bad") -> str:
        tid = f"{kind}-{len(self.records)}-{uuid.uuid4().hex[:6]}"
        h: dict[str, bytes] = {"frame_id": tid.encode(), "camera_id": b"cam-bad", "line_id": b"line-1",
                               "ts_ms": str(self.ts).encode(), "product": b"bottle", "content_type": b"image/png"}
        for k in drop:
            h.pop(k, None)
        for k, v in (headers or {}).items():
            if v is None:
                h.pop(k, None)
            else:
                h[k] = v if isinstance(v, bytes) else str(v).encode()
        hl = list(h.items()) if raw_headers is None else list(raw_headers)
        hl.append(("test_id", tid.encode()))
        self.records.append((key, value, hl))
        self.expect[tid] = expect
        self.kind_of[tid] = kind
        self.value_of[tid] = value
        return tid

    def build(self) -> list:
        """Add one full corpus (new ids every call); returns its records, shuffled."""
        rng = self.rng
        first = len(self.records)
        good_files = sorted(self.bottle_test.glob("good/*.png"))[:6] + sorted(self.bottle_test.glob("broken_large/*.png"))[:3] \
            + sorted(self.bottle_test.glob("contamination/*.png"))[:3]
        assert len(good_files) == 12, f"MVTec bottle test images missing under {self.bottle_test}"
        bottle = cv2.imread(str(good_files[0]), cv2.IMREAD_COLOR)
        small = cv2.resize(bottle, (64, 64), interpolation=cv2.INTER_AREA)
        png_s, jpg_s = _enc(".png", small), _enc(".jpg", small)
        mid = cv2.resize(bottle, (256, 256), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(mid, cv2.COLOR_BGR2GRAY)

        # --- real bottle frames and convertible images: must get results
        for f in good_files:
            self.add("good_bottle", RESULT, f.read_bytes())
        self.add("gray8_png", RESULT, _enc(".png", gray))
        self.add("gray8_png", RESULT, _enc(".png", gray[:, :, None]))
        self.add("gray16_png", RESULT, _enc(".png", gray.astype(np.uint16) * 257))
        self.add("gray16_png", RESULT, _enc(".png", (gray.astype(np.uint16) << 8) | 0x7F))
        self.add("rgb16_png", RESULT, _enc(".png", mid.astype(np.uint16) * 257))
        self.add("rgb16_png", RESULT, _enc(".png", mid.astype(np.uint16) * 200))
        alpha = np.dstack([mid, np.full(mid.shape[:2], 128, np.uint8)])
        self.add("rgba_png", RESULT, _enc(".png", alpha))
        self.add("rgba_png", RESULT, _enc(".png", np.dstack([mid.astype(np.uint16) * 257,
                                                              np.full(mid.shape[:2], 65535, np.uint16)])))
        self.add("gray_jpeg", RESULT, _enc(".jpg", gray), headers={"content_type": "image/jpeg"})
        self.add("gray_jpeg", RESULT, _enc(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 30]), headers={"content_type": "image/jpeg"})
        self.add("bmp", RESULT, _enc(".bmp", mid), headers={"content_type": "image/bmp"})
        self.add("bmp", RESULT, _enc(".bmp", gray), headers={"content_type": "image/bmp"})
        # content_type disagrees with the bytes: the bytes decide (magic sniffing), it is still an image
        self.add("content_type_mismatch", RESULT, _enc(".jpg", mid), headers={"content_type": "image/png"})
        self.add("content_type_mismatch", RESULT, _enc(".png", mid), headers={"content_type": "image/jpeg"})
        self.add("content_type_absent", RESULT, _enc(".png", mid), headers={"content_type": None})
        # non-UTF-8 bytes in a free-form header (gt_label): ignored, the frame is fine
        self.add("non_utf8_extra_header", RESULT, png_s, headers={"gt_label": b"\xff\xfe\x80good"})
        # JPEG whose scan data is damaged: syntactically valid, libjpeg recovers -> scored (likely anomalous)
        jpg_mid = _enc(".jpg", mid)
        for _ in range(3):
            b = bytearray(jpg_mid)
            i0 = _seg(jpg_mid, 0xDA) + 14
            for _ in range(6):
                j = int(rng.integers(i0, len(b) - 2))
                b[j] ^= 1 << int(rng.integers(0, 8))
            self.add("jpeg_scan_bitflips", RESULT, bytes(b), headers={"content_type": "image/jpeg"})
        # a big-but-allowed image (6000x6000 = 36 Mpx <= 40 Mpx): decoded, 108 MB transient, freed after
        big_ok = _enc(".png", np.zeros((6000, 6000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        self.add("large_in_limits_png", RESULT, big_ok)

        # --- headers
        for _ in range(60):
            self.add("missing_frame_id", "missing_header", png_s, drop=("frame_id",))
        for _ in range(40):
            self.add("missing_camera_id", "missing_header", png_s, drop=("camera_id",))
        for _ in range(40):
            self.add("missing_ts_ms", "missing_header", png_s, drop=("ts_ms",))
        for _ in range(30):
            self.add("no_headers", "missing_header", png_s, raw_headers=[], key=None)
        for _ in range(20):
            self.add("empty_frame_id", "missing_header", png_s, headers={"frame_id": b""})
        for _ in range(50):
            garbage = bytes(rng.integers(0x21, 0x7F, int(rng.integers(1, 30)), dtype=np.uint8)).replace(b"0", b"x")
            self.add("garbled_ts_ms", "bad_header", png_s, headers={"ts_ms": b"t" + garbage})
        for i in range(10):
            self.add("negative_ts_ms", "bad_header", png_s, headers={"ts_ms": f"-{i + 1}"})
        for i in range(40):
            bad = [b"has space", b"semi;colon", b"new\nline", b"tab\tid", b"quote\"id", b"x" * 200, b"star*", b"a?b"][i % 8]
            self.add("bad_id_chars", "bad_header", png_s, headers={("frame_id" if i % 2 else "camera_id"): bad})
        for i in range(20):  # 2 KB (kept in the DLQ record) and 20 KB (left out of it) header values
            self.add("oversized_header", "bad_header", png_s,
                     headers={"camera_id": b"c" * (2048 if i % 2 else 20_000)})
        for i in range(40):
            self.add("non_utf8_frame_id", "bad_header", png_s, headers={"frame_id": b"\xff\xfe" + bytes([0x80 + i % 64])})
        for _ in range(30):
            self.add("non_utf8_camera_id", "bad_header", png_s, headers={"camera_id": b"cam-\xc3\x28"})
        for _ in range(30):
            self.add("non_utf8_product", "bad_header", png_s, headers={"product": b"bot\xe2\x28\xa1tle"})
        for i in range(20):
            self.add("unsupported_schema", "unsupported_schema", png_s, headers={"schema": str(2 + i)})
        ctypes = [b"text/plain", b"application/json", b"image/gif", b"image/webp", b"application/octet-stream",
                  b"image/tiff", b"video/mp4", b"image/png; charset=binary", b"IMAGE/HEIC", b"x"]
        for i in range(60):
            self.add("wrong_content_type", "unsupported_content_type", png_s, headers={"content_type": ctypes[i % 10]})

        # --- payloads
        for _ in range(60):
            self.add("empty_payload", "empty_payload", b"")
        for _ in range(20):
            self.add("tombstone", "empty_payload", None)
        for _ in range(80):
            self.add("truncated_png", "undecodable_image", png_s[: int(rng.integers(1, len(png_s) - 12))])
        for _ in range(80):  # JPEG missing only its 2-byte EOI still holds every scan byte: cut deeper
            self.add("truncated_jpeg", "undecodable_image", jpg_s[: int(rng.integers(1, len(jpg_s) - 3))],
                     headers={"content_type": "image/jpeg"})
        for i in range(6):  # truncated real 900x900 bottle frames
            data = good_files[i].read_bytes()
            self.add("truncated_bottle_png", "undecodable_image", data[: int(rng.integers(len(data) // 4, len(data) - 100))])
        for i in range(40):
            b = bytearray(png_s)
            for _ in range(1 + i % 3):  # flips inside IDAT: CRC / zlib errors
                b[int(rng.integers(41, len(b) - 16))] ^= 1 << int(rng.integers(0, 8))
            self.add("corrupt_png", "undecodable_image", bytes(b))
        for i in range(40):
            b = bytearray(jpg_s)
            how = i % 4
            if how == 0:
                j = _seg(jpg_s, 0xC4)
                b[j + 4:j + 21] = b"\xff" * 17  # bogus Huffman table
            elif how == 1:
                j = _seg(jpg_s, 0xDB)
                b[j + 2:j + 4] = b"\x00\x01"  # bogus DQT length
            elif how == 2:
                j = _seg(jpg_s, 0xC0)
                b[j + 9] = 0  # zero components
            else:
                j = _seg(jpg_s, 0xDA)
                b[j:j + 2] = b"\x00\x00"  # no start of scan
            self.add("corrupt_jpeg_header", "undecodable_image", bytes(b), headers={"content_type": "image/jpeg"})
        non_images = [b"GIF89a" + bytes(64), b"II*\x00" + bytes(64), b"MM\x00*" + bytes(64),
                      b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(64), b"%PDF-1.7\n" + bytes(64),
                      b"<html><body>not an image</body></html>", b'{"frame": "json, not an image"}',
                      b"\x00" * 100, b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64)]
        for i in range(45):
            v = non_images[i % len(non_images)] if i < 36 else bytes(rng.integers(0, 256, 200, dtype=np.uint8)).replace(
                b"\x89P", b"xx").replace(b"\xff\xd8", b"xx").replace(b"BM", b"xx")
            if v[:2] in (b"\xff\xd8", b"BM"):
                v = b"z" + v
            self.add("not_an_image", "unsupported_format", v)

        # --- decompression bombs / huge declared dimensions: rejected from the header, never decoded
        for i in range(60):
            w, h = [(100_000, 100_000), (60_000, 60_000), (2**31 - 1, 2**31 - 1), (8193, 16), (7000, 7000)][i % 5]
            self.add("png_huge_dims", "too_large", _png_declaring(w, h, bit_depth=16 if i % 2 else 8))
        for i in range(40):
            w, h = [(65535, 65535), (65535, 100), (9000, 9000)][i % 3]
            self.add("jpeg_huge_dims", "too_large", _jpeg_declaring(jpg_s, w, h), headers={"content_type": "image/jpeg"})
        for i in range(20):
            self.add("bmp_huge_dims", "too_large", _bmp_declaring(100_000, -100_000 if i % 2 else 100_000),
                     headers={"content_type": "image/bmp"})
        bomb = _enc(".png", np.zeros((6000, 10_000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])  # 60 Mpx in ~60 KB
        assert len(bomb) < 200_000
        for _ in range(3):
            self.add("png_bomb_real", "too_large", bomb)
        for _ in range(4):
            self.add("zero_dims", "undecodable_image", _png_declaring(0, 64))

        # --- routing: nothing serves these (MoLE-Flow, when loaded, routes unknown products itself)
        for i in range(30):
            self.add("unknown_camera", self.unknown_expect, png_s, headers={"camera_id": f"cam-nowhere-{i}", "product": None},
                     key=f"cam-nowhere-{i}".encode())
        for i in range(30):
            self.add("unknown_product", self.unknown_expect, png_s, headers={"product": f"no-such-product-{i % 3}"})
        for _ in range(10):
            self.add("unknown_line", self.unknown_expect, png_s, headers={"line_id": "line-zz", "product": None})

        # shuffle so good frames sit among the bad ones (the stream must keep going around them)
        mine = self.records[first:]
        return [mine[i] for i in rng.permutation(len(mine))]
