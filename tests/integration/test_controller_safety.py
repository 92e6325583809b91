"""One controller that cannot half-promote (issue #26 items 1-3), at the deployed shape: the real Tansu broker,
the real tritonserver, two worker processes on 6 ``frames`` partitions at 20 fps routing by the serving state,
and the controller as the service it is (stream/lifecycle/service.py; a process where a process is what fails).

- **a broker blip mid-promotion**: the serving-state write after Triton switched to v2 fails once (the real
  producer, its first serving-state write after the fault is armed raising what a lost broker connection
  raises). The old controller logged it, published no ``promoted``, left the serving state at v1 and still
  committed the event. Now: the write is retried, ``promoted`` is published once, the serving state says v2,
  and the event is committed only then.
- **a rollout longer than the consumer's poll interval** (``max_poll_interval_s`` 6 s; v2 released while no
  camera publishes waits in shadow for traffic, as a release on a quiet line does for up to an hour, then the
  line starts): one take of the event, one outcome, the group kept; a rolled-back release whose event is then
  redelivered (the group's offset moved back, as a lost commit does) is skipped, not re-run.
- **two controllers, the active one SIGKILLed mid-rollout**: the second stands by (the lease,
  stream/lifecycle/lease.py) until the first dies, then takes the event over: one promotion, no interleaving.

Each line ends with ``linewatch account`` (0 lost, 0 DLQ'd) and records its benchmarks/reliability.py row.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from contracts.config import RolloutSettings, Settings
from contracts.model_events import ModelEvent
from contracts.serving_state import decode_entry
from stream.kafka.clients import client_kwargs, ensure_topics, read_topics
from tests.harness.line import STEP_CAP_S, Line, check_line, wait_until
from tests.harness.line import small_frames as _small_frames
from tests.harness.rollout import (
    POLICY,
    Broken,
    Tiny,
    good_pngs,
    lifecycle_topics,
    model_ready,
    outcomes,
    release,
    send_records,
    start_controller,
    topic_env,
    write_artifact,
)

pytestmark = pytest.mark.integration

# a served product's candidate needs live frames (24 > its 8 probes); with no traffic it waits in shadow
IDLE_WAITS = {**POLICY, "LINEWATCH_ROLLOUT__SHADOW_FRAMES": "24", "LINEWATCH_ROLLOUT__MIN_FRAMES": "16",
              "LINEWATCH_ROLLOUT__SHADOW_TIMEOUT_S": "4"}
PROBES = 8
POLL_S = 6.0  # the controller's max_poll_interval_s in the poll-interval scenario


@pytest.fixture(scope="module")
def images(shared_data):
    return good_pngs(shared_data, 90)


def _scenario(stack, tag: str):
    uid = uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"{tag}-{uid}")
    boot = stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, [t["events"], t["drift"]]))
    asyncio.run(ensure_topics(boot, [t["state"]], config={"cleanup.policy": "compact"}))
    return uid, t, f"lwt_{tag}_{uid}", f"{tag}-{uid}"


def _events(boot: str, t: dict) -> list[dict]:
    recs = asyncio.run(read_topics(boot, [t["events"]], timeout_s=30, idle_s=1.0))[t["events"]]
    return [json.loads(r.value) for r in recs]


def _event_types(boot: str, t: dict, model: str, version: int) -> list[str]:
    return [d["type"] for d in _events(boot, t) if d.get("model") == model and d.get("version") == version]


def _serving_version(boot: str, t: dict, product: str) -> int | None:
    recs = asyncio.run(read_topics(boot, [t["state"]], timeout_s=30, idle_s=1.0))[t["state"]]
    last = None
    for r in recs:
        if (r.key or b"").decode() == product:
            e = decode_entry(r.value)
            last = e.version if e is not None else None
    return last


def _released_offset(boot: str, t: dict, model: str, version: int) -> tuple[int, int]:
    recs = asyncio.run(read_topics(boot, [t["events"]], timeout_s=30, idle_s=1.0))[t["events"]]
    hits = [(r.partition, r.offset) for r in recs
            if (d := json.loads(r.value)).get("type") == "released" and d.get("model") == model
            and d.get("version") == version]
    assert len(hits) == 1, hits
    return hits[0]


async def _group_offset(boot: str, group: str, topic: str, partition: int, move_to: int | None = None) -> int | None:
    """The group's committed offset on ``topic``/``partition``; with ``move_to``, commit that one first (what an
    operator's offset reset, or a commit lost in a rebalance, leaves behind)."""
    c = AIOKafkaConsumer(bootstrap_servers=boot, group_id=group, enable_auto_commit=False,
                         auto_offset_reset="earliest", **client_kwargs("consumer"))
    await c.start()
    try:
        tp = TopicPartition(topic, partition)
        if move_to is None:
            c.assign([tp])
            return await c.committed(tp)
        c.subscribe([topic])  # a member of the group (the controller is stopped), so its commit is accepted
        deadline = time.monotonic() + STEP_CAP_S
        while tp not in c.assignment():
            assert time.monotonic() < deadline, f"never assigned {tp} in {group}"
            await c.getmany(timeout_ms=200, max_records=1)
        await c.commit({tp: move_to})
        return await c.committed(tp)
    finally:
        await c.stop()


