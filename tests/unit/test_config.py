import pytest
from pydantic import ValidationError

from contracts.config import Settings
from stream.kafka.clients import aiokafka_client_kwargs


def test_defaults_target_the_embedded_stack():
    s = Settings()
    assert s.dev_broker is True and s.topic_frames == "frames" and s.topic_dlq == "frames-dlq"
    assert len(set(s.topics())) == 12 and {"retrain-requests", "model-commands"} <= set(s.topics()) and {"serving-state", "drift-state", "inspection-feedback", "onboarding-events"} <= set(s.topics())


def test_env_then_file_precedence(tmp_path, monkeypatch):
    f = tmp_path / "lw.toml"
    f.write_text('[linewatch]\nkafka_bootstrap = "k1:9092"\nbatch_max = 16\ntopic_frames = "cam-frames"\n')
    monkeypatch.setenv("LINEWATCH_CONFIG", str(f))
    monkeypatch.setenv("LINEWATCH_BATCH_MAX", "4")
    s = Settings()
    assert s.kafka_bootstrap == "k1:9092" and s.topic_frames == "cam-frames"
    assert s.batch_max == 4  # environment beats the file


def test_bad_values_name_the_field(monkeypatch):
    monkeypatch.setenv("LINEWATCH_KAFKA_BOOTSTRAP", "no-port")
    with pytest.raises(ValidationError, match="kafka_bootstrap"):
        Settings()
    monkeypatch.delenv("LINEWATCH_KAFKA_BOOTSTRAP")
    monkeypatch.setenv("LINEWATCH_CONFIG", "/nonexistent.toml")
    with pytest.raises(ValueError, match="no such file"):
        Settings()


def test_dev_broker_is_the_single_switch_and_secrets_stay_secret():
    prod = Settings(dev_broker=False, kafka_security_protocol="SASL_PLAINTEXT",
                    kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u", kafka_sasl_password="hunter2")
    kw = aiokafka_client_kwargs(prod, "consumer")
    assert "session_timeout_ms" not in kw and kw["sasl_plain_password"] == "hunter2"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "hunter2" not in repr(prod) and "hunter2" not in str(prod.redacted())
    dev = Settings(dev_broker=True)
    assert aiokafka_client_kwargs(dev, "consumer")["session_timeout_ms"] == 6000
    assert aiokafka_client_kwargs(dev, "producer")["max_batch_size"] == 1


def test_unknown_linewatch_variable_is_rejected_with_its_name(monkeypatch, capsys):
    from contracts.config import UnknownSettingError
    from stream.ops.cli import main

    monkeypatch.setenv("LINEWATCH_TRITON_URL", "t:8001")  # the field is triton_grpc_url
    with pytest.raises(UnknownSettingError, match="LINEWATCH_TRITON_URL"):
        Settings()
    # at an entry point: one line naming the variable, exit 2 (contracts.cli)
    assert main(["rollout", "status", "--bootstrap", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LINEWATCH_TRITON_URL" in err and err.startswith("linewatch: error:")
    monkeypatch.delenv("LINEWATCH_TRITON_URL")
    monkeypatch.setenv("LINEWATCH_DRIFT__WINDOWS", "32")  # a typo inside a nested group
    with pytest.raises(UnknownSettingError, match="LINEWATCH_DRIFT__WINDOWS"):
        Settings()


def test_worker_entry_point_rejects_unknown_variable(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LINEWATCH_WORKER_DATADIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "stream.worker.app"], env=env, cwd=str(repo), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "LINEWATCH_WORKER_DATADIR" in p.stderr


def test_nested_drift_and_rollout_fields_from_env_and_file(tmp_path, monkeypatch):
    from stream.lifecycle.hooks import DriftHook
    from stream.lifecycle.policy import HealthPolicy

    monkeypatch.setenv("LINEWATCH_DRIFT__WINDOW", "32")
    monkeypatch.setenv("LINEWATCH_DRIFT__ENABLED", "false")
    f = tmp_path / "lw.toml"
    f.write_text("[linewatch.rollout]\nshadow_frames = 12\n[linewatch.drift]\ncheck_every = 4\n")
    monkeypatch.setenv("LINEWATCH_CONFIG", str(f))
    s = Settings()
    assert s.drift.window == 32 and s.drift.enabled is False and s.drift.check_every == 4
    assert s.rollout.shadow_frames == 12 and s.rollout.min_frames == 16
    # ... and they are used: the drift hook and the health policy are built from them
    hook = DriftHook.from_settings(s.drift)
    assert (hook.monitor.config.window, hook.monitor.config.check_every) == (32, 4)
    assert hook.warmup == s.drift.warmup
    pol = HealthPolicy.from_settings(s.rollout, shadow_timeout_s=5.0, min_frames=None)
    assert (pol.shadow_frames, pol.shadow_timeout_s, pol.min_frames) == (12, 5.0, 16)
    monkeypatch.setenv("LINEWATCH_DRIFT__WINDOW", "2")
    with pytest.raises(ValidationError, match="drift.window"):
        Settings()


def test_lifecycle_defaults_are_the_settings_defaults():
    from contracts.config import DriftSettings, RolloutSettings
    from stream.lifecycle.drift import DriftConfig
    from stream.lifecycle.policy import HealthPolicy

    d, r = DriftSettings(), RolloutSettings()
    assert (DriftConfig().window, DriftConfig().check_every, DriftConfig().min_interval_s) == (
        d.window, d.check_every, d.min_interval_s)
    assert HealthPolicy() == HealthPolicy.from_settings(r)


def test_worker_config_has_no_defaults_of_its_own(tmp_path):
    import dataclasses

    from stream.worker.config import WorkerConfig, add_worker_args, worker_config

    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(WorkerConfig))
    s = Settings()
    cfg = WorkerConfig.from_settings(s)
    assert cfg.settings is s and cfg.datadir == s.worker_data_dir
    assert cfg.broker_urls == [f"kafka://{s.kafka_bootstrap}"] and cfg.broker_credentials is None
    from stream.worker import budget

    assert cfg.decode_threads == budget.decode_threads(s.worker_decode_threads, cpu_limit=budget.cgroup_cpu_limit(),
                                                       cpus=budget.available_cpus())
    assert cfg.stream_buffer_max == (s.worker_stream_buffer_max or max(16, 4 * s.batch_max))
    # flags override settings (validated), unset flags leave them alone
    import argparse

    ap = argparse.ArgumentParser()
    add_worker_args(ap)
    a = ap.parse_args([])
    assert worker_config(s, a).settings == s
    a = ap.parse_args(["--batch-max", "3", "--bootstrap", "k1:1,k2:2", "--datadir", str(tmp_path)])
    c = worker_config(s, a)
    assert (c.settings.batch_max, c.settings.batch_within_s, c.datadir) == (3, s.batch_within_s, tmp_path)
    assert c.broker_urls == ["kafka://k1:1", "kafka://k2:2"]
    with pytest.raises(ValidationError, match="batch_max"):
        worker_config(s, ap.parse_args(["--batch-max", "0"]))
