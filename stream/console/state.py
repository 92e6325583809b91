"""What the console knows, in bounded memory: every topic's records folded into ring buffers and small maps.

Pure logic (no Kafka, no HTTP): :mod:`stream.console.sources` feeds decoded records in, the web app
(:mod:`stream.console.app`) reads views out, and every change is passed to ``on_change(kind, payload)``
(the server-sent-event hub). Bounds: cameras (least recently seen dropped), defect events, results kept for
the throughput window, drift alerts, DLQ records, model events and feedback records are each a ring.

Times: throughput and latency use the result's ``processed_ts_ms`` (the worker's clock), DLQ rates the
record's ``error_ts_ms``, so a bounded replay at start lands where it happened, not all at once.

Scores: an operator reads the normalised score (``score_normalized``, 0.5 at the threshold of the version's
operating point, contracts/operating_point.py); the raw score and threshold stay in every summary. Results
of warm-up frames (``warmup``, e.g. the demo's first frame) are counted, never shown as a camera or defect.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contracts.envelope import DefectEvent, InspectionResult
from contracts.model_events import ModelEvent, fold_status
from contracts.serving_state import ServingEntry
from stream.console.feedback import Feedback, propose_thresholds
from stream.console.onboarding import OnboardingView
from stream.lifecycle.onboarding import OnboardEvent
from stream.lifecycle.operating import summary_of

SPARK = 60  # scores per camera for the sparkline
WINDOW_S = 60  # throughput / latency window
MAX_GALLERY = 500  # items one defects query returns at most


@dataclass
class DefectRecord:
    summary: dict[str, Any]
    heatmap_b64: str
    thumb: bytes | None = None
    verdict: str | None = None

    def view(self) -> dict[str, Any]:
        return {**self.summary, "verdict": self.verdict, "has_frame": self.thumb is not None}


@dataclass
class Filters:
    line: str | None = None
    camera: str | None = None
    product: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    verdict: str | None = None  # unreviewed | confirmed | false_alarm
    limit: int = 100

    @classmethod
    def from_query(cls, q: dict[str, str]) -> Filters:
        def num(name: str) -> int | None:
            v = q.get(name)
            if v in (None, ""):
                return None
            try:
                return int(float(v))
            except ValueError:
                raise ValueError(f"query parameter {name!r} must be a number (ms since the epoch)") from None

        verdict = q.get("verdict") or None
        if verdict not in (None, "unreviewed", "confirmed", "false_alarm"):
            raise ValueError("verdict must be unreviewed, confirmed or false_alarm")
        limit = num("limit")
        return cls(line=q.get("line") or None, camera=q.get("camera") or None, product=q.get("product") or None,
                   since_ms=num("since"), until_ms=num("until"), verdict=verdict,
                   limit=max(1, min(MAX_GALLERY, limit if limit is not None else 100)))

    def match(self, d: dict[str, Any], verdict: str | None) -> bool:
        if self.line is not None and d.get("line") != self.line:
            return False
        if self.camera is not None and d.get("camera") != self.camera:
            return False
        if self.product is not None and d.get("product") != self.product:
            return False
        ts = d.get("ts_ms") or 0
        if self.since_ms is not None and ts < self.since_ms:
            return False
        if self.until_ms is not None and ts > self.until_ms:
            return False
        if self.verdict == "unreviewed":
            return verdict is None
        return self.verdict is None or verdict == self.verdict


def result_summary(r: InspectionResult) -> dict[str, Any]:
    return {"frame_id": r.frame_id, "camera": r.camera, "line": r.line, "product": r.product or r.task or None,
            "model": r.model, "version": str(r.model_version), "score": float(r.score),
            "threshold": float(r.threshold), "is_anomaly": bool(r.is_anomaly), "ts_ms": int(r.ts_ms),
            "score_normalized": None if r.score_normalized is None else float(r.score_normalized),
            "processed_ts_ms": int(r.processed_ts_ms), "gt_label": r.gt_label, "gt_defect": r.gt_defect,
            "latency_ms": {k: round(float(v), 2) for k, v in (r.latency_ms or {}).items()}}


def _pct(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p = np.percentile(np.asarray(values, dtype=float), [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2), "p99": round(float(p[2]), 2)}


@dataclass
class ConsoleState:
    max_defects: int = 500
    max_cameras: int = 256
    max_results: int = 20000
    max_drift: int = 200
    max_dlq: int = 500
    max_events: int = 500
    max_feedback: int = 20000
    clock: Callable[[], float] = time.time
    on_change: Callable[[str, dict[str, Any]], None] | None = None

    cameras: OrderedDict = field(default_factory=OrderedDict)
    defects: OrderedDict = field(default_factory=OrderedDict)
    totals: Counter = field(default_factory=Counter)
    dlq_reasons: Counter = field(default_factory=Counter)
    serving: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results: deque = deque(maxlen=self.max_results)  # (t_s, e2e, infer, is_anomaly)
        self.drift: deque = deque(maxlen=self.max_drift)
        self.dlq: deque = deque(maxlen=self.max_dlq)
        self.events: deque = deque(maxlen=self.max_events)
        self.feedback: OrderedDict[str, Feedback] = OrderedDict()  # frame_id -> the latest verdict on it
        self._feedback_ids: OrderedDict[str, None] = OrderedDict()  # applied records (dedupe)
        self.onboarding = OnboardingView()

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        if self.on_change is not None:
            self.on_change(kind, payload)

    # ------------------------------------------------------------------ apply (one per topic)
    def apply_result(self, r: InspectionResult, has_frame: bool = False) -> dict[str, Any] | None:
        if r.shadow:  # a rollout candidate's score: not what the line sees
            self.totals["shadow_results"] += 1
            return None
        if r.warmup:  # a warm-up frame (e.g. the demo's): no camera of the line
            self.totals["warmup_results"] += 1
            return None
        s = result_summary(r)
        self.totals["results"] += 1
        self.totals["anomalies"] += int(r.is_anomaly)
        lat = r.latency_ms or {}
        t = (r.processed_ts_ms / 1000.0) if r.processed_ts_ms else self.clock()
        self.results.append((t, lat.get("e2e"), lat.get("infer"), bool(r.is_anomaly)))
        cam = self.cameras.pop(r.camera, None) or {"camera": r.camera, "scores": deque(maxlen=SPARK), "frames": 0,
                                                   "anomalies": 0, "last_defect": None}
        self.cameras[r.camera] = cam
        # the sparkline: normalised scores (threshold 0.5); the raw score from an older writer
        cam["scores"].append(round(float(r.score if r.score_normalized is None else r.score_normalized), 6))
        cam["frames"] += 1
        cam["anomalies"] += int(r.is_anomaly)
        cam.update({k: s[k] for k in ("line", "product", "model", "version", "frame_id", "score", "threshold",
                                      "score_normalized", "is_anomaly", "ts_ms", "processed_ts_ms", "gt_label")})
        cam["has_frame"] = has_frame
        cam["has_defect"] = s["frame_id"] in self.defects
        while len(self.cameras) > self.max_cameras:
            self.cameras.popitem(last=False)
        known = self.defects.get(s["frame_id"])
        payload = {**s, "has_frame": has_frame, "has_defect": cam["has_defect"],
                   "boxes": known.summary["boxes"] if known is not None else []}
        self._emit("result", payload)
        return payload

    def apply_defect(self, ev: DefectEvent, thumb: bytes | None = None) -> dict[str, Any] | None:
        if ev.result.warmup:  # a warm-up frame: not in the gallery
            return None
        s = {**result_summary(ev.result), "boxes": [dict(b) for b in ev.boxes][:64],
             "map_threshold": float(ev.map_threshold), "heatmap_scale": float(ev.heatmap_scale)}
        fid = s["frame_id"]
        self.totals["defects"] += int(fid not in self.defects)
        self.defects.pop(fid, None)
        rec = DefectRecord(s, ev.heatmap_png_b64, thumb, self._verdict_of(fid))
        self.defects[fid] = rec
        while len(self.defects) > self.max_defects:
            self.defects.popitem(last=False)
        cam = self.cameras.get(s["camera"])
        if cam is not None:
            cam["last_defect"] = fid
            cam["has_defect"] = cam.get("frame_id") == fid or cam.get("has_defect", False)
        view = rec.view()
        self._emit("defect", view)
        return view

    def _verdict_of(self, frame_id: str) -> str | None:
        f = self.feedback.get(frame_id)
        return f.verdict if f else None

    def apply_drift(self, d: dict[str, Any]) -> None:
        if not isinstance(d, dict):
            return
        self.totals["drift"] += 1
        alert = {k: d.get(k) for k in ("detector", "key", "statistic", "threshold", "p_value", "window",
                                       "reference", "ts_ms")}
        alert["detail"] = d.get("detail") if isinstance(d.get("detail"), dict) else {}
        self.drift.append(alert)
        self._emit("drift", alert)

    def apply_dlq(self, h: dict[str, bytes], value_bytes: int) -> None:
        def s(name: str) -> str | None:
            v = h.get(name)
            return v.decode("utf-8", "replace")[:300] if v else None

        reason = s("error") or "unknown"
        try:
            ts = int(s("error_ts_ms") or 0)
        except ValueError:
            ts = 0
        rec = {"reason": reason, "detail": s("error_detail"), "stage": s("error_stage"), "camera": s("camera_id"),
               "frame_id": s("frame_id"), "product": s("product"), "ts_ms": ts or int(self.clock() * 1000),
               "bytes": value_bytes}
        self.totals["dlq"] += 1
        self.dlq_reasons[reason] += 1
        self.dlq.append(rec)
        self._emit("dlq", rec)
        if reason == "unknown_product" and self.onboarding.apply_candidate(rec["product"], rec["frame_id"],
                                                                          rec["camera"], rec["ts_ms"]):
            self._emit("onboarding", {"product": rec["product"], "candidate": rec["frame_id"]})

    def apply_onboard_event(self, ev: OnboardEvent) -> None:
        self.totals["onboarding_events"] += 1
        view = self.onboarding.apply_event(ev)
        self._emit("onboarding", {"product": ev.product, "type": ev.type, "run_id": ev.run_id,
                                  "captured": view["captured"]})

    def apply_serving(self, product: str, e: ServingEntry | None) -> None:
        if e is None:
            self.serving.pop(product, None)
        else:
            # the operating point of this product (a multi-task model's entry is one task's: its own threshold)
            op = summary_of(e.spec, e.product)
            self.serving[product] = {"product": e.product, "model": e.model, "version": int(e.version),
                                     "threshold": float(op["threshold"]),
                                     "detector": e.detector, "updated_ms": int(e.updated_ms),
                                     "spec_sha256": e.spec_sha256, "operating_point": op}
        self._emit("serving", {"product": product, "entry": self.serving.get(product)})

    def apply_model_event(self, ev: ModelEvent) -> None:
        if any(e.event_id == ev.event_id for e in self.events):
            return
        self.events.append(ev)
        self._emit("model_event", {"type": ev.type, "model": ev.model, "version": ev.version, "reasons": ev.reasons,
                                   "ts_ms": ev.ts_ms})

    def apply_feedback(self, fb: Feedback) -> bool:
        """False when this record was already applied (the console's own write read back)."""
        if fb.feedback_id in self._feedback_ids:
            return False
        self._feedback_ids[fb.feedback_id] = None
        while len(self._feedback_ids) > self.max_feedback:
            self._feedback_ids.popitem(last=False)
        old = self.feedback.get(fb.frame_id)
        if old is None or fb.created_ms >= old.created_ms:  # the latest verdict on a frame counts
            self.feedback.pop(fb.frame_id, None)
            self.feedback[fb.frame_id] = fb
        while len(self.feedback) > self.max_feedback:
            self.feedback.popitem(last=False)
        rec = self.defects.get(fb.frame_id)
        if rec is not None:
            rec.verdict = self._verdict_of(fb.frame_id)
        self._emit("feedback", {"frame_id": fb.frame_id, "verdict": fb.verdict, "product": fb.product})
        return True

    # ------------------------------------------------------------------ views
    def camera_tiles(self) -> list[dict[str, Any]]:
        out = []
        for cam in sorted(self.cameras.values(), key=lambda c: c["camera"]):
            known = self.defects.get(cam.get("frame_id"))
            out.append({**{k: v for k, v in cam.items() if k != "scores"}, "scores": list(cam["scores"]),
                        "has_defect": known is not None, "boxes": known.summary["boxes"] if known else []})
        return out

    def defect_list(self, f: Filters) -> dict[str, Any]:
        items, facets = [], {"line": set(), "camera": set(), "product": set()}
        matched = 0
        for rec in reversed(self.defects.values()):
            s = rec.summary
            for k in facets:
                if s.get(k):
                    facets[k].add(s[k])
            if f.match(s, rec.verdict):
                matched += 1
                if len(items) < f.limit:
                    items.append(rec.view())
        return {"items": items, "matched": matched, "kept": len(self.defects),
                "facets": {k: sorted(v) for k, v in facets.items()}}

    def defect_detail(self, frame_id: str) -> dict[str, Any] | None:
        rec = self.defects.get(frame_id)
        if rec is None:
            return None
        fb = self.feedback.get(frame_id)
        return {**rec.view(), "feedback": fb.to_dict() if fb else None}

    def drift_list(self) -> list[dict[str, Any]]:
        return list(reversed(self.drift))

    def models_view(self) -> dict[str, Any]:
        status = fold_status(list(self.events))
        rollouts = []
        for _name, st in sorted(status.items()):
            rollouts.append({**{k: v for k, v in st.items() if k != "history"},
                             "history": list(reversed(st["history"]))[:50]})
        serving = [self.serving[p] for p in sorted(self.serving)]
        proposals = [p.to_dict() for p in propose_thresholds(list(self.feedback.values()), self.serving)]
        return {"serving": serving, "rollouts": rollouts, "proposals": proposals,
                "feedback": {"confirmed": sum(f.verdict == "confirmed" for f in self.feedback.values()),
                             "false_alarm": sum(f.verdict == "false_alarm" for f in self.feedback.values())}}

    def throughput(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        lo = now - WINDOW_S
        per_s = [0] * WINDOW_S
        anom_s = [0] * WINDOW_S
        e2e, infer = [], []
        last10 = 0
        for t, e, i, a in self.results:
            if t < lo or t > now + 5:
                continue
            k = min(WINDOW_S - 1, int(t - lo))
            per_s[k] += 1
            anom_s[k] += int(a)
            last10 += int(t >= now - 10)
            if e is not None:
                e2e.append(float(e))
            if i is not None:
                infer.append(float(i))
        recent = Counter(d["reason"] for d in self.dlq if d["ts_ms"] / 1000.0 >= lo)
        return {"window_s": WINDOW_S, "fps_10s": round(last10 / 10.0, 2), "per_second": per_s,
                "anomalies_per_second": anom_s, "e2e_ms": _pct(e2e), "infer_ms": _pct(infer),
                "totals": dict(self.totals), "dlq_by_reason": dict(self.dlq_reasons.most_common()),
                "dlq_recent_by_reason": dict(recent.most_common()), "dlq_recent": list(reversed(self.dlq))[:50],
                "cameras": len(self.cameras)}
