"""Issue #26 item 5: a 4K camera on the real Tansu broker. ``linewatch camera`` (a process) reads a 3840x2160
video (tiled MVTec bottle images, upscaled, with sensor-like noise: ~2 MB a JPEG at quality 90) and must
keep publishing, every frame on the topic, never exiting 1 on ``MessageSizeTooLargeError``:

- a topic with no ``max.message.bytes`` (as the dev stack creates them): the producer is sized from
  ``max_frame_bytes``; every frame goes at full size and quality;
- a topic with Kafka's default 1 MiB ``max.message.bytes``: each frame is re-encoded (lower JPEG quality,
  then downscaled) to fit, counted, and every record on the topic fits the topic's limit.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts.envelope import decode_frame
from stream.kafka.clients import read_topics
from tests.harness.line import STEP_CAP_S

pytestmark = pytest.mark.integration

LINEWATCH = str(Path(sys.executable).with_name("linewatch"))
W, H, FRAMES = 3840, 2160, 4
KAFKA_DEFAULT_MAX = 1048588  # Apache Kafka's default max.message.bytes


def _video(shared_data: Path, path: Path) -> Path:
    imgs = [cv2.imread(str(p)) for p in sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:8]]
    rng = np.random.default_rng(0)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (W, H))
    assert w.isOpened()
    w.set(cv2.VIDEOWRITER_PROP_QUALITY, 100)
    for i in range(FRAMES):
        tiles = [cv2.resize(imgs[(i + j) % len(imgs)], (W // 4, H // 2), interpolation=cv2.INTER_CUBIC)
                 for j in range(8)]
        f = np.vstack([np.hstack(tiles[:4]), np.hstack(tiles[4:])]).astype(np.int16)
        f += rng.normal(0, 30, f.shape).astype(np.int16)
        w.write(np.clip(f, 0, 255).astype(np.uint8))
    w.release()
    cap = cv2.VideoCapture(str(path))
    ok, first = cap.read()
    cap.release()
    assert ok and first.shape == (H, W, 3)
    big = cv2.imencode(".jpg", first, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].size
    assert big > 1_500_000, big  # past aiokafka's 1 MB max_request_size, and past 1 MiB at quality 90
    return path


async def _topic(boot: str, name: str, config: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=boot)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


def _camera(boot: str, video: Path, topic: str, camera_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([LINEWATCH, "camera", "--source", str(video), "--camera-id", camera_id, "--fps", "1",
                           "--jpeg-quality", "90", "--topic", topic, "--bootstrap", boot],
                          capture_output=True, text=True, timeout=240)


def _records(boot: str, topic: str) -> list:
    out = asyncio.run(read_topics(boot, [topic], until=lambda o: len(o[topic]) >= FRAMES, timeout_s=STEP_CAP_S))
    return out[topic]


def _size(r) -> int:
    return len(r.key or b"") + len(r.value or b"") + sum(len(k) + len(v or b"") for k, v in r.headers)


@pytest.mark.parametrize("limit", [None, KAFKA_DEFAULT_MAX], ids=["topic_without_limit", "topic_1MiB"])
def test_4k_camera_keeps_publishing_every_frame(kafka_bootstrap, shared_data, tmp_path, limit, reliability):
    video = _video(shared_data, tmp_path / "cam4k.avi")
    topic = f"frames-4k-{uuid.uuid4().hex[:8]}"
    asyncio.run(_topic(kafka_bootstrap, topic, {"max.message.bytes": str(limit)} if limit else {}))
    p = _camera(kafka_bootstrap, video, topic, "cam-4k")
    assert p.returncode == 0, (p.returncode, p.stdout[-1000:], p.stderr[-3000:])
    assert f"published {FRAMES} frames" in p.stdout, p.stdout + p.stderr[-2000:]
    recs = _records(kafka_bootstrap, topic)
    if limit:  # benchmarks/reliability.py's row: frames read from the video vs frames on the topic
        reliability.record_counts("camera_4k_frames", frames_sent=FRAMES, lost=FRAMES - len(recs),
                                  reencoded=int(re.search(r"re-encoded (\d+)", p.stdout).group(1)),
                                  topic_max_message_bytes=limit)
    assert len(recs) == FRAMES
    shapes = []
    for r in recs:
        f = decode_frame(r.key, r.value, r.headers)
        img = cv2.imdecode(np.frombuffer(f.image, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and f.camera_id == "cam-4k"
        shapes.append(img.shape[:2])
        if limit:
            assert _size(r) <= limit, (_size(r), limit)
    reenc = int(re.search(r"re-encoded (\d+)", p.stdout).group(1))
    assert "camera_frame_limit" in p.stdout + p.stderr  # the limit it sized itself to, and where it came from
    logs = (p.stdout + p.stderr).replace(" ", "")
    print("\n" + "\n".join(line for line in (p.stdout + p.stderr).splitlines()
                             if "camera_frame_limit" in line or "camera_frame_reencoded" in line or "published" in line))
    if limit is None:  # Tansu reports no max.message.bytes for this topic: sized from max_frame_bytes, said so
        assert '"source":"settings"' in logs and '"topic_max_message_bytes":null' in logs
        assert shapes == [(H, W)] * FRAMES and reenc == 0  # max_frame_bytes (32 MiB) holds a 4K JPEG
    else:
        assert f'"topic_max_message_bytes":{limit}' in logs and '"source":"topic"' in logs
        assert reenc == FRAMES and "camera_frame_reencoded" in logs
        assert all(h <= H and w <= W for h, w in shapes)
