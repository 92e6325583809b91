"""Helpers of the lifecycle integration tests (tests/integration/test_rollout.py): tiny traced
detectors in the EfficientAD export format, artifact writing, and a controller driven over the real
broker against the real tritonserver."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.artifact import config_sha256, path_to_uri, sha256_file
from contracts.config import Settings
from contracts.image import decode_image
from contracts.model_events import ModelEvent, decode
from contracts.spec import parse_spec, to_tensor
from models.efficientad.export import build_spec, config_pbtxt
from models.efficientad.serving import MODEL_PY
from stream.kafka.clients import Producer, client_kwargs, ensure_topics, read_topics
from stream.lifecycle.controller import Publish, RolloutController
from stream.lifecycle.events import actionable
from stream.lifecycle.policy import HealthPolicy
from tests.harness.line import STEP_CAP_S

SIZE = 64


class Tiny(torch.nn.Module):
    """anomaly map = gain * mean_c |x| + bias; score = mean of the map (CONTRACTS.md I/O)."""

    def __init__(self, gain: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.gain, self.bias = gain, bias

    def forward(self, x):
        amap = self.gain * x.abs().mean(1, keepdim=True) + self.bias
        return amap, amap.flatten(1).mean(1)


class Broken(torch.nn.Module):
    """Fails on the requests it gets: a constant of batch ``n`` is added to the input, so only a batch of 1
    or ``n`` broadcasts. ``n=5`` passes the config's 1-image warmup and fails the probe and live batches
    (inference errors); traced on ``side`` x ``side`` (31: not the served 64) it fails the warmup too, so
    the load itself fails."""

    def __init__(self, n: int = 5, side: int = SIZE):
        super().__init__()
        self.register_buffer("c", torch.ones(n, 3, side, side))

    def forward(self, x):
        y = (x + self.c).abs().mean(1, keepdim=True)
        return y, y.flatten(1).mean(1)


def good_pngs(shared_data: Path, n: int) -> list[bytes]:
    """The first ``n`` MVTec bottle train/good images as 128x128 PNG bytes (small: the tiny test detectors
    resize to 64x64 anyway): calibration, probe and live frames of the rollout scenarios."""
    import cv2

    files = sorted((shared_data / "mvtec" / "bottle" / "train" / "good").glob("*.png"))[:n]
    return [cv2.imencode(".png", cv2.resize(cv2.imread(str(f)), (128, 128), interpolation=cv2.INTER_AREA))[1].tobytes()
            for f in files]


def scores_eager(net, imgs, spec) -> list[float]:
    s = parse_spec(spec)
    x = np.stack([to_tensor(decode_image(b), s) for b in imgs])
    with torch.inference_mode():
        return net(torch.from_numpy(x))[1].tolist()


def write_artifact(store: Path, model: str, version: int, product: str, net, images, *, honest=None,
                   example=None, probes: int = 24) -> tuple[Path, str]:
    """Export like models.efficientad.export + calibration scores + ``probes`` probe images (all sha-pinned)."""
    vdir = store / model / str(version)
    (vdir / "probe").mkdir(parents=True)
    ex = example if example is not None else torch.randn(2, 3, SIZE, SIZE)
    torch.jit.trace(net.eval(), ex, check_trace=False).save(str(vdir / "model.pt"))
    (vdir / "model.py").write_text(MODEL_PY)
    n_probes, probes = probes, images[60:60 + probes]
    assert len(probes) == n_probes, "not enough images for the probes"
    for i, b in enumerate(probes):
        (vdir / "probe" / f"{i:03d}.png").write_bytes(b)
    spec = build_spec(model, product, version, threshold=0.0, map_threshold=0.0, size=SIZE)
    cal = scores_eager(honest or net, images[:60], spec)  # calibration: the honest model on held-out good images
    spec["threshold"] = spec["map_threshold"] = float(np.quantile(cal, 0.99)) + 0.05
    spec["calibration"] = {"scores": cal, "n": len(cal)}
    spec["probe"] = {"files": [f"probe/{i:03d}.png" for i in range(len(probes))], "kind": "good"}
    spec["artifacts"] = {"model.pt": sha256_file(vdir / "model.pt"), "model.py": sha256_file(vdir / "model.py"),
                         **{f: sha256_file(vdir / f) for f in spec["probe"]["files"]}}
    (vdir / "config.pbtxt").write_text(config_pbtxt(model, spec, size=SIZE))  # the version's pinned template
    spec["config_sha256"] = config_sha256((vdir / "config.pbtxt").read_text())
    (vdir / "metadata.json").write_text(json.dumps(spec, indent=2))
    (store / model / "config.pbtxt").write_text(config_pbtxt(model, spec, size=SIZE))
    return vdir, sha256_file(vdir / "metadata.json")


def send_records(boot: str, topic: str, recs: list) -> None:
    """Produce ``recs`` ((key, value, headers) tuples) to ``topic`` and wait for the broker's acks."""
    async def go():
        async with Producer(boot) as p:
            await p.send_many(topic, recs)

    asyncio.run(go())


