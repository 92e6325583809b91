"""Issue #26 item 4: the serving state is the authority on which products are served. A product it routes is
never ``unknown_product`` in the worker (its model not loaded: the frame waits behind the breaker), and the
capture service never takes such a product's frames as a new product's dataset. The end-to-end check (real
broker, tritonserver, worker processes) is tests/integration/test_triton_restart_empty.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from contracts.envelope import EnvelopeError, Frame, dlq_record, encode_frame
from contracts.serving_state import ServingEntry
from stream.inference.routing import Router, RoutingConfig
from stream.lifecycle.capture import CaptureService
from stream.worker.infer_stage import InferStage
from stream.worker.serving import ServingView
from tests.harness.rollout import SIZE


def _spec(model: str, product: str, tasks=()) -> dict:
    from models.efficientad.export import build_spec

    d = build_spec(model, product, 1, threshold=0.5, map_threshold=0.5, size=SIZE)
    if tasks:
        d["tasks"] = list(tasks)
    return d


class _Triton:
    """What ServingView and the infer stage ask of TritonInfer: nothing loaded (a Triton restarted empty)."""

    def __init__(self):
        self.specs: dict = {}
        self.live_calls = 0

    def add_spec(self, model, version, spec):
        self.specs[model] = spec

    def spec_for(self, model):
        return self.specs.get(model)

    def tasks_of(self, model):
        s = self.specs.get(model)
        return None if s is None else s.tasks

    async def live(self):
        self.live_calls += 1
        return True

    async def health(self, model):
        return "unready"


def _view(triton, router, *entries: ServingEntry) -> ServingView:
    v = ServingView.__new__(ServingView)  # no follower: apply() is what the follower calls per record
    v.router, v.triton, v.entries, v._static = router, triton, {}, {}
    for e in entries:
        v.apply(e.key, e.to_json())
    return v


def _frame(product: str, task: str | None = None) -> Frame:
    return Frame("f-1", "cam-1", 1, b"x", product=product, task=task)


class _Stage(InferStage):
    def __init__(self, triton, router, serving):
        self.triton, self.router, self.serving, self.awaiting = triton, router, serving, set()


def test_a_served_product_routes_to_its_model_while_triton_has_none_loaded():
    triton, router = _Triton(), Router(RoutingConfig())
    e = ServingEntry("bottle", "lw_bottle", 1, 0.5, _spec("lw_bottle", "bottle"))
    stage = _Stage(triton, router, _view(triton, router, e))
    with pytest.raises(EnvelopeError, match="no loaded model"):
        router.route(_frame("bottle"))  # what the router alone says: nothing loaded
    r = stage.route_live(_frame("bottle"))
    assert (r.model, r.product, r.task) == ("lw_bottle", "bottle", "")
    assert triton.spec_for("lw_bottle") is not None  # the serving version's spec: preprocess by it
    with pytest.raises(EnvelopeError, match="no loaded model"):  # a product nothing serves stays unknown
        stage.route_live(_frame("cable"))


def test_a_multi_task_model_gets_the_products_task():
    triton, router = _Triton(), Router(RoutingConfig())
    e = ServingEntry("cells", "lw_multi", 1, 0.5, _spec("lw_multi", "cells", tasks=("cells", "bottle")))
    stage = _Stage(triton, router, _view(triton, router, e))
    r = stage.route_live(_frame("cells"))
    assert (r.model, r.task, r.routed) == ("lw_multi", "cells", False)


def test_the_breaker_waits_for_an_awaited_served_model_and_forgets_a_retired_one():
    triton, router = _Triton(), Router(RoutingConfig())
    e = ServingEntry("bottle", "lw_bottle", 1, 0.5, _spec("lw_bottle", "bottle"))
    view = _view(triton, router, e)
    stage = _Stage(triton, router, view)
    stage.awaiting.add("lw_bottle")
    assert asyncio.run(stage.probe()) is False  # Triton live, the served model not loaded: keep waiting
    view.apply(b"bottle", None)  # retired: nothing to wait for any more
    assert asyncio.run(stage.probe()) is True and stage.awaiting == set()


def test_capture_never_takes_a_served_products_frames(tmp_path, settings):
    svc = CaptureService(settings.with_overrides(capture_dir=tmp_path, capture_every_n=1))
    svc.on_serving(b"bottle", b'{"product": "bottle"}')
    for i, product in enumerate(["bottle", "elpv"]):
        k, v, h = encode_frame(Frame(f"d-{i}", "cam-1", 1, np.zeros(4, np.uint8).tobytes(), product=product))
        svc.on_dlq(*dlq_record(k, v, h, "unknown_product", "x"))
    assert [e.product for e in svc.flush()] == ["elpv"] and svc.stats["served"] == 1
    svc.on_serving(b"bottle", None)  # retired: unknown again, captured again
    k, v, h = encode_frame(Frame("d-2", "cam-1", 1, b"img", product="bottle"))
    svc.on_dlq(*dlq_record(k, v, h, "unknown_product", "x"))
    assert [e.product for e in svc.flush()] == ["bottle"]


def test_triton_down_with_a_served_model_reopens_only_once_it_is_loaded():
    """Triton down, then back without the served model: the breaker stays open through both (one pause, one
    resume), instead of closing on liveness and reopening at once on the model's NOT_FOUND."""
    from stream.inference.triton_client import TransientInferError
    from stream.worker.breaker import CircuitBreaker

    triton, router = _Triton(), Router(RoutingConfig())
    e = ServingEntry("bottle", "lw_bottle", 1, 0.5, _spec("lw_bottle", "bottle"))
    stage = _Stage(triton, router, _view(triton, router, e))
    stage.breaker = CircuitBreaker(stage.probe)

    async def down(model):
        return "down"

    triton.health = down
    asyncio.run(stage._judge("lw_bottle", TransientInferError("gone", "UNAVAILABLE"), 1))
    assert not stage.breaker.closed and stage.awaiting == {"lw_bottle"}
    assert asyncio.run(stage.probe()) is False  # live again, the model not loaded: still open
    asyncio.run(stage._judge("other", TransientInferError("gone", "UNAVAILABLE"), 1))
    assert stage.awaiting == {"lw_bottle"}  # a model no product is served by is not waited for
