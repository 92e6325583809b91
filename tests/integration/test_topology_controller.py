"""The production shape with the rollout controller (issue #16 item 4): three workers, one controller, two
tritonservers (one LocalStack + tests/harness/triton_replica.py), 6 ``frames`` partitions at 20 fps.

Workers never call model control; they route and judge by the serving state the controller writes
(contracts/serving_state.py) and label each result with the version Triton says served it. Worker i talks
to Triton i % 2, so a version loaded on one replica only would show up in the results.

- a release while three workers stream; two releases of one model at once (run one after the other);
  the controller SIGKILLed mid-rollout and restarted (the unacked ``released`` event is redelivered and
  rolled out); one Triton SIGKILLed and restarted empty (the controller's reconcile loads the serving
  version back). After each promotion, within a bounded time, no result reports another version.
- the whole stack stopped and started again (`linewatch stack down` / `up`, memory-only broker): the
  controller restores the serving versions from its repository; a new worker's frames are scored, none
  DLQ'd ``unknown_product``.

Each line ends with ``linewatch account`` (0 lost, 0 DLQ'd), the per-camera order check and the
duplicates counted (tests/harness/line.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from contracts.artifact import verify_artifact
from contracts.envelope import Frame, decode_result, encode_frame
from contracts.model_events import ModelEvent
from devstack.stack import LocalStack
from stream.kafka.clients import ensure_topics, read_topics
from stream.lifecycle.repository import materialize
from tests.harness.line import STEP_CAP_S, Line, check_line, wait_until
from tests.harness.line import small_frames as _small_frames
from tests.harness.rollout import (
    POLICY,
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
from tests.harness.settle import settle
from tests.harness.topology import read_results
from tests.harness.triton_replica import TritonReplica

pytestmark = pytest.mark.integration


SETTLE_S = 8.0  # after a promotion: results still labelled with the old version only within this time


@pytest.fixture(scope="module")
def images(shared_data):
    return good_pngs(shared_data, 90)


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory):
    root = tmp_path_factory.mktemp("controller-topology")
    stack = LocalStack(root / "work", root / "model_repository", start_timeout_s=STEP_CAP_S)
    stack.start()
    b = TritonReplica(stack, root / "triton-b")
    try:
        b.start()
        yield stack, b
    finally:
        b.stop()
        stack.stop()


def _scenario(two_tritons, prefix: str, model_prefix: str) -> tuple[str, list[str], dict[str, str], str, str]:
    """Fresh lifecycle topics on the module's stack: (bootstrap, both Tritons' URLs, topics, model, product)."""
    stack, b = two_tritons
    boot, uid = stack.kafka_bootstrap, uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"{prefix}-{uid}")
    asyncio.run(ensure_topics(boot, [t["events"], t["drift"]]))
    asyncio.run(ensure_topics(boot, [t["state"]], config={"cleanup.policy": "compact"}))
    return boot, [stack.triton_grpc_url, b.grpc_url], t, f"{model_prefix}_{uid}", f"part-{uid}"


def _logged(typ: str, model: str, version: int) -> str:
    """How the controller logs an event it took (released) or published (promoted...)."""
    return f'"type":"{typ}","model":"{model}","version":{version}'


def _wait_log(ctl, needle: str, since: int, timeout_s: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in ctl.log()[since:]:
            return True
        time.sleep(0.05)
    return False


def test_one_worker_client_round_robins_over_both_replicas(two_tritons):
    """Deliver 4 of the GPU-serving issue: a worker's Triton target naming several replicas (k8s: the headless
    Service ``dns:///linewatch-triton-pods...``; here ``ipv4:a,b``) spreads its requests over all of them
    (gRPC round_robin), so one busy worker never pins one GPU while the other idles."""
    from stream.inference.triton_client import TritonInfer
    from tests.harness.probe_model import write_probe_model

    stack, b = two_tritons
    model = write_probe_model(stack.model_repository, "probe_rr")
    urls = [stack.triton_grpc_url, b.grpc_url]
    for u in urls:
        c = grpcclient.InferenceServerClient(u)
        c.load_model(model, headers=stack.control_headers)
        assert wait_until(lambda c=c: c.is_model_ready(model), STEP_CAP_S)
        c.close()

    def counts() -> list[int]:
        out = []
        for u in urls:
            c = grpcclient.InferenceServerClient(u)
            st = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
            out.append(int(st.get("inference_count", 0)))  # protobuf JSON omits zeros
            c.close()
        return out

    before = counts()
    target = "ipv4:" + ",".join(urls)

    async def go():
        infer = TritonInfer(target, max_retries=0)
        try:
            pixels = np.full((2, 3, 64, 64), 128, np.uint8)  # uint8 pixels; the probe's spec is FP32
            return [float((await infer.infer(model, pixels)).scores[0]) for _ in range(40)]
        finally:
            await infer.close()

    scores = asyncio.run(go())
    served = [a - b0 for a, b0 in zip(counts(), before, strict=True)]
    print(f"\n80 images over {target}: per replica {served}")
    assert sum(served) == 80 and min(served) >= 20, served
    assert len(set(scores)) == 1  # the same model on both: the same score


def test_rollouts_controller_crash_and_triton_restart_with_three_workers(two_tritons, images, shared_data,
                                                                          tmp_path):
    stack, b = two_tritons
    boot, tritons, t, model, product = _scenario(two_tritons, "topo-ctl", "lwt_topo")
    store = tmp_path / "store"
    env = {**topic_env(t), **POLICY}
    ctl = start_controller(stack, t, tmp_path, tritons=tritons, env=POLICY, name="controller-0")
    # the line publishes until the scenario's last step is done (line.finish ends it), however long the
    # steps take on this machine: no fixed duration to outlast
    line = Line(stack, None, _small_frames(shared_data), tmp_path, "ctl", seconds=None, product=product,
                tritons=tritons, env=env, topics=t)
    ctl2 = None
    try:
        release(boot, t, store, model, 1, product, images, 1.0)  # a new product: promoted on both Tritons
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", ctl.log()[-3000:]
        assert all(model_ready(u, model, 1) for u in tritons)
        line.begin(3)  # the workers know the product from the serving state only (no static routing)
        assert line.fleet.wait_frames_in([0, 1, 2], timeout_s=STEP_CAP_S), line.fleet.summary()

        # two releases of one model at once: one rollout at a time, in order, each acked when it ended
        mark = len(ctl.log())
        release(boot, t, store, model, 2, product, images, 0.99)
        release(boot, t, store, model, 3, product, images, 0.98)
        got = outcomes(boot, t, model, [2, 3])
        assert [e["type"] for v in (2, 3) for e in got[v]] == ["promoted", "promoted"], (got, ctl.log()[mark:][-3000:])
        log = ctl.log()[mark:]
        assert log.index(_logged("promoted", model, 2)) < \
            log.index(_logged("released", model, 3)), "v3's rollout began before v2's ended"
        promoted_3 = got[3][0]["_ts"]

        # the controller SIGKILLed mid-rollout (v4's candidate in its shadow window), then restarted
        mark = len(ctl.log())
        release(boot, t, store, model, 4, product, images, 0.97)
        assert _wait_log(ctl, _logged("released", model, 4), mark), ctl.log()[mark:][-3000:]
        # killed once its candidate is up on a replica (loading, shadowing or promoting: all mid-rollout)
        assert wait_until(lambda: model_ready(tritons[0], f"{model}__candidate"), STEP_CAP_S), ctl.log()[mark:][-3000:]
        ctl.kill()
        killed_during = "promoted" if _logged("promoted", model, 4) in ctl.log() else "rollout"
        ctl2 = start_controller(stack, t, tmp_path, tritons=tritons, env=POLICY, name="controller-1")
        got4 = outcomes(boot, t, model, [4])[4]
        assert [e["type"] for e in got4] == ["promoted"], (got4, ctl2.log()[-3000:])
        assert killed_during == "rollout", "the controller published v4's outcome before it was killed"
        print(f"\ncontroller killed mid-rollout; restarted controller: {got4[0].get('detail')}")
        assert _logged("released", model, 4) in ctl2.log(), "v4 was not redelivered"
        promoted_4 = got4[0]["_ts"]
        assert all(model_ready(u, model, 4) for u in tritons)
        assert wait_until(lambda: not any(model_ready(u, f"{model}__candidate") for u in tritons), STEP_CAP_S), "candidate left loaded"

        # Triton B SIGKILLed and restarted empty (a replacement pod): the reconcile loads v4 there again
        assert line.publishing(), f"the line stopped before the Triton restart: {line.feeder.error!r}"
        b.kill()
        time.sleep(3)
        b.start()
        t_back = time.time()
        assert wait_until(lambda: model_ready(b.grpc_url, model, 4), STEP_CAP_S), ctl2.log()[-3000:]
        reconciled_s = time.time() - t_back
        # the last step: line frames scored through the reconciled Triton B (worker 1 talks to it), then the
        # line ends; the timeout is an upper bound
        out_b = line.fleet.metric(1, "linewatch_results_out_total")
        assert wait_until(lambda: line.fleet.metric(1, "linewatch_results_out_total") >= out_b + 20, STEP_CAP_S), \
            f"no results through Triton B after its restart\n{line.fleet.summary()}\n{line.fleet.log_tails()}"
        assert line.publishing(), f"the line stopped before the scenario's last step: {line.feeder.error!r}"
        rep, order = line.finish(settle_s=120)
        check_line(line, rep, order, changes=3, what="releases + controller kill + triton restart")
        res = [r for r in read_results(boot, t["results"]) if not r.get("shadow")]
        # between v3's promotion (+ settle) and v4's: v3, or v4 once Triton switched (before the event is out)
        late3 = [r for r in res if promoted_3 + SETTLE_S * 1000 < r["processed_ts_ms"] < promoted_4
                 and r["model_version"] not in ("3", "4")]
        late4 = [r for r in res if r["processed_ts_ms"] > promoted_4 + SETTLE_S * 1000 and r["model_version"] != "4"]
        by_version = {v: sum(1 for r in res if r["model_version"] == v) for v in sorted({r["model_version"] for r in res})}
        print(f"\nresults by served version {by_version}; Triton B reconciled {reconciled_s:.1f} s after its restart")
        assert not late3 and not late4, (late3[:3], late4[:3])
        assert {r["model"] for r in res} == {model} and by_version.get("4", 0) > 0
    finally:
        line.close()
        for c in (ctl, ctl2):
            if c is not None:
                c.stop()


def test_release_redelivered_after_a_partial_promotion_serves_it_on_every_replica(two_tritons, images, tmp_path):
    """What a controller killed between two replicas' loads leaves behind: v2 pinned in the repository and
    served by Triton A (the replica it asks first), Triton B still on v1, the ``released`` event unacked.
    The restarted controller recognises the promotion (the repository holds this very artifact) and must bring
    every replica to v2 before it announces ``promoted`` (it used to announce with B still serving v1)."""
    stack, b = two_tritons
    boot, tritons, t, model, product = _scenario(two_tritons, "topo-part", "lwt_part")
    store = tmp_path / "store"
    ctl = start_controller(stack, t, tmp_path, tritons=tritons, env=POLICY, name="controller-0")
    try:
        release(boot, t, store, model, 1, product, images, 1.0)
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", ctl.log()[-3000:]
    finally:
        ctl.stop()
    # the half-done promotion: v2 materialised and pinned, loaded on A only
    vdir, digest = write_artifact(store, model, 2, product, Tiny(gain=0.99), images)
    art = verify_artifact(vdir, digest, model, 2, strict=True).artifact
    materialize(art, stack.model_repository, model, [2])
    with grpcclient.InferenceServerClient(tritons[0]) as c:
        c.load_model(model, headers=stack.control_headers)
    assert wait_until(lambda: model_ready(tritons[0], model, 2), STEP_CAP_S)
    assert model_ready(tritons[1], model, 1) and not model_ready(tritons[1], model, 2)
    ev = ModelEvent("released", model, 2, product=product, detector="efficientad", artifact_uri=vdir.as_uri(),
                    sha256=digest)
    send_records(boot, t["events"], [(ev.key, ev.to_json(), [])])
    ctl2 = start_controller(stack, t, tmp_path, tritons=tritons, env=POLICY, name="controller-1")
    try:
        got = outcomes(boot, t, model, [2])[2]
        assert [e["type"] for e in got] == ["promoted"], (got, ctl2.log()[-3000:])
        assert got[0]["detail"].get("recovered") is True, got  # the recovery path, not a fresh rollout
        assert model_ready(tritons[0], model, 2) and model_ready(tritons[1], model, 2), ctl2.log()[-3000:]
    finally:
        ctl2.stop()


def test_stack_down_up_restores_serving_versions(images, tmp_path):
    """`stack down` / `stack up` with the controller: a memory-only broker forgets the serving state and
    Triton (explicit mode) starts empty; the controller restores the pinned, verified versions and a new
    worker's frames are scored by them (none DLQ'd unknown_product)."""
    from devstack.worker_process import WorkerProcess

    uid = uuid.uuid4().hex[:6]
    store, model, product = tmp_path / "store", f"lwt_restore_{uid}", f"restore-{uid}"
    stack = LocalStack(tmp_path / "work", tmp_path / "repo", start_timeout_s=STEP_CAP_S, controller=True)
    stack.start()
    try:
        boot = stack.kafka_bootstrap
        asyncio.run(ensure_topics(boot, ["model-events"]))
        vdir, digest = write_artifact(store, model, 1, product, Tiny(), images)
        ev = ModelEvent("released", model, 1, product=product, detector="efficientad", artifact_uri=vdir.as_uri(),
                        sha256=digest)
        send_records(boot, "model-events", [(ev.key, ev.to_json(), [])])
        t = {"events": "model-events"}
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", stack.log_tail("controller", 40)
        stack.stop()
        stack.start()  # fresh ports, empty broker, empty Triton
        boot = stack.kafka_bootstrap
        assert wait_until(lambda: model_ready(stack.triton_grpc_url, model, 1), STEP_CAP_S), stack.log_tail("controller", 40)
        asyncio.run(ensure_topics(boot, ["frames", "inspection-results", "defect-events", "frames-dlq"]))
        w = WorkerProcess(boot, stack.triton_grpc_url, tmp_path / "w", app_id=f"lw-restore-{uid}").start()
        try:
            frames = [encode_frame(Frame(f"r-{i}", "cam-r", int(time.time() * 1000), images[i], product=product,
                                         content_type="image/png")) for i in range(20)]
            send_records(boot, "frames", frames)
            rep = settle(boot, frames_topic="frames", results_topic="inspection-results", dlq_topic="frames-dlq")
            res = [decode_result(r.value) for r in asyncio.run(read_topics(boot, ["inspection-results"], timeout_s=60,
                                                                           idle_s=2.0))["inspection-results"]]
        finally:
            w.stop()
        print(f"\nstack down/up: {rep.summary_line()}")
        assert rep.ok and rep.missing == [] and rep.dlq == 0, (rep.dlq_reasons, Path(w.log_path).read_text()[-3000:])
        assert {(r.model, r.model_version) for r in res} == {(model, "1")}
    finally:
        stack.stop()
