"""The Kafka ACLs each component needs, derived from its code (issue #15 item 7).

Nothing here is a hand-kept list of topics: each component's grants are read from the code that does
the reading and writing.

- **worker**: the Faust app that ``linewatch worker`` runs (:func:`stream.worker.app.build_app`).
  It reads its agents' source topics and writes the topics in ``app.linewatch_writes`` (the ones its
  pipeline and lifecycle hooks publish to; never ``model-events``: a worker decodes untrusted images, and the
  controller obeys the commands on that topic, so its ``retrain_requested`` goes to ``retrain-requests``). At start it reads the ``max.message.bytes`` of
  :func:`stream.worker.app.limit_topics` (DescribeConfigs). Faust creates its internal topics (the
  assignor's leader topic, table changelogs) under the ``<app id>-`` prefix, and its consumer group
  is the app id.
- **trainer**: ``linewatch release`` (run by the training Job) publishes to the topic its parser
  resolves (:func:`stream.ops.cli_lifecycle._topic`).
- **controller**: ``linewatch controller`` (:class:`stream.lifecycle.service.ControllerService`) reads
  and writes the topics of its ``ControllerTopics`` (model events in its own group, the compacted serving
  state) and reads frames without a group (the shadow sampler).
- **console**: ``linewatch console`` (:class:`stream.console.sources.ConsoleTopics`) reads every topic it
  shows without a group and writes operator feedback and capture selections. Unless
  ``console_onboard_runner`` is ``off`` it runs ``linewatch onboard`` as a child with its own identity, so
  its user also holds :func:`onboard_grants` for that runner.
- **capture**: ``linewatch capture`` (:class:`stream.lifecycle.capture.CaptureTopics`) reads the DLQ, the
  workers' retrain requests and onboarding commands in its group, live frames and the serving state without
  one, and writes onboarding progress.
- **onboard**: ``linewatch onboard`` (stream/lifecycle/onboard_runner.py) reads serving-state, model-events and the
  onboarding topic without a group and publishes its steps on the onboarding topic; trained locally, the
  training subprocess publishes ``released`` with the same identity.
- **operator**: a person's ``linewatch rollback`` (on model-commands, the only topic the controller obeys a
  rollback from) and ``linewatch rollout status``.
- **line**: a factory line publishes frames the way ``linewatch replay`` and ``linewatch camera`` do and
  follows its results the way ``linewatch tail --defects`` does. None uses a consumer group.

None of these producers is idempotent or transactional, so no cluster grant is needed.
``tests/unit/test_kafka_acls.py`` checks that the KafkaUsers in ``k8s/base/kafka-users.yaml``
grant exactly these. ``linewatch acls`` prints them as Strimzi ``acls`` entries.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from contracts.config import Settings

READ = frozenset({"Read", "Describe"})
WRITE = frozenset({"Write", "Describe"})


@dataclass(frozen=True, order=True)
class Resource:
    type: str  # topic | group | cluster
    name: str = ""
    pattern: str = "literal"  # literal | prefix


Grants = dict[Resource, frozenset[str]]


def _add(g: Grants, res: Resource, ops: frozenset[str]) -> None:
    g[res] = g.get(res, frozenset()) | ops


def _topic(name: str) -> Resource:
    return Resource("topic", name)


def _parse(argv: list[str], settings: Settings) -> argparse.Namespace:
    from stream.ops.cli import build_parser

    a = build_parser().parse_args(argv)
    a.settings = settings
    return a


def worker_grants(settings: Settings, args: list[str] | None = None) -> Grants:
    """What the Faust app of ``linewatch worker ARGS`` reads, writes, creates and joins (built, never started)."""
    from stream.kafka.faust_adapter import leader_topic_name
    from stream.worker.app import build_app, limit_topics
    from stream.worker.config import worker_config

    with tempfile.TemporaryDirectory() as d:
        a = _parse(["worker", *(args or []), "--datadir", str(Path(d) / "worker")], settings)
        cfg = worker_config(settings, a)
        s = cfg.settings
        app = build_app(cfg)
        g: Grants = {}
        for agent in app.agents.values():
            for name in agent.channel.topics:
                _add(g, _topic(name), READ)
        for name in app.linewatch_follows:  # type: ignore[attr-defined]  # compacted topics read whole, no group
            _add(g, _topic(name), READ)
        for name in app.linewatch_writes:  # type: ignore[attr-defined]
            _add(g, _topic(name), WRITE)
        for name in limit_topics(s):
            _add(g, _topic(name), frozenset({"DescribeConfigs"}))
        internal = [] if app.conf.topic_disable_leader else [leader_topic_name(app)]
        internal += [t.changelog_topic.get_topic_name() for t in app.tables.values()]
        prefix = f"{app.conf.id}-"
        if any(not n.startswith(prefix) for n in internal):
            raise RuntimeError(f"a Faust internal topic outside the {prefix!r} prefix: {internal}")
        ops = {"Create", "Read", "Describe"} | ({"Write"} if app.tables else set())
        _add(g, Resource("topic", prefix, "prefix"), frozenset(ops))
        _add(g, Resource("group", app.conf.id), READ)
        return g


def trainer_grants(settings: Settings) -> Grants:
    """``linewatch release DIR``: describes (metadata) and writes the model-events topic."""
    from stream.ops.cli_lifecycle import _topic as events_topic

    return {_topic(events_topic(_parse(["release", "artifact"], settings))): WRITE}


def controller_grants(settings: Settings) -> Grants:
    """What the rollout controller service reads, writes and joins (the ``topics`` it is built with)."""
    from stream.lifecycle.service import ControllerTopics

    t = ControllerTopics.of(settings)
    g: Grants = {}
    for name in t.reads:
        _add(g, _topic(name), READ)
    for name in t.writes:
        _add(g, _topic(name), WRITE)
    _add(g, Resource("group", t.group), READ)
    return g


def line_grants(settings: Settings) -> Grants:
    """A factory line: frames out (as ``linewatch replay``), results in (as ``linewatch tail --defects``)."""
    from stream.ops.cli_worker import replay_topic, tail_topics

    g: Grants = {}
    _add(g, _topic(replay_topic(_parse(["replay", "folder"], settings))), WRITE)
    # `linewatch camera` resolves its topic like replay (--topic, else topic_frames; stream/ops/cli_camera.py)
    _add(g, _topic(replay_topic(_parse(["camera", "--source", "x", "--camera-id", "c"], settings))), WRITE)
    for name in tail_topics(_parse(["tail", "--defects"], settings)).values():
        if name:
            _add(g, _topic(name), READ)
    return g


def onboard_grants(settings: Settings, k8s: bool = True) -> Grants:
    """``linewatch onboard [--k8s]`` (stream/lifecycle/onboard_runner.py), no consumer group anywhere (``read_topics``):
    the serving state read whole (``serving_entries``: is the product served, which model), model events
    read (``wait_model_event``: the ``released``, then the outcome with ``--wait``), the onboarding topic
    read (``captured_on_topic``: the image count without the capture volume, ``--k8s``) and written (each
    step: ``Onboarding.emit``). Trained locally, the training subprocess publishes ``released`` on the
    model-events topic ``train_argv`` passes it, as this same identity; with ``--k8s`` the Job does, as
    ``linewatch-trainer``."""
    s = settings
    g: Grants = {}
    for name in (s.topic_serving_state, s.topic_model_events):
        _add(g, _topic(name), READ)
    _add(g, _topic(s.topic_onboarding), WRITE)
    if k8s:
        _add(g, _topic(s.topic_onboarding), READ)
    else:
        _add(g, _topic(s.topic_model_events), WRITE)
    return g


def console_grants(settings: Settings) -> Grants:
    """``linewatch console``: reads the topics it shows (no group), writes operator feedback and capture
    selections; plus what its ``linewatch onboard`` child needs (``console_onboard_runner``: ``k8s`` adds
    ``--k8s``, ``off`` runs none)."""
    from stream.console.sources import ConsoleTopics

    t = ConsoleTopics.of(settings)
    g: Grants = {}
    for name in t.reads:
        _add(g, _topic(name), READ)
    for name in t.writes:
        _add(g, _topic(name), WRITE)
    if settings.console_onboard_runner != "off":
        for res, ops in onboard_grants(settings, k8s=settings.console_onboard_runner == "k8s").items():
            _add(g, res, ops)
    return g


def capture_grants(settings: Settings, args: list[str] | None = None) -> Grants:
    """``linewatch capture ARGS``: the topics of its ``CaptureTopics`` (``--group`` replaces the settings'
    group, as the verb does)."""
    from stream.lifecycle.capture import CaptureTopics

    a = _parse(["capture", *(args or [])], settings)
    t = CaptureTopics.of(settings.with_overrides(capture_group=a.group))
    g: Grants = {}
    for name in t.subscribed:
        _add(g, _topic(name), READ)
    _add(g, _topic(t.frames), READ)
    _add(g, _topic(t.serving_state), READ)  # followed whole, no group: served products are not captured
    for name in t.writes:
        _add(g, _topic(name), WRITE)
    _add(g, Resource("group", t.group), READ)
    return g


def operator_grants(settings: Settings) -> Grants:
    """A person's ``linewatch rollback`` (publishes ``rollback_requested`` on model-commands) and ``linewatch
    rollout status`` (reads the model-events history, no group), on the topics their parsers resolve."""
    from stream.ops.cli_lifecycle import _commands_topic
    from stream.ops.cli_lifecycle import _topic as events_topic

    g: Grants = {}
    _add(g, _topic(_commands_topic(_parse(["rollback", "m", "--to-version", "1"], settings))), WRITE)
    _add(g, _topic(events_topic(_parse(["rollout", "status"], settings))), READ)
    return g


def command_writers(settings: Settings) -> dict[str, set[str]]:
    """Per event the controller obeys, the components that may write the topic it is obeyed from
    (stream/lifecycle/events.py SOURCE): ``released`` on model-events, ``rollback_requested`` on model-commands.
    Never the worker (issue #26 item 7); a rollback only from the operator."""
    topics = {"released": settings.topic_model_events, "rollback_requested": settings.topic_model_commands}
    return {ev: {n for n, f in COMPONENTS.items() if "Write" in f(settings).get(_topic(name), frozenset())}
            for ev, name in topics.items()}


COMPONENTS = {"linewatch-worker": worker_grants, "linewatch-controller": controller_grants,
              "linewatch-trainer": trainer_grants, "linewatch-line": line_grants,
              "linewatch-console": console_grants, "linewatch-capture": capture_grants,
              "linewatch-operator": operator_grants}


def from_strimzi(acls: list[dict]) -> Grants:
    """A KafkaUser's ``spec.authorization.acls`` as :data:`Grants`."""
    g: Grants = {}
    for a in acls:
        r = a["resource"]
        res = Resource(r["type"], r.get("name", ""), r.get("patternType", "literal") if r["type"] != "cluster" else "literal")
        _add(g, res, frozenset(a.get("operations") or [a["operation"]]))
    return g


def to_strimzi(g: Grants) -> list[dict]:
    out = []
    for res in sorted(g):
        r = {"type": res.type} if res.type == "cluster" else {"type": res.type, "name": res.name, "patternType": res.pattern}
        out.append({"resource": r, "operations": sorted(g[res])})
    return out


def _cmd_acls(a) -> int:
    import yaml

    names = [a.component] if a.component else list(COMPONENTS)
    docs = {n: {"authorization": {"type": "simple", "acls": to_strimzi(COMPONENTS[n](a.settings))}} for n in names}
    print(yaml.safe_dump(docs, sort_keys=False).rstrip())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("acls", help="print the Kafka ACLs each component needs (Strimzi KafkaUser acls), derived from the code")
    p.add_argument("--component", choices=sorted(COMPONENTS), help="one component (default: all)")
    p.set_defaults(func=_cmd_acls)
