"""Which ``model-events`` records the rollout controller acts on (``released``, ``rollback_requested``);
the service that consumes them is stream/lifecycle/service.py."""

from __future__ import annotations

from contracts.logs import get_logger
from contracts.model_events import ModelEvent, ModelEventError, decode
from stream.lifecycle.controller import HANDLED

log = get_logger("stream.lifecycle.events")


def actionable(value: bytes | None) -> ModelEvent | None:
    """The event in a ``model-events`` record if the controller acts on it (invalid ones are logged)."""
    try:
        ev = decode(value)
    except ModelEventError as e:
        log.warning("model_event_invalid", error=str(e)[:300])
        return None
    return ev if ev.type in HANDLED else None
