"""A production line over a partitioned frames topic feeding a fleet of workers, and the checks every
topology scenario ends with (issue #16 item 4; tests/integration/test_topology_*.py).

:class:`Line`: one scenario's fresh topics (``frames`` with ``partitions`` partitions, one camera per
partition), a :class:`~tests.harness.topology.WorkerFleet`, a warm-up frame, a steady line
(:class:`~tests.harness.chaos.Feeder`) and a result watch. The line publishes for ``seconds`` or, with
``seconds=None``, until the scenario ends it (:meth:`Line.end` / :meth:`Line.finish`, after its last step),
so a slow machine gets a longer line instead of one that ends before the scenario's last step.
:func:`check_line`: ``linewatch account`` (0 lost, 0 DLQ'd), the per-camera order check, and the
duplicates at-least-once redelivery added, printed and bounded by what the group's membership changes
can re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import cv2
import numpy as np

from stream.kafka.clients import ensure_topics
from tests.harness.chaos import Feeder, ResultWatch, load_images
from tests.harness.settle import settle
from tests.harness.topology import WorkerFleet, cameras_for_partitions, check_camera_order, read_results

PARTITIONS = 6
FPS = 20.0
BATCH_MAX = 8
# what one membership change (a join, a leave, a kill) can make the group re-read: results published
# but their offsets not yet committed, on every partition (Faust 0.15 does not commit on revocation --
# it drains the streams and flushes the producer, then every new owner, the same worker included,
# seeks to the committed offsets; cf. faust-streaming/faust#502). A worker commits every BATCH_MAX
# acks or 0.5 s and has one batch in flight: <= 1 s of the line's traffic + one batch per worker (<= 3).
REREAD_PER_CHANGE = int(FPS * 1.0) + 3 * BATCH_MAX


def small_frames(shared_data, limit: int = 12) -> list[bytes]:
    """Bottle test images, resized to 128x128 PNG in memory (decode stays cheap with 3 workers on 2 cores)."""
    out = []
    for raw in load_images(shared_data / "mvtec" / "bottle" / "test", limit=limit):
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        ok, png = cv2.imencode(".png", cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA))
        assert ok
        out.append(png.tobytes())
    return out


class Line:
    """One scenario's topics, fleet, warm-up frame, production line and result watch."""

    def __init__(self, stack, model: str | None, images: list[bytes], workdir, tag: str, *, seconds: float | None,
                 product: str = "bottle", tritons: list[str] | None = None, env: dict[str, str] | None = None,
                 topics: dict[str, str] | None = None):
        self.stack, self.images = stack, images
        uid = f"{tag}-{uuid.uuid4().hex[:6]}"
        self.uid = uid
        self.topics = topics or {k: f"topo-{uid}-{k}" for k in ("frames", "results", "defects", "dlq")}
        asyncio.run(ensure_topics(stack.kafka_bootstrap, [self.topics[k] for k in ("frames", "results", "defects",
                                                                                    "dlq")], partitions=PARTITIONS))
        self.cameras = cameras_for_partitions(PARTITIONS)
        # model None: the workers route by the serving state only (what the rollout controller announces)
        self.fleet = WorkerFleet(stack.kafka_bootstrap, tritons or stack.triton_grpc_url, workdir, app_id=f"lw-{uid}",
                                 topics=self.topics, routing={"products": {product: model}} if model else None,
                                 batch_max=BATCH_MAX, env=env)
        self.watch = ResultWatch(stack.kafka_bootstrap, self.topics["results"])
        self.warm = Feeder(stack.kafka_bootstrap, self.topics["frames"], images[:1], n=1, fps=0,
                           cameras=self.cameras[:1], product=product)
        # None: until end() -- the number of frames the line published is known then
        self.n: int | None = None if seconds is None else int(seconds * FPS)
        self.feeder = Feeder(stack.kafka_bootstrap, self.topics["frames"], images, n=self.n, fps=FPS,
                             cameras=self.cameras, product=product)
        self.t0: float | None = None
        self.t0_wall = 0.0

    def begin(self, workers: int) -> None:
        """Start ``workers`` workers, push one frame through (the group formed, Triton reached), start the line."""
        self.watch.start()
        self.watch.ready.wait(30)
        self.fleet.start(workers)
        self.warm.start()
        deadline = time.monotonic() + 120
        while not self.watch.arrivals:
            assert time.monotonic() < deadline and self.fleet.all_alive(), \
                f"no warm-up result\n{self.fleet.log_tails()}"
            time.sleep(0.1)
        self.feeder.start()
        self.t0, self.t0_wall = time.monotonic(), time.time()

    def at(self, seconds: float) -> None:
        """Sleep until ``seconds`` into the line's traffic."""
        time.sleep(max(0.0, self.t0 + seconds - time.monotonic()))

    def publishing(self) -> bool:
        return self.feeder.is_alive() and (self.n is None or len(self.feeder.sent) < self.n)

    def end(self, timeout_s: float = 120.0) -> None:
        """Stop an open-ended line (``seconds=None``): the frame in flight is sent, then no more.
        ``timeout_s`` bounds a send stalled on the broker (an upper bound, not the expected time)."""
        assert self.n is None, "end() is for a line started with seconds=None"
        self.feeder.stop_evt.set()
        self.feeder.join(timeout_s)
        self.n = len(self.feeder.sent)

    def finish(self, settle_s: float = 90.0):
        """Let the line finish (end it when open-ended), account for every frame (``settle_s``: how long
        without progress before giving up), read the results and check the per-camera order."""
        if self.n is None:
            self.end()
        else:
            self.feeder.join(self.n / FPS * 3 + 30)
        assert not self.feeder.is_alive() and self.feeder.error is None, f"line stalled: {self.feeder.error!r}"
        rep = settle(self.stack.kafka_bootstrap, frames_topic=self.topics["frames"],
                     results_topic=self.topics["results"], dlq_topic=self.topics["dlq"], stall_s=settle_s)
        order = check_camera_order(read_results(self.stack.kafka_bootstrap, self.topics["results"]),
                                   self.warm.sent + self.feeder.sent)
        return rep, order

    def where(self, frame_ids) -> list[tuple[str, str, float]]:
        """(frame id, camera, seconds into the line it was sent) of line frames, for failure messages."""
        idx = {f: i for i, f in enumerate(self.feeder.sent)}
        return [(f, self.cameras[idx[f] % len(self.cameras)], round(self.feeder.sent_at[idx[f]] - self.t0, 2))
                if f in idx else (f, "warm-up", 0.0) for f in frame_ids]

    def close(self) -> None:
        self.fleet.close()
        for th in (self.feeder, self.warm, self.watch):
            with contextlib.suppress(Exception):
                th.stop()


