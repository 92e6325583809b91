"""Adapter/model lifecycle against the real embedded stack (Tansu + tritonserver): no mocks.

Artifacts are real Triton models in the EfficientAD export format (models.efficientad.serving's
model.py + a TorchScript ``model.pt`` + metadata.json with sha256 + config.pbtxt), with a tiny traced
module instead of a trained network so the suite stays fast. Their calibration scores are computed
on real MVTec bottle images. Events travel over the real broker (``model-events``), the controller
drives Triton's explicit model control.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from contracts.artifact import path_to_uri, sha256_file, verify_artifact
from contracts.model_events import ModelEvent, decode
from contracts.pbtxt import parse_config
from stream.kafka.clients import Producer, ensure_topics, read_topics
from stream.lifecycle.drift import DriftConfig, DriftMonitor
from stream.lifecycle.repository import remove_model_dir
from tests.harness.line import STEP_CAP_S
from tests.harness.rollout import (
    Broken,
    Lifecycle,
    Tiny,
    good_pngs,
    infer_score,
    lifecycle_topics,
    served_version,
    start_controller,
    topic_env,
    write_artifact,
)
from tests.harness.settle import settle

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(shared_data):
    return good_pngs(shared_data, 170)


@pytest.fixture(scope="module")
def life(local_stack, tmp_path_factory, images):
    store = tmp_path_factory.mktemp("model_store")
    lc = Lifecycle(local_stack, Path(local_stack.model_repository), f"it-model-events-{uuid.uuid4().hex[:6]}")
    lc.store = store
    lc.model = f"lwt_bottle_{uuid.uuid4().hex[:4]}"
    lc.product = f"bottle{uuid.uuid4().hex[:4]}"  # no other model of the session serves it (no takeover)
    vdir, digest = write_artifact(store, lc.model, 1, lc.product, Tiny(), images)
    lc.release(lc.model, 1, vdir, digest, lc.product)  # a new model: loaded, shadow-checked, promoted
    ev = lc.outcome(lc.model, 1)
    assert ev.type == "promoted", ev
    yield lc
    lc.close()


def test_release_new_product_and_new_version_zero_failed_requests(life, images, local_stack):
    """Hammer the serving model while (a) a new product model and (b) its own v2 roll out."""
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    assert served_version(client, life.model) == 1
    stop, ok, failures = threading.Event(), [0], []

    def hammer():
        c = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
        x = images[100:102]
        while not stop.is_set():
            try:
                infer_score(c, life.model, x)
                ok[0] += 1
            except Exception as e:
                failures.append(str(e)[:200])
        c.close()

    th = threading.Thread(target=hammer, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while ok[0] < 3 and not failures and time.monotonic() < deadline:  # serving before the switch starts
        time.sleep(0.05)
    try:
        other = f"lwt_cells_{uuid.uuid4().hex[:4]}"
        vdir, digest = write_artifact(life.store, other, 1, "cells", Tiny(gain=0.5), images)
        life.release(other, 1, vdir, digest, "cells")
        n0 = ok[0]
        vdir2, digest2 = write_artifact(life.store, life.model, 2, life.product, Tiny(gain=1.01), images)
        life.release(life.model, 2, vdir2, digest2, life.product)
        ev_new = life.outcome(other, 1)
        ev_v2 = life.outcome(life.model, 2)
        time.sleep(0.5)
    finally:
        stop.set()
        th.join(30)
    assert ev_new.type == "promoted" and ev_new.product == "cells", ev_new
    assert ev_v2.type == "promoted" and ev_v2.previous_version == 1, ev_v2
    assert ev_v2.detail["ks_p"] > 1e-3 and ev_v2.detail["errors"] == 0
    assert failures == [], failures[:3]
    assert ok[0] > n0 > 0  # requests kept flowing through the switch
    assert served_version(client, life.model) == 2
    assert client.is_model_ready(other)
    assert not (Path(local_stack.model_repository) / f"{life.model}__candidate").exists()
    client.close()


def test_corrupted_artifact_refused_old_version_keeps_serving(life, images, local_stack):
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    before = served_version(client, life.model)
    vdir, digest = write_artifact(life.store, life.model, 90, life.product, Tiny(), images)
    with open(vdir / "model.pt", "r+b") as f:  # bit rot after the metadata was written
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    assert not verify_artifact(vdir, digest).ok
    life.release(life.model, 90, vdir, digest, life.product)
    ev = life.outcome(life.model, 90)
    assert ev.type == "refused" and any(r.startswith("sha256_mismatch: model.pt") for r in ev.reasons), ev
    assert served_version(client, life.model) == before
    assert infer_score(client, life.model, images[:2]).shape == (2,)
    assert not (Path(local_stack.model_repository) / life.model / "90").exists()
    client.close()


def test_misbehaving_candidates_rolled_back(life, images, local_stack):
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    before = served_version(client, life.model)
    # scores far off its own calibration (calibrated on the honest model)
    vdir, digest = write_artifact(life.store, life.model, 91, life.product, Tiny(bias=5.0), images, honest=Tiny())
    life.release(life.model, 91, vdir, digest, life.product)
    ev = life.outcome(life.model, 91)
    assert ev.type == "rolled_back", ev
    assert any(r.startswith("score_distribution") for r in ev.reasons), ev.reasons
    # loads (its 1-image warmup broadcasts), errors on the requests it gets
    vdir, digest = write_artifact(life.store, life.model, 92, life.product, Broken(5), images, honest=Tiny(),
                                  example=torch.randn(5, 3, 64, 64))
    life.release(life.model, 92, vdir, digest, life.product)
    ev = life.outcome(life.model, 92)
    assert ev.type == "rolled_back" and ev.reasons[0].startswith("inference_errors"), ev
    # cannot even run the warmup batch (traced for 31x31, served 64x64): the load fails, it never serves
    vdir, digest = write_artifact(life.store, life.model, 93, life.product, Broken(2, 31), images, honest=Tiny(),
                                  example=torch.randn(2, 3, 31, 31))
    life.release(life.model, 93, vdir, digest, life.product)
    ev = life.outcome(life.model, 93)
    assert ev.type == "rolled_back" and ev.reasons[0].startswith("load_failed"), ev
    assert served_version(client, life.model) == before
    assert not (Path(local_stack.model_repository) / f"{life.model}__candidate").exists()
    assert infer_score(client, life.model, images[:2]).shape == (2,)
    client.close()


def test_drift_alert_on_drifted_stream_not_on_clean(life, images, local_stack):
    """DriftMonitor driven by scores from the served model: darkened frames alert, clean ones do not."""
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    spec = json.loads(client.get_model_config(life.model, as_json=True)["config"]["parameters"]
                      ["linewatch_spec"]["string_value"])
    clean = images[100:164]
    dark = [cv2.imencode(".png", (cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) * 0.6).astype(np.uint8))[1]
            .tobytes() for b in clean]

    def alerts(frames):
        mon = DriftMonitor(DriftConfig(window=32, check_every=8, min_interval_s=0.0))
        mon.set_reference("bottle", spec["calibration"]["scores"], expected_anomaly_rate=0.01)
        out = []
        for i in range(0, len(frames), 8):
            for s in infer_score(client, life.model, frames[i:i + 8]):
                out += mon.observe("cam-1", "bottle", float(s), bool(s > spec["threshold"]))
        return out

    assert alerts(clean) == []
    got = alerts(dark)
    assert got and {a.detector for a in got} & {"score_shift", "anomaly_rate"}
    client.close()


def _lw(*args: str) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "stream.ops.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_cli_release_rollback_status(life, images, local_stack):
    """`linewatch release` -> promoted; `linewatch rollback` -> old version serves again; `rollout status`."""
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    before = served_version(client, life.model)
    vdir, _ = write_artifact(life.store, life.model, 95, life.product, Tiny(gain=0.99), images)
    boot = ["--bootstrap", local_stack.kafka_bootstrap, "--topic", life.topic]
    out = json.loads(_lw("release", str(vdir), *boot))
    assert out["type"] == "released" and out["sha256"] == sha256_file(vdir / "metadata.json")
    assert life.outcome(life.model, 95).type == "promoted"
    assert served_version(client, life.model) == 95
    _lw("rollback", life.model, "--to-version", str(before), *boot)

    def rolled(recs):
        return any(json.loads(r.value).get("detail", {}).get("operator") for r in recs[life.topic])

    recs = asyncio.run(read_topics(local_stack.kafka_bootstrap, [life.topic], until=rolled, timeout_s=STEP_CAP_S))
    ev = [decode(r.value) for r in recs[life.topic] if json.loads(r.value).get("detail", {}).get("operator")][0]
    assert ev.type == "rolled_back" and ev.version == 95 and ev.previous_version == before
    assert served_version(client, life.model) == before
    assert infer_score(client, life.model, images[:2]).shape == (2,)
    st = json.loads(_lw("rollout", "status", "--json", "--model", life.model, *boot))
    assert st[life.model]["serving_version"] == before
    assert _lw("release", "--help")
    client.close()


def test_controller_rolls_out_new_product_workers_route_it_and_raise_drift(life, images, local_stack, tmp_path):
    """`linewatch controller` (subprocess) promotes a released model for a new product and writes the serving
    state; the Faust worker (subprocess) follows it, so the product's frames reach the model; a darkened
    camera raises a drift alert (a clean one does not)."""
    from contracts.envelope import Frame, decode_result, encode_frame
    from devstack.worker_process import WorkerProcess

    uid = uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"it-wk-{uid}")
    boot = local_stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, t.values()))
    ctl = start_controller(local_stack, t, tmp_path)
    w = WorkerProcess(boot, local_stack.triton_grpc_url, tmp_path, app_id=f"lw-wk-{uid}", batch_max=8,
                      batch_within=0.05, env=topic_env(t),
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"],
                                  "--defects-topic", t["defects"], "--dlq-topic", t["dlq"]]).start()
    try:
        model = f"lwt_widget_{uid}"  # no naming convention: reachable only through the routing update
        vdir, digest = write_artifact(life.store, model, 1, "widget", Tiny(), images)
        ev = ModelEvent("released", model, 1, product="widget", detector="efficientad",
                        artifact_uri=path_to_uri(vdir), sha256=digest)

        async def send(recs):
            async with Producer(boot) as p:
                await p.send_many(*recs)

        asyncio.run(send((t["events"], [(ev.key, ev.to_json(), [])])))

        def promoted(o):
            return any(json.loads(r.value).get("type") == "promoted" for r in o[t["events"]])

        recs = asyncio.run(read_topics(boot, [t["events"]], until=promoted, timeout_s=STEP_CAP_S))
        assert promoted(recs), (ctl.log()[-3000:], [r.value for r in recs[t["events"]]])
        dark = [cv2.imencode(".png", (cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) * 0.6)
                             .astype(np.uint8))[1].tobytes() for b in images[100:164]]
        frames = [Frame(f"c-{uid}-{i}", "cam-clean", int(time.time() * 1000), b, product="widget",
                        content_type="image/png") for i, b in enumerate(images[100:164])]
        frames += [Frame(f"d-{uid}-{i}", "cam-dark", int(time.time() * 1000), b, product="widget",
                         content_type="image/png") for i, b in enumerate(dark)]
        asyncio.run(send((t["frames"], [encode_frame(f) for f in frames])))

        def done(o):
            return len(o[t["results"]]) >= len(frames) and o[t["drift"]]

        out = asyncio.run(read_topics(boot, [t["results"], t["drift"], t["dlq"]], until=done, timeout_s=STEP_CAP_S))
        assert w.alive(), w.log_path.read_text()[-3000:]
        res = [decode_result(r.value) for r in out[t["results"]]]
        assert {r.frame_id for r in res} >= {f.frame_id for f in frames} and not out[t["dlq"]]
        assert {r.model for r in res} == {model} and not any(r.shadow for r in res)
        alerts = [json.loads(r.value) for r in out[t["drift"]]]
        assert alerts and {a["camera"] for a in alerts} == {"cam-dark"}, alerts
        assert {a["detector"] for a in alerts} & {"score_shift", "anomaly_rate"}
    finally:
        w.stop()
        ctl.stop()


def test_model_control_needs_the_controllers_key(life, local_stack):
    """tritonserver runs with its restricted model-repository protocol: load/unload/index without the key
    are refused (gRPC and HTTP); with it they work; inference and metadata stay open."""
    import urllib.error
    import urllib.request

    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    for call in (lambda: client.load_model(life.model), lambda: client.unload_model(life.model),
                 lambda: client.get_model_repository_index()):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    req = urllib.request.Request(f"http://{local_stack.triton_http_url}/v2/repository/models/{life.model}/load",
                                 data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 403
    assert client.is_model_ready(life.model)  # the refused unload did nothing
    client.load_model(life.model, headers=local_stack.control_headers)  # the key holder may
    assert client.is_model_ready(life.model) and client.get_model_metadata(life.model).name == life.model
    client.close()


def test_new_model_cannot_take_over_a_product_without_the_flag(life, images, local_stack):
    """A released model for a product another model serves is refused unless the release says take_over."""
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    taker = f"lwt_taker_{uuid.uuid4().hex[:4]}"
    vdir, digest = write_artifact(life.store, taker, 1, life.product, Tiny(gain=0.9), images)
    life.release(taker, 1, vdir, digest, life.product)
    ev = life.outcome(taker, 1)
    assert ev.type == "refused" and any(r.startswith("takeover:") and life.model in r for r in ev.reasons), ev
    assert not client.is_model_ready(taker) and not (Path(local_stack.model_repository) / taker).exists()
    vdir2, digest2 = write_artifact(life.store, taker, 2, life.product, Tiny(gain=0.9), images)
    life.release(taker, 2, vdir2, digest2, life.product, take_over=True)
    assert life.outcome(taker, 2).type == "promoted"
    assert client.is_model_ready(taker)
    # leave life.product to life.model: this in-process controller writes no serving state, so undo by hand
    # what a controller service's retirement does (unload + out of the repository; restores skip it)
    client.unload_model(taker, headers=local_stack.control_headers)
    remove_model_dir(Path(local_stack.model_repository), taker)
    client.close()


def test_served_copy_is_independent_of_the_store(life, images, local_stack):
    """What Triton serves is a checked copy: rewriting the store afterwards changes nothing served."""
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    vdir, digest = write_artifact(life.store, life.model, 96, life.product, Tiny(gain=0.98), images)
    life.release(life.model, 96, vdir, digest, life.product)
    assert life.outcome(life.model, 96).type == "promoted"
    served = Path(local_stack.model_repository) / life.model / "96"
    assert (served / "model.pt").stat().st_ino != (vdir / "model.pt").stat().st_ino
    (vdir / "model.pt").write_bytes(b"tampered in the store after the rollout")
    assert verify_artifact(served, digest).ok
    written = parse_config((served.parent / "config.pbtxt").read_text())
    assert list(written.version_policy.specific.versions) == [96]
    assert infer_score(client, life.model, images[:2]).shape == (2,)
    client.close()


def test_tampered_model_py_refused_while_frames_flow_nothing_lost(life, images, local_stack, tmp_path, reliability):
    """A released version whose model.py was changed after its manifest was written (the code Triton would
    run) is refused by the controller while the product's frames keep flowing: every frame is
    scored by the version already serving, none lost, none DLQ'd."""
    from contracts.envelope import Frame, decode_result, encode_frame
    from devstack.worker_process import WorkerProcess

    uid = uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"it-tamper-{uid}")
    boot = local_stack.kafka_bootstrap
    asyncio.run(ensure_topics(boot, t.values()))
    client = grpcclient.InferenceServerClient(local_stack.triton_grpc_url)
    before = served_version(client, life.model)
    vdir, digest = write_artifact(life.store, life.model, 97, life.product, Tiny(gain=0.97), images)
    with open(vdir / "model.py", "a") as f:
        f.write("\nimport os  # tampered: code that would run inside tritonserver\n")
    ctl = start_controller(local_stack, t, tmp_path)
    w = WorkerProcess(boot, local_stack.triton_grpc_url, tmp_path, app_id=f"lw-tamper-{uid}", batch_max=8,
                      batch_within=0.05, env=topic_env(t),
                      extra_args=["--frames-topic", t["frames"], "--results-topic", t["results"], "--defects-topic",
                                  t["defects"], "--dlq-topic", t["dlq"],
                                  "--routing", json.dumps({"products": {life.product: life.model}})]).start()

    def frames(tag: str, n: int) -> list:
        return [encode_frame(Frame(f"{tag}-{uid}-{i}", "cam-tamper", int(time.time() * 1000), images[i], product=life.product,
                                   content_type="image/png")) for i in range(n)]

    async def send(topic, recs):
        async with Producer(boot) as p:
            await p.send_many(topic, recs)

    try:
        asyncio.run(send(t["frames"], frames("a", 20)))
        ev = ModelEvent("released", life.model, 97, product=life.product, detector="efficientad",
                        artifact_uri=path_to_uri(vdir), sha256=digest)
        asyncio.run(send(t["events"], [(ev.key, ev.to_json(), [])]))
        asyncio.run(send(t["frames"], frames("b", 20)))

        def outcome(o):
            return [json.loads(r.value) for r in o[t["events"]] if json.loads(r.value).get("type") != "released"]

        evs = asyncio.run(read_topics(boot, [t["events"]], until=lambda o: bool(outcome(o)), timeout_s=STEP_CAP_S))
        asyncio.run(send(t["frames"], frames("c", 20)))
        rep = settle(boot, frames_topic=t["frames"], results_topic=t["results"], dlq_topic=t["dlq"], stall_s=120)
        res = [decode_result(r.value) for r in asyncio.run(read_topics(boot, [t["results"]], timeout_s=30,
                                                                       idle_s=2.0))[t["results"]]]
        alive = w.alive()
    finally:
        w.stop()
        ctl.stop()
    out = outcome(evs)
    reliability.record("tampered_model_py", rep, outcome=out[0]["type"] if out else None,
                       served_versions=sorted({r.model_version for r in res}))
    assert out and out[0]["type"] == "refused", (out, ctl.log()[-3000:])
    assert any(r.startswith("sha256_mismatch: model.py") for r in out[0]["reasons"]), out[0]
    assert rep.ok and rep.missing == [] and rep.dlq == 0 and rep.produced == 60, (rep.missing[:5], rep.dlq_reasons)
    assert alive and {r.model for r in res} == {life.model} and {r.model_version for r in res} == {str(before)}
    assert served_version(client, life.model) == before
    assert not (Path(local_stack.model_repository) / life.model / "97").exists()
    client.close()