def release(boot: str, t: dict[str, str], store: Path, model: str, version: int, product: str, images, gain: float,
            probes: int = 24) -> None:
    """Export a Tiny(gain) version (write_artifact) and publish its ``released`` event on ``t["events"]``."""
    vdir, digest = write_artifact(store, model, version, product, Tiny(gain=gain), images, probes=probes)
    ev = ModelEvent("released", model, version, product=product, detector="efficientad",
                    artifact_uri=vdir.as_uri(), sha256=digest)
    send_records(boot, t["events"], [(ev.key, ev.to_json(), [])])


# a short shadow window for the controller tests (a few frames, fast reconcile)
POLICY = {"LINEWATCH_ROLLOUT__SHADOW_FRAMES": "24", "LINEWATCH_ROLLOUT__MIN_FRAMES": "8",
          "LINEWATCH_ROLLOUT__SHADOW_TIMEOUT_S": "60", "LINEWATCH_ROLLOUT__RECONCILE_S": "1"}


def outcomes(boot, t, model, versions, timeout_s=STEP_CAP_S) -> dict[int, list[dict]]:
    """{version: [outcome events]} once every version in ``versions`` has one (promoted / rolled_back / refused)."""
    def hits(o):
        out: dict[int, list[dict]] = {}
        for r in o[t["events"]]:
            d = json.loads(r.value)
            if d.get("model") == model and d.get("type") in ("promoted", "rolled_back", "refused"):
                out.setdefault(d["version"], []).append({**d, "_ts": r.timestamp})
        return out

    recs = asyncio.run(read_topics(boot, [t["events"]], until=lambda o: set(versions) <= set(hits(o)),
                                   timeout_s=timeout_s))
    got = hits(recs)
    assert set(versions) <= set(got), f"outcomes {got}"
    return got


def model_ready(url: str, name: str, version: int | None = None) -> bool:
    """Triton at ``url`` has ``name`` (``version`` when given) loaded and ready; False when it cannot say."""
    c = grpcclient.InferenceServerClient(url)
    try:
        return c.is_model_ready(name, "" if version is None else str(version))
    except Exception:
        return False
    finally:
        c.close()


class Lifecycle:
    """A controller consuming a per-test model-events topic on the real broker, in a thread's loop."""

    def __init__(self, stack, repo: Path, topic: str):
        self.stack, self.repo, self.topic = stack, repo, topic
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(ensure_topics(stack.kafka_bootstrap, [topic]))
        async def mk():  # aiokafka objects are made inside their loop
            return await Producer(stack.kafka_bootstrap).__aenter__()

        self.producer = self.run(mk())
        self.ctl = RolloutController(stack.triton_grpc_url, repo, kafka_publisher(self.producer, topic),
                                     HealthPolicy(shadow_frames=16, min_frames=8, shadow_timeout_s=60, load_timeout_s=90),
                                     control_key=stack.control_key)
        self.stop = asyncio.Event()
        self.task = asyncio.run_coroutine_threadsafe(serve_events(stack.kafka_bootstrap, topic, self.ctl, stop=self.stop),
                                                     self.loop)

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def release(self, model: str, version: int, vdir: Path, digest: str, product: str, take_over=False) -> None:
        ev = ModelEvent("released", model, version, product=product, detector="efficientad",
                        artifact_uri=path_to_uri(vdir), sha256=digest, take_over=take_over)
        self.run(self.producer.send_many(self.topic, [(ev.key, ev.to_json(), [])]))

    def outcome(self, model: str, version: int, timeout_s: float = 90) -> ModelEvent:
        def done(recs):
            return any(_match(r, model, version) for r in recs[self.topic])

        recs = asyncio.run(read_topics(self.stack.kafka_bootstrap, [self.topic], until=done, timeout_s=timeout_s))
        hits = [decode(r.value) for r in recs[self.topic] if _match(r, model, version)]
        assert hits, f"no outcome for {model} v{version} within {timeout_s}s; history={self.ctl.history}"
        return hits[0]

    def close(self):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.task.result(30)
        self.run(self.producer.__aexit__(None, None, None))
        self.run(self.ctl.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _match(r, model, version) -> bool:
    d = json.loads(r.value)
    return d.get("model") == model and d.get("version") == version and d.get("type") in ("promoted", "rolled_back", "refused")


def infer_score(client, model, imgs) -> np.ndarray:
    spec = parse_spec(json.loads(client.get_model_config(model, as_json=True)["config"]["parameters"]
                                 ["linewatch_spec"]["string_value"]))
    x = np.stack([to_tensor(decode_image(b), spec) for b in imgs])
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("score")]).as_numpy("score").reshape(-1)


