"""``linewatch stack up|status|down`` and ``linewatch demo``: development verbs, registered into the
``linewatch`` parser through the ``linewatch.verbs`` entry point (absent from the worker image).

:func:`running_endpoints` lets the operator verbs find a running ``linewatch stack up`` when no
endpoint is given (flag or LINEWATCH_* setting).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contracts.cli import RuntimeFailure, UsageError, non_negative_int, positive_int
from contracts.config import Settings


def _stack_paths(a) -> tuple[Path, Path]:
    s = a.settings
    return Path(a.workdir or s.stack_workdir), Path(a.model_repository or s.model_repository)


def _cmd_stack(a) -> int:
    from devstack import stack as local

    workdir, repo = _stack_paths(a)
    if a.action == "up":
        stack = local.LocalStack(workdir, repo, detach=True, load_models=a.load or [], controller=not a.no_controller,
                                 workers=a.workers)
        st = stack.start()
        print(json.dumps({"ready": True, **st.endpoints(), "pids": st.pids, "workdir": str(workdir)}, indent=2))
        return 0
    if a.action == "status":
        report = local.status(workdir)
        if a.json:
            print(json.dumps(report, indent=2))
        elif not report["running"]:
            print(f"stack: not running (no state in {workdir})")
        else:
            for name, svc in report["services"].items():
                eps = ", ".join(f"{k}={v}" for k, v in svc.items() if k.startswith("endpoint"))
                print(f"{name:7s} {'ready' if svc['ready'] else 'NOT READY'}  pid={svc['pid']}  {eps}")
        return 0 if report.get("ready") else 1
    if a.action == "down":
        st = local.read_state(workdir)
        if st is None:
            print(f"stack: not running (no state in {workdir})")
            return 0
        local.LocalStack(workdir, st.model_repository).stop()
        left = {n: [p, *local.group_pids(p)] for n, p in st.pids.items() if local.owned_alive(n, p)}
        if left:
            raise RuntimeFailure(f"processes still alive after stop: {left}")
        print(f"stack: stopped {st.pids}")
        return 0
    raise RuntimeFailure(f"unknown stack action {a.action}")


def _cmd_demo(a) -> int:
    from devstack.demo import run_demo

    try:
        run_demo(settings=a.settings, workdir=a.workdir, model_repository=a.model_repository, fps=a.fps,
                 retrain=a.retrain, cameras=a.camera, bootstrap=a.bootstrap, triton_grpc_url=a.triton, model=a.model,
                 limit=a.limit, max_images=a.max_images)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    return 0


def running_endpoints(settings: Settings) -> tuple[str, str] | None:
    """(kafka bootstrap, triton gRPC url) of a running ``linewatch stack up``, or None."""
    from devstack.processes import pid_alive
    from devstack.stack import read_state

    st = read_state(settings.stack_workdir)
    if st is not None and all(pid_alive(p) for p in st.pids.values()):
        return st.kafka_bootstrap, st.triton_grpc_url
    return None


def running_control_key(settings: Settings) -> str | None:
    """Triton's model-control key of a running ``linewatch stack up`` (its state file, mode 0600), or None."""
    from devstack.processes import pid_alive
    from devstack.stack import read_state

    st = read_state(settings.stack_workdir)
    if st is not None and st.control_key and all(pid_alive(p) for p in st.pids.values()):
        return st.control_key
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="embedded local stack: Tansu Kafka broker + tritonserver")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--workdir", help="state, logs and Triton backends (default: settings stack_workdir)")
    p.add_argument("--model-repository", help="Triton model repository (default: settings model_repository)")
    p.add_argument("--load", action="append", help="model to load after start (repeatable)")
    p.add_argument("--no-controller", action="store_true", help="up: do not start the rollout controller")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="up: also start N stream workers (one consumer group; frames get max(6, N) partitions)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=_cmd_stack)

    p = sub.add_parser("demo", help="embedded stack + bottle model + worker + replay of the test set + summary")
    p.add_argument("--workdir")
    p.add_argument("--model-repository")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--camera", action="append")
    p.add_argument("--retrain", action="store_true", help="train + export a fresh model even if one exists")
    p.add_argument("--bootstrap", help="use a running broker (with --triton) instead of the embedded stack")
    p.add_argument("--triton", help="Triton gRPC host:port of a running server")
    p.add_argument("--model", help="Triton model name to use (default: the bottle model found in the repository)")
    p.add_argument("--limit", type=positive_int, help="replay only this many test frames (good and defective mixed)")
    p.add_argument("--max-images", type=positive_int,
                   help="training images when a model is trained here (default: the detector's quick recipe)")
    p.set_defaults(func=_cmd_demo)
