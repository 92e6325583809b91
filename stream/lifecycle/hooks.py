"""What the worker's lifecycle does per micro-batch: drift alerts (+ ``retrain_requested`` on route OOD).

:class:`DriftHook` feeds results into a :class:`stream.lifecycle.drift.DriftMonitor`;
:class:`Lifecycle` is called once per batch with the pipeline's typed :class:`stream.worker.records.Batch`
and returns the extra records to publish with the batch's results (before the batch is acked).
"""

from __future__ import annotations

from typing import Any

import orjson

from contracts.config import DriftSettings
from contracts.envelope import InspectionResult
from contracts.logs import get_logger
from contracts.model_events import ModelEvent
from contracts.operating_point import operating_point_of
from stream.lifecycle.drift import DriftAlert, DriftConfig, DriftMonitor
from stream.lifecycle.policy import calibration_of
from stream.worker.records import Batch, Outgoing, Scored

log = get_logger("stream.lifecycle.hooks")

_DEFAULTS = DriftSettings()


class DriftHook:
    """Feeds every (non-shadow) result into a :class:`stream.lifecycle.drift.DriftMonitor`; returns its alerts.

    The reference of a (model, version, task) is the calibration in its spec (``calibration.scores``, or
    ``tasks[t].calibration_scores`` for MoLE-Flow) with the task's ``route_distance_threshold`` and, for the
    anomaly-rate test, the target false-alarm rate of its operating point (never below the configured
    expected rate: the line's real defects are flagged too); a model without calibration scores gets a
    warm-up reference (its first ``warmup`` scores). Warm-up frames (``InspectionResult.warmup``) are not
    a camera's traffic and are skipped."""

    def __init__(self, config: DriftConfig | None = None, warmup: int = _DEFAULTS.warmup,
                 max_tracks: int = _DEFAULTS.max_tracks):
        self.monitor = DriftMonitor(config, max_tracks=max_tracks)
        self.warmup = warmup
        self._warm: dict[str, list[float]] = {}

    @classmethod
    def from_settings(cls, drift: DriftSettings) -> DriftHook:
        return cls(DriftConfig(window=drift.window, check_every=drift.check_every,
                               min_interval_s=drift.min_interval_s), warmup=drift.warmup, max_tracks=drift.max_tracks)

    def _ensure_reference(self, key: str, spec_raw: dict, task: str, score: float) -> None:
        if self.monitor.has_reference(key):
            return
        cal, _ = calibration_of(spec_raw, task or None)
        tinfo = (spec_raw.get("tasks") or {}).get(task) if isinstance(spec_raw.get("tasks"), dict) else None
        rthr = tinfo.get("route_distance_threshold") if isinstance(tinfo, dict) else None
        target = operating_point_of(spec_raw, task or None).target_false_alarm_rate
        rate = None if target is None else max(float(target), self.monitor.config.expected_anomaly_rate)
        if cal and len(cal) >= 10:
            self.monitor.set_reference(key, cal, route_distance_threshold=rthr, expected_anomaly_rate=rate)
            return
        w = self._warm.setdefault(key, [])
        w.append(score)
        if len(w) >= self.warmup:
            self.monitor.set_reference(key, w, route_distance_threshold=rthr, expected_anomaly_rate=rate)
            self._warm.pop(key, None)

    def observe(self, res: InspectionResult, spec_raw: dict[str, Any]) -> list[DriftAlert]:
        if res.shadow or res.warmup:
            return []
        key = f"{res.model}@{res.model_version}" + (f"/{res.task}" if res.task else "")
        self._ensure_reference(key, spec_raw or {}, res.task, float(res.score))
        return self.monitor.observe(res.camera, key, float(res.score), bool(res.is_anomaly), res.route_distance)


class Lifecycle:
    """The per-batch hook (:meth:`after_batch`): drift alerts (+ ``retrain_requested`` on a route_ood alert)."""

    def __init__(self, drift: DriftHook | None, drift_topic: Any, events_topic: Any, retrain_on_ood: bool,
                 state=None):
        self.drift = drift
        self.drift_topic, self.events_topic = drift_topic, events_topic
        self.retrain_on_ood = retrain_on_ood
        self.state = state  # stream.lifecycle.drift_state.DriftStateStore: windows that survive restarts

    @property
    def output_topics(self) -> tuple[Any, ...]:
        """The topics this hook publishes to: drift alerts, retrain requests (never model-events), drift state."""
        return (self.drift_topic, self.events_topic) + ((self.state.topic,) if self.state is not None else ())

    def after_batch(self, batch: Batch) -> list[Outgoing]:
        out: list[Outgoing] = []
        if self.drift is None:
            return out
        try:
            for s in batch.scored:
                out += self._drift(s)
            if self.state is not None:
                out += self.state.outgoing(batch)
        except Exception as e:  # lifecycle extras never stop the frame stream
            log.warning("lifecycle_hook_failed", error=f"{type(e).__name__}: {e}"[:300])
        return out

    def _drift(self, s: Scored) -> list[Outgoing]:
        res, out = s.result, []
        for alert in self.drift.observe(res, s.spec.raw):
            d = alert.to_dict()
            d.update(model=res.model, model_version=res.model_version, task=res.task, camera=res.camera)
            out.append(Outgoing(self.drift_topic, res.camera.encode(), orjson.dumps(d), None))
            log.warning("drift_alert", detector=alert.detector, key=alert.key, statistic=alert.statistic)
            if alert.detector == "route_ood" and self.retrain_on_ood:
                ev = ModelEvent("retrain_requested", res.model, 0, product=res.product,
                                reasons=[f"route_ood: {alert.statistic:.0%} of {alert.window} frames beyond "
                                         f"the task's route distance on camera {res.camera}"],
                                detail={"camera": res.camera, "task": res.task})
                out.append(Outgoing(self.events_topic, ev.key, ev.to_json(), None))
        return out
