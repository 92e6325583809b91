"""Decode bombs *under* the cap (issue #15 item 4) through the real worker: real Tansu broker + real
tritonserver + the session ``detector`` + the Faust worker as a subprocess.

One micro-batch holds four 16-bit RGBA PNGs just under the pixel cap (the explicit
``max_image_pixels`` bounded by ``max_image_pixels_per_input`` x the model's input H x W), one just
over it, and four real MVTec bottle frames. The bombs are built row by row with zlib (a repeated
pixel): ~110 MP of 16-bit RGBA in a few hundred KB each, so the payload stays small while a
full-depth decode needs ~280 MiB per frame (x2.5 with the old >>8 / astype / BGRA2BGR temporaries).

With a tight decode memory budget (``worker_decode_budget_mb``) the worker's peak RSS (VmHWM) stays
within its warm RSS + the budget + a fixed allowance, every frame is accounted for
(stream.ops.accounting.account: 0 lost), the under-cap frames all get results, the over-cap one is
DLQ'd ``too_large``, and the worker stays alive.

Measured on 2 cores (the commit that added this test): before the fix the batch peaked at warm +
~1.3 GiB (two decode threads, each holding a 16-bit RGBA frame and its 16-bit and 8-bit copies);
with it, warm + ~230 MiB (one bomb at a time, the good frames alongside).
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
import zlib
from pathlib import Path

import pytest

from contracts.config import Settings
from contracts.image import model_pixel_cap
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.line import STEP_CAP_S
from tests.harness.settle import settle
from tests.harness.streams import topics

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BUDGET_MB = 256  # one bomb at a time (each needs ~222 MiB: OpenCV's PNG decoder holds 2x the 8-bit output)
PEAK_ALLOWANCE_MB = 160  # beyond warm RSS + the budget: payload copies, glibc arenas, Faust buffers
N_BOMBS = 4
MODEL_INPUT = (256, 256)  # the session detector (EfficientAD) input, checked against its spec below


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png16_rgba(w: int, h: int, pixel: tuple[int, int, int, int] = (0x3456, 0x789A, 0xBCDE, 0xFFFF)) -> bytes:
    """A valid 16-bit RGBA PNG of one repeated pixel, compressed row by row (never w*h*8 bytes in memory)."""
    z = zlib.compressobj(9)
    row = b"\0" + struct.pack(">4H", *pixel) * w
    idat = b"".join([z.compress(row) for _ in range(h)] + [z.flush()])
    step = 1 << 20  # OpenCV 4.11 warns about (and may refuse) very large chunks: split the IDAT
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
            + b"".join(_chunk(b"IDAT", idat[i:i + step]) for i in range(0, len(idat), step)) + _chunk(b"IEND", b""))


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _spec_input(grpc_url: str, model: str) -> tuple[int, int]:
    from stream.inference.triton_client import TritonInfer

    async def get():
        t = TritonInfer(grpc_url)
        try:
            spec = (await t.specs(max_age_s=0))[model]
            return spec.input.width, spec.input.height
        finally:
            await t.close()

    return asyncio.run(get())


def test_bombs_under_the_cap_stay_in_budget(stack, detector, bottle_test, tmp_path, reliability):
    t0 = time.monotonic()
    boot = stack.kafka_bootstrap
    assert _spec_input(stack.triton_grpc_url, detector) == MODEL_INPUT
    s = Settings()
    cap = model_pixel_cap(s.max_image_pixels, s.max_image_pixels_per_input, *MODEL_INPUT)
    under = math.isqrt(cap) - 16  # a square just under the cap
    over = math.isqrt(cap) + 64  # just over the derived cap, still under the explicit max_image_pixels
    assert under * under < cap < over * over <= s.max_image_pixels and over <= s.max_image_side
    bomb, over_bomb = png16_rgba(under, under), png16_rgba(over, over)
    assert len(bomb) < 1 * MIB and len(over_bomb) < 1 * MIB  # compressible: the payload stays small

    t = topics(f"bomb-{uuid.uuid4().hex[:6]}")
    asyncio.run(ensure_topics(boot, t.values(), partitions=1))
    ts = str(int(time.time() * 1000)).encode()

    def rec(fid: str, value: bytes):
        return (b"cam-bomb", value, [("frame_id", fid.encode()), ("camera_id", b"cam-bomb"), ("line_id", b"line-1"),
                                     ("ts_ms", ts), ("product", b"bottle"), ("content_type", b"image/png")])

    good = [p.read_bytes() for p in sorted(bottle_test.glob("good/*.png"))[:5]]
    warm, batch = rec("warm", good[0]), []
    for i in range(N_BOMBS):  # interleaved so every decode thread gets a bomb
        batch += [rec(f"bomb-{i}", bomb), rec(f"good-{i}", good[1 + i])]
    batch.append(rec("over-cap", over_bomb))

    w = WorkerProcess(boot, stack.triton_grpc_url, tmp_path, app_id=f"lw-bomb-{uuid.uuid4().hex[:6]}",
                      batch_max=len(batch), batch_within=3.0, log_path=tmp_path / "worker.log",
                      env={"LINEWATCH_WORKER_DECODE_BUDGET_MB": str(BUDGET_MB)},
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()

    async def send(records):
        async with Producer(boot) as p:
            await p.send_many(t["frames"], records)

    try:
        asyncio.run(send([warm]))
        seen: set[bytes] = set()
        asyncio.run(read_topics(boot, [t["results"]], timeout_s=STEP_CAP_S, on_record=lambda r: seen.add(r.value),
                                until=lambda o: bool(seen)))
        assert seen, f"warm-up frame got no result; worker log: {w.log_path.read_text()[-3000:]}"
        pid = w.proc.pid
        warm_kb = _status_kb(pid, "VmHWM")
        asyncio.run(send(batch))
        rep = settle(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"], stall_s=240,
                     poll_s=2.0)
        alive = w.alive()
        hwm_kb = _status_kb(pid, "VmHWM") if alive else -1
    finally:
        w.stop()
    log_tail = w.log_path.read_text(errors="replace")[-3000:]

    summary = {"cap_pixels": cap, "bomb": f"{under}x{under} 16-bit RGBA", "bomb_payload_kb": len(bomb) // 1024,
               "full_depth_decode_mib": under * under * 8 // MIB, "budget_mb": BUDGET_MB,
               "rss_warm_peak_mb": round(warm_kb / 1024, 1), "rss_peak_mb": round(hwm_kb / 1024, 1),
               "peak_over_warm_mb": round((hwm_kb - warm_kb) / 1024, 1), "produced": rep.produced,
               "results": rep.results, "dlq": rep.dlq_reasons, "missing": len(rep.missing),
               "test_s": round(time.monotonic() - t0, 1)}
    print("decode budget:", summary)
    reliability.record("decode_bombs_under_cap", rep, expect_dlq={"too_large": 1}, worker_alive=alive,
                       peak_over_warm_mb=summary["peak_over_warm_mb"], budget_mb=BUDGET_MB)
    assert alive, f"worker died on the batch: {summary}; log: {log_tail}"
    assert rep.ok and rep.missing == [] and rep.produced == len(batch) + 1, (summary, log_tail)
    assert rep.dlq_reasons == {"too_large": 1}, (summary, log_tail)  # the over-cap frame only
    assert rep.results - rep.duplicate_results == len(batch), summary  # every under-cap frame scored
    bound_mb = warm_kb / 1024 + BUDGET_MB + PEAK_ALLOWANCE_MB
    assert hwm_kb / 1024 < bound_mb, f"peak RSS {hwm_kb / 1024:.0f} MB over the {bound_mb:.0f} MB bound: {summary}"
