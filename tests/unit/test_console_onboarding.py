"""The console's onboarding page without Kafka: folding onboarding records and unknown-product DLQ records
(stream/console/onboarding.py), the actions' token / input checks, and the Onboard action's real child
process (`linewatch onboard`, which refuses a product with too few captured images before touching Kafka).
The whole loop in a browser on the real stack is tests/integration/test_camera_onboarding.py."""

from __future__ import annotations

import asyncio
import sys

import pytest

from contracts.config import Settings
from stream.console.onboarding import MAX_CANDIDATES, OnboardingView, OnboardRunner, RunnerRefused
from stream.console.state import ConsoleState
from stream.lifecycle.onboarding import OnboardEvent

TOKEN = "t-onboarding-123"


def _ev(type_, product="elpv", run=None, ts=1, **detail):
    return OnboardEvent(type_, product, detail, run_id=run, ts_ms=ts)


def _progress(view, product="elpv"):
    p = next(x for x in view.view() if x["product"] == product)
    return {s["step"]: s["state"] for s in p["runs"][0]["progress"]}


def test_dlq_unknown_product_frames_become_candidates_and_captures_mark_them():
    st = ConsoleState()
    seen = []
    st.on_change = lambda kind, payload: seen.append(kind)
    for i in range(3):
        st.apply_dlq({"error": b"unknown_product", "frame_id": f"c{i}".encode(), "camera_id": b"cam-e",
                      "product": b"elpv", "error_ts_ms": str(1000 + i).encode()}, 10)
    st.apply_dlq({"error": b"empty_payload", "frame_id": b"x", "product": b"elpv"}, 0)  # not a candidate
    st.apply_dlq({"error": b"unknown_product", "frame_id": b"y", "product": b"../etc"}, 5)  # no safe product
    st.apply_onboard_event(_ev("captured", count=2, frame_ids=["c0", "c1"], ts=2000))
    st.apply_onboard_event(_ev("capture_select", frame_ids=["c2"], ts=2001))
    (p,) = st.onboarding.view()
    assert p["captured"] == 2 and [c["frame_id"] for c in p["candidates"]] == ["c2", "c1", "c0"]
    assert [c["captured"] for c in p["candidates"]] == [False, True, True] and p["candidates"][0]["selected"]
    assert "onboarding" in seen
    for i in range(MAX_CANDIDATES + 5):
        st.onboarding.apply_candidate("elpv", f"n{i}", "cam", i)
    assert len(st.onboarding.view()[0]["candidates"]) == MAX_CANDIDATES


def test_run_progress_done_active_failed_and_outcomes():
    v = OnboardingView()
    v.apply_event(_ev("onboard_started", run="r1", ts=1, model="moleflow", images=20))
    v.apply_event(_ev("training_started", run="r1", ts=2, runner="local"))
    assert _progress(v) == {"onboard_started": "done", "training_started": "done", "training_finished": "active",
                            "released": "pending", "promoted": "pending"}
    v.apply_event(_ev("training_started", run="r1", ts=2, runner="local"))  # a replayed record: applied once
    assert len(v.view()[0]["runs"][0]["steps"]) == 2
    v.apply_event(_ev("failed", run="r1", ts=3, step="training", error="exit code 1"))
    assert _progress(v) == {"onboard_started": "done", "training_started": "done", "training_finished": "failed",
                            "released": "skipped", "promoted": "skipped"}
    for i, t in enumerate(("onboard_started", "training_started", "training_finished", "released", "rolled_back")):
        v.apply_event(_ev(t, run="r2", ts=10 + i))
    p = v.view()[0]
    assert p["runs"][0]["run_id"] == "r2" and p["runs"][0]["outcome"] == "rolled_back"
    assert _progress(v)["rolled_back"] == "failed" and _progress(v)["released"] == "done"
    v.apply_event(_ev("onboard_started", run="r3", ts=20))
    v.apply_event(_ev("promoted", run="r3", ts=25))
    assert v.view()[0]["runs"][0]["outcome"] == "promoted"


async def _client(settings: Settings, st: ConsoleState):
    from aiohttp.test_utils import TestClient, TestServer

    from stream.console.app import build_app

    client = TestClient(TestServer(build_app(settings, "127.0.0.1:1", state=st, connect=False)))
    await client.start_server()
    return client


async def test_onboarding_actions_need_the_token_and_check_their_input(tmp_path):
    st = ConsoleState()
    st.apply_onboard_event(_ev("captured", count=1, frame_ids=["a"]))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    c = await _client(Settings(console_token=TOKEN, capture_dir=tmp_path, console_onboard_runner="off"), st)
    try:
        d = await (await c.get("/api/onboarding")).json()
        assert d["runner"] == "off" and d["products"][0]["product"] == "elpv" and d["products"][0]["captured"] == 1
        assert (await c.get("/static/onboarding.js")).status == 200
        assert (await c.post("/api/onboarding/elpv/onboard", json={})).status == 401
        off = await c.post("/api/onboarding/elpv/onboard", json={}, headers=auth)
        assert off.status == 403 and "console_onboard_runner" in (await off.json())["error"]
        assert (await c.post("/api/onboarding/elpv/select", json={"frame_ids": ["a"]})).status == 401
        for bad in ({"frame_ids": []}, {"frame_ids": "a"}, {"frame_ids": [1]}, [1, 2]):
            assert (await c.post("/api/onboarding/elpv/select", json=bad, headers=auth)).status == 400, bad
        assert (await c.post("/api/onboarding/elpv/select", data=b"{", headers=auth)).status == 400
        # no broker behind this app: the selection is not recorded, and says so
        down = await c.post("/api/onboarding/elpv/select", json={"frame_ids": ["a"]}, headers=auth)
        assert down.status == 503 and "not recorded" in (await down.json())["error"]
    finally:
        await c.close()


