"""The rollout controller service (`linewatch controller`, stream/lifecycle/service.py) as a child process,
the way it runs in production: the test harness starts it through this."""

from __future__ import annotations

import sys
from pathlib import Path

from devstack.processes import ChildProcess


def controller_argv(bootstrap: str, triton_urls: list[str], repository: str | Path, extra: list[str] | None = None):
    """`linewatch controller` on ``bootstrap``, with model control on every one of ``triton_urls``."""
    return [sys.executable, "-m", "stream.ops.cli", "controller", "--bootstrap", bootstrap, "--triton", triton_urls[0],
            "--triton-replicas", ",".join(triton_urls), "--model-repository", str(repository), *(extra or [])]


class ControllerProcess(ChildProcess):
    def __init__(self, bootstrap: str, triton_urls: list[str], repository: str | Path, control_key: str, *,
                 log_path: Path, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        super().__init__(controller_argv(bootstrap, triton_urls, repository, extra_args), log_path, {"LINEWATCH_TRITON_CONTROL_KEY": control_key, "LINEWATCH_DEV_BROKER": "true",
                                         **(env or {})})
