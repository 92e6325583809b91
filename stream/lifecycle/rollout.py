"""Adapter / model rollout controller (``model-events`` -> Triton explicit model control).

On a ``released`` event, step by step:

1. **verify**: the artifact at ``artifact_uri`` (model store, :mod:`contracts.artifact`) must match the
   event's sha256 (digest of metadata.json) and every file listed in metadata.json its own sha256.
2. **compatibility**: against the spec Triton serves now for that model (same detector and input
   contract; MoLE-Flow: same frozen base, earlier tasks' adapters unchanged; newer version).
   Any failure -> ``refused`` event with reasons; nothing is written to Triton's repository, the
   serving version is untouched.
3. **candidate**: the artifact is hard-linked into the Triton repository as a separate model
   ``<model>__candidate`` (explicit version policy) and loaded with ``load_model``. The serving model
   is not touched, so it keeps answering. A failed load -> ``rolled_back`` (``load_failed``).
4. **shadow**: for ``policy.shadow_frames`` frames or ``policy.shadow_timeout_s``, the candidate scores
   (a) the probe images shipped with the artifact (good validation images listed under
   ``metadata.probe``) and (b) live frames the worker offers (:meth:`RolloutController.offer`) for
   that model/product. Shadow results are tagged ``shadow=true`` (optional callback) and never used for
   decisions on frames.
5. **health** (:func:`decide`, pure): no inference errors; enough frames; the candidate's scores on
   good-looking frames (live frames the incumbent did not flag, and probe images) consistent with the
   candidate's own calibration scores (``metadata.calibration.scores``): KS p-value and PSI as in
   :mod:`stream.lifecycle.drift`, and the flagged fraction of good frames below ``policy.max_good_flag_rate``.
6. **promote**: the artifact version is linked into ``<model>/<version>``, ``<model>/config.pbtxt`` is
   rewritten atomically with ``version_policy specific [new]`` and ``load_model(<model>)``: Triton loads
   the new version beside the serving one and retires the old one when the new one is READY (0 failed
   requests, tested). ``promoted`` is published; ``on_promoted`` callbacks update routing
   (product -> model). The candidate is unloaded and removed.
   Otherwise **roll back**: unload + remove the candidate, publish ``rolled_back`` with reasons.

``rollback_requested`` (``linewatch rollback``): rewrite the policy to the requested older version and
reload; publish ``rolled_back`` (detail.operator = true).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from scipy import stats

from contracts.artifact import (
    CANDIDATE_SUFFIX,
    Artifact,
    check_compatibility,
    materialize,
    remove_model_dir,
    repository_versions,
    verify_artifact,
    write_config,
)
from contracts.logs import get_logger
from contracts.model_events import ModelEvent
from stream.lifecycle.drift import population_stability_index

log = get_logger("stream.lifecycle.rollout")


# ----------------------------------------------------------------------------- pure decision logic


@dataclass(frozen=True)
class HealthPolicy:
    shadow_frames: int = 32  # frames the candidate must score before a decision
    min_frames: int = 16  # fewer than this at the timeout -> roll back (not enough evidence)
    shadow_timeout_s: float = 120.0
    load_timeout_s: float = 180.0
    max_error_rate: float = 0.0  # any inference error -> roll back
    ks_alpha: float = 1e-3
    psi_threshold: float = 0.25
    psi_bins: int = 10
    max_good_flag_rate: float = 0.2  # good-looking frames the candidate flags as anomalous
    batch: int = 8


@dataclass
class Decision:
    action: str  # "promote" | "rollback" | "wait"
    reasons: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShadowStats:
    scores: list[float] = field(default_factory=list)  # candidate scores of good-looking frames
    frames: int = 0
    errors: int = 0
    last_error: str = ""
    flagged_good: int = 0


def decide(s: ShadowStats, calibration: np.ndarray | list[float] | None, threshold: float,
           policy: HealthPolicy, timed_out: bool = False) -> Decision:
    """Promote / roll back / wait from what the candidate did in its shadow window (pure)."""
    total = s.frames + s.errors
    st: dict[str, Any] = {"frames": s.frames, "errors": s.errors, "good_frames": len(s.scores)}
    if total and s.errors / total > policy.max_error_rate:
        return Decision("rollback", [f"inference_errors: {s.errors}/{total} requests failed ({s.last_error[:200]})"], st)
    if s.frames < policy.shadow_frames and not timed_out:
        return Decision("wait", [], st)
    if s.frames < policy.min_frames:
        return Decision("rollback", [f"insufficient_shadow_traffic: {s.frames} frames < {policy.min_frames}"], st)
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
    """(calibration scores, decision threshold) of a spec, for a task of a MoLE-Flow spec."""
    thr = float(spec.get("threshold", 0.0) or 0.0)
    cal = spec.get("calibration") or {}
    scores = cal.get("scores") if isinstance(cal, dict) else None
    tasks = spec.get("tasks")
    if task and isinstance(tasks, dict) and isinstance(tasks.get(task), dict):
        scores = tasks[task].get("calibration_scores", scores)
    return (list(map(float, scores)) if scores else None), thr


# ----------------------------------------------------------------------------- controller

Publish = Callable[[ModelEvent], Awaitable[None]]


@dataclass
class Rollout:
    model: str
    version: int
    candidate: str
    artifact: Artifact
    previous_version: int | None
    task: str | None = None  # MoLE-Flow: the adapter released (its own frames are its shadow traffic)
    started: float = field(default_factory=time.monotonic)
    state: str = "verifying"
    stats: ShadowStats = field(default_factory=ShadowStats)
    queue: deque = field(default_factory=lambda: deque(maxlen=256))  # (image bytes, incumbent flagged?)


class RolloutController:
    """Runs one rollout at a time per model; events are handled in order."""

    def __init__(self, triton_grpc_url: str, repository: str | Path, publish: Publish,
                 policy: HealthPolicy | None = None,
                 on_shadow_result: Callable[[dict[str, Any]], Awaitable[None]] | None = None):
        self.url = triton_grpc_url
        self.repository = Path(repository)
        self.publish = publish
        self.policy = policy or HealthPolicy()
        self.on_shadow_result = on_shadow_result
        self.on_promoted: list[Callable[[Artifact], Any]] = []
        self.active: dict[str, Rollout] = {}
        self.history: list[dict[str, Any]] = []
        self._client = None

    # -- Triton helpers
    def client(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient  # noqa: PLC0415

            self._client = grpcclient.InferenceServerClient(url=self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def serving_spec(self, model: str) -> tuple[dict[str, Any] | None, int | None]:
        """(linewatch_spec, version) Triton serves for ``model`` now, or (None, None)."""
        c = self.client()
        try:
            if not await c.is_model_ready(model):
                return None, None
            cfg = (await c.get_model_config(model, as_json=True))["config"]
            meta = await c.get_model_metadata(model, as_json=True)
        except Exception:  # noqa: BLE001 - not loaded / unknown
            return None, None
        raw = cfg.get("parameters", {}).get("linewatch_spec", {}).get("string_value")
        versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
        spec = orjson.loads(raw) if raw else None
        return spec, (max(versions) if versions else (int(spec.get("version")) if spec else None))

    async def _load(self, name: str, version: int | None = None) -> None:
        c = self.client()
        await c.load_model(name)
        t0 = time.monotonic()
        while True:
            try:
                if await c.is_model_ready(name, str(version) if version else ""):
                    return
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() - t0 > self.policy.load_timeout_s:
                raise TimeoutError(f"{name} v{version} not ready after {self.policy.load_timeout_s}s")
            await asyncio.sleep(0.2)

    async def _unload(self, name: str) -> None:
        try:
            await self.client().unload_model(name)
        except Exception as e:  # noqa: BLE001
            log.warning("rollout_unload_failed", model=name, error=str(e)[:200])

    # -- events
    async def handle(self, ev: ModelEvent) -> ModelEvent | None:
        """Handle one model event; returns the event published as its outcome (None: not ours)."""
        if ev.type == "released":
            return await self.rollout(ev)
        if ev.type == "rollback_requested":
            return await self.rollback_to(ev.model, ev.version, reason=(ev.reasons or ["operator request"])[0])
        return None

    async def _emit(self, ev: ModelEvent) -> ModelEvent:
        self.history.append(ev.to_dict())
        log.info("model_event", type=ev.type, model=ev.model, version=ev.version, reasons=ev.reasons)
        await self.publish(ev)
        return ev

    def _event(self, typ: str, ev: ModelEvent, reasons: list[str], prev: int | None, detail=None,
               art: Artifact | None = None) -> ModelEvent:
        return ModelEvent(typ, ev.model, ev.version, task=ev.task, product=ev.product or (art.product if art else None),
                          detector=ev.detector or (art.detector if art else None), artifact_uri=ev.artifact_uri,
                          sha256=ev.sha256, previous_version=prev, reasons=reasons, detail=detail or {})

    async def rollout(self, ev: ModelEvent) -> ModelEvent:
        if ev.model in self.active:
            return await self._emit(self._event("refused", ev, [f"busy: a rollout of {ev.model} "
                                                                 f"v{self.active[ev.model].version} is running"], None))
        ver = await asyncio.to_thread(verify_artifact, ev.artifact_uri, ev.sha256, ev.model, ev.version)
        current, cur_ver = await self.serving_spec(ev.model)
        if not ver.ok:
            return await self._emit(self._event("refused", ev, ver.reasons, cur_ver, art=ver.artifact))
        art = ver.artifact
        assert art is not None
        reasons = check_compatibility(art.metadata, current)
        if reasons:
            return await self._emit(self._event("refused", ev, reasons, cur_ver, art=art))
        cand = f"{ev.model}{CANDIDATE_SUFFIX}"
        ro = Rollout(ev.model, ev.version, cand, art, cur_ver, task=ev.task or None)
        self.active[ev.model] = ro
        try:
            ro.state = "loading_candidate"
            await asyncio.to_thread(materialize, art, self.repository, cand, [art.version])
            try:
                await self._load(cand, art.version)
            except Exception as e:  # noqa: BLE001 - Triton refused the model (bad model.py, artifact...)
                return await self._fail(ro, ev, [f"load_failed: {str(e)[:300]}"], {})
            ro.state = "shadow"
            decision = await self._shadow(ro, ev)
            if decision.action != "promote":
                return await self._fail(ro, ev, decision.reasons, decision.stats)
            ro.state = "promoting"
            try:
                await asyncio.to_thread(materialize, art, self.repository, ev.model, [art.version])
                await self._load(ev.model, art.version)
            except Exception as e:  # noqa: BLE001 - restore the previous policy, old version keeps serving
                if cur_ver is not None:
                    await self._restore(ev.model, cur_ver)
                return await self._fail(ro, ev, [f"promote_failed: {str(e)[:300]}"], decision.stats)
            await self._drop_candidate(ro)
            for cb in self.on_promoted:
                try:
                    r = cb(art)
                    if asyncio.iscoroutine(r):
                        await r
                except Exception as e:  # noqa: BLE001
                    log.warning("on_promoted_failed", error=str(e)[:200])
            return await self._emit(self._event("promoted", ev, [], cur_ver, decision.stats, art))
        finally:
            self.active.pop(ev.model, None)

    async def _restore(self, model: str, version: int) -> None:
        mdir = self.repository / model
        try:
            write_config(mdir, (mdir / "config.pbtxt").read_text(), model, [version])
            await self._load(model, version)
        except Exception as e:  # noqa: BLE001
            log.error("rollout_restore_failed", model=model, version=version, error=str(e)[:300])

    async def _drop_candidate(self, ro: Rollout) -> None:
        await self._unload(ro.candidate)
        await asyncio.to_thread(remove_model_dir, self.repository, ro.candidate)

    async def _fail(self, ro: Rollout, ev: ModelEvent, reasons: list[str], st: dict) -> ModelEvent:
        await self._drop_candidate(ro)
        return await self._emit(self._event("rolled_back", ev, reasons or ["unhealthy"], ro.previous_version, st,
                                            ro.artifact))

    async def rollback_to(self, model: str, version: int, reason: str = "operator request") -> ModelEvent:
        """Serve an older version of ``model`` again (operator verb)."""
        _, cur = await self.serving_spec(model)
        ev = ModelEvent("rollback_requested", model, version)
        if version not in repository_versions(self.repository, model):
            return await self._emit(self._event("refused", ev, [f"version_unavailable: {model}/{version} is not in "
                                                                f"the Triton repository"], cur))
        await self._restore(model, version)
        _, now = await self.serving_spec(model)
        if now != version:
            return await self._emit(self._event("refused", ev, [f"reload_failed: serving v{now}"], cur))
        out = ModelEvent("rolled_back", model, cur or version, previous_version=version, reasons=[reason],
                         detail={"operator": True, "serving_version": version})
        return await self._emit(out)

    # -- shadow traffic
    def offer(self, model: str, product: str | None, image: bytes, flagged_by_serving: bool) -> None:
        """Worker hook: a live frame the serving model scored. Cheap no-op unless a candidate for that
        model (or a new model for that product) is in its shadow window."""
        for ro in self.active.values():
            if ro.state == "shadow" and (ro.model == model or (product and ro.artifact.product == product)):
                if ro.task and product != ro.task:
                    continue  # another task's frame would be scored by this adapter: meaningless evidence
                ro.queue.append((image, flagged_by_serving))

    def _probe_images(self, art: Artifact) -> list[bytes]:
        probe = art.metadata.get("probe") or {}
        files = probe.get("files", []) if isinstance(probe, dict) else []
        out = []
        for rel in files:
            p = (art.path / rel)
            if p.is_file() and rel in (art.metadata.get("artifacts") or {}):  # only sha-verified files
                out.append(p.read_bytes())
        return out

    async def _shadow(self, ro: Rollout, ev: ModelEvent) -> Decision:
        from contracts.image import decode_image  # noqa: PLC0415
        from contracts.spec import parse_spec, to_tensor  # noqa: PLC0415
        from stream.inference.triton_client import TritonInfer  # noqa: PLC0415

        pol = self.policy
        spec = parse_spec(ro.artifact.metadata)
        cal, thr = calibration_of(ro.artifact.metadata, ev.task)
        infer = TritonInfer(self.url, max_retries=2)
        probes = [(b, False) for b in self._probe_images(ro.artifact)]
        if ro.previous_version is None or ev.task:
            # a new model/product or a MoLE-Flow adapter: the serving model may never see (or route) its frames
            # yet, so the shipped probe images are enough evidence; do not idle until the timeout waiting for
            # live traffic that may not come (live frames of its own product still count when they do)
            pol = dataclasses.replace(pol, shadow_frames=min(pol.shadow_frames, max(len(probes), pol.min_frames)))
        t0 = time.monotonic()
        s = ro.stats
        try:
            await infer.refresh()
            while True:
                items = []
                while probes and len(items) < pol.batch:
                    items.append(probes.pop(0))
                while ro.queue and len(items) < pol.batch:
                    items.append(ro.queue.popleft())
                if items:
                    good = [not f for _, f in items]
                    try:
                        x = np.stack([to_tensor(decode_image(b), spec) for b, _ in items])
                        task = [ev.task or ""] * len(items) if ev.task else None
                        out = await infer.infer(ro.candidate, x, task)
                        sc = out.scores.astype(np.float64)
                        s.frames += len(items)
                        s.scores.extend(float(v) for v, g in zip(sc, good, strict=True) if g)
                        s.flagged_good += int(sum(1 for v, g in zip(sc, good, strict=True) if g and v > thr))
                        if self.on_shadow_result is not None:
                            for v in sc:
                                await self.on_shadow_result({"model": ro.candidate, "model_version": str(ro.version),
                                                             "score": float(v), "threshold": thr,
                                                             "is_anomaly": bool(v > thr), "shadow": True})
                    except Exception as e:  # noqa: BLE001 - a candidate error is evidence, not a crash
                        s.errors += len(items)
                        s.last_error = f"{type(e).__name__}: {e}"
                timed_out = time.monotonic() - t0 > pol.shadow_timeout_s
                d = decide(s, cal, thr, pol, timed_out=timed_out)
                if d.action != "wait":
                    return d
                if not items:
                    await asyncio.sleep(0.1)
        finally:
            await infer.close()

    def status(self) -> dict[str, Any]:
        return {"active": {m: {"version": r.version, "state": r.state, "frames": r.stats.frames,
                               "errors": r.stats.errors, "since_s": round(time.monotonic() - r.started, 1)}
                           for m, r in self.active.items()},
                "history": self.history[-50:]}


# ----------------------------------------------------------------------------- worker integration


class DriftHook:
    """Feeds every (non-shadow) result into a :class:`stream.lifecycle.drift.DriftMonitor`; returns alert records.

    The reference of a (model, version, task) is the calibration in its spec (``calibration.scores``, or
    ``tasks[t].calibration_scores`` for MoLE-Flow) with the task's ``route_distance_threshold``; a model
    without calibration scores gets a warm-up reference (its first ``warmup`` scores)."""

    def __init__(self, config=None, warmup: int = 128):
        from stream.lifecycle.drift import DriftMonitor  # noqa: PLC0415

        self.monitor = DriftMonitor(config)
        self.warmup = warmup
        self._warm: dict[str, list[float]] = {}

    def _ensure_reference(self, key: str, spec_raw: dict, task: str, score: float) -> None:
        if self.monitor.has_reference(key):
            return
        cal, _ = calibration_of(spec_raw, task or None)
        tinfo = (spec_raw.get("tasks") or {}).get(task) if isinstance(spec_raw.get("tasks"), dict) else None
        rthr = tinfo.get("route_distance_threshold") if isinstance(tinfo, dict) else None
        if cal and len(cal) >= 10:
            self.monitor.set_reference(key, cal, route_distance_threshold=rthr)
            return
        w = self._warm.setdefault(key, [])
        w.append(score)
        if len(w) >= self.warmup:
            self.monitor.set_reference(key, w, route_distance_threshold=rthr)
            self._warm.pop(key, None)

    def observe(self, res, spec_raw: dict) -> list:
        if getattr(res, "shadow", False):
            return []
        key = f"{res.model}@{res.model_version}" + (f"/{res.task}" if res.task else "")
        self._ensure_reference(key, spec_raw or {}, res.task, float(res.score))
        return self.monitor.observe(res.camera, key, float(res.score), bool(res.is_anomaly), res.route_distance)


class Lifecycle:
    """What the worker calls once per micro-batch (:meth:`after_batch`): shadow traffic for a rollout
    candidate and drift alerts (+ ``retrain_requested`` on a route_ood alert). Returns extra records to
    send with the batch's results (before the batch is acked)."""

    def __init__(self, controller: RolloutController | None, drift: DriftHook | None, drift_topic, events_topic,
                 pipeline_getter, retrain_on_ood: bool = True):
        self.controller, self.drift = controller, drift
        self.drift_topic, self.events_topic = drift_topic, events_topic
        self.pipeline_getter = pipeline_getter
        self.retrain_on_ood = retrain_on_ood

    async def after_batch(self, records, outputs) -> list[tuple]:
        sends: list[tuple] = []
        try:
            p = await self.pipeline_getter()
            by_id = None
            for _key, _rj, _dj, res in outputs:
                if self.controller is not None and self.controller.active:
                    if by_id is None:
                        from contracts.envelope import peek_ids  # noqa: PLC0415

                        by_id = {peek_ids(h)[0]: v for _k, v, h, _t in records}
                    img = by_id.get(res.frame_id)
                    if img is not None:
                        self.controller.offer(res.model, res.product, img, res.is_anomaly)
                if self.drift is None:
                    continue
                spec = p.triton._specs.get(res.model) or p.triton.last_specs.get(res.model)
                for alert in self.drift.observe(res, spec.raw if spec is not None else {}):
                    d = alert.to_dict()
                    d.update(model=res.model, model_version=res.model_version, task=res.task, camera=res.camera)
                    sends.append((self.drift_topic, res.camera.encode(), orjson.dumps(d), None))
                    log.warning("drift_alert", detector=alert.detector, key=alert.key, statistic=alert.statistic)
                    if alert.detector == "route_ood" and self.retrain_on_ood:
                        ev = ModelEvent("retrain_requested", res.model, 0, product=res.product,
                                        reasons=[f"route_ood: {alert.statistic:.0%} of {alert.window} frames beyond "
                                                 f"the task's route distance on camera {res.camera}"],
                                        detail={"camera": res.camera, "task": res.task})
                        sends.append((self.events_topic, ev.key, ev.to_json(), None))
        except Exception as e:  # noqa: BLE001 - lifecycle extras never stop the frame stream
            log.warning("lifecycle_hook_failed", error=f"{type(e).__name__}: {e}"[:300])
        return sends


