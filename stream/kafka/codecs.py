"""Startup self-check: every Kafka record-batch codec decodes here.

The producer picks the codec (``compression.type`` none / gzip / snappy / lz4 / zstd; librdkafka
clients often default to lz4 or snappy), not us. aiokafka decodes batches only with optional
libraries (aiokafka 0.14: ``cramjam`` for snappy, lz4 and zstd; gzip is the stdlib), and a missing
one is not a skipped record but ``UnsupportedCodecError`` in the fetcher: the Faust worker crashes
("We experienced a crash!"), and crashes again on the same batch after a restart; ``linewatch
account`` / ``tail`` die the same way. The ``[worker]`` extra installs the libraries; this check
makes an install without them fail at startup with one line instead.

:func:`require_codecs` is called by the worker (``build_app``) and the operator consumers
(``account``, ``tail``): it round-trips a record batch per codec through aiokafka's own builder and
reader (the code a fetch runs), so a library that imports but cannot decode also fails.
"""

from __future__ import annotations

import functools

from contracts.cli import RuntimeFailure

# Kafka's record-batch codecs (attributes & 0x07), besides 0 = none
KAFKA_CODECS: dict[str, int] = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


class MissingCodecError(RuntimeFailure):
    """A Kafka compression codec cannot be decoded in this install (exit 1, one line)."""


def _round_trip(codec_id: int) -> None:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords

    payload = b"linewatch codec self-check " * 8
    b = DefaultRecordBatchBuilder(magic=2, compression_type=codec_id, is_transactional=0, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    b.append(0, timestamp=None, key=b"k", value=payload, headers=[])
    batch = MemoryRecords(bytes(b.build())).next_batch()
    if batch is None or batch.compression_type != codec_id:
        raise RuntimeError("batch was not written with the codec")
    values = [r.value for r in batch]
    if values != [payload]:
        raise RuntimeError("round trip changed the records")


def missing_codecs() -> dict[str, str]:
    """{codec: why} for every Kafka codec aiokafka cannot write + read back here (empty when all work)."""
    out: dict[str, str] = {}
    for name, cid in KAFKA_CODECS.items():
        try:
            _round_trip(cid)
        except Exception as e:  # UnsupportedCodecError, ImportError, a broken library: all mean "missing"
            out[name] = " ".join(str(e).split()) or type(e).__name__
    return out


@functools.cache
def _checked() -> None:
    missing = missing_codecs()
    if missing:
        raise MissingCodecError(
            f"Kafka compression codec(s) {', '.join(missing)} cannot be decoded here "
            f"({next(iter(missing.values()))}); a producer using them would crash this consumer. "
            "Install the [worker] extra (it pins cramjam, the codec library aiokafka uses)")


def require_codecs() -> None:
    """Raise :class:`MissingCodecError` (one line) unless every Kafka codec decodes. Checked once per process."""
    _checked()
