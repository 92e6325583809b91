"""Bad-input corpus through the real worker: real Tansu broker + real tritonserver + a real exported
detector (the same ``detector`` fixture as test_stream_pipeline.py) + the Faust worker as a subprocess.

Over 1,000 malformed frames are generated in-test (nothing is committed): missing / garbled /
oversized / non-UTF-8 headers, unsupported schema and content types, empty payloads and
tombstones, truncated and corrupt PNG / JPEG, non-images, decompression bombs and headers that
declare huge dimensions (PNG 100000x100000, JPEG 65535x65535, BMP), a real 10000x6000 PNG bomb,
a 50 MB payload, unknown camera / line / product. Mixed in: real MVTec bottle frames and images
that must be *converted*, not rejected (8/16-bit grayscale, 16-bit RGB, alpha, grayscale JPEG,
BMP, content_type that disagrees with the bytes, JPEG with damaged scan data).

Asserted: every frame ends in ``inspection-results`` or ``frames-dlq``; each malformed kind with
its specific DLQ reason and the original bytes; the worker stays alive; its RSS stays bounded.

50 MB frames: a producer with aiokafka's default ``max_request_size`` (1 MB) refuses them at send
time (MessageSizeTooLargeError: the clear, early error a camera client gets). A producer configured
to allow them reaches Tansu (which, unlike Apache Kafka's default ``message.max.bytes``, accepts
it); the worker then DLQs it as ``too_large`` *before decoding*, and since the DLQ record must
itself be publishable, it carries an empty value plus ``error_original_bytes`` and
``error_original_sha256`` instead of the 50 MB.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
import urllib.request
import uuid
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiokafka.errors import MessageSizeTooLargeError
from test_stream_pipeline import BOTTLE_TEST, _topics, detector, stack  # noqa: F401 - shared fixtures

from contracts.envelope import decode_result, dlq_reason, headers_to_dict
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics

pytestmark = pytest.mark.integration

RESULT = "RESULT"  # expected outcome: a scored result (not the DLQ)
MB = 1024 * 1024
# measured on 2 cores: warm 181 MB, pass 1 +72..126 MB (50 MB frame buffers, the 108 MB in-limit
# decode, glibc arenas), pass 2 +2 MB, peak 396..444 MB; pass 2 must reuse that memory, not add to it
RSS_GROWTH_MAX_MB = 300
RSS_PASS2_MAX_MB = 100
RSS_PEAK_MAX_MB = 1024


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


# ----------------------------------------------------------------------------- image builders


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

    def __init__(self, moleflow_serving: bool):
        self.rng = np.random.default_rng(20240601)
        self.records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.expect: dict[str, str | frozenset] = {}
        self.kind_of: dict[str, str] = {}
        self.value_of: dict[str, bytes | None] = {}
        self.unknown_expect = RESULT if moleflow_serving else "unknown_product"
        self.ts = int(time.time() * 1000)

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
        good_files = sorted(BOTTLE_TEST.glob("good/*.png"))[:6] + sorted(BOTTLE_TEST.glob("broken_large/*.png"))[:3] \
            + sorted(BOTTLE_TEST.glob("contamination/*.png"))[:3]
        assert len(good_files) == 12, f"MVTec bottle test images missing under {BOTTLE_TEST}"
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


def _moleflow_serving(grpc_url: str) -> bool:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        return c.is_model_ready("moleflow")
    except Exception:  # not in the repository
        return False
    finally:
        c.close()


def test_bad_input_corpus(stack, detector, tmp_path):  # noqa: F811 - fixtures imported above
    """Two passes of the corpus (new ids, same kinds) through one worker: pass 1 reaches the
    memory high-water mark, pass 2 must not add to it (bounded, not leaking)."""
    t0 = time.monotonic()
    boot = stack.kafka_bootstrap
    t = _topics(f"bad-{uuid.uuid4().hex[:6]}")
    asyncio.run(ensure_topics(boot, t.values(), partitions=1))
    corpus = Corpus(_moleflow_serving(stack.triton_grpc_url))
    passes = [corpus.build(), corpus.build()]
    n_malformed = sum(1 for e in corpus.expect.values() if e != RESULT) // 2
    assert n_malformed >= 1000, n_malformed

    # 50 MB: a default producer (max_request_size 1 MB) refuses it at send time with a clear error
    big = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(7).integers(0, 256, 50 * MB - 8, dtype=np.uint8).tobytes()

    async def refused():
        async with Producer(boot) as p:
            with pytest.raises(MessageSizeTooLargeError, match="max_request_size"):
                await p.send_many(t["frames"], [(b"cam-bad", big, [("frame_id", b"big-refused")])])

    asyncio.run(refused())
    big_passes = []
    for _ in passes:
        corpus.add("payload_50mb", "too_large", big)
        big_passes.append([corpus.records[-1]])

    w = WorkerProcess(boot, stack.triton_grpc_url, tmp_path, app_id=f"lw-bad-{uuid.uuid4().hex[:6]}",
                      batch_max=16, batch_within=0.05, log_path=tmp_path / "worker.log",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()

    def tid_of(rec) -> str:
        return headers_to_dict(rec[2])["test_id"].decode()

    seen: dict[str, list] = defaultdict(list)

    def on_record(r):
        if r.topic == t["results"]:
            seen[decode_result(r.value).frame_id].append(("result", r))
        elif r.topic == t["dlq"]:
            seen[headers_to_dict(r.headers).get("test_id", b"").decode()].append(("dlq", r))

    async def send(records, **kw):
        async with Producer(boot, **kw) as p:
            await p.send_many(t["frames"], records)

    rss, stream_s = [], []
    try:
        # warm up (group join, Triton specs, first inference), then take the RSS baseline
        warm = next(r for r in passes[0] if corpus.kind_of[tid_of(r)] == "good_bottle")
        passes[0].remove(warm)
        asyncio.run(send([warm]))
        asyncio.run(read_topics(boot, [t["results"]], timeout_s=120, on_record=on_record,
                                until=lambda o: tid_of(warm) in seen))
        assert tid_of(warm) in seen, f"warm-up frame got no result; worker log: {w.log_path.read_text()[-3000:]}"
        pid = w.proc.pid
        rss.append(_rss_kb(pid))
        for recs, bigs in zip(passes, big_passes, strict=True):
            ids = {tid_of(r) for r in recs + bigs}
            t_send = time.monotonic()
            asyncio.run(send(recs))
            # a producer configured for it gets 50 MB onto Tansu (no message.max.bytes there)
            asyncio.run(send(bigs, max_request_size=64 * MB))
            seen.clear()
            asyncio.run(read_topics(boot, [t["results"], t["dlq"]], timeout_s=150, on_record=on_record,
                                    until=lambda o, ids=ids: ids <= set(seen)))
            stream_s.append(round(time.monotonic() - t_send, 1))
            if not w.alive() or not ids <= set(seen):
                break
            rss.append(_rss_kb(pid))
        alive = w.alive()
        hwm = _rss_kb(pid, "VmHWM") if alive else -1
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/metrics", timeout=5).read().decode() if alive else ""
    finally:
        w.stop()
    log_tail = w.log_path.read_text(errors="replace")[-3000:]

    assert alive, f"worker died on the bad-input corpus; log: {log_tail}"
    missing = ids - set(seen)
    assert not missing, (f"{len(missing)} frames in neither results nor DLQ, e.g. "
                         f"{sorted(Counter(corpus.kind_of[i] for i in missing).items())}; log: {log_tail}")
    assert len(rss) == 3
    # `seen` was reset per pass and the topic re-read from offset 0: it now holds every frame of both passes
    assert set(corpus.expect) <= set(seen)
    ids = set(corpus.expect)

    by_kind: dict[str, Counter] = defaultdict(Counter)
    wrong = []
    for tid, outs in seen.items():
        if tid not in corpus.expect:
            continue
        exp, kind = corpus.expect[tid], corpus.kind_of[tid]
        kinds = {o for o, _ in outs}
        assert len(kinds) == 1, f"{tid}: both a result and a DLQ record"
        o, rec = outs[0]
        if o == "result":
            res = decode_result(rec.value)
            by_kind[kind]["result"] += 1
            if exp != RESULT:
                wrong.append((kind, tid, "result", exp))
                continue
            assert np.isfinite(res.score) and res.latency_ms.get("infer", 0) > 0, res
            assert res.model == detector or corpus.unknown_expect == RESULT
            continue
        reason, detail = dlq_reason(rec.headers)
        by_kind[kind][reason] += 1
        if reason != exp:
            wrong.append((kind, tid, reason, exp, detail))
            continue
        assert detail, f"{tid}: DLQ record without error_detail"
        h = headers_to_dict(rec.headers)
        if kind == "payload_50mb":  # too big to republish: size + sha256 instead of the bytes
            assert rec.value in (b"", None)
            assert int(h["error_original_bytes"]) == len(big)
            assert h["error_original_sha256"].decode() == hashlib.sha256(big).hexdigest()
        else:
            assert (rec.value or b"") == (corpus.value_of[tid] or b""), f"{tid}: DLQ value is not the original bytes"
        if kind == "oversized_header" and "20000" in detail:
            assert h.get("error_dropped_headers") == b"1" and "camera_id" not in h
    assert not wrong, f"{len(wrong)} frames with the wrong outcome, e.g. {wrong[:5]}"

    # the reasons the worker counted agree with what we saw
    dlq_counts = Counter(r for c in by_kind.values() for r, n in c.items() for _ in range(n) if r != "result")
    for reason, n in dlq_counts.items():
        line = next((ln for ln in metrics.splitlines() if ln.startswith(f'linewatch_dlq_total{{reason="{reason}"}}')), None)
        assert line is not None and float(line.split()[-1]) >= n, (reason, n, line)

    mb = [round(x / 1024, 1) for x in rss]
    summary = {"frames": len(ids), "malformed_per_pass": n_malformed,
               "results": sum(c["result"] for c in by_kind.values()), "dlq": dict(dlq_counts),
               "rss_mb_warm_pass1_pass2": mb, "rss_peak_mb": round(hwm / 1024, 1), "stream_s_per_pass": stream_s,
               "test_s": round(time.monotonic() - t0, 1)}
    print("bad-input corpus:", summary)
    print("per kind:", {k: dict(v) for k, v in sorted(by_kind.items())})
    assert mb[2] - mb[0] < RSS_GROWTH_MAX_MB, f"worker RSS grew {mb[2] - mb[0]:.0f} MB over the corpus: {summary}"
    assert mb[2] - mb[1] < RSS_PASS2_MAX_MB, f"worker RSS kept growing on the second pass: {summary}"
    assert hwm / 1024 < RSS_PEAK_MAX_MB, summary
