"""``linewatch-models``: training / evaluation / export jobs for every detector.

One group per registered detector (contracts/detectors.py -> models/registry.py; each detector's
``register_cli`` adds its verbs) plus ``job`` (models/jobs/train_job.py). Verbs set ``func``
(called with the parsed args, ``args.settings`` = the entry point's contracts.config.Settings).
Exit codes and one-line errors follow contracts/cli.py (2 usage/data, 1 runtime).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from contracts.cli import OneLineParser, run_command
from contracts.config import Settings

PROG = "linewatch-models"


def build_parser() -> argparse.ArgumentParser:
    from models.jobs import train_job
    from models.registry import all_detectors

    parser = OneLineParser(prog=PROG, description="linewatch model jobs")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", parser_class=OneLineParser)
    sub.required = True
    for det in all_detectors():
        det.register_cli(sub)
    train_job.register(sub)
    return parser


def run(argv: Sequence[str], settings: Settings) -> int:
    """Run one verb in-process (the train job, a detector's ``train``); failures raise (the caller's
    entry point maps them to the exit convention)."""
    args = build_parser().parse_args(list(argv))
    args.settings = settings
    return int(args.func(args) or 0)


def usage_errors() -> tuple[type[BaseException], ...]:
    from contracts.artifact import ArtifactError
    from models.backbones import BackboneError
    from models.data import DataError

    return DataError, BackboneError, ArtifactError  # an artifact that fails verification is bad data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        from contracts.logs import configure_logging

        args.settings = Settings()
        configure_logging(args.settings.log_level)
        return int(args.func(args) or 0)

    return run_command(PROG, go, usage=usage_errors())


if __name__ == "__main__":
    raise SystemExit(main())
