"""The rollout controller service (`linewatch controller`, stream/lifecycle/service.py) as a child process,
the way it runs in production: the test harness starts it through this."""

from __future__ import annotations

import sys
from pathlib import Path

from devstack.processes import ChildProcess


class ControllerProcess(ChildProcess):
    def __init__(self, bootstrap: str, triton_urls: list[str], repository: str | Path, control_key: str, *,
                 log_path: Path, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        cmd = [sys.executable, "-m", "stream.ops.cli", "controller", "--bootstrap", bootstrap,
               "--triton", triton_urls[0], "--triton-replicas", ",".join(triton_urls),
               "--model-repository", str(repository), *(extra_args or [])]
        super().__init__(cmd, log_path, {"LINEWATCH_TRITON_CONTROL_KEY": control_key, "LINEWATCH_DEV_BROKER": "true",
                                         **(env or {})})
