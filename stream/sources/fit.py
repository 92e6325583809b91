"""A camera frame that fits the topic (issue #26 item 5): the limit read at start, the JPEG re-encoded to fit.

:func:`frame_limit` reads the frames topic's ``max.message.bytes`` once at start (admin DescribeConfigs,
stream/kafka/limits.py). A topic that reports none (Tansu stores only the configs a topic was created with)
or a broker that cannot be asked: ``Settings.kafka_max_message_bytes`` if set, else ``max_frame_bytes`` plus
the headers' room (the worker refuses larger frames anyway); the log line ``camera_frame_limit`` says which.
The producer's ``max_request_size`` is sized from it, and a frame's JPEG may be at most ``max_frame_bytes``
and what the record's key and headers leave of the limit.

:func:`fit_jpeg` encodes at the camera's quality; a JPEG over the budget is re-encoded at lower qualities
(``QUALITIES`` below the camera's), then downscaled (at ``DOWNSCALE_QUALITY``, by the square root of the
size ratio with a margin, down to ``MIN_SIDE`` px): the frame is published smaller rather than lost. Only a
frame that fits at no size is refused (``None``: counted ``too_large`` by the camera).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from contracts.config import Settings
from contracts.logs import get_logger

log = get_logger("stream.sources.camera")

HEADERS_ROOM = 64 * 1024  # a frame record beyond its JPEG: key, headers, record and batch framing
RECORD_OVERHEAD = 512  # per record beyond key + value + headers (record + batch framing, generous)
QUALITIES = (80, 70, 60, 50)
DOWNSCALE_QUALITY = 70
MIN_SIDE = 320


@dataclass(frozen=True)
class FrameLimit:
    record_bytes: int  # a whole record (key + value + headers) at most
    image_bytes: int  # a JPEG at most (max_frame_bytes, the worker's own limit)
    source: str  # "topic" | "settings"

    def producer_max_request_size(self) -> int:
        return self.record_bytes + RECORD_OVERHEAD

    def budget(self, key: bytes, headers: list) -> int:
        """The bytes left for a JPEG in a record with this key and these headers."""
        used = len(key) + sum(len(k) + len(v or b"") for k, v in headers) + RECORD_OVERHEAD
        return min(self.image_bytes, self.record_bytes - used)


async def frame_limit(bootstrap: str, topic: str, s: Settings) -> FrameLimit:
    from stream.kafka.limits import read_topic_limits

    topic_max = (await read_topic_limits(s.with_overrides(kafka_bootstrap=bootstrap), [topic])).get(topic)
    if topic_max is not None:
        lim = FrameLimit(topic_max, s.max_frame_bytes, "topic" if s.kafka_max_message_bytes is None
                         or topic_max != s.kafka_max_message_bytes else "settings")
    else:
        lim = FrameLimit(s.max_frame_bytes + HEADERS_ROOM, s.max_frame_bytes, "settings")
    log.info("camera_frame_limit", topic=topic, record_bytes=lim.record_bytes, image_bytes=lim.image_bytes,
             source=lim.source, topic_max_message_bytes=topic_max,
             note=None if topic_max is not None else "the topic reports no max.message.bytes (or the broker "
             "could not be asked): sized from max_frame_bytes")
    return lim


@dataclass(frozen=True)
class Fitted:
    data: bytes | None  # None: fits at no size
    quality: int
    scale: float  # 1.0: full size
    first_bytes: int  # the JPEG at the camera's quality

    @property
    def reencoded(self) -> bool:
        return self.data is not None and (self.scale < 1.0 or self.quality != -1)


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def fit_jpeg(img: np.ndarray, quality: int, budget: int) -> Fitted:
    """The JPEG of ``img`` at ``quality`` if it fits ``budget`` bytes (``quality`` -1 in the result: as
    asked), else re-encoded lower, then downscaled (module docstring)."""
    first = _jpeg(img, quality)
    if len(first) <= budget:
        return Fitted(first, -1, 1.0, len(first))
    size = len(first)
    for q in (q for q in QUALITIES if q < quality):
        data = _jpeg(img, q)
        if len(data) <= budget:
            return Fitted(data, q, 1.0, len(first))
        size = len(data)
    q = min(quality, DOWNSCALE_QUALITY)
    h, w = img.shape[:2]
    scale = 1.0
    for _ in range(6):
        scale *= max(0.1, min(0.9, math.sqrt(max(budget, 1) / size) * 0.9))  # size: the JPEG at the last scale
        if min(h, w) * scale < MIN_SIDE:
            break
        small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        data = _jpeg(small, q)
        if len(data) <= budget:
            return Fitted(data, q, round(scale, 4), len(first))
        size = len(data)
    return Fitted(None, q, round(scale, 4), len(first))
