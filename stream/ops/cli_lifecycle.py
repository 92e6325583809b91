"""`linewatch release|rollout|controller|rollback` verbs (model lifecycle), registered into stream/ops/cli.py.

release ARTIFACT_DIR        verify an artifact (version dir in the model store) and publish ``released``
                            (``--take-over``: it may take over a product/task another model serves)
rollout status              fold the ``model-events`` history into the state per model, with the operating
                            point (target / estimated false-alarm rate, estimated recall, n) of the serving and
                            the candidate version, per task for a multi-task model
controller                  the rollout controller service (stream/lifecycle/service.py): consumes
                            ``model-events``, drives every Triton replica, writes the serving state
rollout run                 the same (older name)
rollback MODEL --to-version V   publish ``rollback_requested`` on ``model-commands`` (the controller reloads V and
                            reports on ``model-events``)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from contracts.cli import positive_float


def _topic(a) -> str:
    """The model-events topic the lifecycle verbs publish to and read."""
    return a.topic or a.settings.topic_model_events


def _commands_topic(a) -> str:
    """The model-commands topic ``linewatch rollback`` publishes to (the controller obeys rollbacks only there)."""
    return a.topic or a.settings.topic_model_commands


async def publish_event(bootstrap: str, topic: str, ev, settings) -> None:
    from stream.kafka.clients import Producer, ensure_topics

    await ensure_topics(bootstrap, [topic], settings=settings)
    async with Producer(bootstrap, settings=settings) as p:
        await p.send_many(topic, [(ev.key, ev.to_json(), [])])


def released_event(artifact_dir: str, *, task: str | None = None, product: str | None = None, force: bool = False,
                   take_over: bool = False):
    """Verify ``artifact_dir`` and build its ``released`` event (ValueError with the reasons if broken)."""
    from contracts.artifact import verify_artifact
    from contracts.model_events import ModelEvent
    from stream.lifecycle.operating import operating_points

    v = verify_artifact(artifact_dir, strict=True)
    if v.artifact is None or (not v.ok and not force):
        raise ValueError(f"artifact {artifact_dir} fails verification: {'; '.join(v.reasons)}")
    art = v.artifact
    detail = {"tasks": art.tasks} if art.tasks else {}
    ops = operating_points(art.metadata)  # per task of a multi-task model
    if ops:
        detail["operating_point"] = ops
    return ModelEvent("released", art.model, art.version, task=task, product=product or art.product,
                      detector=art.detector or None, artifact_uri=art.uri, sha256=art.sha256,
                      detail=detail, take_over=take_over)


def _cmd_release(a) -> int:
    from stream.ops.cli_worker import _bootstrap

    ev = released_event(a.artifact, task=a.task, product=a.product, force=a.force, take_over=a.take_over)
    asyncio.run(publish_event(_bootstrap(a), _topic(a), ev, a.settings))
    print(json.dumps(ev.to_dict()))
    return 0


def _cmd_rollout(a) -> int:
    from stream.kafka.codecs import require_codecs
    from stream.ops.cli_worker import _endpoints

    require_codecs()  # every consumer of ours reads every codec a producer may use
    boot, triton = _endpoints(a)
    s = a.settings
    if a.action == "status":
        from contracts.model_events import ModelEventError, decode, fold_status
        from stream.kafka.clients import read_topics
        from stream.lifecycle.operating import attach_to_status

        def read() -> dict:
            recs = asyncio.run(read_topics(boot, [_topic(a)], timeout_s=a.timeout, idle_s=1.5, settings=s))
            evs = []
            for r in recs[_topic(a)]:
                try:
                    evs.append(decode(r.value))
                except ModelEventError:
                    continue
            st = attach_to_status(fold_status(evs), evs)
            return {k: v for k, v in st.items() if k == a.model} if a.model else st

        st = read()
        deadline = time.monotonic() + (a.wait or 0)
        # --wait: until every released version has its outcome (promoted, rolled back or refused)
        while a.wait and any(v["candidate_version"] for v in st.values()) and time.monotonic() < deadline:
            time.sleep(1.0)
            st = read()
        if a.json:
            print(json.dumps(st, indent=2))
        elif not st:
            print(f"no model events on {_topic(a)}")
        else:
            for m, s in sorted(st.items()):
                print_status_line(m, s)
        return 1 if a.wait and any(v["candidate_version"] for v in st.values()) else 0
    if a.action == "run":  # the controller service under its older name
        return _cmd_controller(a)
    raise ValueError(f"unknown rollout action {a.action}")


def print_status_line(model: str, s: dict) -> None:
    """One model's status (stream/lifecycle/operating.status_line) and its operating points."""
    from stream.lifecycle.operating import status_line

    print(status_line(model, s))
    print_operating_points(s)


