"""`linewatch` command line: one parser, verbs registered by the modules that own them.

Expected failures print one line (`linewatch: error: ...`) and exit non-zero; argparse reports
bad arguments the same way (exit 2). Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stream.logs import configure_logging


class CliError(Exception):
    """An expected failure with a one-line message."""


def _stack_paths(a) -> tuple[Path, Path]:
    from stream.config import Settings  # noqa: PLC0415

    s = Settings()
    return Path(a.workdir or s.stack_workdir), Path(a.model_repository or s.model_repository)


def _cmd_stack(a) -> int:
    from stream import local  # noqa: PLC0415

    workdir, repo = _stack_paths(a)
    if a.action == "up":
        stack = local.LocalStack(workdir, repo, detach=True, load_models=a.load or [])
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
            raise CliError(f"processes still alive after stop: {left}")
        print(f"stack: stopped {st.pids}")
        return 0
    raise CliError(f"unknown stack action {a.action}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="linewatch", description="streaming visual inspection service")
    ap.add_argument("--log-level", default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("stack", help="embedded local stack: Tansu Kafka broker + tritonserver")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--workdir", help="state, logs and Triton backends (default: settings stack_workdir)")
    p.add_argument("--model-repository", help="Triton model repository (default: settings model_repository)")
    p.add_argument("--load", action="append", help="model to load after start (repeatable)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=_cmd_stack)

    for module in ("stream.cli_worker", "stream.cli_lifecycle", "stream.accounting"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    configure_logging(a.log_level)
    try:
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - expected failures: one line, no traceback
        from stream.local import StackError  # noqa: PLC0415

        if isinstance(e, CliError | StackError | FileNotFoundError | ValueError | TimeoutError | ConnectionError):
            from stream.config import one_line_error  # noqa: PLC0415

            print(f"linewatch: error: {one_line_error(e)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