def _generation(log: str) -> int:
    """The lease generation a controller's log says it acquired."""
    m = re.search(r'"event":"controller_lease_acquired"[^\n]*?"generation":(\d+)|"generation":(\d+)[^\n]*?'
                  r'"event":"controller_lease_acquired"', log)
    assert m, "no controller_lease_acquired in the log"
    return int(m.group(1) or m.group(2))


class BlipOnce:
    """The service's real producer, except that its first serving-state write after :meth:`arm` fails the way a
    lost broker connection fails it."""

    def __init__(self, producer, topic: str):
        self.real, self.topic = producer.send_many, topic
        self.armed, self.blips = False, 0

    def arm(self) -> None:
        self.armed = True

    async def send_many(self, topic, recs):
        if self.armed and topic == self.topic:
            self.armed, self.blips = False, self.blips + 1
            raise KafkaConnectionError("injected: broker connection lost mid-promotion")
        return await self.real(topic, recs)


class ServiceThread:
    """``ControllerService.run`` in its own event loop (aiokafka objects are made inside it)."""

    def __init__(self, settings: Settings, repository):
        from stream.lifecycle.service import ControllerService

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            self.stop_evt = asyncio.Event()
            return ControllerService(settings, repository)

        self.svc = asyncio.run_coroutine_threadsafe(make(), self.loop).result(60)
        self.fut = asyncio.run_coroutine_threadsafe(self.svc.run(self.stop_evt), self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_evt.set)
        try:
            self.fut.result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def test_controller_publish_fails_mid_promotion(local_stack, images, shared_data, tmp_path, reliability):
    stack = local_stack
    uid, t, model, product = _scenario(stack, "blip")
    boot, store, group = stack.kafka_bootstrap, tmp_path / "store", f"lw-ctl-blip-{uid}"
    own = {k: f"blip-{uid}-{k[len('topic_'):]}" for k, f in Settings.model_fields.items()
           if k.startswith("topic_") and f.annotation is str}  # every topic its own (the broker is shared)
    own.update(topic_model_events=t["events"], topic_serving_state=t["state"], topic_frames=t["frames"],
               topic_drift=t["drift"], topic_results=t["results"], topic_defects=t["defects"], topic_dlq=t["dlq"])
    s = Settings().with_overrides(
        **own, kafka_bootstrap=boot, triton_grpc_url=stack.triton_grpc_url, dev_broker=True,
        triton_control_key=stack.control_key,
        rollout=RolloutSettings(shadow_frames=24, min_frames=8, shadow_timeout_s=60, reconcile_s=1, group=group))
    ctl = ServiceThread(s, stack.model_repository)
    blip = BlipOnce(ctl.svc.producer, t["state"])
    ctl.svc.producer.send_many = blip.send_many
    line = Line(stack, None, _small_frames(shared_data), tmp_path, "blip", seconds=None, product=product,
                env={**topic_env(t), **POLICY}, topics=t)
    try:
        release(boot, t, store, model, 1, product, images, 1.0)
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted"
        line.begin(2)  # routed by the serving state only
        assert line.fleet.wait_frames_in([0, 1], timeout_s=STEP_CAP_S), line.fleet.summary()

        # a compromised worker (it decodes untrusted images) asks for a rollback to v1 on every topic its
        # KafkaUser may write (stream/ops/acls.py): none of them is one the controller acts on
        from stream.ops.acls import controller_grants, worker_grants

        writable = sorted(r.name for r, ops in worker_grants(s).items() if r.type == "topic" and "Write" in ops
                          and r.name in s.topics())  # linewatch's own topics (not Faust's internal ones)
        assert t["events"] not in writable and s.topic_retrain_requests in writable, writable
        assert not set(writable) & {r.name for r in controller_grants(s) if r.type == "topic"}
        forged = ModelEvent("rollback_requested", model, 1, reasons=["forged by a worker"])
        # forged on its lifecycle topics (retrain requests, drift...); its data topics (results, defects, DLQ)
        # are the line's own accounting, and the check above shows the controller reads none of them either
        forged_on = [n for n in writable if n not in (t["results"], t["defects"], t["dlq"])]
        asyncio.run(ensure_topics(boot, forged_on))
        for topic in forged_on:
            send_records(boot, topic, [(forged.key, forged.to_json(), [])])
        # and what the trainer's user may write: model-events (a rollback is obeyed only from model-commands)
        by_trainer = ModelEvent("rollback_requested", model, 1, reasons=["forged by the trainer's user"])
        send_records(boot, t["events"], [(by_trainer.key, by_trainer.to_json(), [])])
        print(f"\nworker-writable topics {writable}; forged rollback_requested on {forged_on} and {t['events']}")

        blip.arm()  # v2's serving-state write, after Triton switched to v2, fails once
        release(boot, t, store, model, 2, product, images, 0.99)
        got = outcomes(boot, t, model, [2])[2]
        assert [e["type"] for e in got] == ["promoted"], got
        assert blip.blips == 1, "the fault was never injected"
        assert model_ready(stack.triton_grpc_url, model, 2)
        assert wait_until(lambda: _serving_version(boot, t, product) == 2, STEP_CAP_S), \
            f"serving state says v{_serving_version(boot, t, product)} while Triton serves v2"
        part, off = _released_offset(boot, t, model, 2)
        assert wait_until(lambda: (asyncio.run(_group_offset(boot, group, t["events"], part)) or 0) > off,
                          STEP_CAP_S), "v2's released event was never committed"
        out = sum(line.fleet.metric(i, "linewatch_results_out_total") for i in (0, 1))
        assert wait_until(lambda: sum(line.fleet.metric(i, "linewatch_results_out_total") for i in (0, 1)) >= out + 40,
                          STEP_CAP_S), f"no results after the promotion\n{line.fleet.log_tails()}"
        rep, order = line.finish(settle_s=120)
        reliability.record("controller_publish_fails_mid_promotion", rep, workers=2, blips=blip.blips)
        # the forged rollbacks (published before v2's release) changed nothing: no outcome names one as its cause
        caused = [d for d in _events(boot, t)
                  if (d.get("detail") or {}).get("cause") in (forged.event_id, by_trainer.event_id)]
        served = _serving_version(boot, t, product)
        reliability.record("worker_cannot_roll_back", rep, workers=2, forged_on=forged_on,
                           outcomes_of_forged=len(caused), serving_version=served)
        check_line(line, rep, order, changes=0, what="serving-state write fails mid-promotion")
        assert _event_types(boot, t, model, 2).count("promoted") == 1
        assert caused == [] and served == 2 and model_ready(stack.triton_grpc_url, model, 2), (caused, served)
    finally:
        line.close()
        ctl.close()


