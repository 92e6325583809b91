"""Issue #26 item 5 at unit level (stream/sources/fit.py and run_camera): a JPEG over the record budget is
re-encoded (lower quality, then downscaled) to fit, a frame that fits at no size or that the broker refuses as
too large is counted, never fatal. The process on the real broker with a 4K video:
tests/integration/test_camera_4k.py."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np
from aiokafka import errors as ke

from stream.sources.camera import CameraConfig, run_camera
from stream.sources.fit import MIN_SIDE, FrameLimit, fit_jpeg
from tests.unit.test_camera import Broker, Clock, Frames, direct


def _noisy(shared_data, w=1920, h=1080) -> np.ndarray:
    img = cv2.imread(str(sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[0]))
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += np.random.default_rng(0).normal(0, 30, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_fit_jpeg_keeps_lowers_quality_then_downscales(shared_data):
    img = _noisy(shared_data)
    full = fit_jpeg(img, 90, 10**9)
    assert not full.reencoded and full.scale == 1.0 and len(full.data) == full.first_bytes
    q = fit_jpeg(img, 90, int(full.first_bytes * 0.8))
    assert q.reencoded and q.scale == 1.0 and q.quality < 90 and len(q.data) <= full.first_bytes * 0.8
    small = fit_jpeg(img, 90, full.first_bytes // 10)
    assert small.reencoded and small.scale < 1.0 and len(small.data) <= full.first_bytes // 10
    dec = cv2.imdecode(np.frombuffer(small.data, np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape[1] == round(1920 * small.scale) and min(dec.shape[:2]) >= MIN_SIDE
    none = fit_jpeg(img, 90, 1000)  # fits at no size >= MIN_SIDE
    assert none.data is None and not none.reencoded


def test_limit_budget_leaves_room_for_key_and_headers():
    lim = FrameLimit(record_bytes=100_000, image_bytes=99_000, source="topic")
    assert lim.budget(b"k" * 10, [("h", b"v" * 1000)]) == 100_000 - 10 - 1001 - 512
    assert lim.budget(b"", []) == 99_000  # max_frame_bytes binds first
    assert lim.producer_max_request_size() > lim.record_bytes


def _run(frames, broker, cfg, clock, limit):
    return asyncio.run(run_camera(frames, broker.send, cfg, clock=clock, sleep=clock.sleep, offload=direct,
                                  limit=limit))


def test_camera_reencodes_to_fit_and_counts_a_frame_that_fits_at_no_size(shared_data):
    class Big(Frames):
        def read(self):
            shot = super().read()
            if shot is not None:
                shot.image = _noisy(shared_data, 1280, 720) if self.i < 4 else np.zeros((8, 8, 3), np.uint8)
            return shot

    clock, broker = Clock(), Broker()
    first = len(cv2.imencode(".jpg", _noisy(shared_data, 1280, 720), [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    st = _run(Big(5, clock), broker, CameraConfig("cam-big", fps=10), clock,
              FrameLimit(record_bytes=first // 3, image_bytes=10**9, source="topic"))
    assert st.reencoded == 3 and st.too_large == 0 and st.published == 5
    assert all(len(k) + len(v) + sum(len(a) + len(b) for a, b in h) <= first // 3 for k, v, h in broker.sent)
    clock, broker = Clock(), Broker()
    st = _run(Big(5, clock), broker, CameraConfig("cam-big", fps=10), clock,
              FrameLimit(record_bytes=2_000, image_bytes=10**9, source="topic"))
    assert st.too_large == 3 and st.published == 2 and st.failed == 0  # the 8x8 frames still go


def test_broker_refusing_a_frame_as_too_large_is_counted_not_fatal(shared_data):
    clock, broker = Clock(), Broker()
    broker.error = ke.MessageSizeTooLargeError()
    st = _run(Frames(4, clock), broker, CameraConfig("cam-r", fps=10), clock,
              FrameLimit(record_bytes=1_000_000, image_bytes=10**9, source="settings"))
    assert (st.too_large, st.failed, st.published) == (4, 0, 0)  # no RuntimeFailure: the camera goes on
