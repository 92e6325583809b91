"""Camera sources for ``linewatch camera`` (stream/sources/camera.py): video files, live streams, image folders.

- ``FILE`` (mp4, avi, mkv ...): ``cv2.VideoCapture``, frames in order; its end is the camera's end
  (``loop``: from the start again). A file that does not open is a usage error.
- ``rtsp://``, ``rtsps://``, ``http(s)://``, ``rtmp://``, ``udp://``, ``tcp://``, ``srt://`` or ``/dev/videoN``:
  a live stream. A reader thread keeps only the newest frame (a camera faster than ``fps`` is decimated,
  nothing buffers); a failed open or read reconnects with capped exponential backoff (``backoff_s``
  doubling up to ``backoff_max_s``); more than ``max_reconnects`` failures in a row end it (``gave_up``).
- ``FOLDER``: its images in order (:func:`list_images`, which ``linewatch replay`` reads too: the MVTec
  layout adds the ``gt_label``/``gt_defect`` headers), ``loop`` optional.

Every source has ``read() -> Shot | None`` (None: the end), ``skip(n) -> skipped``, ``close()`` and ``reconnects``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from contracts.backoff import backoff_delay
from contracts.cli import UsageError
from contracts.logs import get_logger

log = get_logger("stream.sources.camera")

_URL = re.compile(r"^(rtsps?|https?|rtmp|udp|tcp|srt)://", re.I)
_DEVICE = re.compile(r"/dev/video(\d+)")  # fullmatch: `$` would accept a trailing newline
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class Shot:
    image: np.ndarray
    ts_ms: int
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class FolderImage:
    path: Path
    gt_label: str | None
    gt_defect: str | None


def list_images(folder: str | Path) -> list[FolderImage]:
    """The images of ``folder`` in order: its own, then each sub-folder's; an MVTec-style sub-folder labels its
    images (``good``/``ok``/``normal``: good, any other: defect named after it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"replay folder {folder} does not exist")
    flat = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
    items = [FolderImage(p, None, None) for p in flat]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        imgs = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT)
        label = "good" if sub.name in ("good", "ok", "normal") else "defect"
        items += [FolderImage(p, label, None if label == "good" else sub.name) for p in imgs]
    if not items:
        raise FileNotFoundError(f"no images (png/jpg/bmp) in {folder}")
    return items


class FolderSource:
    live = False

    def __init__(self, folder: str | Path, loop: bool = False):
        self.items = list_images(folder)  # FileNotFoundError: a usage error
        self.loop, self.i, self.reconnects = loop, 0, 0

    def read(self) -> Shot | None:
        for _ in range(len(self.items)):  # every file unreadable (a looping folder too): the end
            if self.i >= len(self.items):
                if not self.loop:
                    return None
                self.i = 0
            it = self.items[self.i]
            self.i += 1
            img = cv2.imread(str(it.path), cv2.IMREAD_COLOR)
            if img is None:  # an unreadable file is skipped, as a camera glitch would be
                log.warning("camera_image_unreadable", path=str(it.path))
                continue
            extra = {k: v for k, v in (("gt_label", it.gt_label), ("gt_defect", it.gt_defect),
                                       ("source", it.path.name)) if v}
            return Shot(img, int(time.time() * 1000), extra)
        return None

    def skip(self, n: int) -> int:
        done = n if self.loop else max(0, min(n, len(self.items) - self.i))
        self.i += done
        if self.loop and self.items:
            self.i %= len(self.items)
        return done

    def close(self) -> None:
        pass


class FileSource:
    live = False

    def __init__(self, path: str | Path, loop: bool = False, capture: Callable[..., Any] = cv2.VideoCapture):
        self.path, self.loop, self.capture, self.reconnects = Path(path), loop, capture, 0
        if not self.path.is_file():
            raise FileNotFoundError(f"camera source {self.path} does not exist")
        self.cap = self._open()

    def _open(self):
        cap = self.capture(str(self.path))
        if not cap.isOpened():
            raise UsageError(f"camera source {self.path}: OpenCV cannot open it as a video")
        return cap

    def read(self) -> Shot | None:
        ok, img = self.cap.read()
        if not ok and self.loop:
            self.cap.release()
            self.cap = self._open()
            ok, img = self.cap.read()
        if not ok:
            return None
        return Shot(img, int(time.time() * 1000), {"source": self.path.name})

    def skip(self, n: int) -> int:
        for i in range(n):
            if not self.cap.grab():
                return i
        return n

    def close(self) -> None:
        self.cap.release()


