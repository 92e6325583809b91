"""Decode bombs under the cap (issue #15 item 4): the decoded-size estimate from the header, the
pixel cap derived from the model input, JPEG reduced decoding, the decode memory budget and the
cgroup limits it is derived from (files written in tmp_path; no real cgroup needed)."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest

from contracts.envelope import EnvelopeError
from contracts.image import decode_image, model_pixel_cap, plan_decode, read_header

MIB = 1024 * 1024


def _enc(img, ext=".png", params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _png_header_only(w, h, depth, ctype):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- header estimate


@pytest.mark.parametrize("img,ext,channels,bps", [
    (np.zeros((37, 91), np.uint8), ".png", 1, 1),
    (np.zeros((37, 91, 3), np.uint8), ".png", 3, 1),
    (np.zeros((37, 91, 4), np.uint8), ".png", 4, 1),
    (np.zeros((37, 91), np.uint16), ".png", 1, 2),
    (np.zeros((37, 91, 3), np.uint16), ".png", 3, 2),
    (np.zeros((37, 91, 4), np.uint16), ".png", 4, 2),
    (np.zeros((37, 91, 3), np.uint8), ".jpg", 3, 1),
    (np.zeros((37, 91), np.uint8), ".jpg", 1, 1),
    (np.zeros((37, 91, 3), np.uint8), ".bmp", 3, 1),
    (np.zeros((37, 91, 4), np.uint8), ".bmp", 4, 1),
])
def test_header_estimate_matches_full_depth_decode(img, ext, channels, bps):
    """raw_bytes = w*h*channels*bytes per sample = what a full-depth (IMREAD_UNCHANGED) decode allocates."""
    data = _enc(img, ext)
    h = read_header(data)
    assert (h.width, h.height, h.channels, h.bytes_per_sample) == (91, 37, channels, bps)
    assert h.raw_bytes == 91 * 37 * channels * bps
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    # OpenCV reads a 32-bit BMP without an alpha mask as BGR: the estimate is an upper bound there
    assert full.nbytes == h.raw_bytes if (ext, channels) != (".bmp", 4) else full.nbytes <= h.raw_bytes


def test_bomb_estimate_without_decoding():
    """40 MP 16-bit RGBA: ~305 MiB at full depth, read from the 33-byte IHDR alone."""
    h = read_header(_png_header_only(8000, 5000, 16, 6))
    assert h.raw_bytes == 8000 * 5000 * 4 * 2
    p = plan_decode(_png_header_only(6000, 6000, 16, 6))
    # the fix decodes straight to 8-bit BGR: the peak is the codec's 2x of the 8-bit output, not 16-bit RGBA x 2.5
    assert p.out_bytes == 6000 * 6000 * 3 and p.cost_bytes < h.raw_bytes


# ----------------------------------------------------------------------------- the derived pixel cap


def test_model_pixel_cap():
    assert model_pixel_cap(40_000_000, 576, 256, 256) == 576 * 256 * 256  # 37.7 M < 40 M
    assert model_pixel_cap(40_000_000, 576, 128, 128) == 576 * 128 * 128
    assert model_pixel_cap(10_000_000, 576, 256, 256) == 10_000_000  # the explicit setting bounds it
    assert model_pixel_cap(40_000_000, 0, 256, 256) == 40_000_000  # factor 0: explicit only
    data = _png_header_only(200, 200, 8, 2)
    with pytest.raises(EnvelopeError) as ei:
        plan_decode(data, max_pixels=model_pixel_cap(40_000_000, 2, 100, 100))
    assert ei.value.reason == "too_large"


# ----------------------------------------------------------------------------- 16-bit and alpha: same pixels


@pytest.mark.parametrize("shape,dtype", [((40, 50), np.uint16), ((40, 50, 3), np.uint16), ((40, 50, 4), np.uint16),
                                         ((40, 50, 4), np.uint8), ((40, 50), np.uint8)])
def test_direct_8bit_decode_equals_the_old_conversion(shape, dtype):
    """Decoding straight to 8-bit BGR gives exactly the old IMREAD_UNCHANGED -> >>8 -> drop alpha result."""
    rng = np.random.default_rng(3)
    src = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    full = cv2.imdecode(np.frombuffer(_enc(src), np.uint8), cv2.IMREAD_UNCHANGED)
    if full.dtype == np.uint16:
        full = (full >> 8).astype(np.uint8)
    if full.ndim == 2:
        full = cv2.cvtColor(full, cv2.COLOR_GRAY2BGR)
    elif full.shape[2] == 4:
        full = cv2.cvtColor(full, cv2.COLOR_BGRA2BGR)
    np.testing.assert_array_equal(decode_image(_enc(src)), full)


# ----------------------------------------------------------------------------- JPEG reduced decoding


@pytest.mark.parametrize("w,h,target,factor", [
    (2048, 2048, (256, 256), 8),  # 256x256 at 1/8: still the model's input size
    (2000, 2000, (256, 256), 4),  # 1/8 would be 250 < 256
    (600, 600, (256, 256), 2),
    (500, 500, (256, 256), 1),    # 1/2 = 250 < 256: full decode
    (4000, 1000, (256, 256), 2),  # the short side decides
    (2048, 2048, None, 1),        # no model input known: full decode
])
def test_jpeg_reduced_decoding(w, h, target, factor):
    data = _enc(np.full((h, w, 3), 90, np.uint8), ".jpg")
    p = plan_decode(data, target=target)
    assert p.reduce == factor
    img = decode_image(data, target=target)
    assert img.shape == (-(-h // factor), -(-w // factor), 3) and img.dtype == np.uint8
    if target:
        assert img.shape[0] >= target[1] and img.shape[1] >= target[0]
    assert p.out_bytes == img.nbytes


def test_png_is_never_reduced():
    """OpenCV's REDUCED flags on PNG decode full size and then resize: no memory saved, so never used."""
    data = _enc(np.zeros((2048, 2048, 3), np.uint8))
    assert plan_decode(data, target=(256, 256)).reduce == 1
    assert decode_image(data, target=(256, 256)).shape == (2048, 2048, 3)


