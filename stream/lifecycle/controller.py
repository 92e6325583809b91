"""Adapter / model rollout controller (``model-events`` -> Triton explicit model control).

On a ``released`` event, step by step:

1. **verify**: the artifact at ``artifact_uri`` (model store, :mod:`contracts.artifact`) must match the
   event's sha256 (digest of metadata.json) and every file listed in metadata.json its own sha256.
2. **compatibility**: against the spec Triton serves now for that model (same detector and input
   contract; MoLE-Flow: same frozen base, earlier tasks' adapters unchanged; newer version).
   Any failure -> ``refused`` event with reasons; nothing is written to Triton's repository, the
   serving version is untouched. **Takeover**: a product (or task) that another model serves now is
   refused (``takeover``) unless the release carries ``take_over`` (``linewatch release --take-over``).
3. **candidate**: the artifact is copied (checked copy, stream/lifecycle/repository.py) into the Triton repository as a separate model
   ``<model>__candidate`` (explicit version policy) and loaded with ``load_model``. The serving model
   is not touched, so it keeps answering. A failed load -> ``rolled_back`` (``load_failed``).
4. **shadow**: for ``policy.shadow_frames`` frames or ``policy.shadow_timeout_s``, the candidate scores
   (a) the probe images shipped with the artifact (good validation images listed under
   ``metadata.probe``) and (b) live frames the worker offers (:meth:`RolloutController.offer`) for
   that model/product. Shadow results are tagged ``shadow=true`` (optional callback) and never used for
   decisions on frames.
5. **health** (:func:`stream.lifecycle.policy.decide`, pure): no inference errors; enough frames; the candidate's scores on
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

Triton's model control (load / unload / repository index) is restricted to holders of the control key
(contracts/triton_control.py); the controller sends it with every such call.

Events reach the controller from the worker's Faust agent (stream/lifecycle/wiring.py) or the standalone
consumer (stream/lifecycle/events.py); the policy is ``settings.rollout`` (stream/lifecycle/policy.py).
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

from contracts.artifact import CANDIDATE_SUFFIX, Artifact, check_compatibility, verify_artifact
from contracts.image import decode_image
from contracts.logs import get_logger
from contracts.model_events import ModelEvent
from contracts.names import is_candidate
from contracts.spec import parse_spec, to_tensor
from contracts.triton_control import grpc_headers
from stream.inference.triton_client import TritonInfer
from stream.lifecycle.policy import Decision, HealthPolicy, ShadowStats, calibration_of, decide
from stream.lifecycle.repository import materialize, remove_model_dir, repository_versions, write_config

log = get_logger("stream.lifecycle.controller")

# the event types the controller acts on (the others are its own outcomes, or for the training job)
HANDLED = ("released", "rollback_requested")

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
                 on_shadow_result: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                 control_key: str | None = None):
        self.url = triton_grpc_url
        self.headers = grpc_headers(control_key)  # Triton's restricted model-repository protocol
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
            import tritonclient.grpc.aio as grpcclient

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
        except Exception:  # not loaded / unknown
            return None, None
        raw = cfg.get("parameters", {}).get("linewatch_spec", {}).get("string_value")
        versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
        spec = orjson.loads(raw) if raw else None
        return spec, (max(versions) if versions else (int(spec.get("version")) if spec else None))

    async def claims(self, exclude: str) -> dict[str, str]:
        """{product or task: model} over the READY models Triton serves now, except ``exclude`` and candidates."""
        c = self.client()
        idx = await c.get_model_repository_index(as_json=True, headers=self.headers)
        out: dict[str, str] = {}
        for m in idx.get("models", []):
            name = m.get("name", "")
            if m.get("state") != "READY" or name == exclude or is_candidate(name):
                continue
            spec, _ = await self.serving_spec(name)
            for k in _claimed(spec or {}):
                out.setdefault(k, name)
        return out

    async def _load(self, name: str, version: int | None = None) -> None:
        c = self.client()
        await c.load_model(name, headers=self.headers)
        t0 = time.monotonic()
        while True:
            try:
                if await c.is_model_ready(name, str(version) if version else ""):
                    return
            except Exception:
                pass
            if time.monotonic() - t0 > self.policy.load_timeout_s:
                raise TimeoutError(f"{name} v{version} not ready after {self.policy.load_timeout_s}s")
            await asyncio.sleep(0.2)

    async def _unload(self, name: str) -> None:
        try:
            await self.client().unload_model(name, headers=self.headers)
        except Exception as e:
            log.warning("rollout_unload_failed", model=name, error=str(e)[:200])

    # -- events
    async def handle(self, ev: ModelEvent) -> ModelEvent | None:
        """Handle one model event; returns the event published as its outcome (None: not ours)."""
        if ev.type == "released":
            return await self.rollout(ev)
        if ev.type == "rollback_requested":
            return await self.rollback_to(ev.model, ev.version, reason=(ev.reasons or ["operator request"])[0])
        return None

    async def handle_safely(self, ev: ModelEvent) -> None:
        """:meth:`handle` for an agent or a consumer loop: a failure is logged, never raised."""
        try:
            await self.handle(ev)
        except Exception as e:  # never kill the agent
            log.error("rollout_failed", error=f"{type(e).__name__}: {e}"[:400])

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
        ver = await asyncio.to_thread(verify_artifact, ev.artifact_uri, ev.sha256, ev.model, ev.version, strict=True)
        current, cur_ver = await self.serving_spec(ev.model)
        if ver.ok and ver.artifact is not None and _inside(ver.artifact.path, self.repository):
            ver.ok, ver.reasons = False, [f"artifact_in_repository: {ver.artifact.path} is in Triton's repository; "
                                          "release it from the model store"]
        if not ver.ok:
            return await self._emit(self._event("refused", ev, ver.reasons, cur_ver, art=ver.artifact))
        art = ver.artifact
        assert art is not None
        reasons = check_compatibility(art.metadata, current)
        if not reasons and not ev.take_over:
            owners = await self.claims(exclude=ev.model)
            mine = _claimed(art.metadata) | {k for k in (ev.product, ev.task) if k}
            reasons = [f"takeover: {k!r} is served by {owners[k]!r}; release with take_over "
                       f"(`linewatch release --take-over`) to move it to {ev.model!r}" for k in sorted(mine & set(owners))]
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
            except Exception as e:  # Triton refused the model (bad model.py, artifact...)
                return await self._fail(ro, ev, [f"load_failed: {str(e)[:300]}"], {})
            ro.state = "shadow"
            decision = await self._shadow(ro, ev)
            if decision.action != "promote":
                return await self._fail(ro, ev, decision.reasons, decision.stats)
            ro.state = "promoting"
            try:
                await asyncio.to_thread(materialize, art, self.repository, ev.model, [art.version])
                await self._load(ev.model, art.version)
            except Exception as e:  # restore the previous policy, old version keeps serving
                if cur_ver is not None:
                    await self._restore(ev.model, cur_ver)
                return await self._fail(ro, ev, [f"promote_failed: {str(e)[:300]}"], decision.stats)
            await self._drop_candidate(ro)
            for cb in self.on_promoted:
                try:
                    r = cb(art)
                    if asyncio.iscoroutine(r):
                        await r
                except Exception as e:
                    log.warning("on_promoted_failed", error=str(e)[:200])
            return await self._emit(self._event("promoted", ev, [], cur_ver, decision.stats, art))
        finally:
            self.active.pop(ev.model, None)

    async def _restore(self, model: str, version: int) -> None:
        mdir = self.repository / model
        try:
            write_config(mdir, (mdir / "config.pbtxt").read_text(), model, [version])
            await self._load(model, version)
        except Exception as e:
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
                    except Exception as e:  # a candidate error is evidence, not a crash
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



def _claimed(spec: dict[str, Any]) -> set[str]:
    """Products and tasks a spec serves (its product; a multi-task model's tasks)."""
    tasks = spec.get("tasks") or {}
    return ({spec["product"]} if spec.get("product") else set()) | set(tasks if isinstance(tasks, dict | list) else ())


def _inside(path: Path, root: Path) -> bool:
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents
