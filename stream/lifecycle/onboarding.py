"""Capture data layout, capture policy and onboarding progress records (pure: files and JSON, no Kafka).

Shared by the capture service (stream/lifecycle/capture.py, ``linewatch capture``), ``linewatch onboard``
(stream/lifecycle/onboard_runner.py) and the console, which reads both the files and the topic.

**Capture layout** (``Settings.capture_dir``; in k8s the model store's datasets dir)::

    <capture_dir>/<product>/good/<name>.<ext>   the frame's original bytes exactly as published
                                                (``ext`` from its content_type: jpg / png / bmp);
                                                ``name`` = the frame_id when it is a safe file name
                                                (contracts.names), else ``id-<sha256(frame_id)[:32]>``
    <capture_dir>/<product>/manifest.json       the index (rewritten atomically after every capture batch)

``manifest.json``::

    {"schema": 1, "product": "elpv", "updated_ms": 1718000000000, "count": 12,
     "frames": {"<frame_id>": {"file": "good/<name>.jpg", "camera": "cam-7", "line": "line-2",
                               "ts_ms": ..., "captured_ms": ..., "bytes": 10422, "sha256": "<hex>",
                               "content_type": "image/jpeg",
                               "trigger": "unknown_product" | "retrain_requested" | "selected"}}}

``good/`` is what ``linewatch onboard`` trains on: an operator (the console) curates it by deleting a file
(or moving it to ``<product>/rejected/``); a manifest entry whose file is gone is not trained on and is
never captured again. ``count`` is the number of manifest entries whose file exists.

**Progress records** on ``Settings.topic_onboarding`` (default ``onboarding-events``), key = product,
value = JSON :class:`OnboardEvent`::

    {"schema": 1, "type": "<type>", "product": "elpv", "ts_ms": ..., "event_id": "<hex>",
     "run_id": "<hex>" | null, "detail": {...}}

=================  ==========================  =========================================================
type               written by                  detail
=================  ==========================  =========================================================
capture_armed      capture service             camera, model, reasons, until_ms (a retrain_requested)
capture_refused    capture service             reason (max_products / max_bytes / max_images /
                                               selection_not_buffered / selection_refused), limit,
                                               message, frame_ids, count, suppressed
captured           capture service             count (images in good/), new, frame_ids (this batch),
                                               trigger
capture_select     the console / an operator   frame_ids: capture exactly these (a command, not progress)
onboard_started    onboard                     detector, model, images, min_images, runner (local/k8s)
training_started   onboard                     runner, argv (local) or job (k8s Job name)
training_finished  onboard                     rc, seconds, artifact, version, sha256 (local runner)
released           onboard                     model, version, sha256 (seen on model-events)
promoted           onboard                     model, version (the controller's outcome)
rolled_back        onboard                     model, version, reasons
refused            onboard                     model, version, reasons
failed             onboard                     step, error
=================  ==========================  =========================================================

One onboarding run's records share ``run_id``; capture records have none.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from contracts.envelope import Frame
from contracts.names import check_name, is_safe_name

SCHEMA_VERSION = 1
EVENT_TYPES = ("capture_armed", "captured", "capture_refused", "capture_select", "onboard_started", "training_started",
               "training_finished", "released", "promoted", "rolled_back", "refused", "failed")
MANIFEST = "manifest.json"
GOOD = "good"
_EXT = {"image/jpeg": ".jpg", "image/png": ".png", "image/bmp": ".bmp"}
# in-memory bounds (issue #26 item 8): per-product candidate counters, pending operator selections, cached
# manifests (an evicted one is written first and re-read from disk when needed)
MAX_TRACKED, MAX_SELECTED, MAX_MANIFESTS = 4096, 5000, 64
HOST = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "host"  # the pod: temp names unique per pod


class OnboardEventError(ValueError):
    """An onboarding record that does not follow the schema."""


@dataclass
class OnboardEvent:
    type: str
    product: str
    detail: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise OnboardEventError(f"onboarding event: type must be one of {EVENT_TYPES}, got {self.type!r}")
        if not is_safe_name(self.product):
            raise OnboardEventError(f"onboarding event: bad product {str(self.product)[:80]!r}")
        if not isinstance(self.detail, dict):
            raise OnboardEventError("onboarding event: detail must be an object")

    @property
    def key(self) -> bytes:
        return self.product.encode()

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SERIALIZE_NUMPY)

    def record(self) -> tuple[bytes, bytes, list]:
        return self.key, self.to_json(), []


def decode_event(value: bytes | None) -> OnboardEvent:
    try:
        d = orjson.loads(value or b"")
    except orjson.JSONDecodeError as e:
        raise OnboardEventError(f"onboarding event: not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA_VERSION:
        raise OnboardEventError("onboarding event: not a schema-1 JSON object")
    names = set(OnboardEvent.__dataclass_fields__)
    try:
        return OnboardEvent(**{k: v for k, v in d.items() if k in names})
    except TypeError as e:
        raise OnboardEventError(f"onboarding event: {e}") from None


# ----------------------------------------------------------------------------- the capture store


def file_stem(frame_id: str) -> str:
    """A file name for ``frame_id`` that cannot leave its directory."""
    if is_safe_name(frame_id) and len(frame_id) <= 100:
        return frame_id
    return "id-" + hashlib.sha256(frame_id.encode()).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` durably: a temp file unique to this pod, process and write, fsync'd, renamed over
    ``path``, then the directory fsync'd (the capture service commits its offsets only after this)."""
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass
class Usage:
    """What the capture volume holds: product dirs and bytes of listed images whose file exists."""

    names: set[str] = field(default_factory=set)
    bytes: int = 0

    @property
    def products(self) -> int:
        return len(self.names)


