"""Many workers of one consumer group over a partitioned frames topic (issue #16 item 4, workers only).

Real Tansu broker + tritonserver (this module's own stack: workers are killed here) + Faust workers as
subprocesses (tests/harness/topology.py ``WorkerFleet``), a production line publishing small (128x128
PNG) MVTec bottle frames at 20 fps over 6 partitions, one camera per partition. Each scenario must end
with :func:`stream.ops.accounting.account` proving every frame has a result (0 lost, 0 DLQ'd), the
per-camera order check (first result of each frame in publish order) and the duplicates that
at-least-once redelivery added counted, printed and bounded by what the group's membership changes
can re-read.

- scale 1 -> 3 -> 1 workers while frames stream (what KEDA does on consumer lag): the extra workers
  really take partitions (their frames-in counters > 0) and hand them back when SIGTERMed;
- SIGKILL a worker while the group is rebalancing (a third worker joining): its partitions move on
  after the session timeout, nothing is lost.

Each line publishes until the scenario's last step is done (``Line(seconds=None)``, ended by
``line.finish``), however long the steps take on this machine: no fixed duration to outlast. Every wait is
for an event (frames consumed, a log line, an assignment) with a generous upper bound, not a time it
must happen by.
"""

from __future__ import annotations

import time

import pytest

from tests.harness.line import FPS, PARTITIONS, STEP_CAP_S, Line, check_line, wait_until
from tests.harness.line import small_frames as _small_frames
from tests.harness.probe_model import probe_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def topo_stack(tmp_path_factory):
    with probe_stack(tmp_path_factory.mktemp("topology-stack"), delay_ms=20) as st:
        yield st


@pytest.fixture(scope="module")
def small_frames(shared_data) -> list[bytes]:
    return _small_frames(shared_data)


def _last_assignment(fleet, i: int) -> set[int]:
    got = fleet.assignments(i)
    return got[-1] if got else set()


def test_scale_workers_1_3_1_under_traffic(topo_stack, small_frames, tmp_path):
    """KEDA-style: 1 worker, +2 after ~10 s of traffic, back to 1 once the added workers consume and ~15 s of
    traffic later; the line publishes (20 fps) until the single worker again owns every partition and has
    consumed a further ~5 s of it. The added workers take partitions (frames-in > 0), the SIGTERMed ones
    hand them back cleanly."""
    stack, model = topo_stack
    line = Line(stack, model, small_frames, tmp_path, "scale", seconds=None)
    fleet = line.fleet
    try:
        line.begin(1)
        line.at(10)
        t_up = time.monotonic() - line.t0
        added = fleet.scale_to(3)
        took = fleet.wait_frames_in(added, timeout_s=STEP_CAP_S)
        assert took, f"the added workers never took partitions: {fleet.summary()}\n{fleet.log_tails()}"
        line.at(max(25.0, time.monotonic() - line.t0 + 5))  # three workers share the line for a while
        t_down = time.monotonic() - line.t0
        assert line.publishing(), f"the line stopped before the scale-down: {line.feeder.error!r}"
        three = {i: fleet.frames_in(i) for i in fleet.active}
        gone = fleet.scale_to(1)
        assert sorted(gone) == sorted(added)
        assert fleet.all_alive() and fleet.active == [0]
        # the last step: worker 0 owns every partition again and consumes the line alone, then the line ends
        assert wait_until(lambda: _last_assignment(fleet, 0) == set(range(PARTITIONS)), STEP_CAP_S), \
            f"worker 0 never took every partition back: {fleet.summary()}\n{fleet.log_tails()}"
        alone = fleet.frames_in(0)
        assert fleet.wait_frames_in([0], above=alone + 5 * FPS, timeout_s=STEP_CAP_S), \
            f"worker 0 stopped consuming after the scale-down: {fleet.summary()}\n{fleet.log_tails()}"
        assert line.publishing(), f"the line stopped before the scenario's last step: {line.feeder.error!r}"
        rep, order = line.finish()
        print(f"\nscale: up at {t_up:.1f} s, down at {t_down:.1f} s, frames-in before the scale-down {three}")
        check_line(line, rep, order, changes=4, what="scale 1->3->1")
        for i in range(3):  # every worker consumed: the extra ones really held partitions
            assert fleet.last_metrics[i].get("linewatch_frames_in_total", 0) > 0, fleet.summary()
        for i in added:
            assert fleet.ended[i] == "stopped" and fleet.workers[i].proc.returncode == 0, fleet.summary()
            assert any(fleet.assignments(i)), f"worker {i} was never assigned a frames partition"
        # back to one worker: it owns every partition again
        assert fleet.assignments(0)[-1] == set(range(PARTITIONS)), fleet.summary()
        assert fleet.frames_in(0) > three[0]
    finally:
        line.close()


