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
retries is counted ``failed``; a fatal producer error (authorization, topic) stops the camera
(:class:`contracts.cli.RuntimeFailure`, exit 1). Sizes never do (stream/sources/fit.py): the producer is
sized from the topic's ``max.message.bytes`` read at start (else ``max_frame_bytes``), a JPEG over the
budget is re-encoded (lower quality, then downscaled; counted ``reencoded``, logged
``camera_frame_reencoded``), a frame that fits at no size, or that the broker still refuses as too large, is
counted ``too_large`` (and the budget shrinks a quarter for the next frames). The time a live stream spent reconnecting is not counted
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
from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from contracts.cli import RuntimeFailure, UsageError
from contracts.envelope import Frame, decode_frame, encode_frame, new_frame_id
from contracts.logs import get_logger
from stream.kafka.produce import classify, root_cause
from stream.sources.fit import FrameLimit, fit_jpeg
from stream.sources.inputs import Shot, open_source  # noqa: F401 - re-exported for the CLI and tests

log = get_logger("stream.sources.camera")

Record = tuple[bytes, bytes, list]
TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
REENCODE_LOG_S = 5.0
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
    reencoded: int = 0  # JPEGs re-encoded (lower quality / downscaled) to fit the topic
    too_large: int = 0  # frames that fit at no size, or that the broker refused as too large
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
        self.on_too_large: Callable[[], None] | None = None
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
        if isinstance(root_cause(err), TOO_LARGE):  # never fatal: counted, and later frames made smaller
            self.stats.too_large += 1
            if self.on_too_large is not None:
                self.on_too_large()
            log.warning("camera_frame_too_large", too_large=self.stats.too_large,
                        error=f"{type(err).__name__}: {err}"[:300])
            return
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


def _encode(cfg: CameraConfig, shot: Shot, limit: FrameLimit | None, shrink: float, stats: CameraStats,
            last_log: list[float]) -> Record | None:
    """The frame's record, its JPEG fitted to ``limit`` (stream/sources/fit.py); None: it fits at no size."""
    if limit is None:
        return frame_record(cfg, encode_jpeg(shot.image, cfg.jpeg_quality), shot.ts_ms, shot.extra)
    k, v, h = frame_record(cfg, b"", shot.ts_ms, shot.extra)
    budget = int(limit.budget(k, h) * shrink)
    fit = fit_jpeg(shot.image, cfg.jpeg_quality, budget)
    if fit.data is None:
        stats.too_large += 1
        log.warning("camera_frame_too_large", camera=cfg.camera_id, bytes=fit.first_bytes, budget=budget,
                    too_large=stats.too_large, shape=list(shot.image.shape[:2]))
        return None
    if fit.reencoded:
        stats.reencoded += 1
        now = time.monotonic()
        if now - last_log[0] >= REENCODE_LOG_S or stats.reencoded == 1:
            last_log[0] = now
            log.warning("camera_frame_reencoded", camera=cfg.camera_id, reencoded=stats.reencoded,
                        bytes_before=fit.first_bytes, bytes_after=len(fit.data), budget=budget,
                        quality=fit.quality, scale=fit.scale, shape=list(shot.image.shape[:2]))
    return k, fit.data, h


async def run_camera(source, send: Send, cfg: CameraConfig, *, clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, stop: asyncio.Event | None = None,
                     offload: Callable[..., Awaitable[Any]] = asyncio.to_thread,
                     limit: FrameLimit | None = None) -> CameraStats:
    """Read, encode and publish until the source ends, ``max_frames`` were sent, or ``stop`` (see the module
    docstring). ``send(record)`` schedules one record and returns its delivery future; ``limit``: what a
    record may weigh (None: no limit, the JPEG as encoded)."""
    stats = CameraStats()
    window = Window(cfg.max_inflight, stats)
    shrink = [1.0]  # the budget's factor: a quarter less after each frame the broker refused as too large
    window.on_too_large = lambda: shrink.__setitem__(0, shrink[0] * 0.75)
    last_reenc_log = [float("-inf")]
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
                rec = await offload(_encode, cfg, shot, limit, shrink[0], stats, last_reenc_log)
                if rec is not None:
                    try:
                        fut = await send(rec)
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
    from contracts.config import process_settings
    from stream.kafka.clients import Producer
    from stream.sources.fit import frame_limit

    s = settings or process_settings()
    limit = await frame_limit(bootstrap, topic, s)
    async with Producer(bootstrap, settings=s, max_request_size=limit.producer_max_request_size()) as prod:
        async def send(rec: Record) -> asyncio.Future:
            k, v, h = rec
            return await prod.p.send(topic, key=k, value=v, headers=h)

        return await run_camera(source, send, cfg, stop=stop, limit=limit)
