"""``linewatch-models``: training / evaluation / export jobs for every detector.

Each detector group lives in its own module exposing ``register(subparsers)``; adding a detector
is one line in :data:`GROUP_MODULES` (e.g. ``"models.moleflow.cli"``). ``register`` adds a
sub-parser per group whose verbs set ``func`` (called with the parsed args, returns an exit code).
Bad arguments and missing data print ONE line on stderr and exit 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

GROUP_MODULES: list[str] = [
    "models.efficientad.cli",
    "models.moleflow.cli",
    "models.jobs.train_job",  # `job train` (adapter lifecycle: train -> store -> released)
]


class UsageError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse default prints usage + message
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="linewatch-models", description="linewatch model jobs")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", parser_class=OneLineParser)
    sub.required = True
    for mod_name in GROUP_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):  # group not present in this checkout
                continue
            raise
        mod.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    # importlib: under ``python -m models.cli`` this module is __main__, group modules raise models.cli's class
    errs: list[type[BaseException]] = [UsageError, importlib.import_module("models.cli").UsageError,
                                       FileNotFoundError, NotADirectoryError]
    for mod, name in (("models.data", "DataError"), ("models.backbones", "BackboneError")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except Exception:  # pragma: no cover
            pass
    return tuple(errs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from contracts.logs import configure_logging

        configure_logging()
    except Exception:  # pragma: no cover
        pass
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"linewatch-models: error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("linewatch-models: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
