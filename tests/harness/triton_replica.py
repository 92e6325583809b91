"""A second tritonserver beside a LocalStack's (issue #16: prod runs two Triton replicas).

Same model repository, same model-control key, same backends as the stack's Triton, its own ports and
its own Python-backend shared-memory prefix (two servers on one host must not share region names).
Explicit model control, nothing loaded at start: only the rollout controller loads models on it, as
in Kubernetes. ``kill()`` SIGKILLs it (a crashed pod), ``start()`` brings it back empty on the same
ports (a replacement pod).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from devstack.processes import free_port, prepare_triton_backends, triton_env, triton_ready
from devstack.stack import _package_dir, triton_home, tritonserver_argv


class TritonReplica:
    def __init__(self, stack, workdir: str | Path, name: str = "triton-b"):
        self.stack, self.name = stack, name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        host = stack.state.host
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = (free_port(host) for _ in range(3))
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def start(self, timeout_s: float = 90.0) -> TritonReplica:
        home = triton_home()
        backends = prepare_triton_backends(home, self.workdir / "backends")
        env = triton_env(_package_dir("pytriton").parent / "nvidia_pytriton.libs")
        log = open(self.workdir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            tritonserver_argv(home, self.stack.model_repository, backends, self.stack.control_key, host=self.host,
                              grpc_port=self.grpc_port, http_port=self.http_port, metrics_port=self.metrics_port,
                              extra=(f"--backend-config=python,shm-region-prefix-name=lw_{self.name.replace('-', '_')}_",)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not triton_ready(self.http_url):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout_s}s: {self.log()[-2000:]}")
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its Python-backend stubs (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for p in Path("/dev/shm").glob(f"lw_{self.name.replace('-', '_')}_*"):
            p.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log(self) -> str:
        p = self.workdir / f"{self.name}.log"
        return p.read_text(errors="replace") if p.is_file() else ""
