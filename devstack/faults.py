"""Fault injection on a :class:`devstack.stack.LocalStack` (tests, benchmarks/reliability.py): pause a
service, SIGKILL Triton (and its Python-backend stubs) and bring it back on the same ports."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from contracts.logs import get_logger
from devstack.processes import StackError, _shm_mapped, group_pids, owned_alive, stop_pid, triton_live

log = get_logger("devstack.stack")


class StackFaults:
    """Mixed into LocalStack: uses its state, children and readiness waits."""

    def signal_service(self, name: str, sig: int) -> None:
        """Send ``sig`` to service ``name``'s process group ("tansu" or "triton"), e.g. SIGSTOP/SIGCONT
        to make it unreachable without losing its state (Tansu keeps topics in memory)."""
        pid = self._require_state().pids.get(name)
        if not pid or not owned_alive(name, pid):
            raise StackError(f"{name} is not running")
        os.killpg(pid, sig)

    def kill_triton(self, sig: int = signal.SIGKILL) -> list[str]:
        """Stop tritonserver and its Python-backend stubs (default SIGKILL: a crash). Returns the models
        that were READY, for :meth:`start_triton`. Shared-memory regions the killed processes mapped
        are unlinked (a SIGKILLed Triton cannot remove them itself)."""
        st = self._require_state()
        models = self.ready_models(timeout_s=2.0) or list(self.load_models)
        pid = st.pids.get("triton")
        shm: set[str] = set()
        if pid and owned_alive("triton", pid):
            for p in [pid, *group_pids(pid)]:
                shm |= _shm_mapped(p)
            try:
                os.killpg(pid, signal.SIGCONT)  # a paused group would never act on SIGTERM
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            stop_pid(pid, timeout_s=10.0)
        proc = self._procs.pop("triton", None)
        if proc is not None:
            proc.wait(timeout=5)
        for path in shm:
            Path(path).unlink(missing_ok=True)
        log.info("triton_killed", pid=pid, signal=signal.Signals(sig).name, models=models, shm_unlinked=len(shm))
        return models

    def start_triton(self, models: list[str] | tuple[str, ...] = ()) -> None:
        """(Re)start tritonserver on the same ports and load ``models`` (after :meth:`kill_triton`)."""
        st = self._require_state()
        if owned_alive("triton", st.pids.get("triton")):
            raise StackError(f"triton is still running (pid {st.pids['triton']})")
        t0 = time.monotonic()
        self._start_triton()
        self._write_state()
        self._wait_triton()
        for name in models:
            self.load_model(name)
        log.info("triton_restarted", pid=st.pids["triton"], models=list(models), seconds=round(time.monotonic() - t0, 2))

    def liveness_restart(self, period_s: float = 10.0, failures: int = 3, timeout_s: float = 3.0) -> str:
        """What the Triton pod's livenessProbe does (k8s/base/triton.yaml: ``/v2/health/live`` every 10 s,
        3 s timeout, 3 failures): "" while tritonserver answers; else it is killed and started again with its
        models (a kubelet restart) and the returned line says why, with its log tail."""
        for n in range(failures):
            if triton_live(self.triton_http_url, timeout_s):
                return ""
            if n < failures - 1:
                time.sleep(period_s)
        pid = self._require_state().pids.get("triton")
        state = "did not answer" if owned_alive("triton", pid) else "had exited"
        why = (f"tritonserver {state} /v2/health/live {failures} times {period_s:.0f} s apart; restarted as its "
               f"livenessProbe would. Log tail: {self.log_tail('triton', 8)}")
        log.warning("triton_liveness_restart", why=why[:1000])
        self.restart_triton()
        return why

    def restart_triton(self, down_s: float = 0.0, sig: int = signal.SIGKILL) -> list[str]:
        """Kill tritonserver, stay down ``down_s`` seconds, start it again on the same ports with the
        models that were READY. Returns those models."""
        models = self.kill_triton(sig)
        time.sleep(down_s)
        self.start_triton(models)
        return models


