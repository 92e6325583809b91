"""A model version's operating point as operators read it: ``linewatch rollout status``, model events, the console.

The operating point itself (threshold, normalised score, boxes) is :mod:`contracts.operating_point`, read from
the version's ``linewatch_spec``; this module only summarises what it states -- the target false-alarm rate
and the training job's estimates (false-alarm rate on held-out good images, recall on synthetic defects,
overall and per defect family, with their sample sizes) -- per product, or per task of a multi-task model.
``released`` and the controller's outcome events carry it under ``detail.operating_point`` ({name: summary}).
"""

from __future__ import annotations

from typing import Any

from contracts.model_events import ModelEvent
from contracts.operating_point import OperatingPoint, operating_point_of

ESTIMATE_KEYS = ("estimated_false_alarm_rate", "estimated_recall", "estimated_recall_by_family", "n_good",
                 "n_synthetic", "method")


def _stated(spec: dict[str, Any], task: str | None) -> bool:
    """Does the spec state an operating point for ``task`` (else: the fallback of an older version)?"""
    tasks = spec.get("tasks")
    if task and isinstance(tasks, dict) and isinstance(tasks.get(task), dict):
        d = tasks[task].get("operating_point")
    else:
        d = spec.get("operating_point")
    return isinstance(d, dict) and "threshold" in d


def summary(op: OperatingPoint, stated: bool = True) -> dict[str, Any]:
    """The operator-facing fields of one operating point (JSON-ready)."""
    d: dict[str, Any] = {"threshold": op.threshold, "target_false_alarm_rate": op.target_false_alarm_rate,
                         "stated": stated}
    d.update({k: op.estimates[k] for k in ESTIMATE_KEYS if k in op.estimates})
    return d


def summary_of(spec: dict[str, Any], task: str | None = None) -> dict[str, Any]:
    """The summary of the operating point ``spec`` applies to ``task`` (or to the model)."""
    return summary(operating_point_of(spec, task), _stated(spec, task))


def operating_points(spec: dict[str, Any] | None, task: str | None = None) -> dict[str, dict[str, Any]]:
    """{task: summary} of a multi-task spec (only ``task`` when it names one), else {product (or model): summary}."""
    if not isinstance(spec, dict):
        return {}
    tasks = spec.get("tasks")
    if isinstance(tasks, dict) and tasks:
        names = [task] if task and task in tasks else [str(t) for t in tasks]
        return {t: summary_of(spec, t) for t in names}
    return {str(spec.get("product") or spec.get("model") or "model"): summary_of(spec, None)}


def _pct(v: Any) -> str:
    try:
        return f"{100.0 * float(v):.3g}%"
    except (TypeError, ValueError):
        return "-"


def describe(d: dict[str, Any]) -> str:
    """One line: ``target FAR 1% · est. FAR 0.8% · recall 93.5% (n_good 120, n_synthetic 300)``."""
    if not d.get("stated", True):
        return f"no operating point stated (older version: threshold {d.get('threshold', 0.0):.6g})"
    parts = [f"target FAR {_pct(d.get('target_false_alarm_rate'))}",
             f"est. FAR {_pct(d.get('estimated_false_alarm_rate'))}",
             f"recall {_pct(d.get('estimated_recall'))}"]
    n = ", ".join(f"{k} {d[k]}" for k in ("n_good", "n_synthetic") if d.get(k) is not None)
    fam = d.get("estimated_recall_by_family")
    fams = ", ".join(f"{k} {_pct(v)}" for k, v in sorted(fam.items())) if isinstance(fam, dict) and fam else ""
    return " · ".join(parts) + (f" ({n})" if n else "") + (f"; recall by family: {fams}" if fams else "")


def attach_to_status(status: dict[str, dict[str, Any]], events: list[ModelEvent]) -> dict[str, dict[str, Any]]:
    """Add ``operating_point`` (serving version) and ``candidate_operating_point`` to
    :func:`contracts.model_events.fold_status`'s entries, from the events' ``detail.operating_point``."""
    by_version: dict[tuple[str, int], dict[str, Any]] = {}
    for e in events:
        ops = (e.detail or {}).get("operating_point")
        if isinstance(ops, dict) and ops:
            by_version.setdefault((e.model, int(e.version)), {}).update(ops)
    for model, s in status.items():
        for key, v in (("operating_point", s.get("serving_version")),
                       ("candidate_operating_point", s.get("candidate_version"))):
            if v is not None and (model, int(v)) in by_version:
                s[key] = by_version[(model, int(v))]
    return status


def status_line(model: str, s: dict[str, Any]) -> str:
    """One model's `linewatch rollout status` line: serving, candidate (and "waiting for traffic"), the last event
    with its reasons, and the shadow rule that decided the last outcome (stream/lifecycle/policy.py)."""
    last = s["history"][-1]
    why = f"  ({'; '.join(last['reasons'])})" if last.get("reasons") else ""
    cand = f"v{s['candidate_version']}" if s.get("candidate_version") else "-"
    if s.get("candidate_version") and s.get("candidate_state"):
        cand += f" ({s['candidate_state']})"
    rule = f"  rule={s['decided_by']}" if s.get("decided_by") else ""
    return (f"{model:32s} serving=v{s['serving_version']}  candidate={cand}  "
            f"last={last['type']} v{last['version']}{rule}{why}")
