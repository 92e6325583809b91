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
4. **shadow**: until the window's rule says it has enough (stream/lifecycle/policy.py: a product nothing serves
   yet is judged on its probes alone; a served one on ``policy.shadow_frames`` frames or ``shadow_timeout_s`` of
   traffic, and on an idle line waits for traffic, ``shadow_waiting``, up to ``traffic_deadline_s``), it scores
   (a) the probe images shipped with the artifact (good validation images listed under
   ``metadata.probe``) and (b) live frames from every ``frames`` partition that the controller's
   sampler (stream/lifecycle/sampler.py) offers (:meth:`RolloutController.offer`) for that model/product
   (stream/lifecycle/shadow.py). Shadow results are tagged ``shadow=true`` (optional callback) and never used for
   decisions on frames.
5. **health** (:func:`stream.lifecycle.policy.decide`, pure): no inference errors; enough frames; the candidate's scores on
   good-looking frames (live frames the incumbent did not flag, and probe images) consistent with the
   candidate's own calibration scores (``metadata.calibration.scores``): KS p-value and PSI as in
   :mod:`stream.lifecycle.drift`, and the flagged fraction of good frames below ``policy.max_good_flag_rate``.
6. **promote**: the artifact version is copied into ``<model>/<version>``, ``<model>/config.pbtxt`` is
   rewritten atomically with ``version_policy specific [new]`` and ``load_model(<model>)``: Triton loads
   the new version beside the serving one and retires the old one when the new one is READY (0 failed
   requests, tested). ``promoted`` is published; ``on_promoted`` callbacks update routing
   (product -> model). The candidate is unloaded and removed.
   Otherwise **roll back**: unload + remove the candidate, publish ``rolled_back`` with reasons.

Steps 1-6 are a state machine (``Rollout.state``; stream/lifecycle/steps.py): a failure up to the promotion
is rolled back; once Triton serves the new version, recording the serving state and announcing ``promoted``
are retried until done. Every outcome names its cause (``detail.cause``: the ``event_id`` of the
``released`` / ``rollback_requested`` event), so a redelivered event whose outcome is already out is skipped
(stream/lifecycle/service.py). Before every model-control call, repository write and published event the
controller checks its fence (``fence``: the lease generation, stream/lifecycle/lease.py).

``rollback_requested`` (``linewatch rollback``): rewrite the policy to the requested older version and
reload; publish ``rolled_back`` (detail.operator = true).

Triton's model control (load / unload / repository index) is restricted to holders of the control key
(contracts/triton_control.py); the controller sends it with every such call.

