"""Issue #26 item 11, the worker's share: what an untrusted ``frames`` header can make the worker do.

- A frame naming a product nothing routes made every batch re-sync the serving state and re-read every Triton
  spec: a camera publishing a product before it is onboarded (the capture flow) or rotating product names did it
  per batch. Now :class:`stream.worker.serving.ResyncThrottle` decides (pure logic, tested on a given clock) and
  :meth:`Pipeline.process` asks it.
- The ``camera`` label of ``linewatch_frames_in_total`` came from the header: every new camera id a new time
  series. Now the first ``max_camera_labels`` ids keep their own label, the rest count under ``other``, an id
  that is not a valid camera id under ``invalid``.

The worker-path tests run the real :class:`Pipeline` (its own __init__ and process) on frames with no image
(each DLQ'd ``empty_payload`` at decode, so no Triton request is made) with a stand-in for the Triton client's
model list; the Triton side of the worker is tested against a real tritonserver in tests/integration/.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from contracts.config import Settings
from contracts.envelope import Frame, encode_frame
from stream.worker.config import WorkerConfig
from stream.worker.metrics import WorkerMetrics
from stream.worker.pipeline import Pipeline
from stream.worker.records import RawRecord


class ModelList:
    """The part of TritonInfer that process() reads before any request: no model is loaded; counts re-reads."""

    def __init__(self):
        self.forced_refreshes = 0

    async def live(self) -> bool:
        return True

    async def specs(self, max_age_s: float = 30.0):
        if max_age_s == 0:
            self.forced_refreshes += 1
        return {}

    def available(self, include_unready: bool = False):
        return {}

    def available_specs(self):
        return {}

    def ready_models(self):
        return []

    def tasks_of(self, model):
        return []


def _pipeline(metrics=None) -> tuple[Pipeline, ModelList, list[float]]:
    s = Settings()
    cfg = WorkerConfig(settings=s, broker_urls=[], broker_credentials=None, datadir=None, decode_threads=2,
                       decode_budget_bytes=64 << 20, stream_buffer_max=16, dlq_value_bytes=1024)
    triton = ModelList()
    p = Pipeline(cfg, triton, metrics or WorkerMetrics())
    syncs: list[float] = []

    async def sync():
        syncs.append(time.monotonic())

    p.sync_serving = sync
    return p, triton, syncs


def _record(i: int, camera: str = "cam-1", product: str | None = "ghost") -> RawRecord:
    key, _, headers = encode_frame(Frame(frame_id=f"f{i}", camera_id="cam-1", ts_ms=1, image=b"x", product=product))
    headers = [(k, camera.encode() if k == "camera_id" else v) for k, v in headers]
    return RawRecord(index=i, key=key, value=b"", headers=headers, kafka_ts_s=None)


# ----------------------------------------------------------------------------- the re-sync throttle


def test_resync_throttle_per_name_backoff_and_global_gap():
    from stream.worker.serving import ResyncThrottle

    t = ResyncThrottle(min_s=0.5, max_s=4.0, max_names=3)
    assert t.due({"ghost"}, 100.0)  # a name never asked about: at once (read-your-writes after a promotion)
    assert not t.due({"ghost"}, 100.1)  # the same name again within min_s: no
    assert not t.due({"other"}, 100.2)  # a new name, but within the global gap: no (rotating names)
    assert t.due({"other"}, 100.6)  # past the gap: yes
    assert t.due({"ghost"}, 101.2)  # ghost: its interval (0.5 s) is over
    assert not t.due({"ghost"}, 101.8)  # ...and doubled to 1 s
    assert t.due({"ghost"}, 102.3)
    assert not t.due({"ghost"}, 104.2)  # doubled to 2 s
    assert t.due({"ghost"}, 104.4)
    for now in (108.5, 112.6, 116.7):  # capped at max_s (4 s)
        assert not t.due({"ghost"}, now - 0.2)
        assert t.due({"ghost"}, now)
    assert not t.due(set(), 200.0)  # nothing unknown: nothing to do
    for i, now in enumerate((300.0, 301.0, 302.0, 303.0)):  # remembers at most max_names names
        assert t.due({f"n{i}"}, now)
    assert len(t) <= 3
    t.forget({"n3"})  # a name that routes now: its backoff starts over when it is unknown again
    assert t.due({"n3"}, 303.6)


def test_resync_throttle_one_due_name_is_enough():
    from stream.worker.serving import ResyncThrottle

    t = ResyncThrottle(min_s=0.5, max_s=10.0)
    assert t.due({"a"}, 0.0)
    assert t.due({"a", "b"}, 0.6)  # b is new (a is not due yet): a re-sync, which also covers a
    assert not t.due({"a", "b"}, 0.8)


def test_worker_resyncs_for_an_unknown_product_not_every_batch():
    """The shape where it happened: Pipeline.process on batch after batch naming product ``ghost``. Before: one
    serving-state sync and one forced Triton spec refresh per batch (60 of each)."""
    p, triton, syncs = _pipeline()

    async def go():
        t0 = time.monotonic()
        for i in range(60):
            batch = await p.process([_record(i)])
            assert [d.reason for d in batch.dead] == ["empty_payload"]
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    allowed = 1 + math.ceil(elapsed / 0.5)  # at most one per min_s (0.5 s), the first at once
    assert 1 <= len(syncs) <= allowed, (len(syncs), elapsed)
    assert 1 <= triton.forced_refreshes <= allowed, (triton.forced_refreshes, elapsed)

    async def named(product):
        await asyncio.sleep(0.55)
        n = len(syncs)
        await p.process([_record(99, product=product)])
        return len(syncs) - n

    assert asyncio.run(named("brand-new")) == 1  # a name not asked about before: re-synced at once


def test_worker_does_not_resync_for_frames_without_a_product():
    p, triton, syncs = _pipeline()
    asyncio.run(p.process([_record(i, product=None) for i in range(5)]))
    assert syncs == [] and triton.forced_refreshes == 0


# ----------------------------------------------------------------------------- the camera label


def _camera_labels(metrics: WorkerMetrics) -> dict[str, float]:
    return {s.labels["camera"]: s.value for m in metrics.registry.collect() if m.name == "linewatch_frames_in"
            for s in m.samples if s.name == "linewatch_frames_in_total"}


def test_camera_label_set_is_bounded_on_the_worker_path():
    metrics = WorkerMetrics(max_camera_labels=8)
    p, _, _ = _pipeline(metrics)
    records = [_record(i, camera=f"cam-{i}", product=None) for i in range(300)]
    records += [_record(300, camera="cam-0", product=None), _record(301, camera="bad id\n" + "x" * 5000, product=None)]
    asyncio.run(p.process(records))
    labels = _camera_labels(metrics)
    assert len(labels) <= 8 + 2, sorted(labels)[:20]  # the first 8, "other", "invalid"
    assert sum(labels.values()) == len(records)  # every frame counted
    assert labels["cam-0"] == 2  # a known camera keeps its own label
    assert labels["other"] == 300 - 8
    assert labels["invalid"] == 1


def test_camera_label_default_bound():
    metrics = WorkerMetrics()
    for i in range(5000):
        metrics.count_frame_in(f"cam-{i}")
    labels = _camera_labels(metrics)
    assert len(labels) <= metrics.max_camera_labels + 2 and sum(labels.values()) == 5000
    assert labels["other"] == 5000 - metrics.max_camera_labels


@pytest.mark.parametrize("bad", [None, "", "a" * 129, "x\n", "a b", "é"])
def test_invalid_camera_ids_share_one_label(bad):
    metrics = WorkerMetrics(max_camera_labels=4)
    metrics.count_frame_in(bad)
    assert _camera_labels(metrics) == {"invalid": 1.0}
