"""A new product onboarded end to end on the real stack (issue 18 items 1-3), driven from the console in a real
browser: Tansu + tritonserver + the rollout controller + one worker (LocalStack), the capture service
(`linewatch capture`) and the console (`linewatch console`) as processes, headless Debian Chromium (Selenium).

1. A tiny MoLE-Flow serving ``bottle`` is trained, exported, calibrated and released by the training job
   (models/jobs/train_job.py) and promoted by the controller. It is named ``lwt_onboard_mf``, not the
   registry's ``moleflow``: routing sends an unknown product task-agnostically only to the registry-named
   multi-task model (stream/inference/routing.py step 5), so here a product none of its tasks knows is
   DLQ'd ``unknown_product``.
2. ``linewatch camera --source <folder of 14 ELPV cells> --product elpv`` publishes JPEG frames; the worker
   DLQs them ``unknown_product``; the capture service (at most 12 per product here) writes 12 of them to
   ``<capture_dir>/elpv/good``; the console's onboarding page shows the 14 candidates, 12 captured; the
   operator selects one more in the browser (``capture_select``) and it is captured too (13).
3. The operator clicks Onboard: the console runs ``linewatch onboard --product elpv --wait`` (a tiny schedule
   via ``console_onboard_args``): a new version with the ``elpv`` adapter on the same frozen base is
   released, shadowed on its probe images and promoted; the page shows every step (``onboarding-events``).
4. New ELPV cells from a second camera are scored by the new version with task ``elpv`` (results topic) and
   the camera wall shows that camera scored by ``lwt_onboard_mf v2``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from contracts.envelope import decode_result
from devstack.processes import ChildProcess
from devstack.stack import LocalStack
from stream.kafka.clients import read_topics
from stream.lifecycle.onboarding import decode_event
from tests.harness.browser import browser, needs_browser, shot, wait_for
from tests.harness.line import STEP_CAP_S

pytestmark = pytest.mark.integration
TOKEN = "onboard-test-token"

MODEL = "lwt_onboard_mf"
LINEWATCH = str(Path(sys.executable).with_name("linewatch"))
# a tiny calibration set (6 held-out images): its largest score lies above its own 99% quantile by
# construction, so one probe in six is "flagged"; the rest of the policy is the default one
POLICY = {"LINEWATCH_ROLLOUT__SHADOW_FRAMES": "8", "LINEWATCH_ROLLOUT__MIN_FRAMES": "4",
          "LINEWATCH_ROLLOUT__SHADOW_TIMEOUT_S": "60", "LINEWATCH_ROLLOUT__RECONCILE_S": "2",
          "LINEWATCH_ROLLOUT__MAX_GOOD_FLAG_RATE": "0.34"}
TINY = ["--dim", "32", "--hidden", "32", "--rank", "4", "--grid", "14", "--epochs", "1", "--max-images", "8"]


def _images(paths, folder: Path) -> Path:
    """The images at 256 px: the training job stores its probe images at <= 256 px and calibrates on the
    originals, so at this size probes and calibration see the same pixels (a tiny model's scores move more
    with a resize than its calibration spread)."""
    folder.mkdir(parents=True)
    for i, p in enumerate(paths):
        img = cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def _outcome(boot: str, version: int, timeout_s: float) -> dict:
    def hit(o):
        return [d for d in (json.loads(r.value) for r in o["model-events"])
                if d.get("model") == MODEL and d.get("version") == version
                and d.get("type") in ("promoted", "rolled_back", "refused")]

    recs = asyncio.run(read_topics(boot, ["model-events"], until=lambda o: bool(hit(o)), timeout_s=timeout_s))
    got = hit(recs)
    assert got, f"no outcome for {MODEL} v{version}"
    return got[0]


def _run(argv, env, timeout_s):
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert p.returncode == 0, (argv[:3], p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    return p


@needs_browser[0]
@needs_browser[1]
def test_unknown_product_is_captured_onboarded_promoted_and_scored(tmp_path, shared_data, monkeypatch):
    from selenium.webdriver.common.by import By

    from devstack.processes import free_port
    from models.jobs import train_job
    from models.moleflow.datasets import elpv_split

    t0 = time.monotonic()
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = round(time.monotonic() - t0 - sum(phases.values()), 1)

    caps, store, base = tmp_path / "captures", tmp_path / "store", tmp_path / "training" / "moleflow"
    for k, v in {**POLICY, "LINEWATCH_CAPTURE_DIR": str(caps), "LINEWATCH_CAPTURE_MAX_PER_PRODUCT": "12"}.items():
        monkeypatch.setenv(k, v)
    import os

    env = dict(os.environ)
    stack = LocalStack(tmp_path / "work", tmp_path / "repo", start_timeout_s=STEP_CAP_S, controller=True, workers=1)
    stack.start()
    capture = console = drv = None
    out_dir = Path(os.environ.get("CONSOLE_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        boot = stack.kafka_bootstrap
        capture = ChildProcess([LINEWATCH, "capture", "--bootstrap", boot], tmp_path / "capture.log").start()
        port = free_port()
        console = ChildProcess([LINEWATCH, "console", "--bootstrap", boot, "--port", str(port)], tmp_path / "console.log",
                               {"LINEWATCH_CONSOLE_TOKEN": TOKEN, "LINEWATCH_ONBOARD_MIN_IMAGES": "13",
                                "LINEWATCH_ONBOARD_MODEL_STORE": str(store),
                                "LINEWATCH_ONBOARD_TRAINING_STORE": str(base.parent),
                                "LINEWATCH_CONSOLE_ONBOARD_ARGS": json.dumps(["--epochs", "1", "--max-images", "8"])}
                               ).start()
        mark("stack")

        def logs() -> str:
            return f"--- console\n{console.log()[-4000:]}\n--- capture\n{capture.log()[-2000:]}"

        # 1. bottle: train + export + calibrate + release (the training job), then the controller's rollout
        bottle = _images(sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:12],
                        tmp_path / "bottle")
        rc = train_job.main(["--detector", "moleflow", "--product", "bottle", "--train-dir", str(bottle),
                             "--store", str(store), "--model", MODEL, "--base-store", str(base),
                             "--bootstrap", boot, "--", *TINY])
        assert rc == 0
        mark("bottle_train")
        out = _outcome(boot, 1, 120)
        assert out["type"] == "promoted", json.dumps(out)
        mark("bottle_rollout")

        # 2. an ELPV camera: an unknown product -> DLQ'd unknown_product -> 12 captured, 2 left as candidates
        drv = browser()
        base_url = f"http://127.0.0.1:{port}"
        drv.get(base_url + "/#/onboarding")
        wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, "#live.on"), STEP_CAP_S, "the console's live events", logs)
        train_cells, test_cells = elpv_split(n_train=14, n_test_good=4, n_test_bad=0)
        cells = _images(train_cells, tmp_path / "cells")
        cam = _run([LINEWATCH, "camera", "--source", str(cells), "--camera-id", "cam-elpv", "--line-id", "line-9",
                    "--product", "elpv", "--fps", "20", "--jpeg-quality", "90", "--bootstrap", boot], env, STEP_CAP_S)
        assert "published 14 frames" in cam.stdout, cam.stdout + cam.stderr[-2000:]
        sec = '.onb[data-product="elpv"]'

        def page_shows(captured: int, candidates: int):
            got = drv.execute_script("const s = document.querySelector(arguments[0]); return s && "
                                     "[s.querySelector('.captured').textContent, s.querySelectorAll('label.cand').length];",
                                     sec)
            return bool(got) and got[0].startswith(f"{captured} images captured") and got[1] >= candidates

        wait_for(lambda: page_shows(12, 14), STEP_CAP_S, "12 captured + 14 candidates on the onboarding page", logs)
        drv.find_element(By.ID, "token").send_keys(TOKEN)
        drv.find_element(By.ID, "token-save").click()
        pick = drv.find_element(By.CSS_SELECTOR, f'{sec} label.cand[data-captured="false"]')
        picked = pick.get_attribute("data-frame-id")
        pick.find_element(By.CSS_SELECTOR, "input").click()
        drv.find_element(By.CSS_SELECTOR, f"{sec} button.capture").click()
        wait_for(lambda: page_shows(13, 14), STEP_CAP_S, "the selected frame captured (13)", logs)
        mark("capture")

        # 3. onboarding from the console: trains the elpv adapter, released -> promoted, each step shown
        wait_for(lambda: drv.find_element(By.CSS_SELECTOR, f"{sec} button.onboard").is_enabled(), 60, "Onboard enabled")
        drv.find_element(By.CSS_SELECTOR, f"{sec} button.onboard").click()

        def step_state(name: str) -> str | None:  # one script: the page redraws on every onboarding record
            return drv.execute_script("const e = document.querySelector(arguments[0]); return e && e.dataset.state;",
                                      f'{sec} ol.steps li[data-step="{name}"]')

        wait_for(lambda: step_state("training_started") == "done", STEP_CAP_S, "training started", logs)
        wait_for(lambda: step_state("promoted") == "done" or drv.execute_script(
            "return !!document.querySelector(arguments[0]);", f'{sec} ol.steps li[data-state="failed"]'),
            400, "the onboarding outcome", logs)
        assert step_state("promoted") == "done", logs()
        mark("onboard")
        wait_for(lambda: drv.execute_script("return !!document.querySelector(arguments[0]);", f"{sec} .served"), 60,
                 "the page showing the product served")
        time.sleep(1.0)
        shot(drv, out_dir, "onboarding")
        api = json.loads(drv.execute_script("return fetch('/api/onboarding').then(r => r.text())"))
        elpv = next(p for p in api["products"] if p["product"] == "elpv")
        assert elpv["runner"]["rc"] == 0 and elpv["captured"] == 13, elpv["runner"]
        assert elpv["serving"]["model"] == MODEL and elpv["serving"]["version"] == 2
        manifest = json.loads((caps / "elpv" / "manifest.json").read_text())
        assert manifest["count"] == 13 and manifest["frames"][picked]["trigger"] == "selected"
        assert {e["trigger"] for e in manifest["frames"].values()} == {"unknown_product", "selected"}
        assert {e["camera"] for e in manifest["frames"].values()} == {"cam-elpv"}

        # 4. new cells from another camera are scored by v2 with the elpv task, on the camera wall
        drv.get(base_url + "/#/wall")
        new = _images([p for p, _ in test_cells], tmp_path / "new-cells")
        _run([LINEWATCH, "camera", "--source", str(new), "--camera-id", "cam-elpv-2", "--product", "elpv",
              "--fps", "20", "--bootstrap", boot], env, STEP_CAP_S)

        def scored(o):
            rs = [decode_result(r.value) for r in o["inspection-results"]]
            return [r for r in rs if r.camera == "cam-elpv-2" and not r.shadow]

        recs = asyncio.run(read_topics(boot, ["inspection-results"], until=lambda o: len(scored(o)) >= 4,
                                       timeout_s=STEP_CAP_S))
        res = scored(recs)
        assert len(res) == 4, stack.log_tail("worker-0", 30)
        assert {(r.model, r.model_version, r.task, r.routed) for r in res} == {(MODEL, "2", "elpv", False)}

        def on_wall():
            t = drv.execute_script("const t = document.querySelector('.tile[data-camera=\"cam-elpv-2\"]');"
                                   "return t && t.textContent;") or ""
            return f"{MODEL} v2" in t and "4 frames" in t and "elpv" in t

        wait_for(on_wall, STEP_CAP_S, "cam-elpv-2 on the camera wall, scored by v2", logs)
        mark("scored")
        time.sleep(1.0)
        shot(drv, out_dir, "wall-onboarded")

        evs = [decode_event(r.value) for r in asyncio.run(read_topics(boot, ["onboarding-events"], timeout_s=10,
                                                                      idle_s=1.5))["onboarding-events"]]
        run = [e for e in evs if e.run_id]
        assert [e.type for e in run] == ["onboard_started", "training_started", "training_finished", "released",
                                         "promoted"] and len({e.run_id for e in run}) == 1
        assert max(e.detail["count"] for e in evs if e.type == "captured") == 13
        assert [e.detail["frame_ids"] for e in evs if e.type == "capture_select"] == [[picked]]
        print(f"\nonboarding loop: {phases} (total {time.monotonic() - t0:.1f} s)")
    finally:
        if drv is not None:
            drv.quit()
        for p in (console, capture):
            if p is not None:
                p.stop()
                print(p.log()[-1500:])
        stack.stop()


def test_route_ood_retrain_request_arms_capture_of_live_frames(local_stack, settings, tmp_path, shared_data):
    """The other trigger: a ``retrain_requested`` event on ``retrain-requests`` (what a worker's route-OOD drift alert publishes,
    stream/lifecycle/hooks.py) arms capture of its product's live ``frames``; frames from before the arm and
    of other products are not captured; ``capture_armed`` and ``captured`` are on the onboarding topic."""
    import uuid

    from contracts.model_events import ModelEvent
    from stream.kafka.clients import Producer, ensure_topics
    from stream.lifecycle.capture import CaptureService
    from stream.sources.camera import CameraConfig, camera, open_source

    uid = uuid.uuid4().hex[:6]
    boot = local_stack.kafka_bootstrap
    s = settings.with_overrides(kafka_bootstrap=boot, capture_dir=tmp_path / "caps", capture_group=f"cap-{uid}",
                                topic_frames=f"cap-{uid}-frames", topic_dlq=f"cap-{uid}-dlq",
                                topic_retrain_requests=f"cap-{uid}-retrain", topic_onboarding=f"cap-{uid}-onb")
    cells = _images([p for p in sorted((shared_data / "mvtec" / "bottle" / "test" / "good").glob("*.png"))[:6]],
                    tmp_path / "frames")

    async def go():
        await ensure_topics(boot, [s.topic_frames, s.topic_dlq, s.topic_retrain_requests, s.topic_onboarding])
        svc = CaptureService(s)
        stop = asyncio.Event()
        task = asyncio.ensure_future(svc.run(stop))
        try:
            before = await camera(boot, open_source(str(cells)), CameraConfig("cam-ood", product="cells", fps=50),
                                  topic=s.topic_frames, settings=s)
            ev = ModelEvent("retrain_requested", "moleflow", 0, product="cells", reasons=["route_ood: 80% of 64"],
                            detail={"camera": "cam-ood", "task": "bottle"})
            async with Producer(boot, settings=s) as p:
                await p.send_many(s.topic_retrain_requests, [(ev.key, ev.to_json(), [])])
            deadline = time.monotonic() + STEP_CAP_S  # upper bounds for a stuck step, not the expected time
            while "product:cells" not in svc.arms and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert "product:cells" in svc.arms, svc.stats
            await asyncio.wait_for(svc.live_ready.wait(), STEP_CAP_S)  # positioned at the end of every partition
            other = await camera(boot, open_source(str(cells)), CameraConfig("cam-x", product="bottle", fps=50),
                                 topic=s.topic_frames, settings=s)
            after = await camera(boot, open_source(str(cells)), CameraConfig("cam-ood", product="cells", fps=50),
                                 topic=s.topic_frames, settings=s)
            good = s.capture_dir / "cells" / "good"
            while (not good.is_dir() or len(list(good.iterdir())) < 6) and time.monotonic() < deadline + STEP_CAP_S:
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await task
        return before, other, after

    before, other, after = asyncio.run(go())
    assert before.published == other.published == after.published == 6
    m = json.loads((s.capture_dir / "cells" / "manifest.json").read_text())
    assert m["count"] == 6 and {e["trigger"] for e in m["frames"].values()} == {"retrain_requested"}
    assert not (s.capture_dir / "bottle").exists()
    evs = [decode_event(r.value) for r in asyncio.run(read_topics(boot, [s.topic_onboarding], timeout_s=10,
                                                                  idle_s=1.5))[s.topic_onboarding]]
    assert [e.type for e in evs][0] == "capture_armed" and evs[-1].type == "captured"
    assert evs[-1].detail["count"] == 6 and evs[0].detail["camera"] == "cam-ood"
