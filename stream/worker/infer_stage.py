"""The ``infer`` stage of :class:`stream.worker.pipeline.Pipeline`: Prepared -> Scored | DeadLetter.

One Triton request per model per round. A failed request is judged by the gRPC status code (never
the error text) and by Triton's health right after it:

- permanent error: the frames are retried one by one so only the poison frame(s) go to the DLQ
  (``inference_error``);
- transient, Triton unreachable: the circuit breaker (stream/worker/breaker.py) opens; no frame is
  charged, no request is sent until a liveness probe answers (app.py pauses consumption meanwhile);
- transient, the model not READY (unloaded, reloading, Triton restarted empty): a model the serving state
  routes a product to (stream/worker/serving.py, the authority) is waited for behind the circuit breaker
  (consumption paused, no timer: its frames are never ``unknown_product``; issue #26 item 4); any other is
  re-routed and retried, DLQ'd as the routing error (``unknown_product``) only past ``worker_transient_grace_s``;
- transient while Triton answers and the model is READY: the frames are retried one by one, and each
  frame's own failures are charged to its retry budget (``worker_retry_budget``); past it the frame
  goes to the DLQ as ``retry_exhausted`` instead of stalling its partition for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from contracts.backoff import Backoff
from contracts.envelope import EnvelopeError, headers_to_dict
from contracts.image import decode_image
from contracts.logs import get_logger
from contracts.names import is_candidate
from contracts.spec import to_pixels
from stream.inference.triton_client import PermanentInferError, TransientInferError
from stream.worker.breaker import RetryBudget

if TYPE_CHECKING:
    from stream.inference.routing import Route
    from stream.worker.records import DeadLetter, Prepared, RawRecord, Scored

log = get_logger("stream.worker.pipeline")

ROUND_BACKOFF = Backoff(0.5, 10.0, "equal")  # between retry rounds while Triton answers


class InferStage:
    """Mixed into Pipeline (which provides triton, metrics, router, serving, awaiting, breaker, retry_budget,
    grace_s, _image_limits, refresh_models, score, dead_letter)."""

    def route_live(self, frame) -> Route:
        """The router's route; for a product the serving state serves, its model's route even while Triton has
        not loaded it (the frame then waits for it: never ``unknown_product``)."""
        try:
            return self.router.route(frame)
        except EnvelopeError as e:
            if e.reason != "unknown_product" or self.serving is None:
                raise
            r = self.serving.route_of(self.router.product_of(frame), frame.task)
            if r is None:
                raise
            return r

    def served(self, model: str) -> bool:
        return self.serving is not None and model in self.serving.served_models()

    async def probe(self) -> bool:
        """The circuit breaker's probe: Triton live, and every awaited served model READY (a model the serving
        state no longer routes to is not waited for)."""
        if not await self.triton.live():
            return False
        self.awaiting = {m for m in self.awaiting if self.served(m)}
        for m in sorted(self.awaiting):
            if await self.triton.health(m) != "ok":
                return False
        self.awaiting.clear()
        return True

    def check_task(self, route: Route) -> None:
        """A frame's task must be one its model reports (else DLQ ``unknown_task``, before any request:
        the model's error would echo the task, and a task is no reason to retry)."""
        tasks = self.triton.tasks_of(route.model)
        if route.task and tasks and route.task not in tasks:
            raise EnvelopeError("unknown_task", f"task {route.task[:100]!r} is not a task of model {route.model} "
                                                f"(tasks: {', '.join(tasks)})")

    def names_unknown_task(self, records: list[RawRecord]) -> bool:
        known = {t for ts in self.triton.available().values() for t in ts}
        return any(v not in known for v in _header_values(records, "task"))

    def unknown_products(self, records: list[RawRecord]) -> set[str]:
        """The ``product`` headers no routing entry or served model knows (yet)."""
        known = set(self.router.config.products)
        for name, spec in self.triton.available_specs().items():
            if not is_candidate(name):  # a candidate in its shadow window routes nothing
                known |= {spec.product, *spec.tasks} - {None, ""}
        return {v for v in _header_values(records, "product") if v not in known}

    async def infer(self, items: list[Prepared], t_batch: float) -> tuple[list[Scored], list[DeadLetter]]:
        """Score every prepared frame (see the module docstring); returns (scored, dead letters)."""
        scored: list[Scored] = []
        dead: list[DeadLetter] = []
        budget = RetryBudget(self.retry_budget)
        pending, rounds, t_first_fail = items, 0, 0.0
        while pending:
            retry: list[Prepared] = []
            groups: dict[str, list[Prepared]] = defaultdict(list)
            for p in pending:
                groups[p.route.model].append(p)
            # every model's share goes to Triton at once (separate model instances, GPUs or replicas run
            # them in parallel); the results are collected in the batch's model order
            for s, r, d in await asyncio.gather(*(self._infer_group(m, g, t_batch, budget) for m, g in groups.items())):
                scored += s
                retry += r
                dead += d
            if not retry:
                break
            t_first_fail = t_first_fail or time.monotonic()
            if self.breaker.closed:
                rounds += 1
                await asyncio.sleep(ROUND_BACKOFF.delay(rounds))
            else:  # Triton unreachable: wait for it (capped-backoff liveness probes), then retry at once
                await self.breaker.wait_closed()
                rounds = 0  # the backoff starts over once Triton is back
            try:
                await self.refresh_models()
            except Exception as e:
                log.warning("triton_refresh_failed", error=str(e)[:300])
            pending, lost = self._reroute(retry, waited=time.monotonic() - t_first_fail)
            dead += lost
        return scored, dead

    async def _infer_group(self, model: str, group: list[Prepared], t_batch: float, budget: RetryBudget):
        if not self.breaker.closed:  # Triton went down during this round: send nothing more
            return [], group, []
        return await self._infer_model(model, group, t_batch, budget)

    async def _infer_model(self, model: str, group: list[Prepared], t_batch: float, budget: RetryBudget):
        """(scored, to retry, dead letters) of one model's share of the batch."""
        self.metrics.batch_size.labels(model=model).observe(len(group))
        try:
            out = await self.triton.infer(model, np.stack([p.tensor for p in group]), [p.route.task for p in group])
        except TransientInferError as e:
            health = await self._judge(model, e, len(group))
            if health != "ok":
                return [], group, []
            if len(group) == 1:
                return [], *self._charge(group[0], e, budget)
            return await self._one_by_one(model, group, t_batch, budget)
        except PermanentInferError as e:
            if len(group) == 1:
                return [], [], [self.dead_letter(group[0].raw, "inference_error", str(e), "infer")]
            return await self._one_by_one(model, group, t_batch, budget)
        self.metrics.stage_latency.labels(stage="infer").observe(out.infer_ms)
        return [self.score(p, out, j, t_batch) for j, p in enumerate(group)], [], []

    async def _judge(self, model: str, e: TransientInferError, n: int) -> str:
        """Triton's health after a transient error; "down" opens the circuit breaker."""
        health = await self.triton.health(model)
        log.warning("triton_transient_batch", model=model, n=n, code=e.code, health=health, error=str(e)[:300])
        if health == "down":
            if self.served(model):  # a Triton back without it (restarted empty) is not back for this frame
                self.awaiting.add(model)  # one pause until it is READY, no resume/pause flap in between
            self.breaker.open(f"{model}: {e.code}: {e}")
        elif health == "unready" and self.served(model):  # the serving state routes to it: wait, no timer
            self.awaiting.add(model)
            self.breaker.open(f"{model}: not loaded in Triton; the serving state routes to it: waiting for its load")
        return health

    def _charge(self, p: Prepared, e: TransientInferError, budget: RetryBudget) -> tuple[list, list]:
        """A frame's own transient failure while Triton answers: (to retry, dead letters)."""
        self.metrics.retries.labels(model=p.route.model).inc()
        if budget.charge(p.raw.index):
            n = budget.attempts(p.raw.index)
            return [], [self.dead_letter(p.raw, "retry_exhausted",
                                         f"{n} transient failures ({e.code}) while Triton answered, budget "
                                         f"{budget.budget}; last: {e}", "infer")]
        return [p], []

    async def _one_by_one(self, model: str, group: list[Prepared], t_batch: float, budget: RetryBudget):
        """A multi-frame request failed: retry its frames alone, so only the failing frame(s) are charged or DLQ'd."""
        scored, retry, dead = [], [], []
        for i, p in enumerate(group):
            try:
                out = await self.triton.infer(model, p.tensor[None], [p.route.task])
            except PermanentInferError as e:
                dead.append(self.dead_letter(p.raw, "inference_error", str(e), "infer"))
            except TransientInferError as e:
                if await self._judge(model, e, 1) != "ok":  # not this frame's fault: retry the rest later
                    retry += group[i:]
                    break
                r, d = self._charge(p, e, budget)
                retry += r
                dead += d
            else:
                scored.append(self.score(p, out, 0, t_batch))
        return scored, retry, dead

    def _reroute(self, pending: list[Prepared], waited: float) -> tuple[list[Prepared], list[DeadLetter]]:
        still: list[Prepared] = []
        dead: list[DeadLetter] = []
        for p in pending:
            try:
                r = self.route_live(p.frame)
                self.check_task(r)
            except EnvelopeError as e:
                if e.reason == "unknown_product" and waited < self.grace_s:  # e.g. model reloading: keep retrying
                    still.append(p)
                else:
                    dead.append(self.dead_letter(p.raw, e.reason, e.detail, "route"))
                continue
            if r.model != p.route.model:  # another model (its own input contract): preprocess again
                img = decode_image(p.frame.image, **self._image_limits)
                p = replace(p, tensor=to_pixels(img, self.triton.spec_for(r.model)))
            still.append(replace(p, route=r))
        return still, dead


def _header_values(records: list[RawRecord], name: str) -> list[str]:
    """The non-empty values of header ``name`` (malformed headers are skipped: decode will DLQ the frame)."""
    out = []
    for r in records:
        try:
            v = headers_to_dict(r.headers).get(name)
        except Exception:
            continue
        if v:
            out.append(v.decode("utf-8", "replace"))
    return out
