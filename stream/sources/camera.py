"""``linewatch camera``: one camera (video file, RTSP/HTTP stream, V4L2 device or image folder) -> JPEG
frames on the ``frames`` topic, paced at ``fps``, with bounded memory whatever the broker does.

Sources: stream/sources/inputs.py (:func:`~stream.sources.inputs.open_source`: a file, a folder,
an RTSP/HTTP URL or ``/dev/videoN``; live streams reconnect with capped exponential backoff).

Each frame is JPEG-encoded at ``jpeg_quality`` and published with the envelope of ``linewatch replay``
(:class:`contracts.envelope.Frame` / :func:`~contracts.envelope.encode_frame`: ``frame_id``, ``camera_id``,
``line_id``, ``ts_ms`` = when the frame was read, ``product``, ``task``, ``content_type: image/jpeg``, plus
``source``; key = camera id).

Pacing and back-pressure (:func:`run_camera`, pure apart from the injected clock and sender): tick k is
due at ``t0 + k / fps``. When handling a frame leaves the loop more than a whole period behind, the missed
ticks are skipped and their frames **dropped** (``late``: a file or folder skips that many frames, a live
stream simply has newer ones). At most ``max_inflight`` sends await their broker ack; a tick that finds
the window full drops its frame (``window``) instead of queueing it. Drops are logged as
``camera_frames_dropped`` at most every ``drop_log_s`` seconds. A send that fails after the producer's own
retries is counted ``failed``; a fatal producer error (authorization, topic, size) stops the camera
(:class:`contracts.cli.RuntimeFailure`, exit 1). The time a live stream spent reconnecting is not counted
as drops (the pacer restarts). The end is logged once as ``camera_done`` with :class:`CameraStats`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from contracts.cli import RuntimeFailure, UsageError
from contracts.envelope import Frame, decode_frame, encode_frame, new_frame_id
from contracts.logs import get_logger
from stream.kafka.produce import classify, root_cause
from stream.sources.inputs import Shot, open_source  # noqa: F401 - re-exported for the CLI and tests

log = get_logger("stream.sources.camera")

Record = tuple[bytes, bytes, list]
Send = Callable[[Record], Awaitable[asyncio.Future]]


@dataclass
class CameraConfig:
    camera_id: str
    line_id: str | None = None
    product: str | None = None
    task: str | None = None
    fps: float = 10.0
    jpeg_quality: int = 90
    max_frames: int | None = None  # stop after this many frames were sent
    max_inflight: int = 8
    drop_log_s: float = 5.0


@dataclass
class CameraStats:
    read: int = 0  # frames taken from the source
    sent: int = 0  # handed to the producer
    published: int = 0  # acknowledged by the broker
    dropped_late: int = 0
    dropped_window: int = 0
    failed: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return self.dropped_late + self.dropped_window

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": self.dropped, "seconds": round(self.seconds, 2)}


# ----------------------------------------------------------------------------- pacing + window (pure)


class Pacer:
    """Tick k is due at ``t0 + k * period``."""

    def __init__(self, fps: float, now: float):
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.period = 1.0 / fps
        self.reset(now)

    def reset(self, now: float) -> None:
        self.t0, self.k = now, 0

    def delay(self, now: float) -> float:
        return max(0.0, self.t0 + self.k * self.period - now)

    def advance(self, now: float) -> int:
        """The current tick is done: move on. Returns the ticks skipped because ``now`` is more than one whole
        period past the next one (their frames cannot be published on time: dropped)."""
        self.k += 1
        behind = now - (self.t0 + self.k * self.period)
        if behind < self.period:
            return 0
        missed = int(behind // self.period)
        self.k += missed
        return missed


class Window:
    """Sends awaiting their ack, at most ``limit``; outcomes go into ``stats``."""

    def __init__(self, limit: int, stats: CameraStats):
        self.limit, self.stats = limit, stats
        self.pending: set[asyncio.Future] = set()
        self.fatal: BaseException | None = None
        self._last_fail_log = 0.0

    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def add(self, fut: asyncio.Future) -> None:
        self.pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future) -> None:
        self.pending.discard(fut)
        err = None if not fut.cancelled() else asyncio.CancelledError()
        if err is None:
            err = fut.exception()
        if err is None:
            self.stats.published += 1
            return
        self.failed(err)

    def failed(self, err: BaseException) -> None:
        if isinstance(err, Exception) and classify(err) == "fatal":
            self.fatal = self.fatal or err
            return
        self.stats.failed += 1
        if time.monotonic() - self._last_fail_log > 5.0:
            self._last_fail_log = time.monotonic()
            log.warning("camera_send_failed", failed=self.stats.failed, error=f"{type(err).__name__}: {err}"[:300])

    def check(self) -> None:
        if self.fatal is not None:
            e = root_cause(self.fatal)
            raise RuntimeFailure(f"publishing frames failed for good: {type(e).__name__}: {e}"[:400])

    async def drain(self, timeout_s: float = 30.0) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=timeout_s)
        await asyncio.sleep(0)  # the last done-callbacks run

# ----------------------------------------------------------------------------- the loop


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def frame_record(cfg: CameraConfig, image: bytes, ts_ms: int, extra: dict[str, str]) -> Record:
    f = Frame(frame_id=new_frame_id(), camera_id=cfg.camera_id, ts_ms=ts_ms, image=image, line_id=cfg.line_id,
              product=cfg.product, task=cfg.task, content_type="image/jpeg", extra=dict(extra))
    return encode_frame(f)


def check_config(cfg: CameraConfig) -> None:
    """The headers a frame of ``cfg`` would carry pass the worker's own check (EnvelopeError: exit 2)."""
    k, v, h = frame_record(cfg, b"\xff", 0, {})
    decode_frame(k, v, h)
    if not 1 <= cfg.jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality must be 1..100, got {cfg.jpeg_quality}")


