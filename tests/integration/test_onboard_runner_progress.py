"""Issue #26 item 6 at the console's shape: the real console app (aiohttp server, its Onboard runner, its
read API) runs a child that writes 1 MB of tqdm-style ``\\r`` progress with no newline, as a real training
does, then exits 0. The run ends with rc 0 (not "running" for ever), its progress is a structured event, its
output stays bounded, and the next Onboard is accepted (202, not 409). The child is this test's own script
(the runner's process handling is under test; `linewatch onboard`'s own steps are
tests/integration/test_camera_onboarding.py)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from contracts.config import Settings
from stream.console.app import RUNNER_KEY, build_app
from stream.console.onboarding import OnboardRunner
from stream.console.state import ConsoleState

pytestmark = pytest.mark.integration
TOKEN = "t-progress-123"
CHILD = ("import sys\n"
         "for i in range(20000):\n"
         "    sys.stdout.write(f'\\rtrain {i:6d}/20000 |' + '#' * 40 + '| loss 0.1234')\n"
         "    sys.stdout.flush() if i % 500 == 0 else None\n"
         "sys.stdout.write('\\n{\"summary\": 1}\\n')\n")


class _Runner(OnboardRunner):
    def argv(self, product: str, detector: str) -> list[str]:
        return [sys.executable, "-c", CHILD]


async def test_onboard_runner_survives_a_megabyte_of_progress(reliability):
    from aiohttp.test_utils import TestClient, TestServer

    s = Settings(console_token=TOKEN, console_onboard_runner="local")
    app = build_app(s, "127.0.0.1:1", state=ConsoleState(), connect=False)
    events: list = []
    app[RUNNER_KEY] = _Runner(s, "127.0.0.1:1", lambda kind, payload: events.append((kind, payload)))
    c = TestClient(TestServer(app))
    await c.start_server()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    runs, ended = 0, 0
    try:
        for _ in range(2):
            r = await c.post("/api/onboarding/elpv/onboard", json={}, headers=auth)
            assert r.status == 202, await r.text()  # the second: the first ended, so not 409
            runs += 1
            for _ in range(300):
                running = (await (await c.get("/api/onboarding")).json())["running"]
                if "elpv" not in running:
                    break
                await asyncio.sleep(0.1)
            st = app[RUNNER_KEY].status("elpv")
            ended += st["rc"] is not None
            assert st["rc"] == 0 and st["bytes"] > 1_000_000, {k: v for k, v in st.items() if k != "output"}
            assert st["output"][-1] == '{"summary": 1}' and len(st["output"]) <= 40
            assert st["progress"]["updates"] == 19999 and st["progress"]["text"].startswith("train  19998/20000")
        assert any(k == "onboard_progress" and "text" not in p for k, p in events)  # no output text on SSE
    finally:
        reliability.record_counts("onboard_runner_long_progress", frames_sent=runs, lost=runs - ended,
                                  unit="onboard runs (lost: rc never recorded)")
        await app[RUNNER_KEY].stop()
        await c.close()
