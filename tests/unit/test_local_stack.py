import json
import subprocess
import sys

import pytest

from stream import local
from stream.cli import main


def test_free_port_is_bindable():
    import socket

    p = local.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


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


def test_cli_status_when_not_running_is_one_line(tmp_path, capsys):
    assert main(["stack", "status", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.strip() == f"stack: not running (no state in {tmp_path})"
    assert main(["stack", "down", "--workdir", str(tmp_path)]) == 0