def register(app, cfg, pipeline_getter: Callable[[], Awaitable[Any]], repository: str | Path | None = None,
             policy: HealthPolicy | None = None) -> Lifecycle:
    """Wire the adapter lifecycle into the worker's Faust app: the rollout agent on ``model-events``,
    a ``/rollout`` page and the per-batch :class:`Lifecycle` hook (shadow traffic + drift alerts).

    ``cfg.extra`` options: ``rollout`` (default True), ``drift`` (default True), ``drift_window``,
    ``drift_check_every``, ``retrain_on_ood`` (default True)."""
    from contracts.config import Settings  # noqa: PLC0415
    from contracts.model_events import ModelEventError, decode  # noqa: PLC0415
    from stream.lifecycle.drift import DriftConfig  # noqa: PLC0415

    s = Settings()
    extra = getattr(cfg, "extra", {}) or {}
    repository = repository or s.model_repository
    events_t = app.topic(s.topic_model_events, key_serializer="raw", value_serializer="raw")
    drift_t = app.topic(s.topic_drift, key_serializer="raw", value_serializer="raw")

    async def publish(ev: ModelEvent) -> None:
        fut = await events_t.send(key=ev.key, value=ev.to_json(), force=True)
        await fut

    ctl = None
    if extra.get("rollout", True):
        ctl = RolloutController(cfg.triton_grpc_url, repository, publish, policy)

        async def route_new_product(art: Artifact) -> None:
            p = await pipeline_getter()
            if art.product and art.detector != "moleflow":
                p.router.config.products[art.product] = art.model
            await p.refresh_models()

        ctl.on_promoted.append(route_new_product)

        @app.agent(events_t, name=f"{cfg.app_id}-rollout")
        async def rollout_agent(stream):
            async for value in stream:
                try:
                    ev = decode(value)
                except ModelEventError as e:
                    log.warning("model_event_invalid", error=str(e)[:300])
                    continue
                if ev.type in ("released", "rollback_requested"):
                    # in the background: frames keep flowing (and feed the shadow window) meanwhile
                    asyncio.ensure_future(_safe(ctl.handle(ev)))

        @app.page("/rollout")
        async def rollout_page(web, request):
            return web.json(ctl.status())

    drift = None
    if extra.get("drift", True):
        dcfg = DriftConfig(window=int(extra.get("drift_window", 64)), check_every=int(extra.get("drift_check_every", 16)))
        drift = DriftHook(dcfg)
    return Lifecycle(ctl, drift, drift_t, events_t, pipeline_getter, bool(extra.get("retrain_on_ood", True)))


