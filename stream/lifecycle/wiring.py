"""Wire the worker's lifecycle hooks into its Faust app (stream/worker/app.py): per-batch drift alerts
(+ ``retrain_requested`` on a route-OOD alert, on ``topic_retrain_requests``: the capture service reads it,
the controller never does) through :class:`stream.lifecycle.hooks.Lifecycle`.

Rollouts are not the worker's job: the controller service (stream/lifecycle/service.py) is the only
component with Triton model control; the worker follows the serving state it writes
(stream/worker/serving.py). Drift windows persist on ``drift-state`` (stream/lifecycle/drift_state.py).
Options: ``settings.drift`` (contracts.config)."""

from __future__ import annotations

from typing import Any

from stream.lifecycle.drift_state import DriftStateStore, connect
from stream.lifecycle.hooks import DriftHook, Lifecycle
from stream.worker.config import WorkerConfig


def register(app: Any, cfg: WorkerConfig) -> Lifecycle:
    s = cfg.settings
    # retrain_requested goes to its own topic, not model-events: the worker may not write the controller's commands
    events_t = app.topic(s.topic_retrain_requests, key_serializer="raw", value_serializer="raw")
    drift_t = app.topic(s.topic_drift, key_serializer="raw", value_serializer="raw")
    drift = DriftHook.from_settings(s.drift) if s.drift.enabled else None
    state = None
    if drift is not None:  # the windows follow their cameras across restarts and partition moves
        state_t = app.topic(s.topic_drift_state, key_serializer="raw", value_serializer="raw")
        state = DriftStateStore(s, drift.monitor, state_t)
        connect(app, state, s.topic_frames)
    return Lifecycle(drift, drift_t, events_t, retrain_on_ood=s.drift.retrain_on_ood, state=state)
