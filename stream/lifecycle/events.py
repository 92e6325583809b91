"""Which records the rollout controller acts on: ``released`` from ``model-events`` (the trainer's, the
console's runner's), ``rollback_requested`` from ``model-commands`` (only the operator's and the console's users
may write it, issue #26 item 7: the trainer's user, which writes model-events, cannot roll a model back). The
service that consumes them is stream/lifecycle/service.py."""

from __future__ import annotations

from contracts.logs import get_logger
from contracts.model_events import ModelEvent, ModelEventError, decode
from stream.lifecycle.controller import HANDLED

log = get_logger("stream.lifecycle.events")


# the topic (ControllerTopics field) each event the controller acts on must come from
SOURCE = {"released": "events", "rollback_requested": "commands"}


def actionable(value: bytes | None, source: str | None) -> ModelEvent | None:
    """The event in a record of the ``source`` topic (``"events"`` / ``"commands"``; None: a test harness that
    feeds one topic) if the controller acts on it. Invalid ones, and a command on the wrong topic, are logged."""
    try:
        ev = decode(value)
    except ModelEventError as e:
        log.warning("model_event_invalid", error=str(e)[:300])
        return None
    if ev.type not in HANDLED:
        return None
    if source is not None and SOURCE[ev.type] != source:
        log.warning("model_event_ignored", type=ev.type, model=ev.model, version=ev.version, topic=source,
                    reason=f"{ev.type} is obeyed only from the model-{SOURCE[ev.type]} topic")
        return None
    return ev
