"""Rollout health policy: promote / roll back / wait from a candidate's shadow window (pure, no I/O).

The candidate's scores on good-looking frames (live frames the serving model did not flag, and the
probe images shipped with the artifact) are compared with the candidate's own calibration scores
(``metadata.calibration.scores``): two-sample KS test and PSI as in :mod:`stream.lifecycle.drift`, and
the flagged fraction of good frames against ``max_good_flag_rate``. Any inference error rolls back.
The tunables are ``settings.rollout`` (contracts.config.RolloutSettings, ``LINEWATCH_ROLLOUT__*``).

When the evidence is enough is a rule of the shadow window (:class:`Window`; the decision names it):

- ``probes_only``: nothing serves the candidate's product (or MoLE-Flow task) yet: no incumbent to compare live
  frames with, so its probe images decide as soon as they are scored, however few;
- ``shadow_traffic``: a served product: ``shadow_frames`` frames (probes + live), or once live frames flow,
  ``shadow_timeout_s`` of traffic with at least ``min_frames``. An idle line (no live frame) is not failure: the
  candidate waits ("waiting for traffic", ``stats.waiting_for_traffic`` past the shadow window)...
- ``traffic_deadline``: ...up to ``traffic_deadline_s``, then it is judged on what it has (rolled back under
  ``min_frames``);
- ``inference_errors``: any candidate error decides at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from contracts.config import RolloutSettings
from contracts.operating_point import operating_point_of
from stream.lifecycle.drift import population_stability_index

_DEFAULTS = RolloutSettings()  # one set of defaults: the settings' own


@dataclass(frozen=True)
class HealthPolicy:
    shadow_frames: int = _DEFAULTS.shadow_frames  # frames the candidate must score before a decision
    min_frames: int = _DEFAULTS.min_frames  # fewer than this at the timeout -> roll back (not enough evidence)
    shadow_timeout_s: float = _DEFAULTS.shadow_timeout_s
    traffic_deadline_s: float = _DEFAULTS.traffic_deadline_s  # an idle line waits this long for live frames
    load_timeout_s: float = _DEFAULTS.load_timeout_s
    max_error_rate: float = _DEFAULTS.max_error_rate  # any inference error -> roll back
    max_good_flag_rate: float = _DEFAULTS.max_good_flag_rate  # good-looking frames the candidate flags
    # statistics of the decision (the same tests as the drift detectors), not deployment settings
    ks_alpha: float = 1e-3
    psi_threshold: float = 0.25
    psi_bins: int = 10
    batch: int = 8  # shadow frames per candidate request

    @classmethod
    def from_settings(cls, rollout: RolloutSettings, **overrides: Any) -> HealthPolicy:
        """The policy of ``settings.rollout``; non-None ``overrides`` (command-line flags) win."""
        kw = {k: getattr(rollout, k) for k in ("shadow_frames", "min_frames", "shadow_timeout_s", "load_timeout_s",
                                                "max_error_rate", "max_good_flag_rate", "traffic_deadline_s")}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


PROBES_ONLY, SHADOW_TRAFFIC, TRAFFIC_DEADLINE, INFERENCE_ERRORS = (
    "probes_only", "shadow_traffic", "traffic_deadline", "inference_errors")


@dataclass
class Decision:
    action: str  # "promote" | "rollback" | "wait"
    reasons: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    rule: str = SHADOW_TRAFFIC  # which rule decided (module docstring); also ``stats["rule"]``


@dataclass
class ShadowStats:
    scores: list[float] = field(default_factory=list)  # candidate scores of good-looking frames
    frames: int = 0
    errors: int = 0
    last_error: str = ""
    flagged_good: int = 0
    live: int = 0  # of ``frames``: live frames (the rest are probe images)


@dataclass(frozen=True)
class Window:
    """Where a shadow window stands (stream/lifecycle/shadow.py keeps the clock)."""

    new_product: bool  # nothing serves the candidate's product (or task) yet
    probes: int  # probe images the artifact ships
    elapsed_s: float  # since the window opened
    live_s: float | None  # since the first live frame; None: no live frame yet (an idle line)


def _enough(s: ShadowStats, policy: HealthPolicy, w: Window) -> tuple[str, str]:
    """(``judge`` | ``wait`` | ``waiting_for_traffic`` | ``too_few``, the rule) for a window with no errors."""
    if w.new_product and w.probes:
        return ("judge" if s.frames >= min(w.probes, policy.shadow_frames) else "wait"), PROBES_ONLY
    if s.frames >= policy.shadow_frames:
        return "judge", SHADOW_TRAFFIC
    if w.live_s is not None and w.live_s > policy.shadow_timeout_s and s.frames >= policy.min_frames:
        return "judge", SHADOW_TRAFFIC  # slow traffic: judged on the window's frames
    if w.elapsed_s > policy.traffic_deadline_s:
        return ("judge" if s.frames >= policy.min_frames else "too_few"), TRAFFIC_DEADLINE
    idle = w.live_s is None and w.elapsed_s > policy.shadow_timeout_s
    return ("waiting_for_traffic" if idle else "wait"), SHADOW_TRAFFIC


def decide(s: ShadowStats, calibration: np.ndarray | list[float] | None, threshold: float,
           policy: HealthPolicy, timed_out: bool = False, window: Window | None = None) -> Decision:
    """Promote / roll back / wait from what the candidate did in its shadow window (pure). Without ``window``:
    ``shadow_frames`` frames, or at ``timed_out`` at least ``min_frames`` (the plain window rule)."""
    total = s.frames + s.errors
    st: dict[str, Any] = {"frames": s.frames, "errors": s.errors, "good_frames": len(s.scores),
                          "live_frames": s.live, "probe_frames": s.frames - s.live}
    if total and s.errors / total > policy.max_error_rate:
        st["rule"] = INFERENCE_ERRORS
        return Decision("rollback", [f"inference_errors: {s.errors}/{total} requests failed ({s.last_error[:200]})"],
                        st, INFERENCE_ERRORS)
    if window is None:
        rule = SHADOW_TRAFFIC
        enough = "wait" if s.frames < policy.shadow_frames and not timed_out else (
            "judge" if s.frames >= policy.min_frames else "too_few")
    else:
        enough, rule = _enough(s, policy, window)
    st["rule"] = rule
    if enough in ("wait", "waiting_for_traffic"):
        if enough == "waiting_for_traffic":
            st["waiting_for_traffic"] = True
        return Decision("wait", [], st, rule)
    if enough == "too_few":
        within = f" within the traffic deadline ({policy.traffic_deadline_s:g} s)" if rule == TRAFFIC_DEADLINE else ""
        return Decision("rollback", [f"insufficient_shadow_traffic: {s.frames} frames ({s.live} live) < "
                                     f"{policy.min_frames}{within}"], st, rule)
    d = _judge(s, calibration, threshold, policy, st)
    d.rule = rule
    return d


def _judge(s: ShadowStats, calibration, threshold: float, policy: HealthPolicy, st: dict[str, Any]) -> Decision:
    """The health checks on the window's good-looking frames."""
    reasons: list[str] = []
    good = np.asarray(s.scores, dtype=np.float64)
    if good.size == 0:
        reasons.append("no_good_frames: every shadow frame was flagged by the serving model")
        return Decision("rollback", reasons, st)
    if not np.all(np.isfinite(good)):
        reasons.append("non_finite_scores: the candidate returned NaN/inf scores")
        return Decision("rollback", reasons, st)
    rate = float(np.mean(good > threshold))
    st["good_flag_rate"] = rate
    if rate > policy.max_good_flag_rate:
        reasons.append(f"false_alarms: {rate:.0%} of good-looking frames flagged (> {policy.max_good_flag_rate:.0%})")
    if calibration is not None and len(calibration) >= 5 and good.size >= 5:
        ref = np.asarray(calibration, dtype=np.float64)
        ks = stats.ks_2samp(good, ref)
        psi = population_stability_index(ref, good, policy.psi_bins)
        n_eff = good.size * ref.size / (good.size + ref.size)
        psi_thr = max(policy.psi_threshold, float(stats.chi2.ppf(1 - policy.ks_alpha, policy.psi_bins - 1)) / n_eff)
        st.update(ks_statistic=float(ks.statistic), ks_p=float(ks.pvalue), psi=psi, psi_threshold=psi_thr,
                  median=float(np.median(good)), calibration_median=float(np.median(ref)))
        if ks.pvalue < policy.ks_alpha or psi > psi_thr:
            reasons.append(f"score_distribution: good-frame scores inconsistent with calibration "
                           f"(KS p={ks.pvalue:.2g}, PSI={psi:.3g} > {psi_thr:.3g}; median {np.median(good):.4g} "
                           f"vs {np.median(ref):.4g})")
    else:
        st["calibration"] = "absent"
    return Decision("rollback" if reasons else "promote", reasons, st)


def calibration_of(spec: dict[str, Any], task: str | None = None) -> tuple[list[float] | None, float]:
    """(calibration scores, decision threshold) of a spec, for a task of a MoLE-Flow spec: the threshold of
    its operating point (contracts/operating_point.py; the spec's ``threshold`` for older versions)."""
    thr = operating_point_of(spec, task).threshold
    cal = spec.get("calibration") or {}
    scores = cal.get("scores") if isinstance(cal, dict) else None
    tasks = spec.get("tasks")
    if task and isinstance(tasks, dict) and isinstance(tasks.get(task), dict):
        scores = tasks[task].get("calibration_scores", scores)
    return (list(map(float, scores)) if scores else None), thr

