"""`linewatch worker|replay|tail|demo` verbs, registered into stream/ops/cli.py's argparse parser.

stream/ops/cli.py calls ``register(subparsers)``; each verb sets ``func`` to a callable taking the parsed
namespace and returning an exit code. Bad arguments / missing data -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def _endpoints(a) -> tuple[str, str]:
    """(kafka bootstrap, triton gRPC url): flag > LINEWATCH_* setting > a running dev stack > default."""
    s = a.settings
    boot = getattr(a, "bootstrap", None) or (s.kafka_bootstrap if "kafka_bootstrap" in s.model_fields_set else None)
    triton = getattr(a, "triton", None) or (s.triton_grpc_url if "triton_grpc_url" in s.model_fields_set else None)
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
    from stream.worker.app import config_from_args, run_worker  # noqa: PLC0415

    a.bootstrap, a.triton = _endpoints(a)
    run_worker(config_from_args(a))
    return 0


def _cmd_replay(a) -> int:
    from stream.ops.replay import list_images, replay  # noqa: PLC0415

    try:
        list_images(a.folder)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.fps < 0:
        print("error: --fps must be >= 0", file=sys.stderr)
        return 2
    sent = asyncio.run(replay(_bootstrap(a), a.folder, cameras=a.camera or ["cam-1"], fps=a.fps, topic=a.topic,
                              product=a.product, line=a.line, loops=a.loops, limit=a.limit))
    print(f"published {len(sent)} frames to {a.topic}")
    return 0


def _cmd_tail(a) -> int:
    from stream.ops.tail import run  # noqa: PLC0415

    run(_bootstrap(a), results_topic=a.topic, dlq_topic=None if a.no_dlq else a.dlq_topic,
        defects_topic=a.defects_topic if a.defects else None, from_beginning=a.from_beginning, limit=a.limit,
        as_json=a.json, timeout_s=a.timeout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from stream.worker.app import add_worker_args  # noqa: PLC0415 - light module (faust imported lazily)

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
    p.add_argument("--topic", default="frames")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("tail", help="pretty-print inspection results (and DLQ records) as they arrive")
    p.add_argument("--bootstrap")
    p.add_argument("--topic", default="inspection-results")
    p.add_argument("--dlq-topic", default="frames-dlq")
    p.add_argument("--no-dlq", action="store_true")
    p.add_argument("--defects", action="store_true", help="also show defect events")
    p.add_argument("--defects-topic", default="defect-events")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=int)
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tail)