class CaptureStore:
    """``<root>/<product>/{good/, manifest.json}`` (module docstring). One writer per product dir."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()  # at most MAX_MANIFESTS, LRU
        self._dirty: set[str] = set()  # manifests with entries not yet on disk
        self._usage: Usage | None = None

    def product_dir(self, product: str) -> Path:
        return self.root / check_name(product, "product")

    def good_dir(self, product: str) -> Path:
        return self.product_dir(product) / GOOD

    def manifest(self, product: str) -> dict[str, Any]:
        if product in self._manifests:
            self._manifests.move_to_end(product)
            return self._manifests[product]
        p = self.product_dir(product) / MANIFEST
        m = orjson.loads(p.read_bytes()) if p.is_file() else {}
        m.setdefault("schema", SCHEMA_VERSION)
        m.setdefault("product", product)
        m.setdefault("frames", {})
        self._manifests[product] = m
        while len(self._manifests) > MAX_MANIFESTS:
            old = next(iter(self._manifests))
            if old in self._dirty:
                self.flush(old)  # written before it is dropped: re-read from disk when needed again
            self._manifests.pop(old, None)
        return m

    def usage(self) -> Usage:
        """Products and bytes on the volume: read from the manifests on first use (a restarted service
        re-reads them), then kept up to date by :meth:`add`."""
        if self._usage is None:
            self._usage = self.scan()
        return self._usage

    def rescan(self) -> Usage:
        """Re-read the volume's usage (files deleted by curation free room)."""
        self._usage = self.scan()
        return self._usage

    def scan(self) -> Usage:
        u = Usage()
        if not self.root.is_dir():
            return u
        for d in self.root.iterdir():
            if not d.is_dir() or d.name.startswith(".") or not is_safe_name(d.name):
                continue
            u.names.add(d.name)
            mp = d / MANIFEST
            try:
                frames = orjson.loads(mp.read_bytes()).get("frames", {}) if mp.is_file() else {}
            except (OSError, orjson.JSONDecodeError, AttributeError):
                frames = {}
            u.bytes += sum(int(e.get("bytes") or 0) for e in frames.values()
                           if isinstance(e, dict) and (d / str(e.get("file", ""))).is_file())
        return u

    def has(self, product: str, frame_id: str) -> bool:
        return frame_id in self.manifest(product)["frames"]

    def count(self, product: str) -> int:
        """Images of ``product`` in good/ that the manifest lists (curated-away files do not count)."""
        d = self.product_dir(product)
        return sum(1 for e in self.manifest(product)["frames"].values() if (d / e["file"]).is_file())

    def add(self, product: str, frame: Frame, trigger: str) -> bool:
        """Write one frame's original bytes; False when it was captured before (redelivery) or is empty."""
        if not frame.image or self.has(product, frame.frame_id):
            return False
        good = self.good_dir(product)
        good.mkdir(parents=True, exist_ok=True)
        name = file_stem(frame.frame_id) + _EXT.get((frame.content_type or "").lower(), ".jpg")
        _atomic_write(good / name, frame.image)
        u = self.usage()
        u.names.add(product)
        u.bytes += len(frame.image)
        self._dirty.add(product)
        self.manifest(product)["frames"][frame.frame_id] = {
            "file": f"{GOOD}/{name}", "camera": frame.camera_id, "line": frame.line_id, "ts_ms": frame.ts_ms,
            "captured_ms": int(time.time() * 1000), "bytes": len(frame.image),
            "sha256": hashlib.sha256(frame.image).hexdigest(), "content_type": frame.content_type,
            "trigger": trigger}
        return True

    def flush(self, product: str) -> int:
        """Rewrite ``product``'s manifest (atomically); returns its count."""
        m = self.manifest(product)
        m["count"] = self.count(product)
        m["updated_ms"] = int(time.time() * 1000)
        self.product_dir(product).mkdir(parents=True, exist_ok=True)
        _atomic_write(self.product_dir(product) / MANIFEST, orjson.dumps(m, option=orjson.OPT_INDENT_2))
        self._dirty.discard(product)
        return m["count"]


