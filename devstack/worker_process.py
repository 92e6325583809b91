"""The Faust worker as a child process, the way it runs in production (the demo and the test
harness both start workers through this)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from devstack.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """The Faust worker as a child process (how it runs in production; SIGTERM stops it cleanly)."""

    def __init__(self, bootstrap: str, triton: str, workdir: Path, *, web_port: int | None = None,
                 batch_max: int | None = None, batch_within: float | None = None, app_id: str = "linewatch-worker",
                 log_path: Path | None = None, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.web_port = web_port or free_port()
        self.cmd = [sys.executable, "-m", "stream.worker.app", "--bootstrap", bootstrap, "--triton", triton,
                    "--web-port", str(self.web_port), "--datadir", str(workdir / "faust"), "--dev-broker",
                    "--app-id", app_id]
        if batch_max:
            self.cmd += ["--batch-max", str(batch_max)]
        if batch_within is not None:
            self.cmd += ["--batch-within", str(batch_within)]
        self.cmd += list(extra_args or [])
        self.log_path = log_path or workdir / "worker.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                     env=self.env, start_new_session=True)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
