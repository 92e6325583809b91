"""Process plumbing for the embedded stack: free ports, process groups, parent-death signals,
ownership checks against a stale state file, tritonserver's backends and environment, and the
broker / Triton readiness probes."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from contracts.cli import RuntimeFailure

PR_SET_PDEATHSIG = 1


class StackError(RuntimeFailure):
    """The embedded stack could not start or is not in the expected state (message is one line)."""


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of client source ports (``ip_local_port_range``; Linux's default 32768-60999)."""
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port to run a server on, below the kernel's ephemeral range when there is room: a server restarted on
    its own port (Triton after a crash, the broker) must not find it taken meanwhile as some client
    connection's source port, which the kernel hands out from that range (port 0 would pick from it too)."""
    lo = ephemeral_range()[0]
    if lo > 12000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(10000, lo)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent_of(parent: int):
    """preexec_fn: own process group + SIGKILL when the parent dies (in-process/fixture mode).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so start the stack
    from a thread that lives as long as the stack (the main thread, in practice).
    """

    def preexec() -> None:  # runs in the child between fork and exec
        os.setsid()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _detach() -> None:
    os.setsid()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``.

    Every child we start leads its own group, and helpers it forks (Triton's Python-backend
    stubs) stay in it; Linux never hands out a pid still in use as a group id, so a non-empty
    group is ours even after its leader is gone.
    """
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(int(d))
            if st and st[0] != "Z" and int(st[2]) == pgid:
                out.append(int(d))
    return out


def _gone(pid: int) -> bool:
    return not pid_alive(pid) and not group_pids(pid)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it after ``timeout_s``.

    Returns only when the leader and every member of its group are gone.
    """
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if _gone(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            if pid_alive(pid):  # leads no group (not started by us as a group leader)
                os.kill(pid, sig)
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.05)
    if not _gone(pid):
        raise StackError(f"process group {pid} survived SIGKILL: {[pid, *group_pids(pid)]}")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_BINARIES = {"tansu": "tansu", "triton": "tritonserver"}


def owned_alive(name: str, pid: int | None) -> bool:
    """True if ``pid`` (recorded in a state file as service ``name``) is still that service.

    Guards ``stack status|down`` against a stale state file whose pid was reused by an
    unrelated process.
    """
    if not pid or pid <= 0:
        return False
    if pid_alive(pid):
        binary = _BINARIES.get(name)
        return binary is None or binary in Path(_cmdline(pid).split(" ", 1)[0]).name
    return bool(group_pids(pid))  # leader gone, helpers left in its group


def _shm_mapped(pid: int) -> set[str]:
    """/dev/shm files mapped by ``pid`` (Triton's Python backend shares tensors through them)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[-1].strip().removesuffix(" (deleted)") for line in f if "/dev/shm/" in line}
    except OSError:
        return set()


def kafka_ready(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker answers a Metadata request (aiokafka bootstrap)."""
    import asyncio

    from aiokafka import AIOKafkaClient

    async def probe() -> bool:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
        try:
            await client.bootstrap()
            return True
        finally:
            await client.close()

    return asyncio.run(probe())


def triton_live(http_url: str, timeout_s: float = 2.0) -> bool:
    """True when Triton's /v2/health/live answers 200 (explicit mode: no model need be loaded)."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/live", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def triton_ready(http_url: str, timeout_s: float = 2.0) -> bool:
    """Live and server-ready (``--strict-readiness=false``: ready does not wait for models)."""
    if not triton_live(http_url, timeout_s):
        return False
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def prepare_triton_backends(home: Path, dst: Path) -> Path:
    """Copy tritonserver's backends to ``dst`` with the Python-backend stub of this Python beside them
    (the wheel keeps stubs per Python version)."""
    py = dst / "python"
    stub_src = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not stub_src.is_file():
        raise StackError(f"no Triton Python-backend stub for Python {sys.version_info[:2]} at {stub_src}")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(home / "backends", dst)
    shutil.copy2(stub_src, py / "triton_python_backend_stub")
    (py / "triton_python_backend_stub").chmod(0o755)
    return dst


def triton_env(libs: Path) -> dict[str, str]:
    """tritonserver's environment: a copy of ours with the venv first on PATH (the Python backend stub runs
    the first ``python3`` on PATH: the venv's, with torch + models) and the wheel's shared libraries."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = str(libs) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    # one intra-op thread per model instance on small machines (2 threads -> 120 ms spikes, measured)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def stack_status(st) -> dict:
    """Readiness of a stack from its recorded state (``devstack.stack.StackState`` or None)."""
    if st is None:
        return {"running": False, "services": {}}
    tansu, triton = st.pids.get("tansu"), st.pids.get("triton")
    services = {
        "kafka": {"pid": tansu, "alive": owned_alive("tansu", tansu), "endpoint": st.kafka_bootstrap},
        "triton": {"pid": triton, "alive": owned_alive("triton", triton), "endpoint_grpc": st.triton_grpc_url,
                   "endpoint_http": st.triton_http_url, "model_repository": st.model_repository},
    }
    services["kafka"]["ready"] = services["kafka"]["alive"] and _safe(kafka_ready, st.kafka_bootstrap)
    services["triton"]["ready"] = services["triton"]["alive"] and triton_ready(st.triton_http_url)
    for name in sorted(n for n in st.pids if n.startswith("worker-")):
        pid = st.pids[name]
        services[name] = {"pid": pid, "alive": owned_alive(name, pid)}
        services[name]["ready"] = services[name]["alive"]
    if "controller" in st.pids:
        ctl = st.pids["controller"]
        services["controller"] = {"pid": ctl, "alive": owned_alive("controller", ctl)}
        services["controller"]["ready"] = services["controller"]["alive"]
    return {"running": True, "ready": all(s["ready"] for s in services.values()), "services": services}


def _safe(fn, *a) -> bool:
    try:
        return bool(fn(*a))
    except Exception:  # status reports not-ready instead of raising
        return False


class ChildProcess:
    """A linewatch service as a child process in its own session (``cmd`` run from the repository root,
    output to ``log_path``): SIGTERM stops it cleanly, SIGKILL crashes it. Subclasses build ``cmd``."""

    cmd: list[str]
    log_path: Path
    env: dict[str, str]

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.cmd, self.log_path = cmd, log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(Path(__file__).resolve().parents[1]), env=self.env,
                                     start_new_session=True)
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