async def _safe(coro) -> None:
    try:
        await coro
    except Exception as e:  # noqa: BLE001 - never kill the agent
        log.error("rollout_failed", error=f"{type(e).__name__}: {e}"[:400])


async def serve_events(bootstrap: str, topic: str, controller: RolloutController, *, group_id: str | None = None,
                       stop: asyncio.Event | None = None) -> None:
    """Standalone controller (no Faust): consume ``topic`` with aiokafka and publish outcomes to it.

    ``group_id=None`` reads every partition from the beginning (tests, one-shot catch-up); a group id
    resumes from its committed offsets (a dedicated rollout Deployment)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

    from contracts.model_events import ModelEventError, decode  # noqa: PLC0415
    from stream.kafka.clients import client_kwargs  # noqa: PLC0415

    stop = stop or asyncio.Event()
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=group_id is not None,
                         auto_offset_reset="earliest", **client_kwargs("consumer"))
    await c.start()
    try:
        if group_id is None:
            parts = c.partitions_for_topic(topic) or set()
            for _ in range(50):
                if parts:
                    break
                await asyncio.sleep(0.2)
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            c.assign(tps)
            await c.seek_to_beginning(*tps)
        else:
            c.subscribe([topic])
        while not stop.is_set():
            batch = await c.getmany(timeout_ms=200)
            for recs in batch.values():
                for r in recs:
                    try:
                        ev = decode(r.value)
                    except ModelEventError as e:
                        log.warning("model_event_invalid", error=str(e)[:300])
                        continue
                    if ev.type in ("released", "rollback_requested"):
                        await _safe(controller.handle(ev))
    finally:
        await c.stop()


def kafka_publisher(producer, topic: str = "model-events") -> Publish:
    """Publish callable over a started :class:`stream.kafka.clients.Producer` (awaits the broker ack)."""

    async def publish(ev: ModelEvent) -> None:
        await producer.send_many(topic, [(ev.key, ev.to_json(), [])])

    return publish