def test_controller_rollout_longer_than_poll_interval(local_stack, images, shared_data, tmp_path, reliability):
    stack = local_stack
    uid, t, model, product = _scenario(stack, "poll")
    boot, store, group = stack.kafka_bootstrap, tmp_path / "store", f"lw-ctl-poll-{uid}"
    env = {**IDLE_WAITS, "LINEWATCH_ROLLOUT__MAX_POLL_INTERVAL_S": str(POLL_S)}
    ctl = start_controller(stack, t, tmp_path, env=env, group=group, name="controller-poll")
    ctl2 = None
    # good frames the calibration did not see: the candidate's live scores match its calibration
    line = Line(stack, None, images[60:90], tmp_path, "poll", seconds=None, product=product,
                env={**topic_env(t), **POLICY}, topics=t)
    try:
        release(boot, t, store, model, 1, product, images, 1.0, probes=PROBES)  # a new product: probes decide
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", ctl.log()[-3000:]

        t0 = time.monotonic()
        release(boot, t, store, model, 2, product, images, 0.99, probes=PROBES)  # nobody publishes yet: it waits
        assert wait_until(lambda: "shadow_waiting" in _event_types(boot, t, model, 2), STEP_CAP_S), ctl.log()[-3000:]
        time.sleep(max(0.0, t0 + 3 * POLL_S - time.monotonic()))  # well past the poll interval, still waiting
        assert not {"promoted", "rolled_back", "refused"} & set(_event_types(boot, t, model, 2))
        idle_s = time.monotonic() - t0
        line.begin(2)  # traffic: v2 is judged on its probes and live frames
        assert line.fleet.wait_frames_in([0, 1], timeout_s=STEP_CAP_S), line.fleet.summary()
        got = outcomes(boot, t, model, [2])[2]
        took = time.monotonic() - t0
        assert [e["type"] for e in got] == ["promoted"], (got, ctl.log()[-3000:])
        assert got[0]["detail"]["rule"] == "shadow_traffic" and got[0]["detail"]["live_frames"] > 0, got
        log = ctl.log()
        assert log.count('"event":"model_event_taken"') == 2, "an event was taken twice (the group evicted it)"
        assert "model_event_commit_failed" not in log and ctl.alive(), log[-3000:]

        # a rolled-back release, then its event redelivered (offset moved back): skipped, never re-run
        vdir, digest = write_artifact(store, model, 3, product, Broken(5), images, honest=Tiny(),
                                      example=torch.randn(5, 3, 64, 64))
        ev = ModelEvent("released", model, 3, product=product, detector="efficientad", artifact_uri=vdir.as_uri(),
                        sha256=digest)
        send_records(boot, t["events"], [(ev.key, ev.to_json(), [])])
        assert outcomes(boot, t, model, [3])[3][0]["type"] == "rolled_back"
        part, off = _released_offset(boot, t, model, 3)
        assert wait_until(lambda: (asyncio.run(_group_offset(boot, group, t["events"], part)) or 0) > off, STEP_CAP_S)
        ctl.stop()
        assert asyncio.run(_group_offset(boot, group, t["events"], part, move_to=off)) == off
        ctl2 = start_controller(stack, t, tmp_path, env=env, group=group, name="controller-poll-2")
        assert wait_until(lambda: "model_event_already_decided" in ctl2.log()
                          or _event_types(boot, t, model, 3).count("rolled_back") > 1, STEP_CAP_S), ctl2.log()[-3000:]
        assert _event_types(boot, t, model, 3).count("rolled_back") == 1, "the redelivered release ran again"
        assert model_ready(stack.triton_grpc_url, model, 2)

        # the operator's rollback, as a person runs it: `linewatch rollback` publishes on model-commands
        cli = [sys.executable, "-m", "stream.ops.cli", "rollback", model, "--to-version", "1", "--bootstrap", boot,
               "--topic", t["commands"]]
        r = subprocess.run(cli, capture_output=True, text=True, timeout=STEP_CAP_S)
        assert r.returncode == 0, r.stderr[-2000:]
        assert wait_until(lambda: any((d.get("detail") or {}).get("operator") for d in _events(boot, t)
                                      if d.get("model") == model), STEP_CAP_S), ctl2.log()[-3000:]
        assert model_ready(stack.triton_grpc_url, model, 1)
        assert wait_until(lambda: _serving_version(boot, t, product) == 1, STEP_CAP_S)

        assert line.publishing(), f"the line stopped before the scenario's last step: {line.feeder.error!r}"
        rep, order = line.finish(settle_s=120)
        reliability.record("controller_rollout_longer_than_poll_interval", rep, workers=2,
                           rollout_s=round(took, 1), max_poll_interval_s=POLL_S)
        reliability.record("release_on_idle_line", rep, workers=2, idle_s=round(idle_s, 1),
                           outcome=got[0]["type"], rule=got[0]["detail"]["rule"])
        check_line(line, rep, order, changes=0, what="rollout longer than the poll interval")
    finally:
        line.close()
        for c in (ctl, ctl2):
            if c is not None:
                c.stop()


