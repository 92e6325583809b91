"""Every Kafka compression codec aiokafka supports decodes in this install, and a missing one stops the
worker and the operator consumers at startup with one line (stream/kafka/codecs.py).

The end-to-end proof (librdkafka producing each ``compression.type`` through the real worker) is
tests/integration/test_codecs.py."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import re

import aiokafka.codec
import pytest
from aiokafka.record.default_records import DefaultRecordBase

from contracts.config import Settings
from stream.kafka import codecs
from stream.ops.cli import main as linewatch
from stream.ops.tail import tail
from stream.worker.app import build_app
from stream.worker.config import add_worker_args, worker_config


@pytest.fixture
def no_cramjam(monkeypatch):
    """This install as if the codec library were absent (aiokafka's own 'not installed' state)."""
    monkeypatch.setattr(aiokafka.codec, "cramjam", None)
    codecs._checked.cache_clear()
    yield
    codecs._checked.cache_clear()


def test_our_codec_list_is_kafkas():
    defined = {n[len("CODEC_"):].lower(): v for n, v in vars(DefaultRecordBase).items()
               if n.startswith("CODEC_") and n not in ("CODEC_MASK", "CODEC_NONE")}
    assert defined == codecs.KAFKA_CODECS
    checkers = {n[len("has_"):] for n, f in inspect.getmembers(aiokafka.codec, inspect.isfunction)
                if n.startswith("has_")}
    assert checkers == set(codecs.KAFKA_CODECS)


def test_every_codec_aiokafka_supports_is_available():
    for name in codecs.KAFKA_CODECS:
        assert getattr(aiokafka.codec, f"has_{name}")(), f"{name}: aiokafka finds no library for it"
    assert codecs.missing_codecs() == {}
    codecs.require_codecs()


def test_every_codec_round_trips_a_batch():
    for cid in codecs.KAFKA_CODECS.values():
        codecs._round_trip(cid)


def test_missing_codec_is_named(no_cramjam):
    missing = codecs.missing_codecs()
    assert set(missing) == {"snappy", "lz4", "zstd"}  # gzip is the stdlib
    assert all("not found" in why for why in missing.values()), missing
    with pytest.raises(codecs.MissingCodecError, match=r"snappy, lz4, zstd .*\[worker\] extra"):
        codecs.require_codecs()


def test_account_and_tail_stop_with_one_line_when_a_codec_is_missing(no_cramjam, capsys):
    """Before any connection: exit 1, one stderr line (no broker needed, none is contacted)."""
    rc = linewatch(["account", "--bootstrap", "127.0.0.1:9", "--frames-topic", "f", "--results-topic", "r",
                    "--dlq-topic", "d"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and re.match(r"linewatch: error: Kafka compression codec", err), err

    with pytest.raises(codecs.MissingCodecError):
        asyncio.run(tail("127.0.0.1:9", timeout_s=0.1))


def test_worker_refuses_to_start_without_codecs(no_cramjam, tmp_path):
    ap = argparse.ArgumentParser()
    add_worker_args(ap)
    cfg = worker_config(Settings(), ap.parse_args(["--datadir", str(tmp_path / "faust")]))
    with pytest.raises(codecs.MissingCodecError):
        build_app(cfg)
