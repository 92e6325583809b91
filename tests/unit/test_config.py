import pytest
from pydantic import ValidationError

from contracts.config import Settings
from stream.kafka.clients import aiokafka_client_kwargs


def test_defaults_target_the_embedded_stack():
    s = Settings()
    assert s.dev_broker is True and s.topic_frames == "frames" and s.topic_dlq == "frames-dlq"
    assert len(set(s.topics())) == 6


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
