"""`linewatch console` in a real browser (issue 18 items 2 + 4): headless Chromium (Debian's chromium +
chromedriver, found on PATH) driven by Selenium, against the real session stack (Tansu + tritonserver), the real
exported bottle detector (the ``detector`` fixture), a Faust worker and the console, both as subprocesses.

A video is written with cv2.VideoWriter from real MVTec bottle test images (good first, then defective) and
streamed by `linewatch camera` (JPEG frames, paced); which image each published frame shows is found by
comparing it with the video's frames (so a dropped frame cannot shift the ground truth). The serving-state entry and
the ``promoted`` event the rollout controller writes for a served version are published here for the version
the fixture loaded (the controller's own rollouts are tests/integration/test_rollout.py's).

Checked in the browser: the camera wall shows the camera; the defect gallery shows every flagged frame with
its boxes, defective frames among them; the models page lists the serving version; a feedback click with the
token produces a record on the feedback topic (and the models page then shows the threshold proposal).
Screenshots of every page go to ``$CONSOLE_SCREENSHOTS_DIR`` (``docs/console`` to refresh the committed
ones), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import orjson
import pytest

from contracts.envelope import Frame, decode_defect_event, decode_result, encode_frame
from contracts.model_events import ModelEvent
from contracts.serving_state import entries_for
from devstack.processes import ChildProcess, free_port
from devstack.worker_process import WorkerProcess
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.browser import browser, needs_browser, shot, wait_for
from tests.harness.line import STEP_CAP_S

pytestmark = [pytest.mark.integration, *needs_browser]
TOKEN = "console-test-" + uuid.uuid4().hex[:12]
GOOD = ["good/004.png", "good/005.png", "good/006.png", "good/018.png", "good/000.png", "good/001.png",
        "good/002.png", "good/003.png"]
# the line goes bad: defective bottles after the good ones, the most obvious (contamination) last and seen
# twice, so the worker's drift check (window 8) sees the anomaly rate rise
DEFECTIVE = ["broken_small/012.png", "broken_large/018.png", "broken_large/012.png", "contamination/015.png",
             "contamination/011.png", "contamination/013.png", "contamination/017.png", "contamination/019.png",
             "contamination/017.png", "contamination/019.png"]
SIDE = 448  # video frame size (the bottle images are 900x900)


def _video(path: Path, bottle_test: Path, names: list[str]) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (SIDE, SIDE))
    assert w.isOpened(), "OpenCV cannot write an MJPG video here"
    for n in names:
        img = cv2.imread(str(bottle_test / n), cv2.IMREAD_COLOR)
        w.write(cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    w.release()
    return path


def _camera(boot: str, topic: str, video: Path, camera: str, fps: float, log: Path) -> str:
    """`linewatch camera` (the camera publisher, a subprocess) streams the video file as JPEG frames."""
    p = subprocess.run([sys.executable, "-m", "stream.ops.cli", "camera", "--source", str(video), "--camera-id", camera,
                        "--line-id", "line-console", "--product", "bottle", "--fps", str(fps), "--bootstrap", boot,
                        "--topic", topic], capture_output=True, text=True, timeout=120)
    log.write_text(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout.strip().splitlines()[-1]


def _sources(boot: str, topic: str, video: Path, names: list[str]) -> dict[str, str]:
    """frame_id -> the bottle image each published frame shows (nearest video frame: robust to dropped frames)."""
    cap, refs = cv2.VideoCapture(str(video)), []
    for _ in names:
        ok, img = cap.read()
        assert ok
        refs.append(cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32))
    cap.release()
    out = {}
    for r in asyncio.run(read_topics(boot, [topic], timeout_s=30, idle_s=2.0))[topic]:
        small = cv2.resize(cv2.imdecode(np.frombuffer(r.value, np.uint8), cv2.IMREAD_COLOR), (64, 64),
                           interpolation=cv2.INTER_AREA).astype(np.float32)
        k = int(np.argmin([np.abs(small - ref).mean() for ref in refs]))
        out[dict(r.headers)["frame_id"].decode()] = names[k]
    return out


def _served(stack, model: str) -> tuple[int, dict]:
    d = Path(stack.model_repository) / model
    version = max(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())
    return version, json.loads((d / str(version) / "metadata.json").read_text())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_console_pages_and_feedback_in_a_real_browser(stack, detector, bottle_test, tmp_path):
    t0 = time.monotonic()
    uid = uuid.uuid4().hex[:6]
    t = {k: f"console-{uid}-{k}" for k in ("frames", "results", "defects", "dlq", "drift", "events", "state",
                                           "dstate", "feedback")}
    boot = stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, [t[k] for k in ("frames", "results", "defects", "dlq", "drift", "events",
                                                    "feedback")]))
    asyncio.run(ensure_topics(boot, [t["state"], t["dstate"]], config={"cleanup.policy": "compact"}))
    version, spec = _served(stack, detector)
    entries = entries_for(detector, version, spec)  # one per product (or per task of a multi-task model)
    promoted = ModelEvent("promoted", detector, version, product="bottle", detector=spec.get("detector"),
                          reasons=["shadow: 32 frames, 0 errors"])

    async def announce():  # what the controller writes after a promotion: serving state, then the outcome
        async with Producer(boot) as p:
            await p.send_many(t["state"], [(e.key, e.to_json(), []) for e in entries])
            await p.send_many(t["events"], [(promoted.key, promoted.to_json(), [])])

    asyncio.run(announce())
    env = {"LINEWATCH_TOPIC_FRAMES": t["frames"], "LINEWATCH_TOPIC_RESULTS": t["results"],
           "LINEWATCH_TOPIC_DEFECTS": t["defects"], "LINEWATCH_TOPIC_DLQ": t["dlq"], "LINEWATCH_TOPIC_DRIFT": t["drift"],
           "LINEWATCH_TOPIC_MODEL_EVENTS": t["events"], "LINEWATCH_TOPIC_SERVING_STATE": t["state"],
           "LINEWATCH_TOPIC_DRIFT_STATE": t["dstate"], "LINEWATCH_TOPIC_FEEDBACK": t["feedback"]}
    port = free_port()
    drv = browser()
    console = ChildProcess([sys.executable, "-m", "stream.ops.cli", "console", "--bootstrap", boot,
                            "--port", str(port)], tmp_path / "console.log",
                           {**env, "LINEWATCH_CONSOLE_TOKEN": TOKEN})
    drift = {"LINEWATCH_DRIFT__WINDOW": "8", "LINEWATCH_DRIFT__CHECK_EVERY": "4", "LINEWATCH_DRIFT__WARMUP": "10",
             "LINEWATCH_DRIFT__MIN_INTERVAL_S": "0", "LINEWATCH_DRIFT__RETRAIN_ON_OOD": "false"}
    worker = WorkerProcess(boot, stack.triton_grpc_url, tmp_path, app_id=f"lw-console-{uid}", batch_max=4,
                           batch_within=0.05, log_path=tmp_path / "worker.log", env={**env, **drift},
                           extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                       "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]])
    out = Path(os.environ.get("CONSOLE_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    camera = "cam-bottle-1"

    def logs() -> str:
        return f"--- console\n{console.log()[-3000:]}\n--- worker\n{worker.log()[-3000:]}"

    try:
        console.start()
        worker.start()

        def up():
            assert console.alive(), logs()
            try:
                return _get(base + "/healthz")["ok"]
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(up, 60, "the console to listen", logs)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import Select, WebDriverWait

        wait = WebDriverWait(drv, 20)
        drv.get(base + "/#/wall")  # open before the camera starts: the wall fills in live (server-sent events)
        # the token first: frame images and heat maps are for token holders only (issue #26 item 7)
        drv.find_element(By.ID, "token").send_keys(TOKEN)
        drv.find_element(By.ID, "token-save").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
        names = GOOD + DEFECTIVE
        video = _video(tmp_path / "line.avi", bottle_test, names)
        published = _camera(boot, t["frames"], video, camera, 6.0, tmp_path / "camera.log")
        shows = _sources(boot, t["frames"], video, names)
        ids = list(shows)
        assert len(ids) >= len(names) - 2, f"{published}: {len(ids)} of {len(names)} frames"

        async def bad_frames():  # two frames the worker must DLQ (decode stage, no inference)
            async with Producer(boot) as p:
                for i, payload in enumerate((b"", b"not an image at all " * 4)):
                    k, v, h = encode_frame(Frame(frame_id=f"bad-{uid}-{i}", camera_id=camera, ts_ms=int(time.time() * 1000),
                                                 image=payload or b"x", product="bottle"))
                    await p.send_many(t["frames"], [(k, payload, h)])

        asyncio.run(bad_frames())

        def all_scored(o):
            return {decode_result(r.value).frame_id for r in o[t["results"]]} >= set(ids) and len(o[t["dlq"]]) >= 2

        recs = asyncio.run(read_topics(boot, [t["results"], t["defects"], t["dlq"], t["drift"]], until=all_scored,
                                       timeout_s=STEP_CAP_S))
        assert all_scored(recs), f"not every frame was scored\n{logs()}"
        results = {r.frame_id: r for r in map(lambda x: decode_result(x.value), recs[t["results"]]) if r.frame_id in shows}
        events = {e.result.frame_id: e for e in map(lambda x: decode_defect_event(x.value), recs[t["defects"]])}
        flagged = {f for f, r in results.items() if r.is_anomaly}
        scores = sorted(((round(r.score, 4), shows[f]) for f, r in results.items()), reverse=True)
        defective = [f for f in flagged if not shows[f].startswith("good/")]
        assert defective, f"the detector flagged no defective frame (score, truth): {scores}"
        assert events.keys() >= flagged, f"flagged frames without a defect event: {flagged - events.keys()}"
        print(f"\nconsole: {published}; {len(ids)} frames, flagged {len(flagged)} ({len(defective)} defective), scores {scores}, "
              f"{len(recs[t['drift']])} drift alerts; streamed at {time.monotonic() - t0:.1f}s")

        # the console applied everything (its API), then the pages in the browser
        wait_for(lambda: _get(base + "/api/defects?limit=500")["kept"] >= len(flagged), 30, "the console's defects", logs)
        sel = f'.tile[data-camera="{camera}"]'
        def frames_on_tile(d) -> int:
            m = [re.search(r"(\d+) frames", e.text) for e in d.find_elements(By.CSS_SELECTOR, sel)]
            return int(m[0].group(1)) if m and m[0] else 0

        wait.until(lambda d: frames_on_tile(d) >= len(ids))  # every result arrived live: no reload
        assert drv.execute_script("return location.hash") == "#/wall"
        tile = drv.find_element(By.CSS_SELECTOR, sel)
        assert camera in tile.text and ("OK" in tile.text or "ANOMALY" in tile.text)
        assert wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('.tile img.frame'); return i && i.complete && i.naturalWidth > 0;"))
        assert tile.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
        time.sleep(1.0)
        shot(drv, out, "wall")

        drv.get(base + "/#/defects")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card")))
        cards = {c.get_attribute("data-frame-id"): c for c in drv.find_elements(By.CSS_SELECTOR, "#gallery .card")}
        assert set(cards) >= flagged, f"gallery lacks flagged frames {flagged - set(cards)}"
        for f in flagged:
            assert len(cards[f].find_elements(By.CSS_SELECTOR, ".box")) == len(events[f].boxes)
        assert any(events[f].boxes for f in defective), "no defective frame has a box"
        assert wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#gallery img.heat')].some(i => i.complete && i.naturalWidth > 0);"))
        Select(drv.find_element(By.ID, "f-camera")).select_by_visible_text(camera)
        drv.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
        wait.until(lambda d: d.find_element(By.ID, "f-camera").get_attribute("value") == camera)
        assert len(drv.find_elements(By.CSS_SELECTOR, "#gallery .card")) == len(flagged)
        assert _get(base + "/api/defects?camera=no-such-camera")["matched"] == 0
        time.sleep(0.5)
        shot(drv, out, "defects")

        # feedback: confirm a defective frame (and call a flagged good one a false alarm), with the token
        target = max(defective, key=lambda f: len(events[f].boxes))
        drv.get(base + f"/#/defect/{target}")
        btn = wait.until(ec.element_to_be_clickable((By.ID, "btn-confirm")))
        assert len(drv.find_elements(By.CSS_SELECTOR, ".shot.big .box")) == len(events[target].boxes)
        btn.click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "feedback-status"), "recorded"))
        shot(drv, out, "defect")
        false_alarms = [f for f in flagged if shows[f].startswith("good/")]
        for f in false_alarms[:1]:
            drv.get(base + f"/#/defect/{f}")
            wait.until(ec.element_to_be_clickable((By.ID, "btn-false-alarm"))).click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "feedback-status"), "recorded"))

        fb = asyncio.run(read_topics(boot, [t["feedback"]], timeout_s=30,
                                     until=lambda o: any(orjson.loads(r.value)["frame_id"] == target
                                                         for r in o[t["feedback"]])))[t["feedback"]]
        mine = [orjson.loads(r.value) for r in fb if orjson.loads(r.value)["frame_id"] == target]
        assert mine and mine[0]["verdict"] == "confirmed" and mine[0]["model"] == detector
        assert mine[0]["score"] == pytest.approx(results[target].score) and mine[0]["product"] == "bottle"
        # without the token (or with a wrong one) the action is refused
        req = urllib.request.Request(base + f"/api/defects/{target}/feedback", data=b'{"verdict":"confirmed"}',
                                     method="POST", headers={"Authorization": "Bearer wrong",
                                                             "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 401

        drv.get(base + "/#/models")
        serving = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#serving")))
        assert detector in serving.text and f"v{version}" in serving.text
        assert "promoted" in drv.find_element(By.ID, "rollouts").text
        proposals = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#proposals")))
        assert "bottle" in proposals.text
        if false_alarms and results[false_alarms[0]].score < results[target].score:
            assert "no proposal" not in proposals.text, proposals.text
        shot(drv, out, "models")

        drv.get(base + "/#/throughput")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#dlq")))
        dlq = drv.find_element(By.ID, "dlq").text
        assert "empty_payload" in dlq and "unsupported_format" in dlq, dlq
        shot(drv, out, "throughput")

        drv.get(base + "/#/drift")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table#drift") or "no drift alert" in d.page_source)
        if recs[t["drift"]]:
            assert drv.find_elements(By.CSS_SELECTOR, "table#drift tbody tr")
        shot(drv, out, "drift")
        print(f"console browser test: {time.monotonic() - t0:.1f}s, screenshots in {out}")
        assert console.alive() and worker.alive(), logs()
    finally:
        drv.quit()
        worker.stop()
        console.stop()
