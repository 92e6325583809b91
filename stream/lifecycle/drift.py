"""Drift detection per camera and task over sliding windows of inspection results.

Three detectors, each fed one result at a time (pure logic, no I/O; the worker publishes
the alerts they return on `drift-alerts`):

- ``score_shift``: the window's anomaly scores against the model's calibration reference
  (scores of good validation images stored in the model spec). Two statistics: the two-sample
  Kolmogorov-Smirnov test (scipy) and the Population Stability Index over the reference's
  decile bins. Alerts when KS p < ``ks_alpha`` or PSI > ``psi_threshold``.
- ``route_ood``: MoLE-Flow route distance beyond the task's calibrated quantile (an unknown
  product or a camera that moved). Alerts when the fraction of frames beyond it in the window
  exceeds ``ood_fraction``.
- ``anomaly_rate``: the window's flagged fraction against the expected false-positive rate of
  the calibrated threshold, one-sided exact binomial test.

Every alert is rate-limited per (detector, key) by ``min_interval_s``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from contracts.config import DriftSettings

_DEFAULTS = DriftSettings()  # window / check_every / min_interval_s: one set of defaults, the settings' own


@dataclass(frozen=True)
class DriftConfig:
    window: int = _DEFAULTS.window  # frames per sliding window
    check_every: int = _DEFAULTS.check_every  # evaluate once every N new frames once the window is full
    ks_alpha: float = 1e-3
    psi_threshold: float = 0.25  # common rule of thumb: > 0.25 is a significant shift
    ood_fraction: float = 0.5
    expected_anomaly_rate: float = 0.01
    rate_alpha: float = 1e-4
    min_interval_s: float = _DEFAULTS.min_interval_s  # per (detector, key)
    psi_bins: int = 10


@dataclass
class DriftAlert:
    detector: str
    key: str  # "camera=<id>|task=<name>"
    statistic: float
    threshold: float
    p_value: float | None
    window: int
    reference: str
    detail: dict = field(default_factory=dict)
    ts_ms: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = 1
        return d


def population_stability_index(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """PSI = sum_i (w_i - r_i) * ln(w_i / r_i) over the reference's quantile bins."""
    reference = np.asarray(reference, dtype=np.float64)
    window = np.asarray(window, dtype=np.float64)
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # degenerate reference: a single value
        edges = np.array([reference.min() - 1e-9, reference.max() + 1e-9])
    edges[0], edges[-1] = -np.inf, np.inf
    # additive (Jeffreys, +0.5) smoothing: an empty bin in a small window must not dominate
    r_counts = np.histogram(reference, edges)[0] + 0.5
    w_counts = np.histogram(window, edges)[0] + 0.5
    r = r_counts / r_counts.sum()
    w = w_counts / w_counts.sum()
    return float(np.sum((w - r) * np.log(w / r)))


@dataclass
class _Track:
    scores: deque
    flags: deque
    beyond_route: deque
    since_check: int = 0


