"""Structured JSON logging, configured once for every entry point (structlog + orjson)."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

_configured = False


class _CurrentStderr:
    """Writes to whatever sys.stderr is at write time (test capture, redirection), not at configure time."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def _orjson_dumps(obj, default=None) -> str:
    return orjson.dumps(obj, default=default, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def configure_logging(level: str | None = None) -> None:
    """Configure structlog and stdlib logging to emit one JSON object per line on stderr.

    Entry points pass the level (``settings.log_level``, or a ``--log-level`` flag); an explicit level
    always (re)configures. Without one (the first :func:`get_logger` of a library module) it configures
    INFO once and is a no-op afterwards.
    """
    global _configured
    if _configured and level is None:
        return
    lvl = getattr(logging, (level or "INFO").upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),
        cache_logger_on_first_use=True,
    )
    # stdlib loggers (aiokafka, faust, tritonclient) go through the same JSON renderer
    handler = logging.StreamHandler(_STDERR)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(serializer=_orjson_dumps),
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.INFO) if lvl < logging.INFO else lvl)
    _configured = True


def get_logger(name: str | None = None, **bound):
    configure_logging()
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log
