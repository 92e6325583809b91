"""The console's live-update fan-out: every state change to each connected SSE client, in bounded memory.

Each client has a bounded queue; past it the oldest event is dropped (counted: ``Hub.dropped`` and
``linewatch_console_sse_dropped_total``) and the client is told to reload its views. Live clients are capped
(``SSE_CLIENTS``), anonymous ones separately (``SSE_ANONYMOUS``): the rest is kept for console token holders.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from stream.console.metrics import ConsoleMetrics

SSE_QUEUE = 512  # events buffered per live client (past it the oldest is dropped, counted, and the page reloads)
SSE_CLIENTS = 64  # live clients at once (each holds at most SSE_QUEUE events)
SSE_ANONYMOUS = 48  # of which without the console token: the rest is kept for token holders


class SseClient:
    """One live client: its bounded queue, whether it showed the token, what was dropped for it."""

    def __init__(self, token_holder: bool):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=SSE_QUEUE)
        self.token_holder = token_holder
        self.dropped = 0
        self.reported = 0  # drops the client was told of (a ``hello``: its page reloads the views)


class Hub:
    """Fan-out of state changes to the connected SSE clients: a bounded queue each, the oldest event dropped
    (and counted: ``dropped``, ``linewatch_console_sse_dropped_total``) when a client falls behind."""

    def __init__(self, metrics: ConsoleMetrics | None = None) -> None:
        self.clients: set[SseClient] = set()
        self.dropped = 0
        self.metrics = metrics

    def refusal(self, token_holder: bool) -> str | None:
        """Why a new live client cannot connect now (None: it can)."""
        if len(self.clients) >= SSE_CLIENTS:
            return f"too many live clients (max {SSE_CLIENTS}); the pages still load without live updates"
        if not token_holder and sum(not c.token_holder for c in self.clients) >= SSE_ANONYMOUS:
            return (f"too many anonymous live clients (max {SSE_ANONYMOUS}; the other {SSE_CLIENTS - SSE_ANONYMOUS} "
                    "are kept for console token holders); the pages still load without live updates")
        return None

    def connect(self, token_holder: bool) -> SseClient:
        c = SseClient(token_holder)
        self.clients.add(c)
        return c

    def close(self, c: SseClient) -> None:
        self.clients.discard(c)
        if c.queue.full():
            c.queue.get_nowait()
        c.queue.put_nowait(None)

    def _put(self, c: SseClient, msg: bytes | None) -> None:
        if c.queue.full():
            c.queue.get_nowait()
            c.dropped += 1
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.sse_dropped.inc()
        c.queue.put_nowait(msg)

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        if not self.clients:
            return
        msg = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
        for c in list(self.clients):
            self._put(c, msg)