class DriftMonitor:
    """Keeps one sliding window per (camera, task) and returns alerts as results arrive."""

    def __init__(self, config: DriftConfig | None = None, clock=time.monotonic, max_tracks: int = 20000):
        self.config = config or DriftConfig()
        self._clock = clock
        self.max_tracks = max_tracks  # bounded state: the least recently fed windows are dropped beyond it
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._references: dict[str, dict] = {}

    # -- per-camera state (stream/lifecycle/drift_state.py persists it on a compacted topic)
    def snapshot(self, camera: str) -> dict:
        """Every window of ``camera`` (JSON-ready): restored by another worker after a partition move."""
        pre = f"camera={camera}|"
        now = self._clock()
        out = {}
        for key, tr in self._tracks.items():
            if key.startswith(pre):
                alerts = {d: round(now - t, 3) for (d, k), t in self._last_alert.items() if k == key}
                out[key[len(pre):]] = {"scores": list(tr.scores), "flags": [int(f) for f in tr.flags],
                                       "beyond_route": [int(b) for b in tr.beyond_route],
                                       "since_check": tr.since_check, "alert_age_s": alerts}
        return out

    def restore(self, camera: str, snap: dict) -> int:
        """Replace ``camera``'s windows with a :meth:`snapshot` (what the previous owner had); returns tracks."""
        self.drop(camera)
        cfg, now = self.config, self._clock()
        for task_key, t in snap.items():
            key = f"camera={camera}|{task_key}"
            self._tracks[key] = _Track(deque(map(float, t.get("scores", [])), maxlen=cfg.window),
                                       deque(map(bool, t.get("flags", [])), maxlen=cfg.window),
                                       deque(map(bool, t.get("beyond_route", [])), maxlen=cfg.window),
                                       int(t.get("since_check", 0)))
            for det, age in (t.get("alert_age_s") or {}).items():
                self._last_alert[(det, key)] = now - float(age)
        self._bound()
        return len(snap)

    def drop(self, camera: str) -> None:
        pre = f"camera={camera}|"
        for key in [k for k in self._tracks if k.startswith(pre)]:
            del self._tracks[key]
        for k in [k for k in self._last_alert if k[1].startswith(pre)]:
            del self._last_alert[k]

    def _bound(self) -> None:
        while len(self._tracks) > self.max_tracks:
            key, _ = self._tracks.popitem(last=False)
            for k in [k for k in self._last_alert if k[1] == key]:
                del self._last_alert[k]

    def set_reference(
        self,
        task: str,
        scores: list[float] | np.ndarray,
        route_distance_threshold: float | None = None,
        expected_anomaly_rate: float | None = None,
    ) -> None:
        """Calibration reference of one task/model: good-image scores and the route-distance quantile."""
        arr = np.asarray(scores, dtype=np.float64)
        if arr.size < 10:
            raise ValueError(f"reference for task {task!r} needs >= 10 scores, got {arr.size}")
        self._references[task] = {
            "scores": arr,
            "route_distance_threshold": route_distance_threshold,
            "expected_anomaly_rate": expected_anomaly_rate,
        }

    def has_reference(self, task: str) -> bool:
        return task in self._references

    def observe(
        self,
        camera: str,
        task: str,
        score: float,
        is_anomaly: bool,
        route_distance: float | None = None,
    ) -> list[DriftAlert]:
        ref = self._references.get(task)
        if ref is None:
            return []
        cfg = self.config
        key = f"camera={camera}|task={task}"
        tr = self._tracks.get(key)
        if tr is None:
            tr = _Track(deque(maxlen=cfg.window), deque(maxlen=cfg.window), deque(maxlen=cfg.window))
            self._tracks[key] = tr
            self._bound()
        else:
            self._tracks.move_to_end(key)
        tr.scores.append(float(score))
        tr.flags.append(bool(is_anomaly))
        rthr = ref["route_distance_threshold"]
        if route_distance is not None and rthr is not None:
            tr.beyond_route.append(float(route_distance) > rthr)
        tr.since_check += 1
        if len(tr.scores) < cfg.window or tr.since_check < cfg.check_every:
            return []
        tr.since_check = 0
        return [a for a in self._evaluate(key, tr, ref) if self._admit(a)]

    def _evaluate(self, key: str, tr: _Track, ref: dict) -> list[DriftAlert]:
        cfg = self.config
        out: list[DriftAlert] = []
        window = np.fromiter(tr.scores, dtype=np.float64)
        ks = stats.ks_2samp(window, ref["scores"])
        psi = population_stability_index(ref["scores"], window, cfg.psi_bins)
        # n * PSI is asymptotically chi2(bins - 1) under no shift: on small windows the fixed
        # rule-of-thumb threshold would fire on noise, so use the larger of the two.
        n_eff = len(window) * ref["scores"].size / (len(window) + ref["scores"].size)
        psi_thr = max(cfg.psi_threshold, float(stats.chi2.ppf(1.0 - cfg.ks_alpha, cfg.psi_bins - 1)) / n_eff)
        if ks.pvalue < cfg.ks_alpha or psi > psi_thr:
            out.append(
                DriftAlert(
                    detector="score_shift",
                    key=key,
                    statistic=float(ks.statistic),
                    threshold=cfg.ks_alpha,
                    p_value=float(ks.pvalue),
                    window=len(window),
                    reference=f"calibration scores (n={ref['scores'].size})",
                    detail={"psi": psi, "psi_threshold": psi_thr,
                            "window_median": float(np.median(window)),
                            "reference_median": float(np.median(ref["scores"]))},
                )
            )
        if len(tr.beyond_route) >= cfg.window:
            frac = float(np.mean(tr.beyond_route))
            if frac > cfg.ood_fraction:
                out.append(
                    DriftAlert(
                        detector="route_ood",
                        key=key,
                        statistic=frac,
                        threshold=cfg.ood_fraction,
                        p_value=None,
                        window=len(tr.beyond_route),
                        reference=f"route distance > {ref['route_distance_threshold']:.4g} (task calibration quantile)",
                    )
                )
        rate = ref["expected_anomaly_rate"] if ref["expected_anomaly_rate"] is not None else cfg.expected_anomaly_rate
        flagged = int(sum(tr.flags))
        test = stats.binomtest(flagged, len(tr.flags), rate, alternative="greater")
        if test.pvalue < cfg.rate_alpha:
            out.append(
                DriftAlert(
                    detector="anomaly_rate",
                    key=key,
                    statistic=flagged / len(tr.flags),
                    threshold=cfg.rate_alpha,
                    p_value=float(test.pvalue),
                    window=len(tr.flags),
                    reference=f"expected anomaly rate {rate:.4g}",
                )
            )
        return out

    def _admit(self, alert: DriftAlert) -> bool:
        now = self._clock()
        k = (alert.detector, alert.key)
        last = self._last_alert.get(k)
        if last is not None and now - last < self.config.min_interval_s:
            return False
        self._last_alert[k] = now
        alert.ts_ms = int(time.time() * 1000)
        return True