def test_sigkill_worker_during_rebalance(topo_stack, small_frames, tmp_path):
    """2 workers share the 6 partitions; a 3rd joins and, while the group rebalances for it (the old
    members revoking), one of the first two is SIGKILLed. The group must settle on the 2 survivors
    (after the dead member's session timeout) and every frame still gets a result. The line publishes until
    the survivors own every partition between them and each has consumed more of it."""
    stack, model = topo_stack
    line = Line(stack, model, small_frames, tmp_path, "rebal", seconds=None)
    fleet = line.fleet
    try:
        line.begin(2)
        assert fleet.wait_frames_in([0, 1], timeout_s=STEP_CAP_S), f"2 workers never shared the partitions: {fleet.summary()}"
        line.at(6)
        marks = {i: fleet.log_mark(i) for i in (0, 1)}
        (new,) = fleet.start(1)
        # the rebalance the join triggers: the old members revoke and rejoin
        t_join = time.monotonic()
        revoking = fleet.wait_log(0, "Revoking previously assigned partitions", since=marks[0], timeout_s=STEP_CAP_S)
        t_kill = time.monotonic()
        new_frames_at_kill = fleet.frames_in(new)
        fleet.kill(0)
        print(f"\nrebalance: 3rd worker started at {t_join - line.t0:.1f} s, worker 0 revoking after "
              f"{t_kill - t_join:.1f} s -> SIGKILL; 3rd worker frames-in then {new_frames_at_kill}")
        assert revoking, f"worker 0 never saw the rebalance\n{fleet.log_tails()}"
        assert new_frames_at_kill == 0, "the 3rd worker already consumed: the kill did not land mid-rebalance"
        assert line.publishing(), f"the line stopped before the kill: {line.feeder.error!r}"
        assert fleet.wait_frames_in([new], timeout_s=STEP_CAP_S), f"the 3rd worker never got partitions\n{fleet.log_tails()}"
        # the last step: the group settled on the survivors (the dead member's session timed out), both consume
        assert wait_until(lambda: _last_assignment(fleet, 1) | _last_assignment(fleet, 2) == set(range(PARTITIONS)), STEP_CAP_S), \
            f"the survivors never owned every partition: {fleet.summary()}\n{fleet.log_tails()}"
        settled = {i: fleet.frames_in(i) for i in (1, 2)}
        assert all(fleet.wait_frames_in([i], above=settled[i] + FPS, timeout_s=STEP_CAP_S) for i in (1, 2)), \
            f"a survivor stopped consuming: {fleet.summary()}\n{fleet.log_tails()}"
        assert line.publishing(), f"the line stopped before the scenario's last step: {line.feeder.error!r}"
        rep, order = line.finish()
        check_line(line, rep, order, changes=2, what="sigkill mid-rebalance")
        assert fleet.all_alive() and fleet.active == [1, 2]
        assert fleet.frames_in(1) > 0 and fleet.frames_in(2) > 0
        # the survivors own every partition between them
        last = fleet.assignments(1)[-1] | fleet.assignments(2)[-1]
        assert last == set(range(PARTITIONS)), fleet.summary()
    finally:
        line.close()
