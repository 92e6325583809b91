"""A release on a quiet line (issue #26 item 10), at the real shape: the rollout controller service
(`linewatch controller`, a child process) on the embedded Tansu broker against the real tritonserver, its shadow
sampler reading the scenario's ``frames`` topic, releases published on ``model-events`` and live frames
published as a camera would, `linewatch rollout status` run as the operator runs it.

Before: a version whose probe images were fewer than ``min_frames`` was rolled back after the shadow window
("insufficient_shadow_traffic: 8 frames < 16"), both for a product nothing served yet and for a new version of a
served product while no camera published. Now:

1. a new product (nothing serves it) promotes on its probe images alone (rule ``probes_only``);
2. a new version of that product while no camera publishes is not rolled back: it waits in shadow
   (``shadow_waiting`` on model-events, `rollout status`: "waiting for traffic"), well past its shadow window;
3. frames start: it is judged on the window's frames, live ones included (rule ``shadow_traffic``), and
   `rollout status` says which rule decided.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from contracts.envelope import Frame, encode_frame
from stream.kafka.clients import Producer, ensure_topics, read_topics
from tests.harness.rollout import (
    good_pngs,
    lifecycle_topics,
    release,
    start_controller,
)

pytestmark = pytest.mark.integration

SHADOW_TIMEOUT_S = 8.0
POLICY = {"LINEWATCH_ROLLOUT__SHADOW_FRAMES": "24", "LINEWATCH_ROLLOUT__MIN_FRAMES": "16",
          "LINEWATCH_ROLLOUT__SHADOW_TIMEOUT_S": str(SHADOW_TIMEOUT_S),
          "LINEWATCH_ROLLOUT__TRAFFIC_DEADLINE_S": "900", "LINEWATCH_ROLLOUT__RECONCILE_S": "2"}
PROBES = 8  # < MIN_FRAMES: probes alone are never "enough frames" by count
STEP_S = 240.0  # an upper bound for one step on a loaded 2-core machine (a load + a shadow window: ~10-40 s)
OUTCOMES = ("promoted", "rolled_back", "refused")


@pytest.fixture(scope="module")
def images(shared_data):
    return good_pngs(shared_data, 120)


def _events(boot, t, model, until=None, timeout_s=STEP_S, idle_s=None) -> list[dict]:
    def mine(o):
        return [json.loads(r.value) for r in o[t["events"]] if json.loads(r.value).get("model") == model]

    recs = asyncio.run(read_topics(boot, [t["events"]], until=(lambda o: until(mine(o))) if until else None,
                                   timeout_s=timeout_s, idle_s=idle_s))
    return mine(recs)


def _outcome(evs, version):
    return next((e for e in evs if e["version"] == version and e["type"] in OUTCOMES), None)


def _status(boot, t, model, json_out: bool):
    cmd = [sys.executable, "-m", "stream.ops.cli", "rollout", "status", "--bootstrap", boot, "--topic", t["events"],
           "--model", model, *(["--json"] if json_out else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)[model] if json_out else p.stdout


class Camera:
    """Publishes good bottle frames of ``product`` on the scenario's frames topic (10 fps) until stopped."""

    def __init__(self, boot: str, topic: str, product: str, images: list[bytes]):
        self.boot, self.topic, self.product, self.images = boot, topic, product, images
        self.stop, self.sent = threading.Event(), 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        async with Producer(self.boot) as p:
            while not self.stop.is_set():
                img = self.images[self.sent % len(self.images)]
                f = Frame(frame_id=f"idle-{self.sent}", camera_id="cam-idle-line", ts_ms=int(time.time() * 1000),
                          image=img, product=self.product, content_type="image/png")
                await p.send_many(self.topic, [encode_frame(f)])
                self.sent += 1
                await asyncio.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_release_on_an_idle_line_waits_for_traffic_and_a_new_product_promotes_on_probes(local_stack, images, tmp_path):
    boot = local_stack.kafka_bootstrap
    uid = uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"idle-{uid}")
    asyncio.run(ensure_topics(boot, [t["events"], t["frames"]]))
    asyncio.run(ensure_topics(boot, [t["state"]], config={"cleanup.policy": "compact"}))
    store, model, product = tmp_path / "store", f"lwt_idle_{uid}", f"quiet-{uid}"
    ctl = start_controller(local_stack, t, tmp_path, env=POLICY)
    try:
        # 1. a product nothing serves, no camera: promoted on its 8 probe images alone
        release(boot, t, store, model, 1, product, images, 1.0, probes=PROBES)
        evs = _events(boot, t, model, until=lambda e: _outcome(e, 1) is not None)
        ev1 = _outcome(evs, 1)
        assert ev1 is not None and ev1["type"] == "promoted", (ev1, ctl.log()[-3000:])
        assert ev1["detail"]["rule"] == "probes_only" and ev1["detail"]["probe_frames"] == PROBES, ev1
        assert ev1["detail"]["live_frames"] == 0

        # 2. its v2 while no camera publishes: waits in shadow, well past its shadow window, not rolled back
        t_rel = time.monotonic()
        release(boot, t, store, model, 2, product, images, 1.01, probes=PROBES)
        evs = _events(boot, t, model, until=lambda e: any(x["version"] == 2 and x["type"] in ("shadow_waiting",
                                                                                                *OUTCOMES) for x in e))
        assert _outcome(evs, 2) is None, (_outcome(evs, 2), ctl.log()[-3000:])
        waiting = [x for x in evs if x["version"] == 2 and x["type"] == "shadow_waiting"]
        assert len(waiting) == 1 and waiting[0]["reasons"][0].startswith("waiting_for_traffic"), waiting
        time.sleep(max(0.0, 3 * SHADOW_TIMEOUT_S - (time.monotonic() - t_rel)))
        evs = _events(boot, t, model, timeout_s=30, idle_s=2.0)
        assert _outcome(evs, 2) is None, (_outcome(evs, 2), ctl.log()[-3000:])
        st = _status(boot, t, model, json_out=True)
        assert st["serving_version"] == 1 and st["candidate_version"] == 2, st
        assert st["candidate_state"] == "waiting for traffic", st
        assert "waiting for traffic" in _status(boot, t, model, json_out=False)

        # 3. the camera starts: v2 is judged on probes + live frames of its product
        with Camera(boot, t["frames"], product, images[90:120]) as cam:
            evs = _events(boot, t, model, until=lambda e: _outcome(e, 2) is not None)
            sent = cam.sent
        ev2 = _outcome(evs, 2)
        assert ev2 is not None and ev2["type"] == "promoted", (ev2, ctl.log()[-3000:])
        assert ev2["detail"]["rule"] == "shadow_traffic", ev2
        assert ev2["detail"]["live_frames"] >= 24 - PROBES and sent >= ev2["detail"]["live_frames"], (ev2, sent)
        st = _status(boot, t, model, json_out=True)
        assert st["serving_version"] == 2 and st["candidate_version"] is None and st["decided_by"] == "shadow_traffic"
        assert "rule=shadow_traffic" in _status(boot, t, model, json_out=False)
    finally:
        ctl.stop()
