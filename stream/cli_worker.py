"""`linewatch worker|replay|tail|demo` verbs, registered into stream/cli.py's argparse parser.

stream/cli.py calls ``register(subparsers)``; each verb sets ``func`` to a callable taking the parsed
namespace and returning an exit code. Bad arguments / missing data -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _endpoints(a) -> tuple[str, str]:
    """(kafka bootstrap, triton gRPC url): flag > LINEWATCH_* env > a running `linewatch stack up` > settings."""
    from stream.config import Settings  # noqa: PLC0415

    s = Settings()
    boot = getattr(a, "bootstrap", None) or os.environ.get("LINEWATCH_KAFKA_BOOTSTRAP")
    triton = getattr(a, "triton", None) or os.environ.get("LINEWATCH_TRITON_GRPC_URL")
    if not (boot and triton):
        try:
            from stream.local import pid_alive, read_state  # noqa: PLC0415

            st = read_state(s.stack_workdir)
            if st is not None and all(pid_alive(p) for p in st.pids.values()):
                boot, triton = boot or st.kafka_bootstrap, triton or st.triton_grpc_url
        except Exception:  # noqa: BLE001 - no running stack
            pass
    return boot or s.kafka_bootstrap, triton or s.triton_grpc_url


def _bootstrap(a) -> str:
    return _endpoints(a)[0]


def _cmd_worker(a) -> int:
    from stream.worker import config_from_args, run_worker  # noqa: PLC0415

    a.bootstrap, a.triton = _endpoints(a)
    run_worker(config_from_args(a))
    return 0


def _cmd_replay(a) -> int:
    from stream.replay import list_images, replay  # noqa: PLC0415

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
    from stream.tail import run  # noqa: PLC0415

    run(_bootstrap(a), results_topic=a.topic, dlq_topic=None if a.no_dlq else a.dlq_topic,
        defects_topic=a.defects_topic if a.defects else None, from_beginning=a.from_beginning, limit=a.limit,
        as_json=a.json, timeout_s=a.timeout)
    return 0


def _cmd_demo(a) -> int:
    from stream.demo import run_demo  # noqa: PLC0415

    try:
        run_demo(workdir=a.workdir, model_repository=a.model_repository, fps=a.fps, retrain=a.retrain,
                 cameras=a.camera, bootstrap=a.bootstrap, triton_grpc_url=a.triton, model=a.model)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from stream.worker import add_worker_args  # noqa: PLC0415 - light module (faust imported lazily)

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

    p = sub.add_parser("demo", help="embedded stack + bottle model + worker + replay of the test set + summary")
    p.add_argument("--workdir")
    p.add_argument("--model-repository")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--camera", action="append")
    p.add_argument("--retrain", action="store_true", help="train + export a fresh model even if one exists")
    p.add_argument("--bootstrap", help="use a running broker (with --triton) instead of the embedded stack")
    p.add_argument("--triton", help="Triton gRPC host:port of a running server")
    p.add_argument("--model", help="Triton model name to use (default: the bottle model found in the repository)")
    p.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:  # standalone use until/unless stream.cli is present
    ap = argparse.ArgumentParser("linewatch")
    register(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