def test_two_controllers_one_killed_mid_rollout(local_stack, images, shared_data, tmp_path, reliability):
    stack = local_stack
    uid, t, model, product = _scenario(stack, "fence")
    boot, store, group = stack.kafka_bootstrap, tmp_path / "store", f"lw-ctl-fence-{uid}"
    a = start_controller(stack, t, tmp_path, env=IDLE_WAITS, group=group, name="controller-a")
    b = None
    line = Line(stack, None, images[60:90], tmp_path, "fence", seconds=None, product=product,
                env={**topic_env(t), **POLICY}, topics=t)
    try:
        assert wait_until(lambda: '"event":"controller_start"' in a.log(), STEP_CAP_S), a.log()[-3000:]
        b = start_controller(stack, t, tmp_path, env=IDLE_WAITS, group=group, name="controller-b")
        assert wait_until(lambda: '"event":"controller_standby"' in b.log(), STEP_CAP_S), b.log()[-3000:]
        release(boot, t, store, model, 1, product, images, 1.0, probes=PROBES)
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", a.log()[-3000:]

        # v2 while no camera publishes: A loads its candidate and waits in shadow for traffic
        release(boot, t, store, model, 2, product, images, 0.99, probes=PROBES)
        assert wait_until(lambda: model_ready(stack.triton_grpc_url, f"{model}__candidate"), STEP_CAP_S), a.log()[-3000:]
        # while A rolls out, B has done nothing: no start, no event, no model control
        assert '"event":"controller_start"' not in b.log() and "model_event_taken" not in b.log(), b.log()[-3000:]
        a.kill()  # mid-rollout
        assert not {"promoted", "rolled_back", "refused"} & set(_event_types(boot, t, model, 2)), \
            "A decided v2 before it was killed"
        # B takes the lease and the redelivered event, loads the candidate again and waits for traffic
        assert wait_until(lambda: '"event":"controller_start"' in b.log(), STEP_CAP_S), b.log()[-3000:]
        line.begin(2)
        assert line.fleet.wait_frames_in([0, 1], timeout_s=STEP_CAP_S), line.fleet.summary()
        got = outcomes(boot, t, model, [2])[2]
        assert [e["type"] for e in got] == ["promoted"], (got, b.log()[-3000:])
        blog = b.log()
        assert blog.index('"event":"controller_lease_acquired"') < blog.index('"event":"controller_start"')
        assert _generation(blog) > _generation(a.log()) and "model_event_taken" in blog, blog[-3000:]
        assert model_ready(stack.triton_grpc_url, model, 2)
        assert wait_until(lambda: not model_ready(stack.triton_grpc_url, f"{model}__candidate"), STEP_CAP_S)

        assert line.publishing(), f"the line stopped before the scenario's last step: {line.feeder.error!r}"
        rep, order = line.finish(settle_s=120)
        reliability.record("two_controllers_one_killed_mid_rollout", rep, workers=2, controllers=2)
        check_line(line, rep, order, changes=0, what="two controllers, the active one killed mid-rollout")
        assert _event_types(boot, t, model, 2).count("promoted") == 1
    finally:
        line.close()
        for c in (a, b):
            if c is not None:
                c.stop()