def test_reduced_decode_can_be_off():
    data = _enc(np.full((2048, 2048, 3), 90, np.uint8), ".jpg")
    assert plan_decode(data, target=(256, 256), reduce=False).reduce == 1


# ----------------------------------------------------------------------------- the memory budget


def test_budget_never_admits_more_than_it_allows():
    from stream.worker.budget import MemoryBudget

    b = MemoryBudget(100)
    costs = [30, 60, 45, 10, 100, 25, 70, 5, 55, 40] * 3
    live, seen_max, lock = [0], [0], threading.Lock()

    def work(c):
        with b.hold(c):
            with lock:
                live[0] += c
                seen_max[0] = max(seen_max[0], live[0])
            time.sleep(0.002)
            with lock:
                live[0] -= c

    threads = [threading.Thread(target=work, args=(c,)) for c in costs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert seen_max[0] <= 100 and b.peak <= 100 and b.in_use == 0
    assert seen_max[0] > 60  # it did run decodes concurrently


def test_budget_rejects_what_can_never_fit_and_is_fifo():
    from stream.worker.budget import BudgetExceeded, MemoryBudget

    b = MemoryBudget(100)
    assert b.fits(100) and not b.fits(101)
    with pytest.raises(BudgetExceeded):
        with b.hold(101):
            pass
    assert b.in_use == 0
    # a big waiter is not starved by small ones arriving after it
    order = []
    first = b.hold(60)
    first.__enter__()

    def take(name, c):
        with b.hold(c):
            order.append(name)

    big = threading.Thread(target=take, args=("big", 90))
    big.start()
    time.sleep(0.05)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but queues behind "big"
    small.start()
    time.sleep(0.05)
    assert order == []
    first.__exit__(None, None, None)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]


