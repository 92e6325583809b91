"""Issue #26 item 11 (console): 10,000 cameras do not sink the console, and anonymous live clients cannot
take every live-update slot. The real app (aiohttp test server, no Kafka) and its real state; the browser
wall's cap is read from /api/config."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from contracts.config import Settings
from contracts.envelope import InspectionResult
from stream.console import app as console_app
from stream.console import hub as console_hub
from stream.console.state import ConsoleState

TOKEN = "t-bounds-123"


def _result(i: int, camera: str) -> InspectionResult:
    return InspectionResult(frame_id=f"f{i}", camera=camera, line="l1", model="m", model_version="1", task="",
                            routed=False, route_distance=None, score=0.1, threshold=0.5, is_anomaly=False,
                            product="bottle", latency_ms={"e2e": 10.0, "infer": 2.0}, ts_ms=1_000 + i,
                            processed_ts_ms=1_000 + i)


async def _client(settings: Settings, st: ConsoleState):
    from aiohttp.test_utils import TestClient, TestServer

    c = TestClient(TestServer(console_app.build_app(settings, "127.0.0.1:1", state=st, connect=False)))
    await c.start_server()
    return c


async def test_ten_thousand_cameras_through_the_console_stay_bounded():
    st = ConsoleState()
    c = await _client(Settings(console_token=TOKEN), st)
    try:
        hub = c.server.app[console_app.HUB_KEY]
        slow = hub.connect(token_holder=False)  # a live client that reads nothing
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for rnd in range(3):  # each camera three times: 30,000 results
            for i in range(10_000):
                st.apply_result(_result(rnd * 10_000 + i, f"cam-{i:05d}"))
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(st.cameras) <= st.max_cameras
        assert list(st.cameras)[-1] == "cam-09999"  # least recently seen evicted, newest kept
        assert slow in hub.clients and slow.queue.qsize() <= console_hub.SSE_QUEUE  # kept, drop-oldest
        assert slow.dropped == 30_000 - console_hub.SSE_QUEUE and hub.dropped == slow.dropped
        assert grown < 16 * 1024 * 1024, grown
        cams = (await (await c.get("/api/cameras")).json())["cameras"]
        assert len(cams) == len(st.cameras) <= st.max_cameras
        cfg = await (await c.get("/api/config")).json()
        assert cfg["max_cameras"] == st.max_cameras  # the wall's tile cap (pages.js evicts past it)
        text = await (await c.get("/metrics")).text()
        assert f"linewatch_console_sse_dropped_total {float(slow.dropped)}" in text
    finally:
        await c.close()


def test_wall_evicts_least_recently_seen_tiles():
    from pathlib import Path

    js = (Path(console_app.__file__).parent / "static" / "pages.js").read_text()
    assert "LW.config.max_cameras" in js and "wall.tiles.delete(" in js


async def _open(c, **kw):
    r = await c.get("/events", **kw)
    if r.status == 200:
        assert (await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)).startswith(b"retry:")
    return r


async def test_token_holder_still_connects_when_anonymous_clients_fill_their_share(monkeypatch):
    monkeypatch.setattr(console_hub, "SSE_CLIENTS", 6)
    monkeypatch.setattr(console_hub, "SSE_ANONYMOUS", 4)
    c = await _client(Settings(console_token=TOKEN), ConsoleState())
    held = []
    try:
        for _ in range(4):
            held.append(await _open(c))
            assert held[-1].status == 200
        extra = await _open(c)
        assert extra.status == 503 and "anonymous" in (await extra.json())["error"]
        bad = await _open(c, params={"token": "wrong"})
        assert bad.status == 401
        held.append(await _open(c, headers={"Authorization": f"Bearer {TOKEN}"}))
        assert held[-1].status == 200
        held.append(await _open(c, params={"token": TOKEN}))  # EventSource cannot set headers
        assert held[-1].status == 200
        full = await _open(c, params={"token": TOKEN})
        assert full.status == 503
    finally:
        for r in held:
            r.close()
        await c.close()


@pytest.mark.parametrize("spec", ["/dev/video0\n", "/dev/video12\n"])
def test_device_path_with_a_trailing_newline_is_not_a_camera_device(spec):
    """``$`` matched before a trailing newline: ``/dev/video0\\n`` opened device 0. Now it is no device (a
    file that does not exist: a clear error)."""
    from contracts.cli import UsageError
    from stream.sources.inputs import StreamSource, open_source

    assert isinstance(open_source(spec.strip()), StreamSource)
    try:
        src = open_source(spec)
    except (UsageError, FileNotFoundError, ValueError):
        return
    assert not isinstance(src, StreamSource), src