class StreamSource:
    """A live stream: a reader thread keeps the newest frame; failures reconnect with capped backoff."""

    live = True

    def __init__(self, target: str | int, *, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                 max_reconnects: int | None = None, capture: Callable[..., Any] | None = None,
                 sleep: Callable[[float], None] | None = None, name: str | None = None):
        self.target, self.name = target, name or str(target)
        self.backoff_s, self.backoff_max_s, self.max_reconnects = backoff_s, backoff_max_s, max_reconnects
        self.capture = capture or _open_stream
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._cond = threading.Condition()
        self._latest: tuple[int, np.ndarray, int] | None = None
        self._taken = 0
        self.reconnects = 0
        self.gave_up: str | None = None
        self.thread = threading.Thread(target=self._reader, name=f"camera-{self.name}", daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        failures, seq = 0, 0
        while not self._stop.is_set():
            cap = None
            try:
                cap = self.capture(self.target)
                while cap.isOpened() and not self._stop.is_set():
                    ok, img = cap.read()
                    if not ok:
                        break
                    failures, seq = 0, seq + 1
                    with self._cond:
                        self._latest = (seq, img, int(time.time() * 1000))
                        self._cond.notify_all()
            except Exception as e:  # a backend error is one more failure: reconnect
                log.warning("camera_stream_error", source=self.name, error=f"{type(e).__name__}: {e}"[:200])
            finally:
                if cap is not None:
                    cap.release()
            if self._stop.is_set():
                break
            failures += 1
            if self.max_reconnects is not None and failures > self.max_reconnects:
                self.gave_up = f"{failures} failed attempts in a row"
                break
            delay = backoff_delay(failures, self.backoff_s, self.backoff_max_s, jitter="none")  # one reader per camera
            self.reconnects += 1
            log.warning("camera_reconnect", source=self.name, attempt=failures, delay_s=delay)
            self._sleep(delay)
        with self._cond:
            self._cond.notify_all()

    def read(self) -> Shot | None:
        """The newest frame not taken yet (waits for one); None once stopped or given up."""
        with self._cond:
            while not self._stop.is_set() and self.gave_up is None:
                if self._latest is not None and self._latest[0] > self._taken:
                    seq, img, ts = self._latest
                    self._taken = seq
                    return Shot(img, ts, {"source": self.name})
                self._cond.wait(0.5)
        return None

    def skip(self, n: int) -> int:  # a live stream has newer frames already: the ticks are what was lost
        return n

    def interrupt(self) -> None:
        """Stop reading now (a signal handler): a waiting :meth:`read` returns None."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self.interrupt()
        self.thread.join(5)


def _open_stream(target: str | int):
    if isinstance(target, int):
        return cv2.VideoCapture(target, cv2.CAP_V4L2)
    return cv2.VideoCapture(target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10000,
                                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, 10000])


def open_source(spec: str, *, loop: bool = False, backoff_s: float = 0.5, backoff_max_s: float = 30.0,
                max_reconnects: int | None = None):
    """FILE | FOLDER | stream URL | /dev/videoN -> a source (module docstring)."""
    m = _DEVICE.fullmatch(spec)
    if m:
        return StreamSource(int(m.group(1)), backoff_s=backoff_s, backoff_max_s=backoff_max_s,
                            max_reconnects=max_reconnects, name=spec)
    if _URL.match(spec):
        return StreamSource(spec, backoff_s=backoff_s, backoff_max_s=backoff_max_s, max_reconnects=max_reconnects,
                            name=re.sub(r"//[^@/]*@", "//", spec))  # never log credentials in the URL
    if Path(spec).is_dir():
        return FolderSource(spec, loop=loop)
    return FileSource(spec, loop=loop)
