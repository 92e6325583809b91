"""A Triton restart that loses nothing (issue #26 item 4), at the deployed shape: two workers (processes), the
rollout controller (a process), one tritonserver in explicit mode, the Tansu broker, 6 ``frames`` partitions at
20 fps.

A fresh Triton in explicit mode is Ready with no models; only the controller's reconcile loads them back, one
model at a time. The product is served by the serving state only (no static routing). Triton is SIGKILLed and
restarted EMPTY while the line publishes, and kept empty (no controller running) for longer than the workers'
``worker_transient_grace_s`` (shortened to a few seconds here, so the old behaviour fails fast: frames DLQ'd
``unknown_product`` once the grace ran out, then captured as a new product's dataset). Then the controller comes
back and its reconcile loads the serving version: every frame is scored (0 lost, 0 DLQ'd), the ones published
while the model was missing waited behind the workers' circuit breaker.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from devstack.stack import LocalStack
from stream.kafka.clients import ensure_topics
from tests.harness.line import STEP_CAP_S, Line, check_line, wait_until
from tests.harness.line import small_frames as _small_frames
from tests.harness.rollout import (
    POLICY,
    good_pngs,
    lifecycle_topics,
    model_ready,
    outcomes,
    release,
    start_controller,
    topic_env,
)

pytestmark = pytest.mark.integration

GRACE_S = 3.0  # the workers' worker_transient_grace_s: the old behaviour DLQ'd a served product's frames past it
EMPTY_S = 12.0  # how long Triton stays up without the model (> GRACE_S, with frames flowing)


def test_triton_restart_empty_with_traffic_loses_nothing(shared_data, tmp_path, reliability):
    stack = LocalStack(tmp_path / "work", tmp_path / "model_repository", start_timeout_s=STEP_CAP_S)
    stack.start()
    uid = uuid.uuid4().hex[:6]
    t = lifecycle_topics(f"empty-{uid}")
    boot = stack.kafka_bootstrap
    ctl = ctl2 = line = None
    try:
        asyncio.run(ensure_topics(boot, [t["events"], t["drift"]]))
        asyncio.run(ensure_topics(boot, [t["state"]], config={"cleanup.policy": "compact"}))
        store, model, product = tmp_path / "store", f"lwt_empty_{uid}", f"empty-{uid}"
        env = {**topic_env(t), **POLICY, "LINEWATCH_WORKER_TRANSIENT_GRACE_S": str(GRACE_S),
               "LINEWATCH_WORKER_BREAKER_BACKOFF_MAX_S": "2"}
        ctl = start_controller(stack, t, tmp_path, env=POLICY, name="controller-0")
        release(boot, t, store, model, 1, product, good_pngs(shared_data, 90), 1.0)
        assert outcomes(boot, t, model, [1])[1][0]["type"] == "promoted", ctl.log()[-3000:]
        line = Line(stack, None, _small_frames(shared_data), tmp_path, "empty", seconds=None, product=product,
                    env=env, topics=t)
        line.begin(2)  # the workers route the product by the serving state only
        assert line.fleet.wait_frames_in([0, 1], timeout_s=STEP_CAP_S), line.fleet.summary()

        # no controller: nothing loads the model back while Triton is empty
        ctl.stop()
        assert line.publishing(), f"the line stopped before the Triton restart: {line.feeder.error!r}"
        stack.kill_triton()
        stack.start_triton([])  # Ready, no models: what a replacement pod in explicit mode is
        t_empty = time.monotonic()
        sent_at_restart = len(line.feeder.sent)
        assert not model_ready(stack.triton_grpc_url, model)
        time.sleep(EMPTY_S)  # frames keep arriving for longer than the grace
        assert line.publishing(), f"the line stopped while Triton was empty: {line.feeder.error!r}"
        assert len(line.feeder.sent) > sent_at_restart + 20, "too few frames published while Triton was empty"
        empty_s = time.monotonic() - t_empty

        # the controller back: its reconcile loads the serving version
        ctl2 = start_controller(stack, t, tmp_path, env=POLICY, name="controller-1")
        assert wait_until(lambda: model_ready(stack.triton_grpc_url, model), STEP_CAP_S), ctl2.log()[-3000:]
        out = [line.fleet.metric(i, "linewatch_results_out_total") for i in (0, 1)]
        assert wait_until(lambda: sum(line.fleet.metric(i, "linewatch_results_out_total") for i in (0, 1))
                          >= sum(out) + 40, STEP_CAP_S), f"no results after the reload\n{line.fleet.log_tails()}"
        rep, order = line.finish(settle_s=120)
        print(f"\nTriton empty for {empty_s:.1f} s (grace {GRACE_S} s) with the line publishing")
        # benchmarks/reliability.py's row (issue #26 acceptance): 0 lost, nothing DLQ'd
        reliability.record("triton_restart_empty_with_traffic", rep, empty_s=round(empty_s, 1), grace_s=GRACE_S,
                           workers=2)
        check_line(line, rep, order, changes=1, what="triton restart empty with traffic")
    finally:
        if line is not None:
            line.close()
        for c in (ctl, ctl2):
            if c is not None:
                c.stop()
        stack.stop()