def print_operating_points(s: dict) -> None:
    """The operating point lines of one model's status (serving, then candidate version), one per product/task."""
    from stream.lifecycle.operating import describe

    for key, label in (("operating_point", f"v{s.get('serving_version')}"),
                       ("candidate_operating_point", f"candidate v{s.get('candidate_version')}")):
        for name, d in sorted((s.get(key) or {}).items()):
            print(f"    {label} {name}: {describe(d)}")


def _cmd_controller(a) -> int:
    """`linewatch controller`: the rollout controller service (stream/lifecycle/service.py)."""
    import signal

    from stream.lifecycle.policy import HealthPolicy
    from stream.lifecycle.service import ControllerService
    from stream.ops.cli_worker import _endpoints

    boot, triton = _endpoints(a)
    over = {"kafka_bootstrap": boot, "triton_grpc_url": triton}
    if a.triton_replicas:
        over["controller_triton_urls"] = a.triton_replicas
    if a.topic:
        over["topic_model_events"] = a.topic
    s = a.settings.with_overrides(**over)
    if a.group:
        s = s.with_overrides(rollout=s.rollout.model_copy(update={"group": a.group}))
    pol = HealthPolicy.from_settings(s.rollout, shadow_frames=a.shadow_frames, shadow_timeout_s=a.shadow_timeout)
    repo = Path(a.model_repository or s.model_repository)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await ControllerService(s, repo, pol).run(stop)

    from stream.lifecycle.lease import LeaseLost

    try:
        asyncio.run(run())
    except LeaseLost as e:  # another controller is active now: this one stops without writing anything more
        print(f"linewatch controller: {e}", file=sys.stderr)
        return 3
    return 0


def _cmd_rollback(a) -> int:
    from contracts.model_events import ModelEvent
    from stream.ops.cli_worker import _bootstrap

    ev = ModelEvent("rollback_requested", a.model, a.to_version, reasons=[a.reason])
    asyncio.run(publish_event(_bootstrap(a), _commands_topic(a), ev, a.settings))
    print(json.dumps(ev.to_dict()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    def common(p, triton: bool = False, topic: str = "model_events"):
        p.add_argument("--bootstrap", help="Kafka bootstrap host:port (default: running stack / settings)")
        p.add_argument("--topic", help=f"{topic.replace('_', '-')} topic (default: settings topic_{topic})")
        if triton:
            p.add_argument("--triton", help="Triton gRPC host:port")

    p = sub.add_parser("release", help="verify an artifact in the model store and publish `released`")
    p.add_argument("artifact", help="artifact (version) directory or file:// URI in the model store")
    p.add_argument("--task", help="MoLE-Flow task the release adds")
    p.add_argument("--product", help="product (default: metadata.json product)")
    p.add_argument("--force", action="store_true", help="publish even if verification fails (tests the refusal)")
    p.add_argument("--take-over", action="store_true",
                   help="the release may take over a product (or task) another model serves now (else refused)")
    common(p)
    p.set_defaults(func=_cmd_release)

    def controller_args(p, pre: str = ""):
        p.add_argument("--model-repository", help=f"{pre}Triton model repository the controller writes")
        p.add_argument("--group", help=f"{pre}consumer group (default: settings rollout.group)")
        p.add_argument("--shadow-frames", type=int, help=f"{pre}default settings rollout.shadow_frames")
        p.add_argument("--shadow-timeout", type=float, help=f"{pre}seconds, default settings rollout.shadow_timeout_s")
        p.add_argument("--triton-replicas", help=f"{pre}comma list of Triton gRPC host:port the controller loads "
                                                 "on (default: settings controller_triton_urls / --triton)")

    p = sub.add_parser("rollout", help="rollout status (`rollout run` = `linewatch controller`)")
    p.add_argument("action", choices=["status", "run"])
    p.add_argument("--model", help="status of one model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0, help="status: seconds to read the topic")
    p.add_argument("--wait", type=positive_float, metavar="SECONDS",
                   help="status: wait up to SECONDS until no release is pending (exit 1 if one still is)")
    controller_args(p, "run: ")
    common(p, triton=True)
    p.set_defaults(func=_cmd_rollout)

    p = sub.add_parser("controller", help="run the rollout controller service: the only holder of Triton model "
                                          "control; rolls out releases on every Triton replica, writes the serving state")
    controller_args(p)
    common(p, triton=True)
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("rollback", help="serve an older version of a model again")
    p.add_argument("model")
    p.add_argument("--to-version", type=int, required=True)
    p.add_argument("--reason", default="operator request")
    common(p, topic="model_commands")
    p.set_defaults(func=_cmd_rollback)
