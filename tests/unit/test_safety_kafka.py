"""Safety of the Kafka connection: TLS/SASL settings reach every client (aiokafka and the Faust app);
secrets never reach the logs (weights and adapters: test_safety.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import certifi
import pytest
from pydantic import SecretStr, ValidationError

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55word-do-not-log"


# ============================================================================ 2. Kafka TLS / SASL


def _sasl_ssl_settings(**kw):
    from contracts.config import Settings

    base = dict(kafka_bootstrap="kafka-0.example:9093,kafka-1.example:9093", dev_broker=False,
                kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                kafka_sasl_username="linewatch-worker", kafka_sasl_password=SECRET,
                kafka_ssl_cafile=certifi.where())
    base.update(kw)
    return Settings(**base)


async def test_sasl_ssl_settings_reach_every_aiokafka_client():
    import ssl

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    from stream.kafka.clients import aiokafka_client_kwargs

    s = _sasl_ssl_settings()
    for role in ("producer", "consumer", "any"):
        kw = aiokafka_client_kwargs(s, role)
        assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kw["sasl_plain_username"] == "linewatch-worker" and kw["sasl_plain_password"] == SECRET
        ctx = kw["ssl_context"]
        assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.cert_store_stats()["x509_ca"] > 50  # the CA bundle was loaded
    kw = aiokafka_client_kwargs(s, "producer")
    clients = [AIOKafkaProducer(**kw).client, AIOKafkaConsumer(**aiokafka_client_kwargs(s, "consumer"))._client,
               AIOKafkaAdminClient(**aiokafka_client_kwargs(s))._client]
    for c in clients:  # constructed, not connected: the settings are on the client that will connect
        assert c._security_protocol == "SASL_SSL" and c._sasl_mechanism == "SCRAM-SHA-512"
        assert c._sasl_plain_username == "linewatch-worker" and c._sasl_plain_password == SECRET
        assert c._ssl_context is not None and c._ssl_context.cert_store_stats()["x509_ca"] > 50


def test_ssl_only_and_mutual_tls(tmp_path):
    from stream.kafka.clients import aiokafka_client_kwargs, faust_broker_credentials

    key, crt = tmp_path / "client.key", tmp_path / "client.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=linewatch-test"], check=True, capture_output=True, timeout=60)
    s = _sasl_ssl_settings(kafka_security_protocol="SSL", kafka_sasl_mechanism=None, kafka_sasl_username=None,
                           kafka_sasl_password=None, kafka_ssl_cafile=str(crt), kafka_ssl_certfile=str(crt),
                           kafka_ssl_keyfile=str(key))
    kw = aiokafka_client_kwargs(s, "consumer")
    assert kw["security_protocol"] == "SSL" and "sasl_mechanism" not in kw
    assert kw["ssl_context"].cert_store_stats()["x509_ca"] == 1  # our CA, not the system bundle
    import faust

    creds = faust_broker_credentials(s)
    assert isinstance(creds, faust.SSLCredentials) and creds.context.cert_store_stats()["x509_ca"] == 1
    # a wrong CA path fails at configuration time, not silently later
    with pytest.raises((FileNotFoundError, OSError)):
        aiokafka_client_kwargs(_sasl_ssl_settings(kafka_ssl_cafile=str(tmp_path / "nope.pem")))


def test_sasl_without_credentials_is_a_config_error():
    with pytest.raises(ValidationError, match="kafka_sasl_username"):
        _sasl_ssl_settings(kafka_sasl_password=None)


def test_plaintext_default_has_no_credentials(tmp_path):
    from contracts.config import Settings
    from stream.kafka.clients import faust_broker_credentials
    from stream.worker.app import build_app
    from stream.worker.config import WorkerConfig

    assert faust_broker_credentials(Settings(dev_broker=False)) is None
    app = build_app(WorkerConfig.from_settings(Settings(dev_broker=False, worker_data_dir=tmp_path / "f")))
    assert app.conf.broker_credentials is None


def test_faust_app_gets_the_same_broker_credentials(tmp_path):
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from stream.worker.app import build_app
    from stream.worker.config import WorkerConfig

    s = _sasl_ssl_settings(worker_data_dir=tmp_path / "faust")
    cfg = WorkerConfig.from_settings(s)
    assert isinstance(cfg.broker_credentials, faust.SASLCredentials)
    app = build_app(cfg)
    assert [str(u) for u in app.conf.broker] == ["kafka://kafka-0.example:9093", "kafka://kafka-1.example:9093"]
    # what Faust's worker consumer / client consumer derive from the app config ...
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["sasl_plain_username"] == "linewatch-worker" and auth["sasl_plain_password"] == SECRET
    assert auth["ssl_context"].cert_store_stats()["x509_ca"] > 50
    # ... and what its producer (results / defects / DLQ) passes to aiokafka
    pauth = app.producer._settings_auth()
    assert pauth["security_protocol"] == "SASL_SSL" and pauth["sasl_plain_password"] == SECRET
    # the DLQ may republish a frame of up to max_frame_bytes
    assert app.conf.producer_max_request_size > s.max_frame_bytes


# ============================================================================ 3. secrets stay out of logs


def test_secret_is_secretstr_and_redacted_everywhere(capsys):
    from contracts.logs import get_logger
    from stream.worker.config import WorkerConfig

    s = _sasl_ssl_settings(kafka_ssl_key_password="key-" + SECRET)
    assert isinstance(s.kafka_sasl_password, SecretStr) and isinstance(s.kafka_ssl_key_password, SecretStr)
    cfg = WorkerConfig.from_settings(s)
    capsys.readouterr()
    log = get_logger("test.safety")
    log.info("settings", **s.redacted())
    log.info("settings_obj", settings=repr(s), cfg=repr(cfg), creds=repr(cfg.broker_credentials))
    import logging

    logging.getLogger("test.safety.stdlib").warning("settings %s %s", s, cfg)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "linewatch-worker" in text and "SCRAM-SHA-512" in text  # the settings were logged ...
    assert SECRET not in text  # ... without the secrets
    assert SECRET not in s.model_dump_json() and SECRET not in str(s.model_dump())


def test_worker_startup_log_has_no_secret(tmp_path):
    """The real worker process, SASL configured via the environment, pointed at a closed port:
    its whole stdout/stderr (structlog, Faust banner, aiokafka connection errors) has no secret."""
    from devstack.stack import free_port

    env = {**os.environ, "LINEWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "LINEWATCH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256", "LINEWATCH_KAFKA_SASL_USERNAME": "linewatch-worker",
           "LINEWATCH_KAFKA_SASL_PASSWORD": SECRET, "LINEWATCH_DEV_BROKER": "false", "LINEWATCH_LOG_LEVEL": "DEBUG",
           "PYTHONUNBUFFERED": "1"}
    logf = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "stream.worker.app", "--bootstrap", f"127.0.0.1:{free_port()}",
           "--triton", f"127.0.0.1:{free_port()}", "--web-port", str(free_port()), "--datadir", str(tmp_path / "f")]
    with open(logf, "wb") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                text = logf.read_text(errors="replace")
                if "worker_start" in text and text.count("\n") > 15:
                    break
                time.sleep(0.5)
            time.sleep(2)  # a few connection attempts
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
    text = logf.read_text(errors="replace")
    start = next(json.loads(ln) for ln in text.splitlines() if '"worker_start"' in ln)
    assert start["security"] == "SASLCredentials"
    assert SECRET not in text, "the SASL password appears in the worker's output"


def test_invalid_security_settings_stop_the_worker_with_one_line_and_no_secret():
    """SASL with a password but no username: the worker refuses to start (never falls back to plaintext);
    the message is one line and does not echo the password pydantic saw as input."""
    env = {**os.environ, "LINEWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LINEWATCH_KAFKA_SASL_PASSWORD": SECRET}
    for cmd in ([sys.executable, "-m", "stream.worker.app", "--bootstrap", "127.0.0.1:1"],
                [sys.executable, "-m", "stream.ops.cli", "worker", "--bootstrap", "127.0.0.1:1"]):
        p = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60)
        assert p.returncode != 0
        err = p.stderr.strip()
        assert len(err.splitlines()) == 1 and "kafka_sasl_username" in err, err
        assert SECRET not in p.stdout + p.stderr
