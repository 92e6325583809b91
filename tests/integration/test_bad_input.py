"""Bad-input corpus through the real worker: real Tansu broker + real tritonserver + a real exported
detector (the session ``detector`` fixture of tests/integration/conftest.py) + the Faust worker as a subprocess.

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
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from aiokafka.errors import MessageSizeTooLargeError

from contracts.envelope import decode_result, dlq_reason, headers_to_dict
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.bad_frames import MB, RESULT, Corpus
from tests.harness.line import STEP_CAP_S
from tests.harness.settle import SETTLE_CAP_S
from tests.harness.streams import topics

pytestmark = pytest.mark.integration

# measured on 2 cores: warm 181 MB, pass 1 +72..126 MB (50 MB frame buffers, the 108 MB in-limit
# decode, glibc arenas), pass 2 +2 MB, peak 396..444 MB; pass 2 must reuse that memory, not add to it
RSS_GROWTH_MAX_MB = 300
RSS_PASS2_MAX_MB = 100
RSS_PEAK_MAX_MB = 1024
STALL_S = 120.0  # no new result or DLQ record for this long: the worker is stuck, not slow


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


# ----------------------------------------------------------------------------- image builders


def _moleflow_serving(grpc_url: str) -> bool:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(grpc_url)
    try:
        return c.is_model_ready("moleflow")
    except Exception:  # not in the repository
        return False
    finally:
        c.close()


def test_bad_input_corpus(stack, detector, bottle_test, tmp_path):
    """Two passes of the corpus (new ids, same kinds) through one worker: pass 1 reaches the
    memory high-water mark, pass 2 must not add to it (bounded, not leaking)."""
    t0 = time.monotonic()
    boot = stack.kafka_bootstrap
    t = topics(f"bad-{uuid.uuid4().hex[:6]}")
    asyncio.run(ensure_topics(boot, t.values(), partitions=1))
    corpus = Corpus(_moleflow_serving(stack.triton_grpc_url), bottle_test)
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
        asyncio.run(read_topics(boot, [t["results"]], timeout_s=STEP_CAP_S, on_record=on_record,
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
            # until every frame is accounted for; a pass ends early only when the worker stops producing
            # (no new record for STALL_S), so a slower machine gets the time it needs
            asyncio.run(read_topics(boot, [t["results"], t["dlq"]], timeout_s=SETTLE_CAP_S, idle_s=STALL_S,
                                    on_record=on_record, until=lambda o, ids=ids: ids <= set(seen)))
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