# ----------------------------------------------------------------------------- the policy


class CapturePolicy:
    """Which candidate frames are captured (pure; the service feeds it).

    ``every_n``: the 1st, (n+1)th, ... candidate of each product, up to ``max_per_product`` images;
    ``select``: only the frame ids an operator selected. In both modes a selected frame id
    (:meth:`select`, fed by ``capture_select`` records) is captured whether it arrives later or is still
    among the last ``buffer`` candidates that were not captured."""

    def __init__(self, mode: str = "every_n", every_n: int = 1, max_per_product: int = 500, buffer: int = 256,
                 selected: set[str] | None = None, buffer_bytes: int = 64 * 1024 * 1024):
        if mode not in ("every_n", "select"):
            raise ValueError(f"capture policy must be every_n or select, got {mode!r}")
        self.mode, self.every_n, self.max_per_product, self.buffer = mode, max(1, every_n), max_per_product, buffer
        self.buffer_bytes = buffer_bytes
        self.selected: OrderedDict[str, None] = OrderedDict()  # pending selections, at most MAX_SELECTED
        self.selections_dropped = 0
        self._add_selected(selected or ())
        self._seen: OrderedDict[str, int] = OrderedDict()  # per product, at most MAX_TRACKED (LRU)
        self._recent: OrderedDict[str, tuple[str, Frame, str]] = OrderedDict()  # frame_id -> (product, frame, trigger)
        self._recent_bytes = 0

    def _add_selected(self, ids) -> None:
        for fid in ids:
            self.selected[fid] = None
            self.selected.move_to_end(fid)
        while len(self.selected) > MAX_SELECTED:
            self.selected.popitem(last=False)
            self.selections_dropped += 1

    def want(self, product: str, frame: Frame, count: int, trigger: str) -> bool:
        """Should this candidate be captured now (``count``: images of the product captured so far)?"""
        if frame.frame_id in self.selected:  # an operator's choice: captured whatever the mode or count
            del self.selected[frame.frame_id]
            return True
        if self.mode == "every_n" and count < self.max_per_product:
            k = self._seen.pop(product, 0)
            self._seen[product] = k + 1
            while len(self._seen) > MAX_TRACKED:
                self._seen.popitem(last=False)
            if k % self.every_n == 0:
                return True
        self._remember(product, frame, trigger)  # not captured: still selectable for a while
        return False

    def _remember(self, product: str, frame: Frame, trigger: str) -> None:
        if self.buffer <= 0 or len(frame.image) > self.buffer_bytes:
            return
        old = self._recent.pop(frame.frame_id, None)
        if old is not None:
            self._recent_bytes -= len(old[1].image)
        self._recent[frame.frame_id] = (product, frame, trigger)
        self._recent_bytes += len(frame.image)
        while len(self._recent) > self.buffer or self._recent_bytes > self.buffer_bytes:
            _, (_, f, _) = self._recent.popitem(last=False)
            self._recent_bytes -= len(f.image)

    def select(self, frame_ids: list[str]) -> list[tuple[str, Frame, str]]:
        """Operator selection: the buffered candidates among ``frame_ids`` (capture them now); the others are
        remembered and captured when they arrive."""
        return self.select_ids(frame_ids)[0]

    def select_ids(self, frame_ids: list[str]) -> tuple[list[tuple[str, Frame, str]], list[str]]:
        """:meth:`select`, and the ids that were not buffered (remembered, captured only if they arrive again:
        a DLQ'd frame that left the buffer does not come back, so the caller says so)."""
        now, missing = [], []
        for fid in frame_ids:
            hit = self._recent.pop(fid, None)
            if hit is not None:
                self._recent_bytes -= len(hit[1].image)
                now.append((hit[0], hit[1], "selected"))
            else:
                missing.append(fid)
        self._add_selected(missing)
        return now, missing
