"""Fault injection on the real embedded stack: Tansu broker + tritonserver + the Faust worker
(subprocess), loopback only, no mocks.

Each test runs one :func:`tests.harness.chaos.run_scenario`: fresh topics, a worker, a production line
publishing real MVTec bottle frames at a steady rate until the fault has ended and ~2 s of frames followed it
(``after``: no fixed duration for the warm-up and the fault to fit in), one fault injected while they flow, then
``linewatch account`` (the CLI, in-process) must prove that every frame has a result or a DLQ
record. Expected in every scenario: the worker survives (no crash, no crash loop), transient
failures are retried and never DLQ'd, nothing is lost; duplicate results are allowed
(at-least-once) and counted.

The stack is this module's own (faults are destructive: a SIGSTOPped broker or a killed Triton
must not leak into other tests). Its detector is the probe model from tests/harness/chaos.py (a real
Triton Python-backend model with a real linewatch_spec, 100 ms per batch) so each scenario costs
~20-35 s on 2 cores; with the EfficientAD export a frame costs ~1.2 s of CPU here.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from devstack.stack import free_port
from stream.inference.triton_client import TransientInferError, TritonInfer
from stream.ops.cli import main as linewatch
from tests.harness.chaos import load_images, run_scenario
from tests.harness.probe_model import probe_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    with probe_stack(tmp_path_factory.mktemp("fault-stack"), delay_ms=100) as st:
        yield st


@pytest.fixture(scope="module")
def images(shared_data):
    return load_images(shared_data / "mvtec" / "bottle" / "test", limit=16)


def _worker_logs(workdir, lines: int = 25) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in sorted(workdir.glob("worker-*.log")))


def _account(stack, topics, capsys, why: str = "") -> dict:
    """`linewatch account --json` on the scenario's topics: exit 0 and the parsed report."""
    capsys.readouterr()
    rc = linewatch(["account", "--bootstrap", stack.kafka_bootstrap, "--frames-topic", topics["frames"],
                    "--results-topic", topics["results"], "--dlq-topic", topics["dlq"], "--json"])
    out = capsys.readouterr().out
    rep = json.loads(out)
    assert rc == 0, f"linewatch account failed: {len(rep['missing'])} missing {rep['missing'][:5]}\n{why}"
    return rep


def _run(fault_stack, images, tmp_path, capsys, fault: str, **kw):
    stack, model = fault_stack
    kw.setdefault("after", int(2 * kw["fps"]))  # the line goes on until ~2 s of frames followed the fault
    r = run_scenario(stack, fault, images, tmp_path, model=model, **kw)
    summary = {k: v for k, v in r.to_dict().items() if k not in ("report", "topics")}
    print(f"\n{fault}: {summary}")
    rep = _account(stack, r.topics, capsys, f"scenario {summary}\n{_worker_logs(tmp_path)}")
    # nothing lost, nothing DLQ'd: every frame produced has a result
    assert r.frames_sent >= kw["n"] + 1, r.notes  # + the warm-up frame
    # the fault hit while the line was publishing, and the line went on after it
    assert r.sent_before_fault + r.sent_during_fault + kw["after"] <= r.frames_sent, summary
    assert rep["produced"] == r.frames_sent and rep["accounted"] == rep["produced"] and rep["missing"] == []
    assert rep["complete"] and rep["ok"]
    assert rep["dlq"] == 0 and rep["dlq_reasons"] == {}, f"transient failure DLQ'd: {rep['dlq_reasons']}"
    assert rep["results"] == rep["produced"] + rep["duplicate_results"]  # duplicates: counted, allowed
    # the worker that lived through the fault is still up, and never crashed
    assert r.worker_survived and r.worker_crashes == 0, summary
    # results flowed again after the fault ended
    assert r.recovery_s is not None and r.recovery_s < 30, summary
    assert r.ok, summary
    return r