# ----------------------------------------------------------------------------- cgroup limits


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_v2(tmp_path):
    from stream.worker.budget import cgroup_cpu_limit, cgroup_memory_limit

    root, proc = tmp_path / "cg", tmp_path / "self-cgroup"
    _write(root, "cgroup.controllers", "cpu memory\n")
    proc.write_text("0::/kubepods/pod1/c1\n")
    _write(root, "kubepods/pod1/c1/memory.max", "max\n")
    _write(root, "kubepods/pod1/memory.max", str(2 * 1024 * MIB) + "\n")  # the pod's limit, one level up
    _write(root, "kubepods/pod1/c1/cpu.max", "150000 100000\n")
    assert cgroup_memory_limit(root, proc) == 2 * 1024 * MIB
    assert cgroup_cpu_limit(root, proc) == 1.5
    _write(root, "kubepods/pod1/c1/cpu.max", "max 100000\n")
    _write(root, "kubepods/pod1/memory.max", "max\n")
    assert cgroup_cpu_limit(root, proc) is None and cgroup_memory_limit(root, proc) is None
    # a namespaced container sees its own cgroup as the root
    proc.write_text("0::/\n")
    _write(root, "memory.max", "536870912\n")
    _write(root, "cpu.max", "50000 100000\n")
    assert cgroup_memory_limit(root, proc) == 512 * MIB and cgroup_cpu_limit(root, proc) == 0.5


def test_cgroup_v1(tmp_path):
    from stream.worker.budget import cgroup_cpu_limit, cgroup_memory_limit

    root, proc = tmp_path / "cg", tmp_path / "self-cgroup"
    proc.write_text("4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    _write(root, "memory/docker/abc/memory.limit_in_bytes", str(1024 * MIB))
    _write(root, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(root, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_memory_limit(root, proc) == 1024 * MIB and cgroup_cpu_limit(root, proc) == 2.0
    _write(root, "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")  # unlimited
    _write(root, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_memory_limit(root, proc) is None and cgroup_cpu_limit(root, proc) is None
    assert cgroup_memory_limit(tmp_path / "nothing", tmp_path / "none") is None  # no cgroup at all


def test_derived_threads_and_budget():
    from stream.worker.budget import DEFAULT_DECODE_BUDGET_MB, decode_budget_bytes, decode_threads

    assert decode_threads(0, cpu_limit=1.5, cpus=16) == 1  # the pod's quota, not the node's 16 CPUs
    assert decode_threads(0, cpu_limit=None, cpus=16) == 4
    assert decode_threads(0, cpu_limit=0.25, cpus=16) == 1
    assert decode_threads(3, cpu_limit=1.0, cpus=16) == 3  # explicit setting wins
    assert decode_budget_bytes(0, mem_limit=2048 * MIB) == 512 * MIB  # a quarter of the pod's memory
    assert decode_budget_bytes(0, mem_limit=None) == DEFAULT_DECODE_BUDGET_MB * MIB
    assert decode_budget_bytes(300, mem_limit=2048 * MIB) == 300 * MIB


def test_worker_config_uses_the_cgroup(monkeypatch):
    from contracts.config import Settings
    from stream.worker import budget
    from stream.worker.config import WorkerConfig

    monkeypatch.setattr(budget, "cgroup_cpu_limit", lambda *a, **k: 1.0)
    monkeypatch.setattr(budget, "cgroup_memory_limit", lambda *a, **k: 1024 * MIB)
    cfg = WorkerConfig.from_settings(Settings())
    assert cfg.decode_threads == 1 and cfg.decode_budget_bytes == 256 * MIB
    cfg = WorkerConfig.from_settings(Settings(worker_decode_threads=2, worker_decode_budget_mb=100))
    assert cfg.decode_threads == 2 and cfg.decode_budget_bytes == 100 * MIB
