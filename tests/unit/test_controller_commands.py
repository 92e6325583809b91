"""Which topic the controller obeys each command from (stream/lifecycle/events.py, issue #26 item 7): a release
from model-events, a rollback only from model-commands, which only the operator's user may write -- so the
trainer's user (it writes model-events) cannot roll a model back, and a worker can do neither."""

from __future__ import annotations

from contracts.model_events import ModelEvent
from stream.lifecycle.events import actionable


def _rec(ev: ModelEvent) -> bytes:
    return ev.to_json()


def test_a_release_is_obeyed_from_model_events_only():
    rel = ModelEvent("released", "m", 2, artifact_uri="file:///store/m/2", sha256="0" * 64)
    assert actionable(_rec(rel), "events").version == 2
    assert actionable(_rec(rel), "commands") is None


def test_a_rollback_is_obeyed_from_model_commands_only():
    rb = ModelEvent("rollback_requested", "m", 1, reasons=["operator request"])
    assert actionable(_rec(rb), "commands").type == "rollback_requested"
    assert actionable(_rec(rb), "events") is None  # what the trainer's user could write: ignored


def test_outcomes_and_garbage_are_never_commands():
    for typ in ("promoted", "rolled_back", "refused", "retrain_requested"):
        ev = ModelEvent(typ, "m", 1 if typ != "retrain_requested" else 0, reasons=["r"])
        assert actionable(_rec(ev), "events") is None and actionable(_rec(ev), "commands") is None
    assert actionable(b"not json", "events") is None
    assert actionable(None, "commands") is None


def test_a_single_topic_harness_takes_both():
    rb = ModelEvent("rollback_requested", "m", 1)
    rel = ModelEvent("released", "m", 2, artifact_uri="file:///store/m/2", sha256="0" * 64)
    assert actionable(_rec(rb), None).type == "rollback_requested"
    assert actionable(_rec(rel), None).type == "released"