Events reach the controller from its service (stream/lifecycle/service.py: ``linewatch controller``, one
replica, its own consumer group; the event is acked once its rollout has ended); the policy is
``settings.rollout`` (stream/lifecycle/policy.py). Model control goes to every Triton replica; the serving
state it changes is published through ``on_serving`` (contracts/serving_state.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.artifact import CANDIDATE_SUFFIX, Artifact, check_compatibility, verify_artifact
from contracts.config import ServingSettings
from contracts.logs import get_logger
from contracts.model_events import ModelEvent
from contracts.triton_control import grpc_headers
from stream.lifecycle.lease import LeaseLost
from stream.lifecycle.operating import operating_points
from stream.lifecycle.policy import Decision, HealthPolicy, ShadowStats
from stream.lifecycle.replicas import TritonReplicas, _claimed
from stream.lifecycle.repository import (
    materialize,
    model_dir,
    pinned_version,
    remove_model_dir,
    repository_versions,
    write_config,
)
from stream.lifecycle.shadow import run_shadow
from stream.lifecycle.steps import STEP_BACKOFF, until_done, write_in_thread

log = get_logger("stream.lifecycle.controller")

# the event types the controller acts on (the others are its own outcomes, or for the training job)
HANDLED = ("released", "rollback_requested")
OUTCOMES = ("promoted", "rolled_back", "refused")

Publish = Callable[[ModelEvent], Awaitable[None]]


@dataclass
class Rollout:
    model: str
    version: int
    candidate: str
    artifact: Artifact
    previous_version: int | None
    task: str | None = None  # MoLE-Flow: the adapter released (its own frames are its shadow traffic)
    new_product: bool = False  # nothing serves its product (task) yet: its probes decide (policy.py)
    waiting: bool = False  # a served product's candidate on an idle line: waiting for traffic
    started: float = field(default_factory=time.monotonic)
    state: str = "verifying"
    stats: ShadowStats = field(default_factory=ShadowStats)
    queue: deque = field(default_factory=lambda: deque(maxlen=256))  # (image bytes, incumbent flagged?)


class RolloutController(TritonReplicas):
    """Runs one rollout at a time per model; events are handled in order."""

    def __init__(self, triton_grpc_url: str | list[str], repository: str | Path, publish: Publish,
                 policy: HealthPolicy | None = None,
                 on_shadow_result: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                 control_key: str | None = None, serving: ServingSettings | None = None):
        self.urls: list[str] = []
        self.serving = serving  # the deployment block each materialised config gets (repository.deployed_config)
        self._clients: dict[str, Any] = {}
        self.set_replicas([triton_grpc_url] if isinstance(triton_grpc_url, str) else list(triton_grpc_url))
        self.headers = grpc_headers(control_key)  # Triton's restricted model-repository protocol
        self.repository = Path(repository)
        self.publish = publish
        self.policy = policy or HealthPolicy()
        self.on_shadow_result = on_shadow_result
        self.on_promoted: list[Callable[[Artifact], Any]] = []
        # (model, version, spec) after a promotion or an operator rollback: the serving state changed
        self.on_serving: list[Callable[[str, int, dict[str, Any]], Awaitable[None]]] = []
        self.active: dict[str, Rollout] = {}
        self._busy: set[str] = set()
        self.history: list[dict[str, Any]] = []
        # raises LeaseLost when another controller took over: checked before every write (lease.py)
        self.fence: Callable[[], None] = lambda: None

    # -- events
    async def handle(self, ev: ModelEvent) -> ModelEvent | None:
        """Handle one model event; returns the event published as its outcome (None: not ours)."""
        if ev.type == "released":
            return await self.rollout(ev)
        if ev.type == "rollback_requested":
            return await self.rollback_to(ev.model, ev.version, reason=(ev.reasons or ["operator request"])[0], cause=ev)
        return None

    async def handle_until_decided(self, ev: ModelEvent, attempts: int = 5) -> ModelEvent | None:
        """:meth:`handle` until its outcome is published. An error that escapes a rollout (Triton unreachable,
        the broker gone before the candidate loaded; its candidate is dropped) re-runs the event from the start,
        up to ``attempts`` times with backoff; then the event is refused (``controller_error``), the previous
        version still serving, so a poison event never blocks the topic. A lost lease is raised."""
        err = ""
        for n in range(1, attempts + 1):
            try:
                return await self.handle(ev)
            except LeaseLost:
                raise
            except Exception as e:
                err = f"{type(e).__name__}: {e}"[:300]
                log.error("rollout_attempt_failed", model=ev.model, version=ev.version, attempt=n, of=attempts,
                          error=err)
                if n < attempts:
                    await asyncio.sleep(STEP_BACKOFF.delay(n))
        return await self._emit(self._event("refused", ev, [f"controller_error: {attempts} attempts failed; "
                                                            f"last: {err}"], None))

    async def _emit(self, ev: ModelEvent) -> ModelEvent:
        """Publish ``ev``; an outcome is retried until the broker has it (it is what commits its cause)."""
        async def publish() -> None:
            self.fence()
            await self.publish(ev)

        if ev.type in OUTCOMES:
            await until_done("announce", publish, model=ev.model, version=ev.version, type=ev.type)
        else:
            await publish()
        self.history.append(ev.to_dict())
        log.info("model_event", type=ev.type, model=ev.model, version=ev.version, reasons=ev.reasons)
        return ev

    async def _record(self, model: str, version: int, spec: dict[str, Any]) -> None:
        """The serving state says ``model`` v``version`` (``spec``: the artifact's own metadata, which is the
        ``linewatch_spec`` Triton serves): after the switch, retried until written (steps.py)."""
        async def write() -> None:
            for cb in self.on_serving:
                self.fence()
                await cb(model, version, spec)

        await until_done("record", write, model=model, version=version)

    def _event(self, typ: str, ev: ModelEvent, reasons: list[str], prev: int | None, detail=None,
               art: Artifact | None = None) -> ModelEvent:
        """An outcome event; with the artifact, its operating point (``detail.operating_point``, per task)."""
        ops = operating_points(art.metadata) if art is not None else {}
        return ModelEvent(typ, ev.model, ev.version, task=ev.task, product=ev.product or (art.product if art else None),
                          detector=ev.detector or (art.detector if art else None), artifact_uri=ev.artifact_uri,
                          sha256=ev.sha256, previous_version=prev, reasons=reasons,
                          detail={**({"operating_point": ops} if ops else {}), **(detail or {}),
                                  "cause": ev.event_id})

    async def rollout(self, ev: ModelEvent) -> ModelEvent:
        # claimed before the first await: a second release of the same model cannot slip in meanwhile
        if ev.model in self._busy:
            running = self.active.get(ev.model)
            return await self._emit(self._event("refused", ev, [f"busy: a rollout of {ev.model} "
                                                                 f"v{running.version if running else '?'} is running"], None))
        self._busy.add(ev.model)
        try:
            return await self._rollout(ev)
        finally:
            self._busy.discard(ev.model)

    async def _rollout(self, ev: ModelEvent) -> ModelEvent:
        ver = await asyncio.to_thread(verify_artifact, ev.artifact_uri, ev.sha256, ev.model, ev.version, strict=True)
        current, cur_ver = await self.serving_spec(ev.model)
        if ver.ok and ver.artifact is not None and _inside(ver.artifact.path, self.repository):
            ver.ok, ver.reasons = False, [f"artifact_in_repository: {ver.artifact.path} is in Triton's repository; "
                                          "release it from the model store"]
        if not ver.ok:
            return await self._emit(self._event("refused", ev, ver.reasons, cur_ver, art=ver.artifact))
        art = ver.artifact
        assert art is not None
        if cur_ver == ev.version and await asyncio.to_thread(self._is_served_copy, ev):
            return await self._recovered(ev, art)
        reasons = check_compatibility(art.metadata, current)
        owners = await self.claims(exclude=ev.model) if not reasons else {}
        if not reasons and not ev.take_over:
            mine = _claimed(art.metadata) | {k for k in (ev.product, ev.task) if k}
            reasons = [f"takeover: {k!r} is served by {owners[k]!r}; release with take_over "
                       f"(`linewatch release --take-over`) to move it to {ev.model!r}" for k in sorted(mine & set(owners))]
        if reasons:
            return await self._emit(self._event("refused", ev, reasons, cur_ver, art=art))
        cand = f"{ev.model}{CANDIDATE_SUFFIX}"
        key = ev.task or ev.product or art.product  # the product (task) the candidate is judged for
        new = bool(key) and key not in _claimed(current or {}) | set(owners)
        ro = Rollout(ev.model, ev.version, cand, art, cur_ver, task=ev.task or None, new_product=new)
        self.active[ev.model] = ro
        try:
            ro.state = "loading_candidate"
            self.fence()
            await write_in_thread(materialize, art, self.repository, cand, [art.version], self.serving)
            try:
                await self._load(cand, art.version)
            except Exception as e:  # Triton refused the model (bad model.py, artifact...)
                return await self._fail(ro, ev, [f"load_failed: {str(e)[:300]}"], {})
            ro.state = "shadow"
            decision = await self._shadow(ro, ev)
            if decision.action != "promote":
                return await self._fail(ro, ev, decision.reasons, decision.stats)
            ro.state = "promoting"
            # what the repository pinned before (a replica that restarted empty may not show it)
            previous = await asyncio.to_thread(pinned_version, self.repository, ev.model)
            previous = previous if previous is not None else cur_ver
            try:
                self.fence()
                await write_in_thread(materialize, art, self.repository, ev.model, [art.version], self.serving)
                await self._load(ev.model, art.version)
            except LeaseLost:
                raise
            except Exception as e:  # roll the switch back (retried until done): the old version keeps serving
                await until_done("unpromote", lambda: self._unpromote(ev.model, previous), model=ev.model)
                return await self._fail(ro, ev, [f"promote_failed: {str(e)[:300]}"], decision.stats)
            # past the point of no return: Triton serves the new version; the rest is retried until done
            ro.state = "recording"
            try:  # best effort: a candidate left behind is dropped by the next rollout of this model
                await self._drop_candidate(ro)
            except LeaseLost:
                raise
            except Exception as e:
                log.warning("candidate_drop_failed", model=ev.model, error=str(e)[:200])
            await self._record(ev.model, art.version, art.metadata)
            ro.state = "announcing"
            for cb in self.on_promoted:
                try:
                    r = cb(art)
                    if asyncio.iscoroutine(r):
                        await r
                except Exception as e:
                    log.warning("on_promoted_failed", error=str(e)[:200])
            return await self._emit(self._event("promoted", ev, [], cur_ver, decision.stats, art))
        except Exception:  # escaped before the switch (handle_until_decided re-runs it): no candidate left behind
            if ro.state in ("loading_candidate", "shadow", "promoting"):
                try:
                    await self._drop_candidate(ro)
                except Exception as e:
                    log.warning("candidate_drop_failed", model=ev.model, error=str(e)[:200])
            raise
        finally:
            self.active.pop(ev.model, None)

    def _is_served_copy(self, ev: ModelEvent) -> bool:
        """The repository's copy of ``ev.model`` v``ev.version`` is this very artifact (same manifest digest)."""
        return verify_artifact(model_dir(self.repository, ev.model) / str(ev.version), ev.sha256, ev.model,
                               ev.version, strict=True).ok

    async def _recovered(self, ev: ModelEvent, art: Artifact) -> ModelEvent:
        """A redelivered ``released`` whose rollout had already promoted it when the controller died (before
        the event was acked): finish what the crash cut short -- candidate gone, serving state written,
        ``promoted`` announced -- instead of refusing it as not newer. The crash may have come between two
        replicas' loads: every replica is brought to v``ev.version`` before it is announced."""
        cand = f"{ev.model}{CANDIDATE_SUFFIX}"
        await self._load(ev.model, ev.version)
        await self._unload(cand)
        self.fence()
        await write_in_thread(remove_model_dir, self.repository, cand)
        await self._record(ev.model, ev.version, art.metadata)
        log.info("rollout_recovered", model=ev.model, version=ev.version)
        return await self._emit(self._event("promoted", ev, [], None, {"recovered": True}, art))

    async def _restore(self, model: str, version: int) -> None:
        """Pin ``model`` to ``version`` again and load it on every replica (raises when a replica does not serve it)."""
        mdir = self.repository / model
        self.fence()
        write_config(mdir, (mdir / "config.pbtxt").read_text(), model, [version], serving=self.serving)
        await self._load(model, version)

    async def _unpromote(self, model: str, previous: int | None) -> None:
        """Undo a promotion that failed part-way: the previous version pinned and loaded again, or -- a model
        nothing served before -- unloaded everywhere and removed, so no restore or reconcile brings it back."""
        if previous is not None:
            return await self._restore(model, previous)
        await self._unload(model)
        self.fence()
        await write_in_thread(remove_model_dir, self.repository, model)

    async def _drop_candidate(self, ro: Rollout) -> None:
        await self._unload(ro.candidate)
        self.fence()
        await write_in_thread(remove_model_dir, self.repository, ro.candidate)

    async def _fail(self, ro: Rollout, ev: ModelEvent, reasons: list[str], st: dict) -> ModelEvent:
        await self._drop_candidate(ro)
        return await self._emit(self._event("rolled_back", ev, reasons or ["unhealthy"], ro.previous_version, st,
                                            ro.artifact))

    async def rollback_to(self, model: str, version: int, reason: str = "operator request",
                          cause: ModelEvent | None = None) -> ModelEvent:
        """Serve an older version of ``model`` again (operator verb; ``cause``: the ``rollback_requested`` event)."""
        _, cur = await self.serving_spec(model)
        ev = cause or ModelEvent("rollback_requested", model, version)
        if version not in repository_versions(self.repository, model):
            return await self._emit(self._event("refused", ev, [f"version_unavailable: {model}/{version} is not in "
                                                                f"the Triton repository"], cur))
        try:
            await self._restore(model, version)
        except LeaseLost:
            raise
        except Exception as e:  # back to what served before (retried until done), then refused
            if cur is not None:
                await until_done("restore", lambda: self._restore(model, cur), model=model, version=cur)
            return await self._emit(self._event("refused", ev, [f"reload_failed: {str(e)[:300]}"], cur))
        spec, now = await self.serving_spec(model)
        if now != version or spec is None:
            if cur is not None:
                await until_done("restore", lambda: self._restore(model, cur), model=model, version=cur)
            return await self._emit(self._event("refused", ev, [f"reload_failed: serving v{now}"], cur))
        await self._record(model, version, spec)  # Triton switched back: recorded until done (steps.py)
        out = ModelEvent("rolled_back", model, cur or version, previous_version=version, reasons=[reason],
                         detail={"operator": True, "serving_version": version, "cause": ev.event_id})
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

    async def _shadow(self, ro: Rollout, ev: ModelEvent) -> Decision:
        async def waiting(ro: Rollout, d: Decision) -> None:  # progress for `rollout status`: best effort
            key = ev.task or ev.product or ro.artifact.product
            why = (f"waiting_for_traffic: no live frame of {key!r} in {self.policy.shadow_timeout_s:g} s; "
                   f"waits up to {self.policy.traffic_deadline_s:g} s")
            try:
                await self._emit(self._event("shadow_waiting", ev, [why], ro.previous_version,
                                             {**d.stats, "deadline_s": self.policy.traffic_deadline_s}))
            except LeaseLost:
                raise
            except Exception as e:
                log.warning("shadow_waiting_publish_failed", model=ev.model, error=str(e)[:200])

        return await run_shadow(ro, ev.task, self.url, self.policy, self.on_shadow_result, waiting)

    def status(self) -> dict[str, Any]:
        return {"active": {m: {"version": r.version, "state": "waiting for traffic" if r.waiting else r.state,
                               "frames": r.stats.frames, "live_frames": r.stats.live,
                               "errors": r.stats.errors, "since_s": round(time.monotonic() - r.started, 1)}
                           for m, r in self.active.items()},
                "history": self.history[-50:]}


def _inside(path: Path, root: Path) -> bool:
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents
