"""The capture service's quotas (issue #26 item 8): product names come from untrusted frame headers and the
capture volume is shared with the model store, so what capture may write is bounded.

- ``capture_max_products``: product dirs under ``capture_dir``; a candidate of a new product past it is
  refused (``max_products``); products already there go on.
- ``capture_max_bytes``: bytes of captured images on the volume (the manifests' entries whose file exists,
  re-read at start); a candidate that would pass it is refused (``max_bytes``). Deleting images (curation,
  or a product dir once onboarded) frees room: a quota about to refuse re-reads the volume first (at most
  every ``RESCAN_S``).
- ``capture_max_per_product``: the automatic (``every_n``) capture stops at it (``max_images``); an
  operator's selection may add past it, within the byte quota.

A refusal is a ``capture_refused`` record on the onboarding topic (reason, limit, a one-line message): once
per product and reason (remembered for the last ``MAX_REPORTED`` pairs) and at most ``PER_MINUTE`` per reason
a minute; the rest is counted (``stats["refused_<reason>"]``, ``suppressed`` in the next record), never lost
silently.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from contracts.config import Settings
from contracts.logs import get_logger
from stream.lifecycle.onboarding import CaptureStore, OnboardEvent

log = get_logger("stream.lifecycle.capture")

MAX_REPORTED = 1024
PER_MINUTE = 30
RESCAN_S = 30.0


class Quotas:
    def __init__(self, s: Settings, store: CaptureStore, stats: Counter, clock: Callable[[], float] = time.monotonic):
        self.s, self.store, self.stats, self.clock = s, store, stats, clock
        self.pending: list[OnboardEvent] = []  # refusals to publish with the next flush
        self._reported: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._window: dict[str, tuple[float, int]] = {}  # reason -> (minute start, records in it)
        self._suppressed: Counter = Counter()
        self._scanned = clock()

    def check(self, product: str, size: int) -> str | None:
        """The reason a ``size``-byte image of ``product`` may not be written now (None: it may)."""
        why = self._check(product, size)
        if why is not None and self.clock() - self._scanned >= RESCAN_S:  # room freed by curation since?
            self._scanned = self.clock()
            self.store.rescan()
            why = self._check(product, size)
        return why

    def _check(self, product: str, size: int) -> str | None:
        u = self.store.usage()
        if product not in u.names and u.products >= self.s.capture_max_products:
            return "max_products"
        if u.bytes + size > self.s.capture_max_bytes:
            return "max_bytes"
        return None

    def limit(self, reason: str) -> int:
        return {"max_products": self.s.capture_max_products, "max_bytes": self.s.capture_max_bytes,
                "max_images": self.s.capture_max_per_product}[reason]

    def message(self, reason: str, product: str) -> str:
        u = self.store.usage()
        return {"max_products": f"capture of a new product {product} refused: {u.products} products already in the "
                                f"capture directory (capture_max_products {self.s.capture_max_products})",
                "max_bytes": f"capture of {product} refused: {u.bytes} bytes of captured images, the next would pass "
                             f"capture_max_bytes {self.s.capture_max_bytes}",
                "max_images": f"automatic capture of {product} stopped at capture_max_per_product "
                              f"{self.s.capture_max_per_product} images (select frames to add more)"}[reason]

    def refuse(self, product: str, reason: str, **detail) -> None:
        """Count a refusal; report it once per (product, reason), rate-limited per reason."""
        self.stats[f"refused_{reason}"] += 1
        key = (product, reason)
        if key in self._reported:
            self._reported.move_to_end(key)
            return
        self._reported[key] = None
        while len(self._reported) > MAX_REPORTED:
            self._reported.popitem(last=False)
        now = self.clock()
        start, n = self._window.get(reason, (now, 0))
        if now - start >= 60.0:
            start, n = now, 0
        if n >= PER_MINUTE:
            self._window[reason] = (start, n)
            self._suppressed[reason] += 1
            self.stats["refusals_suppressed"] += 1
            return
        self._window[reason] = (start, n + 1)
        self.emit(product, reason, limit=self.limit(reason), message=self.message(reason, product), **detail)

    def emit(self, product: str, reason: str, **detail) -> None:
        suppressed = self._suppressed.pop(reason, 0)
        ev = OnboardEvent("capture_refused", product, {"reason": reason, **detail,
                                                       **({"suppressed": suppressed} if suppressed else {})})
        self.pending.append(ev)
        log.warning("capture_refused", product=product, reason=reason, **{k: v for k, v in ev.detail.items()
                                                                        if k not in ("reason", "frame_ids")})

    def take(self) -> list[OnboardEvent]:
        out, self.pending = self.pending, []
        return out
