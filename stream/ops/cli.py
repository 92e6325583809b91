"""`linewatch` command line: one parser, verbs registered by the modules that own them.

Core verbs come from stream.ops; development verbs (``stack``, ``demo``) are plugins found through
the ``linewatch.verbs`` entry point, so the worker image (no devstack) simply lacks them.
Exit codes follow contracts.cli: 2 usage/data errors, 1 runtime failures, one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, entry_points
from importlib.metadata import version as _dist_version

from contracts.cli import OneLineParser, run_command
from contracts.config import Settings
from contracts.logs import configure_logging

CORE_VERBS = ("stream.ops.cli_worker", "stream.ops.cli_lifecycle", "stream.ops.accounting", "stream.ops.acls",
              "stream.ops.cli_console", "stream.ops.cli_camera")
PLUGIN_GROUP = "linewatch.verbs"


def plugins() -> list:
    """Modules registered under the ``linewatch.verbs`` entry point that are importable here."""
    mods = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            mods.append(importlib.import_module(ep.value.split(":")[0]))
        except ModuleNotFoundError:  # a plugin whose package this image does not carry
            continue
    return mods


def version() -> str:
    """The installed linewatch distribution's version (pyproject.toml ``[project] version``)."""
    try:
        return _dist_version("linewatch")
    except PackageNotFoundError:  # sources on sys.path without an install: say so rather than guess
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="linewatch", description="streaming visual inspection service")
    ap.add_argument("--version", action="version", version=f"linewatch {version()}")
    ap.add_argument("--log-level", help="default: settings log_level")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    for name in CORE_VERBS:
        importlib.import_module(name).register(sub)
    for mod in plugins():
        mod.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def command() -> int:
        a.settings = Settings()  # the config root: built once here, passed down through `a`
        configure_logging(a.log_level or a.settings.log_level)
        return a.func(a)

    from aiokafka.errors import KafkaError

    # the broker unreachable or refusing: one line and exit 1, not a traceback
    return run_command("linewatch", command, runtime=(KafkaError,))


if __name__ == "__main__":
    sys.exit(main())