def check_line(line: Line, rep, order, *, changes: int, what: str) -> None:
    """The checks every topology scenario ends with."""
    sent = len(line.warm.sent) + len(line.feeder.sent)
    fleet = line.fleet.summary()
    print(f"\n{what}: {rep.summary_line()}")
    print(f"{what}: order cameras={order.cameras} frames={order.frames} duplicates={order.duplicates} "
          f"(late {order.late_duplicates}) violations={len(order.violations)} unknown={order.unknown} "
          f"per camera {order.per_camera}")
    print(f"{what}: fleet {fleet}")
    dups = [(d["camera"], d["offset"], "late" if d["late"] else "in-order",
             round((d["processed_ts_ms"] or 0) / 1000 - line.t0_wall, 1)) for d in order.duplicate_records]
    print(f"{what}: duplicates (camera, results offset, kind, processed at s into the line): {dups}")
    why = f"{rep.summary_line()}\n{fleet}\n{line.fleet.log_tails()}"
    assert sent == line.n + 1
    assert rep.complete and rep.produced == sent and rep.missing == [], \
        f"frames lost: {line.where(rep.missing[:5])}\n{why}"
    assert rep.dlq == 0 and rep.dlq_reasons == {}, f"frames DLQ'd: {rep.dlq_reasons}\n{why}"
    assert rep.ok and rep.accounted == sent and rep.in_both == []
    assert rep.results == sent + rep.duplicate_results
    assert order.ok, f"per-camera order violated: {order.violations[:5]}\n{why}"
    assert order.cameras == PARTITIONS and order.frames == sent and order.unknown == 0
    assert order.duplicates == rep.duplicate_results
    bound = changes * REREAD_PER_CHANGE
    assert rep.duplicate_results <= bound, \
        f"{rep.duplicate_results} duplicate results > {bound} ({changes} membership changes x {REREAD_PER_CHANGE})\n{why}"
    assert line.fleet.crashes() == 0, why


# An upper bound for one scenario step (a rebalance, a model load, a rollout stage): these steps take 5-40 s
# on the 2-core AVX2 development VM and up to ~2 min with the CPU throttled or shared; a step that has not
# happened in STEP_CAP_S is stuck, not slow. Waits return as soon as the step is done.
STEP_CAP_S = 300.0


def wait_until(pred, timeout_s: float) -> bool:
    """``pred()`` became true within ``timeout_s`` (an upper bound, never the expected time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()