async def test_onboard_action_runs_linewatch_onboard_and_shows_its_exit(tmp_path):
    """The real child process: `linewatch onboard` with no captured images exits 2 with one line (no Kafka)."""
    s = Settings(console_token=TOKEN, capture_dir=tmp_path, console_onboard_runner="local", onboard_min_images=4)
    st = ConsoleState()
    st.apply_onboard_event(_ev("captured", count=1, frame_ids=["a"]))  # the page lists elpv (no image on disk)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    c = await _client(s, st)
    try:
        for body, status in (({"detector": "nope"}, 400), ({}, 202)):
            r = await c.post("/api/onboarding/elpv/onboard", json=body, headers=auth)
            assert r.status == status, await r.text()
        started = await r.json()
        assert started["rc"] is None and started["mode"] == "local" and started["detector"] == "moleflow"
        assert (await c.post("/api/onboarding/bad%20name/onboard", json={}, headers=auth)).status == 400
        for _ in range(200):
            runner = (await (await c.get("/api/onboarding")).json())
            if "elpv" not in runner["running"]:
                break
            await asyncio.sleep(0.1)
        app_runner = c.server.app
        from stream.console.app import RUNNER_KEY

        status = app_runner[RUNNER_KEY].status("elpv")
        assert status["rc"] == 2, status
        assert any("only 0 captured images of elpv" in line for line in status["output"]), status["output"]
        # the runner's output is for token holders (issue #26 item 7): left out of the read API without the token
        anon = {p["product"]: p for p in (await (await c.get("/api/onboarding")).json())["products"]}
        held = {p["product"]: p for p in (await (await c.get("/api/onboarding", headers=auth)).json())["products"]}
        assert anon["elpv"]["runner"]["rc"] == 2 and "output" not in anon["elpv"]["runner"]
        assert any("only 0 captured images" in line for line in held["elpv"]["runner"]["output"])
        again = await c.post("/api/onboarding/elpv/onboard", json={}, headers=auth)  # ended: may run again
        assert again.status == 202
    finally:
        await c.close()


def test_runner_argv_and_limits():
    s = Settings(console_onboard_runner="k8s", console_onboard_args=["--epochs", "1"])
    r = OnboardRunner(s, "b:9092")
    argv = r.argv("elpv", "moleflow")
    assert argv[1:4] == ["-m", "stream.ops.cli", "onboard"] and "--k8s" in argv and argv[-3:] == ["--", "--epochs", "1"]
    assert ["--product", "elpv"] == argv[argv.index("--product"):argv.index("--product") + 2] and r.limit == 4
    assert OnboardRunner(Settings(console_onboard_runner="local"), "b:1").limit == 1
    with pytest.raises(RunnerRefused) as e:
        asyncio.run(OnboardRunner(Settings(console_onboard_runner="off"), "b:1").start("elpv", "moleflow"))
    assert e.value.status == 403


class _ChildRunner(OnboardRunner):
    """The runner with an arbitrary child command in place of `linewatch onboard` (its process handling is
    what is under test: the real child, pipe and exit code)."""

    def __init__(self, settings: Settings, child: list[str]):
        super().__init__(settings, "b:1")
        self.child = child

    def argv(self, product: str, detector: str) -> list[str]:
        return self.child


async def test_runner_survives_a_megabyte_of_carriage_return_progress():
    """Issue #26 item 6: tqdm writes ``\\r`` with no newline; 1 MB of it is one "line" past asyncio's 64 KiB
    limit. The run must still end with the child's exit code, its progress as bounded events, and a later
    Onboard accepted (not 409)."""
    child = ("import sys\n"
             "for i in range(20000):\n"
             "    sys.stdout.write(f'\\rtrain {i:6d}/20000 |' + '#' * 40 + '| loss 0.1234')\n"
             "sys.stdout.write('\\n{\"summary\": 1}\\n'); sys.stdout.flush()\n")
    r = _ChildRunner(Settings(console_onboard_runner="local"), [sys.executable, "-c", child])
    events: list = []
    r.on_change = lambda kind, payload: events.append((kind, payload))
    await r.start("elpv", "moleflow")
    for _ in range(300):
        if r.status("elpv")["rc"] is not None:
            break
        await asyncio.sleep(0.1)
    st = r.status("elpv")
    assert st["rc"] == 0, {k: v for k, v in st.items() if k != "output"}
    assert "elpv" not in r.running()
    # the last bar (ended by \n) and the summary are output lines; every \r-ended bar before was progress
    assert st["output"][-2].startswith("train  19999/20000") and st["output"][-1] == '{"summary": 1}'
    assert len(st["output"]) <= 40 and all(len(x) <= 400 for x in st["output"])
    assert st["progress"]["text"].startswith("train  19998/20000") and st["progress"]["updates"] == 19999
    assert st["bytes"] > 1_000_000 and [k for k, _ in events].count("onboard_progress") >= 1
    again = await r.start("elpv", "moleflow")  # ended: accepted, not 409
    assert again["rc"] is None
    await r.stop()


def test_capture_refusals_show_on_the_product_and_clear_the_requested_mark():
    v = OnboardingView()
    v.apply_candidate("elpv", "c0", "cam", 1)
    v.apply_event(_ev("capture_select", frame_ids=["c0"], ts=2))
    assert v.view()[0]["candidates"][0]["selected"]
    v.apply_event(_ev("capture_refused", ts=3, reason="selection_not_buffered", frame_ids=["c0"],
                      message="1 selected frame(s) were no longer buffered"))
    p = v.view()[0]
    assert p["refused"]["reason"] == "selection_not_buffered" and "no longer buffered" in p["refused"]["message"]
    assert not p["candidates"][0]["selected"]  # the page no longer says "requested"
