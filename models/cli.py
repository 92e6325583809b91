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
    from models.jobs import calibrate, train_job
    from models.registry import all_detectors

    parser = OneLineParser(prog=PROG, description="linewatch model jobs")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", parser_class=OneLineParser)
    sub.required = True
    for det in all_detectors():
        det.register_cli(sub)
    train_job.register(sub)
    calibrate.register(sub)
    sc = sub.add_parser("selfcheck", help="log what this process runs on; fail when a GPU deployment has no CUDA")
    sc.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: the serving.device setting")
    sc.set_defaults(func=_selfcheck)
    return parser


def _selfcheck(args) -> int:
    """The Triton pod's init step (k8s prod overlay) and a node check: the torch build, CUDA, every GPU
    running one kernel; a GPU deployment on a CPU-only torch or an old driver stops here, loudly."""
    from contracts.logs import get_logger
    from models.serving_device import self_check

    device = args.device or args.settings.serving.device
    info = self_check(device)
    if info["device"] == "cuda":
        import torch

        for i in range(torch.cuda.device_count()):
            x = torch.ones(64, 64, device=f"cuda:{i}")
            info.setdefault("kernel_ok", []).append(bool(float((x @ x).sum()) == 64.0 ** 3))
    get_logger("models.selfcheck").info("device_selfcheck", **info)
    return 0


def run(argv: Sequence[str], settings: Settings) -> int:
    """Run one verb in-process (the train job, a detector's ``train``); failures raise (the caller's
    entry point maps them to the exit convention)."""
    args = build_parser().parse_args(list(argv))
    args.settings = settings
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        from contracts.logs import configure_logging

        args.settings = Settings()
        configure_logging(args.settings.log_level)
        return int(args.func(args) or 0)

    from models.errors import usage_errors
    from models.serving_device import CudaUnavailable

    return run_command(PROG, go, usage=usage_errors(), runtime=(CudaUnavailable,))


if __name__ == "__main__":
    raise SystemExit(main())