def served_version(client, model) -> int:
    return max(int(v) for v in client.get_model_metadata(model).versions)


def lifecycle_topics(prefix: str) -> dict[str, str]:
    """Fresh topic names for one worker + controller scenario."""
    return {k: f"{prefix}-{k}" for k in ("frames", "results", "defects", "dlq", "drift", "events", "commands",
                                          "state")}


def topic_env(t: dict[str, str]) -> dict[str, str]:
    """The settings that point a worker or a controller at the scenario's topics."""
    return {"LINEWATCH_TOPIC_FRAMES": t["frames"], "LINEWATCH_TOPIC_MODEL_EVENTS": t["events"],
            **({"LINEWATCH_TOPIC_MODEL_COMMANDS": t["commands"]} if "commands" in t else {}),
            "LINEWATCH_TOPIC_DRIFT": t["drift"], "LINEWATCH_TOPIC_SERVING_STATE": t["state"]}


def start_controller(stack, t: dict[str, str], workdir: Path, *, name: str = "controller", group: str | None = None,
                     env: dict[str, str] | None = None, tritons: list[str] | None = None):
    """`linewatch controller` (a child process) on the scenario's topics against ``stack``'s Triton(s)."""
    from devstack.controller_process import ControllerProcess

    e = {**topic_env(t), "LINEWATCH_ROLLOUT__GROUP": group or f"lw-ctl-{t['events']}", **(env or {})}
    return ControllerProcess(stack.kafka_bootstrap, tritons or [stack.triton_grpc_url], stack.model_repository,
                             stack.control_key, log_path=Path(workdir) / f"{name}.log", env=e).start()


async def serve_events(bootstrap: str, topic: str, controller: RolloutController, *, group_id: str | None = None,
                       stop: asyncio.Event | None = None, settings: Settings | None = None) -> None:
    """An in-process controller for tests: consume ``topic`` with aiokafka and handle its events in order
    (outcomes are published by the controller's ``publish``). ``group_id=None`` reads every partition from
    the beginning. The product's controller is the service (stream/lifecycle/service.py)."""
    stop = stop or asyncio.Event()
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=group_id is not None,
                         auto_offset_reset="earliest", **client_kwargs("consumer", settings))
    await c.start()
    try:
        if group_id is None:
            await _assign_all_from_start(c, topic)
        else:
            c.subscribe([topic])
        while not stop.is_set():
            batch = await c.getmany(timeout_ms=200)
            for recs in batch.values():
                for r in recs:
                    ev = actionable(r.value, None)  # one topic carries both kinds here
                    if ev is not None:
                        await controller.handle_until_decided(ev)
    finally:
        await c.stop()


async def _assign_all_from_start(c: AIOKafkaConsumer, topic: str) -> None:
    parts = c.partitions_for_topic(topic) or set()
    for _ in range(50):
        if parts:
            break
        await asyncio.sleep(0.2)
        parts = c.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    c.assign(tps)
    await c.seek_to_beginning(*tps)


def kafka_publisher(producer: Producer, topic: str) -> Publish:
    """Publish callable over a started :class:`stream.kafka.clients.Producer` (awaits the broker ack)."""

    async def publish(ev: ModelEvent) -> None:
        await producer.send_many(topic, [(ev.key, ev.to_json(), [])])

    return publish
