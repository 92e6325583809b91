"""The Faust worker as a child process, the way it runs in production (the demo and the test
harness both start workers through this)."""

from __future__ import annotations

import sys
from pathlib import Path

from devstack.processes import ChildProcess, free_port


def worker_argv(bootstrap: str, triton: str, web_port: int, workdir: Path, *, app_id: str | None = None,
                batch_max: int | None = None, batch_within: float | None = None,
                extra: list[str] | None = None) -> list[str]:
    """`python -m stream.worker.app` on ``bootstrap`` / ``triton`` (``app_id`` None: the settings' own)."""
    cmd = [sys.executable, "-m", "stream.worker.app", "--bootstrap", bootstrap, "--triton", triton,
           "--web-port", str(web_port), "--datadir", str(Path(workdir) / "faust"), "--dev-broker"]
    if app_id:
        cmd += ["--app-id", app_id]
    if batch_max:
        cmd += ["--batch-max", str(batch_max)]
    if batch_within is not None:
        cmd += ["--batch-within", str(batch_within)]
    return cmd + list(extra or [])


class WorkerProcess(ChildProcess):
    """The Faust worker as a child process (how it runs in production; SIGTERM stops it cleanly)."""

    def __init__(self, bootstrap: str, triton: str, workdir: Path, *, web_port: int | None = None,
                 batch_max: int | None = None, batch_within: float | None = None, app_id: str = "linewatch-worker",
                 log_path: Path | None = None, env: dict[str, str] | None = None, extra_args: list[str] | None = None):
        self.web_port = web_port or free_port()
        super().__init__(worker_argv(bootstrap, triton, self.web_port, workdir, app_id=app_id, batch_max=batch_max,
                                     batch_within=batch_within, extra=extra_args),
                         log_path or workdir / "worker.log", env)
