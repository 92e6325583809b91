"""Issue #15 item 7: each KafkaUser grants exactly what its component's code reads, writes, creates and
joins (stream/ops/acls.py derives it from the worker's Faust app and the CLI parsers), for the settings
and arguments its container really gets in k8s."""

from __future__ import annotations

import os

import pytest

from contracts.config import Settings
from stream.ops.acls import (
    COMPONENTS,
    READ,
    WRITE,
    Resource,
    capture_grants,
    command_writers,
    console_grants,
    controller_grants,
    from_strimzi,
    line_grants,
    onboard_grants,
    operator_grants,
    to_strimzi,
    trainer_grants,
    worker_grants,
)
from tests.harness.k8s import by_kind, needs_renderer, render
from tests.unit.test_k8s_containers import _argv, _containers, _env

# credentials and TLS do not change what a component touches; the pod's CA file does not exist here
_TRANSPORT = ("LINEWATCH_KAFKA_SECURITY_PROTOCOL", "LINEWATCH_KAFKA_SASL_MECHANISM", "LINEWATCH_KAFKA_SASL_USERNAME",
              "LINEWATCH_KAFKA_SASL_PASSWORD", "LINEWATCH_KAFKA_SSL_CAFILE")


def _settings_of(env: dict[str, str], monkeypatch) -> Settings:
    for k in [k for k in os.environ if k.startswith("LINEWATCH_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("LINEWATCH_") and k not in _TRANSPORT:
            monkeypatch.setenv(k, v)
    return Settings()


def _user_of(c: dict) -> str | None:
    """The KafkaUser whose Strimzi secret holds the container's SASL password."""
    for e in c.get("env", []):
        if e["name"] == "LINEWATCH_KAFKA_SASL_PASSWORD":
            return e["valueFrom"]["secretKeyRef"]["name"]
    return None


@needs_renderer
def test_kafka_users_grant_exactly_what_the_code_uses(monkeypatch):
    users = {n: from_strimzi(u["spec"]["authorization"]["acls"]) for n, u in by_kind(render("base"), "KafkaUser").items()}
    assert set(users) == set(COMPONENTS)
    checked = set()
    for name, obj, _spec, c, cms in _containers():
        env = _env(c, cms)
        cmd, user = _argv(c, env), _user_of(c)
        if cmd is None or user is None:
            continue
        s = _settings_of(env, monkeypatch)
        prog, args = cmd
        if prog == "linewatch" and args[:1] == ["worker"]:
            want = worker_grants(s, args[1:])
        elif prog == "linewatch" and args[:1] == ["controller"]:
            want = controller_grants(s)
        elif prog == "linewatch-models" and args[:2] == ["job", "train"]:
            want = trainer_grants(s)  # the job publishes with `linewatch release` in the same container
        elif prog == "linewatch" and args[:1] == ["console"]:
            want = console_grants(s)  # with its `linewatch onboard` child's, for the runner it is given
            assert s.console_onboard_runner == "k8s" and "--k8s" not in args  # the runner adds --k8s itself
        elif prog == "linewatch" and args[:1] == ["capture"]:
            want = capture_grants(s, args[1:])
        else:
            pytest.fail(f"{name}: {obj['metadata']['name']}/{c['name']} runs `{prog} {args[:2]}` as {user}: no derivation")
        assert users[user] == want, (f"{name}: KafkaUser {user} for {obj['metadata']['name']}/{c['name']}:\n"
                                     f"has  {to_strimzi(users[user])}\nneeds {to_strimzi(want)}")
        checked.add(user)
    assert checked == {"linewatch-worker", "linewatch-controller", "linewatch-trainer", "linewatch-console",
                       "linewatch-capture"}
    # factory lines run outside the cluster with the ConfigMap's topic names
    base_cm = by_kind(render("base"), "ConfigMap")["linewatch-config"]["data"]
    assert users["linewatch-line"] == line_grants(_settings_of(base_cm, monkeypatch))
    # the operator's user: `linewatch rollback` / `linewatch rollout status`, by a person outside the cluster
    assert users["linewatch-operator"] == operator_grants(_settings_of(base_cm, monkeypatch))
    # who may command the controller: releases on model-events (never the worker, which decodes untrusted
    # images), rollbacks on model-commands (only the operator: not the trainer, not the controller itself)
    events = Resource("topic", base_cm.get("LINEWATCH_TOPIC_MODEL_EVENTS", "model-events"))
    writers = {n for n, g in users.items() if "Write" in g.get(events, frozenset())}
    assert writers == {"linewatch-controller", "linewatch-trainer"}, writers
    commands = Resource("topic", base_cm.get("LINEWATCH_TOPIC_MODEL_COMMANDS", "model-commands"))
    writers = {n for n, g in users.items() if "Write" in g.get(commands, frozenset())}
    assert writers == {"linewatch-operator"}, writers
    assert users["linewatch-controller"][commands] == READ


def test_the_worker_cannot_write_the_controllers_commands():
    """Issue #26 item 7: from the code, for any settings: the worker's grants hold nothing on model-events; its
    retrain_requested goes to retrain-requests, which the capture service reads and the controller does not."""
    from stream.lifecycle.service import ControllerTopics

    s = Settings(topic_model_events="p2-events", topic_model_commands="p2-commands", topic_retrain_requests="p2-retrain",
                 dev_broker=False)
    w = command_writers(s)
    assert "linewatch-worker" not in w["released"] | w["rollback_requested"]
    assert w["released"] <= {"linewatch-controller", "linewatch-trainer",
                             "linewatch-console"}  # the console only with a local onboarding runner
    assert "linewatch-console" not in command_writers(s.with_overrides(console_onboard_runner="k8s"))["released"]
    # a rollback only from the operator: the trainer's user (it writes model-events) cannot roll a model back
    assert w["rollback_requested"] == {"linewatch-operator"}
    assert "p2-commands" in ControllerTopics.of(s).reads
    w = worker_grants(s)
    assert Resource("topic", "p2-events") not in w and w[Resource("topic", "p2-retrain")] == WRITE
    assert "p2-retrain" not in ControllerTopics.of(s).reads
    assert capture_grants(s)[Resource("topic", "p2-retrain")] == READ


def test_worker_grants_follow_the_worker_flags_and_settings():
    """Derived, not listed: renamed topics and another app id move every grant with them."""
    s = Settings(app_id="lw-plant2", topic_dlq="plant2-dlq", dev_broker=False)
    g = {(r.type, r.name, r.pattern): ops for r, ops in worker_grants(s, ["--frames-topic", "plant2-frames"]).items()}
    assert g[("topic", "plant2-frames", "literal")] == {"Read", "Describe"}
    assert g[("topic", "plant2-dlq", "literal")] == {"Write", "Describe", "DescribeConfigs"}
    assert g[("group", "lw-plant2", "literal")] == {"Read", "Describe"}
    assert g[("topic", "lw-plant2-", "prefix")] >= {"Create", "Read"}  # Faust's assignor leader topic
    assert ("topic", "frames", "literal") not in g and ("cluster", "", "literal") not in g
    # the drift hook writes retrain_requested on its own topic; nothing on model-events, whose commands the
    # controller obeys (issue #26 item 7)
    assert g[("topic", "retrain-requests", "literal")] == {"Write", "Describe"}
    assert not [k for k in g if k[1] == "model-events"]
    assert g[("topic", "serving-state", "literal")] == {"Read", "Describe"}


def test_controller_grants_follow_its_settings():
    s = Settings(topic_model_events="plant2-events", topic_serving_state="plant2-serving", topic_frames="plant2-frames",
                 topic_model_commands="plant2-commands")
    s.rollout.group = "plant2-controller"
    g = {(r.type, r.name): ops for r, ops in controller_grants(s).items()}
    assert g == {("topic", "plant2-events"): {"Read", "Write", "Describe"},
                 ("topic", "plant2-commands"): {"Read", "Describe"},
                 ("topic", "plant2-serving"): {"Read", "Write", "Describe"},
                 ("topic", "plant2-frames"): {"Read", "Describe"},
                 ("group", "plant2-controller"): {"Read", "Describe"}}


def test_strimzi_round_trip():
    g = line_grants(Settings())
    assert from_strimzi(to_strimzi(g)) == g


def _named(g) -> dict[tuple[str, str], set[str]]:
    return {(r.type, r.name): set(ops) for r, ops in g.items()}


def test_capture_grants_follow_its_code_settings_and_group_flag():
    """One group for the DLQ, retrain requests and onboarding commands; frames and the serving state without a
    group; progress out."""
    s = Settings(topic_dlq="p2-dlq", topic_retrain_requests="p2-retrain", topic_onboarding="p2-onboarding",
                 topic_frames="p2-frames", capture_group="p2-capture", topic_serving_state="p2-serving")
    assert _named(capture_grants(s)) == {("topic", "p2-dlq"): READ, ("topic", "p2-retrain"): READ,
                                         ("topic", "p2-onboarding"): READ | WRITE, ("topic", "p2-frames"): READ,
                                         ("topic", "p2-serving"): READ, ("group", "p2-capture"): READ}
    g = capture_grants(s, ["--group", "other"])  # `linewatch capture --group` replaces the settings' group
    assert Resource("group", "other") in g and Resource("group", "p2-capture") not in g


def test_capture_service_subscribes_to_what_it_is_granted(monkeypatch):
    """The service's consumer really uses CaptureTopics: the topics it subscribes and its group id."""
    import asyncio

    from stream.lifecycle import capture

    seen = {}

    class FakeConsumer:
        def __init__(self, **kw):
            seen["group"] = kw.get("group_id")

        async def start(self):
            pass

        def subscribe(self, topics):
            seen["topics"] = tuple(topics)

        async def getmany(self, **_kw):
            stop.set()
            return {}

        async def stop(self):
            pass

    s = Settings(topic_dlq="p2-dlq", topic_onboarding="p2-onboarding", capture_group="p2-capture")
    stop = asyncio.Event()
    svc = capture.CaptureService(s)
    monkeypatch.setattr(capture, "AIOKafkaConsumer", FakeConsumer)
    asyncio.run(svc._control(stop))
    g = capture_grants(s)
    assert Resource("group", seen["group"]) in g
    assert set(seen["topics"]) == {s.topic_dlq, s.topic_retrain_requests, s.topic_onboarding}
    assert all(g[Resource("topic", t)] >= READ for t in seen["topics"])


def test_onboard_grants_by_runner():
    s = Settings(topic_serving_state="p2-serving", topic_model_events="p2-events", topic_onboarding="p2-onb")
    # --k8s: no group; the Job (linewatch-trainer) publishes `released`, so model events are only read
    assert _named(onboard_grants(s)) == {("topic", "p2-serving"): READ, ("topic", "p2-events"): READ,
                                         ("topic", "p2-onb"): READ | WRITE}
    # local: the training subprocess publishes `released` as this identity
    local = _named(onboard_grants(s, k8s=False))
    assert local[("topic", "p2-events")] == READ | WRITE and local[("topic", "p2-onb")] == WRITE
    assert not [r for r in onboard_grants(s) if r.type != "topic"]


def test_console_grants_include_its_onboard_child_unless_the_runner_is_off():
    s = Settings(console_onboard_runner="local")
    off = console_grants(s.with_overrides(console_onboard_runner="off"))
    assert off[Resource("topic", s.topic_model_events)] == READ  # the console only shows model events
    assert console_grants(s)[Resource("topic", s.topic_model_events)] == READ | WRITE  # local training
    k8s = console_grants(s.with_overrides(console_onboard_runner="k8s"))
    assert all(k8s.get(r, frozenset()) >= ops for r, ops in onboard_grants(s).items())
    assert k8s[Resource("topic", s.topic_onboarding)] == READ | WRITE


def test_line_grants_cover_the_camera():
    """`linewatch camera` publishes where `linewatch replay` does: the settings' frames topic."""
    from stream.ops.cli import build_parser

    s = Settings(topic_frames="p2-frames")
    assert line_grants(s)[Resource("topic", "p2-frames")] == WRITE
    a = build_parser().parse_args(["camera", "--source", "x", "--camera-id", "c"])
    assert a.topic is None  # no default of its own: the camera falls back to settings.topic_frames