def test_worker_sigkill_mid_batch_then_restart(fault_stack, images, tmp_path, capsys):
    """SIGKILL while a batch is taken and unacknowledged; a new worker in the same group re-reads
    from the last committed offset (at-least-once: the killed batch may be redone, never lost)."""
    r = _run(fault_stack, images, tmp_path, capsys, "worker_sigkill", n=80, fps=10)
    assert r.notes == "", r.notes  # the kill really was mid-batch (worker's inflight gauge > 0)


def test_broker_unreachable_for_8s(fault_stack, images, tmp_path, capsys):
    """Tansu SIGSTOPped for 8 s (connections hang; its in-memory log survives), then SIGCONT."""
    r = _run(fault_stack, images, tmp_path, capsys, "broker_pause", n=100, fps=10, fault_s=8.0)
    assert r.fault_s >= 8.0


def test_triton_killed_and_restarted(fault_stack, images, tmp_path, capsys):
    """tritonserver SIGKILLed, down 5 s, restarted on the same ports with its models re-loaded."""
    stack, model = fault_stack
    r = _run(fault_stack, images, tmp_path, capsys, "triton_crash", n=100, fps=10, fault_s=5.0)
    assert r.triton_transient_errors > 0, "the worker never saw Triton down: the fault did not bite"
    assert stack.ready_models() == [model]


def test_triton_crash_loop(fault_stack, images, tmp_path, capsys):
    """Killed, back without models, killed again, then back with them: the worker keeps retrying."""
    stack, model = fault_stack
    r = _run(fault_stack, images, tmp_path, capsys, "triton_flap", n=100, fps=10, fault_s=8.0)
    assert r.triton_transient_errors > 0
    assert stack.ready_models() == [model]


def test_model_unloaded_while_frames_flow_then_reloaded(fault_stack, images, tmp_path, capsys):
    """Explicit-mode unload for ~6 s under traffic: NOT_FOUND / not-ready is retried, not DLQ'd."""
    r = _run(fault_stack, images, tmp_path, capsys, "model_unload", n=100, fps=10, fault_s=6.0)
    assert r.retries["triton_retry"] + r.retries["triton_transient_batch"] > 0
    assert r.sent_during_fault > 0  # frames for the model arrived while it was gone


def test_stalled_triton_backpressure_keeps_worker_memory_bounded(fault_stack, images, tmp_path, capsys):
    """tritonserver SIGSTOPped for 10 s while the line publishes 40 fps of ~530 KB frames: the backlog
    (~150-200 MB) must stay in Kafka; the worker buffers a bounded number of frames (Faust
    stream_buffer_maxsize; its default of 4096 grew the worker by >300 MB in a 14 s stall)."""
    r = _run(fault_stack, images, tmp_path, capsys, "triton_stall", n=360, fps=40, fault_s=10.0)
    backlog_mb = r.sent_during_fault * float(np.mean([len(b) for b in images])) / 2**20
    growth = r.rss_peak_mb - r.rss_base_mb
    print(f"stall backlog {backlog_mb:.0f} MB, worker RSS {r.rss_base_mb:.0f} -> {r.rss_peak_mb:.0f} MB")
    assert backlog_mb > 80, "the stall did not build a real backlog"
    assert growth < min(80.0, backlog_mb / 2), f"worker grew {growth:.0f} MB while {backlog_mb:.0f} MB of frames backed up"


def test_unreachable_triton_is_a_transient_error_for_the_client():
    """Regression (found by the crash-loop fault): with no model specs cached and Triton unreachable,
    TritonInfer.infer raised the raw gRPC UNAVAILABLE (escaping the worker's retry handling)
    instead of TransientInferError."""

    async def go():
        t = TritonInfer(f"127.0.0.1:{free_port()}", max_retries=1, backoff_s=0.01)
        try:
            with pytest.raises(TransientInferError, match="UNAVAILABLE"):
                await t.infer("probe_bottle", np.zeros((1, 3, 64, 64), np.float32))
            t.last_specs["probe_bottle"] = object()  # seen before: a failed refresh keeps serving, never raises
            assert await t.specs(max_age_s=0) == {}
        finally:
            await t.close()

    asyncio.run(go())
