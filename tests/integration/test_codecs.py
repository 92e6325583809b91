"""Every Kafka compression codec, produced by a non-Python client, through the real worker.

A camera line's producer is usually librdkafka (C), not aiokafka; ``compression.type`` is its choice,
not ours. Real Tansu broker + real tritonserver + the session ``detector`` (tests/integration/conftest.py)
+ one Faust worker subprocess. Real MVTec bottle frames (encode_frame headers) are produced with
``confluent_kafka.Producer`` (librdkafka) once per ``compression.type``: none, gzip, snappy, lz4, zstd,
three frames per record batch, all onto one partition. The frames are the bottle images as BMP
(``image/bmp``, what many line cameras emit): librdkafka silently sends a batch *uncompressed* when
the codec does not shrink it, and the PNG files are already deflated (measured: zstd over
bottle/test/good/012..014.png went out uncompressed), so PNG frames would not exercise the codecs.

Asserted:
- Tansu stores each batch with the codec it was produced with (raw Fetch, batch attributes read with
  aiokafka's record parser: no decompression involved), so the consumers really get compressed batches;
- every frame gets a result (``linewatch account`` in-process: 0 missing, complete) and the worker
  stays alive (before the codec libraries were installed it crashed on the first lz4 / snappy / zstd
  batch with ``UnsupportedCodecError`` and would have crashed again on restart);
- ``linewatch tail`` reads real result records republished by librdkafka under every codec.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import cv2
import pytest

from contracts.envelope import Frame, decode_result, encode_frame
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import ensure_topics, read_topics
from stream.ops.cli import main as linewatch
from tests.harness.requires import require_module
from tests.harness.settle import SETTLE_CAP_S
from tests.harness.streams import topics

confluent_kafka = require_module("confluent_kafka", "confluent-kafka is not installed (the [dev] extra: make venv)")

pytestmark = pytest.mark.integration

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
CODEC_ID = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}  # record batch attributes & 0x07
PER_CODEC = 3


def _produce(bootstrap: str, topic: str, codec: str, records: list[tuple[bytes, bytes, list]]) -> None:
    """librdkafka producer, the way a camera client would configure it; every delivery must succeed."""
    p = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 50,
                                  "acks": "all", "message.max.bytes": 32 << 20, "batch.size": 16 << 20})
    errors: list[str] = []

    def delivered(err, _msg):
        if err is not None:
            errors.append(str(err))

    for k, v, h in records:
        p.produce(topic, key=k, value=v, headers=h, on_delivery=delivered)
    left = p.flush(30)
    assert left == 0 and not errors, f"librdkafka {codec}: {left} undelivered, errors {errors[:3]}"


async def _stored_codecs(bootstrap: str, topic: str) -> list[int]:
    """Compression type of every record batch Tansu holds for partition 0, read with a raw Fetch."""
    from aiokafka import TopicPartition
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.record.default_records import DefaultRecordBatch

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(TopicPartition(topic, 0))
        kinds: list[int] = []
        offset = 0
        for _ in range(100):
            req = FetchRequest(100, 1, 64 * 1024 * 1024, 0, [(topic, [(0, offset, 64 * 1024 * 1024)])])
            resp = await client.send(leader, req)
            (_, parts), = resp.topics
            (_, err, _hw, *data), = parts
            assert err == 0, f"fetch error {err}"
            buf = bytes(data[-1] or b"")
            if not buf:
                break
            # walk the batches without decoding their records: [base_offset:8][length:4][...]
            pos, advanced = 0, False
            while pos + 12 <= len(buf):
                length = int.from_bytes(buf[pos + 8:pos + 12], "big")
                end = pos + 12 + length
                if end > len(buf):
                    break
                batch = DefaultRecordBatch(buf[pos:end])
                kinds.append(batch.compression_type)
                offset = batch.next_offset
                pos, advanced = end, True
            if not advanced:
                break
        return kinds
    finally:
        await client.close()


def test_every_compression_codec_from_librdkafka(stack, detector, bottle_test, tmp_path, capsys, reliability):
    boot = stack.kafka_bootstrap
    t = topics(f"codec-{uuid.uuid4().hex[:6]}")
    mirror = f"{t['results']}-mirror"
    asyncio.run(ensure_topics(boot, [*t.values(), mirror], partitions=1))
    images = sorted((bottle_test / "good").glob("*.png"))[:PER_CODEC * len(CODECS)]
    assert len(images) == PER_CODEC * len(CODECS)

    by_codec: dict[str, list[str]] = {}
    batches = {}
    for i, codec in enumerate(CODECS):
        recs = []
        for path in images[i * PER_CODEC:(i + 1) * PER_CODEC]:
            fid = f"{codec}-{uuid.uuid4().hex[:8]}"
            ok, bmp = cv2.imencode(".bmp", cv2.imread(str(path)))
            assert ok
            f = Frame(frame_id=fid, camera_id=f"cam-{codec}", ts_ms=int(time.time() * 1000),
                      image=bmp.tobytes(), product="bottle", content_type="image/bmp",
                      extra={"gt_label": "good", "source": path.name})
            recs.append(encode_frame(f))
            by_codec.setdefault(codec, []).append(fid)
        batches[codec] = recs

    w = WorkerProcess(boot, stack.triton_grpc_url, tmp_path, app_id=f"lw-codec-{uuid.uuid4().hex[:6]}",
                      batch_max=8, batch_within=0.05, log_path=tmp_path / "worker.log",
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()
    t0 = time.monotonic()
    try:
        for codec in CODECS:
            _produce(boot, t["frames"], codec, batches[codec])
        stored = asyncio.run(_stored_codecs(boot, t["frames"]))
        want = set(sum(by_codec.values(), []))
        got: dict[str, object] = {}

        def on_record(r):
            res = decode_result(r.value)
            got[res.frame_id] = r

        asyncio.run(read_topics(boot, [t["results"]], timeout_s=SETTLE_CAP_S, on_record=on_record,
                                until=lambda o: want <= set(got) or not w.alive()))
        alive = w.alive()
        stream_s = round(time.monotonic() - t0, 1)
    finally:
        w.stop()
    log_tail = w.log_path.read_text(errors="replace")[-3000:]

    # Tansu keeps the producer's codec (it does not recompress): every codec reaches the consumers
    assert sorted(set(stored)) == sorted(CODEC_ID.values()), f"batch codecs stored by Tansu: {stored}"

    missing = {c: [f for f in ids if f not in got] for c, ids in by_codec.items()}
    missing = {c: m for c, m in missing.items() if m}
    for c, ids in by_codec.items():
        reliability.record_counts(f"librdkafka_{c}", frames_sent=len(ids), lost=len(missing.get(c, [])),
                                  complete=True, batch_codec_stored=c in {k for k, v in CODEC_ID.items() if v in stored},
                                  worker_alive=alive)
    assert alive, f"worker died (frames without a result per codec: {missing}); log: {log_tail}"
    assert not missing, f"frames without a result per codec: {missing}; log: {log_tail}"

    # `linewatch account` reads the compressed frames topic: all accounted, nothing missing
    capsys.readouterr()
    rc = linewatch(["account", "--bootstrap", boot, "--frames-topic", t["frames"], "--results-topic", t["results"],
                    "--dlq-topic", t["dlq"], "--json"])
    out = capsys.readouterr()
    rep = json.loads(out.out)
    assert rc == 0 and rep["ok"] and rep["complete"], (rc, out.err[-2000:], rep)
    assert rep["produced"] == len(want) and rep["accounted"] == len(want) and rep["missing"] == []
    assert rep["dlq"] == 0, rep["dlq_reasons"]

    # `linewatch tail` reads real result records republished under every codec
    for codec in CODECS:
        _produce(boot, mirror, codec, [(got[f].key, got[f].value, []) for f in by_codec[codec]])
    mirror_stored = asyncio.run(_stored_codecs(boot, mirror))
    assert sorted(set(mirror_stored)) == sorted(CODEC_ID.values()), f"result batch codecs: {mirror_stored}"
    tail = subprocess.run([sys.executable, "-m", "stream.ops.cli", "tail", "--bootstrap", boot, "--topic", mirror,
                           "--no-dlq", "--from-beginning", "--limit", str(len(want)), "--timeout", "60", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert tail.returncode == 0, tail.stderr[-2000:]
    lines = [json.loads(ln) for ln in tail.stdout.splitlines() if ln.strip()]
    assert {d["value"]["frame_id"] for d in lines} == want, f"tail read {len(lines)} of {len(want)}"
    with capsys.disabled():
        print(f"\ncodecs: frame batch codecs stored {stored}; results {len(got)}/{len(want)} {stream_s} s after "
              f"worker start; account missing {len(rep['missing'])}; result batch codecs {mirror_stored}, "
              f"tail read {len(lines)}/{len(want)}")
