import struct
import zlib

import cv2
import numpy as np
import pytest

from contracts.envelope import EnvelopeError
from contracts.image import decode_image, sniff_image
from contracts.spec import parse_spec, preprocess, to_tensor

SPEC = {"schema": 1, "model": "efficientad_bottle", "detector": "efficientad", "version": 1, "product": "bottle",
        "input": {"name": "image", "height": 32, "width": 48, "color": "RGB", "layout": "NCHW", "dtype": "FP32",
                  "scale": 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "outputs": {"anomaly_map": "anomaly_map", "score": "score"}, "threshold": 0.5, "map_threshold": 0.7}


def _enc(img, ext=".png", params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def test_parse_spec():
    s = parse_spec(SPEC)
    assert s.input.height == 32 and s.input.width == 48 and s.threshold == 0.5 and s.map_threshold == 0.7
    for bad, word in [({"input": {**SPEC["input"], "height": 0}}, "height"),
                      ({"input": {**SPEC["input"], "color": "CMYK"}}, "color"),
                      ({"input": {**SPEC["input"], "std": [0, 1, 1]}}, "std")]:
        with pytest.raises(ValueError, match=word):
            parse_spec({**SPEC, **bad})
    d = dict(SPEC)
    del d["detector"]
    with pytest.raises(ValueError, match="detector"):
        parse_spec(d)


def test_contract_values():
    """decode -> RGB -> resize -> /scale -> (x-mean)/std -> CHW."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, :] = (10, 20, 30)  # BGR
    x = preprocess(_enc(img), parse_spec(SPEC))
    assert x.shape == (3, 32, 48) and x.dtype == np.float32
    exp = (np.array([30, 20, 10]) / 255.0 - np.array(SPEC["input"]["mean"])) / np.array(SPEC["input"]["std"])
    np.testing.assert_allclose(x[:, 5, 5], exp, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gray", "alpha", "gray16", "rgb16", "jpeg", "bmp"])
def test_decode_variants(kind):
    rng = np.random.default_rng(0)
    if kind == "gray":
        data = _enc(rng.integers(0, 255, (40, 50), dtype=np.uint8))
    elif kind == "alpha":
        data = _enc(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8))
    elif kind == "gray16":
        data = _enc(np.full((40, 50), 65535, np.uint16))
    elif kind == "rgb16":
        data = _enc(np.full((40, 50, 3), 256 * 100, np.uint16))
    elif kind == "jpeg":
        data = _enc(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), ".jpg")
    else:
        data = _enc(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), ".bmp")
    img = decode_image(data)
    assert img.shape == (40, 50, 3) and img.dtype == np.uint8
    if kind == "gray16":
        assert img.max() == 255
    if kind == "rgb16":
        assert img.max() == 100
    assert to_tensor(img, parse_spec(SPEC)).shape == (3, 32, 48)


def test_sniff_sizes():
    img = np.zeros((37, 91, 3), np.uint8)
    assert sniff_image(_enc(img)) == ("png", 91, 37)
    assert sniff_image(_enc(img, ".jpg")) == ("jpeg", 91, 37)
    assert sniff_image(_enc(img, ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])) == ("jpeg", 91, 37)
    assert sniff_image(_enc(img, ".bmp")) == ("bmp", 91, 37)


def _png_bomb(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_rejects_huge_before_decoding():
    with pytest.raises(EnvelopeError) as ei:
        decode_image(_png_bomb(100_000, 100_000))
    assert ei.value.reason == "too_large" and "100000x100000" in ei.value.detail
    with pytest.raises(EnvelopeError) as ei:
        decode_image(_enc(np.zeros((100, 100, 3), np.uint8)), max_pixels=5000)
    assert ei.value.reason == "too_large"
    with pytest.raises(EnvelopeError) as ei:
        decode_image(b"x" * 100, max_bytes=10)
    assert ei.value.reason == "too_large"


@pytest.mark.parametrize("data,reason", [(b"hello world, not an image at all", "unsupported_format"),
                                         (b"\x89PNG", "undecodable_image"),
                                         (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "undecodable_image")])
def test_rejects_garbage(data, reason):
    with pytest.raises(EnvelopeError) as ei:
        decode_image(data)
    assert ei.value.reason == reason


def test_truncated_png():
    data = _enc(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(EnvelopeError) as ei:
        decode_image(data[: len(data) // 3])
    assert ei.value.reason == "undecodable_image"
