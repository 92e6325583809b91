"""The rollout controller service (`linewatch controller`, stream/lifecycle/service.py) as a child process,
the way it runs in production: the embedded stack, the demo and the test harness start it through this."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class ControllerProcess:
    def __init__(self, bootstrap: str, triton_urls: list[str], repository: str | Path, control_key: str, *,
                 log_path: Path, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.cmd = [sys.executable, "-m", "stream.ops.cli", "controller", "--bootstrap", bootstrap,
                    "--triton", triton_urls[0], "--triton-replicas", ",".join(triton_urls),
                    "--model-repository", str(repository), *(extra_args or [])]
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "LINEWATCH_TRITON_CONTROL_KEY": control_key,
                    "LINEWATCH_DEV_BROKER": "true", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> ControllerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                     env=self.env, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