async def run_camera(source, send: Send, cfg: CameraConfig, *, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, stop: asyncio.Event | None = None,
                     offload: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> CameraStats:
    """Read, encode and publish until the source ends, ``max_frames`` were sent, or ``stop`` (see the module
    docstring). ``send(record)`` schedules one record and returns its delivery future."""
    stats = CameraStats()
    window = Window(cfg.max_inflight, stats)
    t_start = clock()
    pacer = Pacer(cfg.fps, t_start)
    last_log, logged = t_start, 0
    seen_reconnects = source.reconnects
    try:
        while not (stop is not None and stop.is_set()):
            if cfg.max_frames is not None and stats.sent >= cfg.max_frames:
                break
            d = pacer.delay(clock())
            # behind the pace too: yield, so the producer and the delivery callbacks always get to run
            await (sleep(d) if d > 0 else asyncio.sleep(0))
            shot = await offload(source.read)
            if shot is None:
                break
            stats.read += 1
            if source.reconnects != seen_reconnects:  # the stream was down: no frames existed to publish
                seen_reconnects = stats.reconnects = source.reconnects
                pacer.reset(clock())
            window.check()
            if window.full():
                stats.dropped_window += 1
            else:
                data = await offload(encode_jpeg, shot.image, cfg.jpeg_quality)
                try:
                    fut = await send(frame_record(cfg, data, shot.ts_ms, shot.extra))
                except Exception as e:  # refused before it left the client (e.g. larger than max_request_size)
                    window.failed(e)
                else:
                    stats.sent += 1
                    window.add(fut)
            missed = pacer.advance(clock())
            if missed:
                stats.dropped_late += source.skip(missed)
            now = clock()
            if stats.dropped > logged and now - last_log >= cfg.drop_log_s:
                log.warning("camera_frames_dropped", camera=cfg.camera_id, dropped=stats.dropped - logged,
                            total=stats.dropped, late=stats.dropped_late, window=stats.dropped_window,
                            inflight=len(window.pending))
                last_log, logged = now, stats.dropped
        await window.drain()
        window.check()
    finally:
        stats.reconnects = source.reconnects
        stats.seconds = clock() - t_start
        gave_up = getattr(source, "gave_up", None)
        log.info("camera_done", camera=cfg.camera_id, **stats.summary(), **({"gave_up": gave_up} if gave_up else {}))
    if gave_up:
        raise RuntimeFailure(f"camera source gave up reconnecting ({gave_up})")
    return stats


async def camera(bootstrap: str, source, cfg: CameraConfig, *, topic: str = "frames", settings=None,
                 stop: asyncio.Event | None = None) -> CameraStats:
    """:func:`run_camera` over a real producer (stream.kafka.clients.Producer: acks=all)."""
    from stream.kafka.clients import Producer

    async with Producer(bootstrap, settings=settings) as prod:
        async def send(rec: Record) -> asyncio.Future:
            k, v, h = rec
            return await prod.p.send(topic, key=k, value=v, headers=h)

        return await run_camera(source, send, cfg, stop=stop)
