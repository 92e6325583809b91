"""The Faust worker as a child process, the way it runs in production (the demo and the test
harness both start workers through this)."""

from __future__ import annotations

import sys
from pathlib import Path

from devstack.processes import ChildProcess, free_port


class WorkerProcess(ChildProcess):
    """The Faust worker as a child process (how it runs in production; SIGTERM stops it cleanly)."""

    def __init__(self, bootstrap: str, triton: str, workdir: Path, *, web_port: int | None = None,
                 batch_max: int | None = None, batch_within: float | None = None, app_id: str = "linewatch-worker",
                 log_path: Path | None = None, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.web_port = web_port or free_port()
        cmd = [sys.executable, "-m", "stream.worker.app", "--bootstrap", bootstrap, "--triton", triton,
               "--web-port", str(self.web_port), "--datadir", str(workdir / "faust"), "--dev-broker",
               "--app-id", app_id]
        if batch_max:
            cmd += ["--batch-max", str(batch_max)]
        if batch_within is not None:
            cmd += ["--batch-within", str(batch_within)]
        super().__init__(cmd + list(extra_args or []), log_path or workdir / "worker.log", env)
