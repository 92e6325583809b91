"""`linewatch worker|replay|tail|demo` verbs, registered into stream/ops/cli.py's argparse parser.

stream/ops/cli.py calls ``register(subparsers)``; each verb sets ``func`` to a callable taking the parsed
namespace and returning an exit code. Bad arguments / missing data -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio

from contracts.cli import UsageError


def _endpoints(a) -> tuple[str, str]:
    """(kafka bootstrap, triton gRPC url): flag > LINEWATCH_* setting > a running dev stack > default.
    A running dev stack also supplies Triton's model-control key when no setting gives one."""
    s = a.settings
    given = set(s.model_fields_set)  # before any override below (an override marks every field as set)
    if s.triton_control_key is None:
        from stream.ops.cli import plugins

        for mod in plugins():
            key = getattr(mod, "running_control_key", lambda _s: None)(s)
            if key:
                a.settings = s = s.with_overrides(triton_control_key=key)
                break
    boot = getattr(a, "bootstrap", None) or (s.kafka_bootstrap if "kafka_bootstrap" in given else None)
    triton = getattr(a, "triton", None) or (s.triton_grpc_url if "triton_grpc_url" in given else None)
    if not (boot and triton):
        from stream.ops.cli import plugins

        for mod in plugins():
            found = getattr(mod, "running_endpoints", lambda _s: None)(s)
            if found:
                boot, triton = boot or found[0], triton or found[1]
                break
    return boot or s.kafka_bootstrap, triton or s.triton_grpc_url


def _bootstrap(a) -> str:
    return _endpoints(a)[0]


def _cmd_worker(a) -> int:
    from stream.worker.app import run_worker
    from stream.worker.config import worker_config

    a.bootstrap, a.triton = _endpoints(a)
    run_worker(worker_config(a.settings, a))
    return 0


def replay_topic(a) -> str:
    """The topic `linewatch replay` publishes frames to."""
    return a.topic or a.settings.topic_frames


def tail_topics(a) -> dict[str, str | None]:
    """The topics `linewatch tail` reads: results, DLQ (unless --no-dlq), defects (with --defects)."""
    s = a.settings
    return {"results_topic": a.topic or s.topic_results,
            "dlq_topic": None if a.no_dlq else a.dlq_topic or s.topic_dlq,
            "defects_topic": (a.defects_topic or s.topic_defects) if a.defects else None}


def _cmd_replay(a) -> int:
    from stream.ops.replay import replay
    from stream.sources.inputs import list_images

    list_images(a.folder)  # FileNotFoundError: a usage error (exit 2, contracts.cli)
    if a.fps < 0:
        raise UsageError("--fps must be >= 0")
    topic = replay_topic(a)
    sent = asyncio.run(replay(_bootstrap(a), a.folder, cameras=a.camera or ["cam-1"], fps=a.fps, topic=topic,
                              product=a.product, line=a.line, loops=a.loops, limit=a.limit, settings=a.settings))
    print(f"published {len(sent)} frames to {topic}")
    return 0


def _cmd_tail(a) -> int:
    from stream.ops.tail import run

    run(_bootstrap(a), **tail_topics(a), from_beginning=a.from_beginning, limit=a.limit, as_json=a.json,
        timeout_s=a.timeout, settings=a.settings)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from stream.worker.config import add_worker_args  # light: no faust, no tritonclient

    p = sub.add_parser("worker", help="run the Faust stream worker (frames -> Triton -> results/defects/DLQ)")
    add_worker_args(p)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("replay", help="publish a folder of images as camera frames at a given fps")
    p.add_argument("folder", help="image folder; MVTec layout (good/, <defect>/) adds gt_label/gt_defect headers")
    p.add_argument("--bootstrap")
    p.add_argument("--camera", action="append", help="camera id (repeat for several cameras)")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second per camera (0 = unthrottled)")
    p.add_argument("--product")
    p.add_argument("--line")
    p.add_argument("--loops", type=int, default=1)
    p.add_argument("--limit", type=int)
    p.add_argument("--topic", help="default: settings topic_frames")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("tail", help="pretty-print inspection results (and DLQ records) as they arrive")
    p.add_argument("--bootstrap")
    p.add_argument("--topic", help="results topic (default: settings topic_results)")
    p.add_argument("--dlq-topic", help="default: settings topic_dlq")
    p.add_argument("--no-dlq", action="store_true")
    p.add_argument("--defects", action="store_true", help="also show defect events")
    p.add_argument("--defects-topic", help="default: settings topic_defects")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tail)
