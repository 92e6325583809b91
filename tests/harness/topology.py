"""Topology harness: many workers of one consumer group over a partitioned frames topic (issue #16 item 4).

- :class:`WorkerFleet`: N :class:`~devstack.worker_process.WorkerProcess` es of one group (same ``--app-id``)
  on given topics; ``scale_to(k)`` starts new workers or SIGTERM-stops the newest (what KEDA does),
  ``kill(i)`` SIGKILLs one. Each worker has its own data dir and log; its ``/metrics`` page is scraped
  once more just before it is stopped or killed, so a gone worker's counters stay readable.
- :func:`cameras_for_partitions`: camera ids whose record keys land on distinct partitions (the frames
  topic is keyed by camera, murmur2 like the Java client), so every partition carries traffic.
- :func:`read_results` + :func:`check_camera_order`: the per-camera order check. Per camera, the *first*
  appearance of each frame's result must follow the order the frames were published; at-least-once
  redelivery may add copies later (allowed, counted).

Reused by the topology scenarios (tests/integration/test_topology_scaling.py) and meant for later ones
(a rollout controller, two Tritons): nothing here knows about the model or the fault being injected.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contracts.logs import get_logger
from stream.kafka.clients import partition_for_key
from tests.harness.chaos import _crash_lines, scrape_metrics

log = get_logger("tests.harness.topology")

FRAMES_IN = "linewatch_frames_in_total"


# ----------------------------------------------------------------------------- partitions


def cameras_for_partitions(partitions: int, prefix: str = "cam-", per_partition: int = 1) -> tuple[str, ...]:
    """``per_partition`` camera ids for every partition (ordered by partition), so that a Feeder cycling
    over them puts the same traffic on each partition of a ``partitions``-partition frames topic."""
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < per_partition for v in found.values()):
        cam = f"{prefix}{i:03d}"
        p = partition_for_key(cam.encode(), partitions)
        if len(found[p]) < per_partition:
            found[p].append(cam)
        i += 1
        if i > 100_000:  # pragma: no cover - murmur2 spreads far better than this
            raise RuntimeError(f"no cameras cover {partitions} partitions")
    return tuple(c for p in range(partitions) for c in found[p])


# ----------------------------------------------------------------------------- the fleet


_ASSIGNED = re.compile(r"Setting newly assigned partitions (set\(\)|\{.*?\}) for group")
_TP = re.compile(r"TopicPartition\(topic='([^']*)', partition=(\d+)\)")


class WorkerFleet:
    """Workers of one consumer group (``app_id``) on ``topics`` ({'frames','results','defects','dlq'}).

    ``workers`` holds every worker ever started, in start order (index = worker number, also in its
    log name); ``active`` the indices started and neither stopped nor killed."""

    def __init__(self, bootstrap: str, triton: str | Sequence[str], workdir: str | Path, *, app_id: str,
                 topics: Mapping[str, str],
                 routing: Mapping[str, Any] | str | None = None, batch_max: int = 8, batch_within: float = 0.05,
                 env: dict[str, str] | None = None, extra_args: Sequence[str] = (), name: str = "worker"):
        # several Triton replicas: worker i talks to tritons[i % n] (a Service spreads pods over them in k8s)
        self.tritons = [triton] if isinstance(triton, str) else list(triton)
        self.bootstrap, self.triton, self.app_id = bootstrap, self.tritons[0], app_id
        self.workdir = Path(workdir)
        self.topics = dict(topics)
        self.routing = routing if routing is None or isinstance(routing, str) else json.dumps(routing)
        self.batch_max, self.batch_within, self.env = batch_max, batch_within, env
        self.extra_args, self.name = list(extra_args), name
        self.workers: list = []
        self.started_at: list[float] = []
        self.ended: dict[int, str] = {}  # index -> "stopped" | "killed"
        self.last_metrics: dict[int, dict[str, float]] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = []
        for flag, key in (("--frames-topic", "frames"), ("--results-topic", "results"),
                          ("--defects-topic", "defects"), ("--dlq-topic", "dlq")):
            if key in self.topics:
                args += [flag, self.topics[key]]
        if self.routing is not None:
            args += ["--routing", self.routing]
        return args + self.extra_args

    def start(self, n: int = 1) -> list[int]:
        """Start ``n`` new workers of the group; returns their indices."""
        from devstack.worker_process import WorkerProcess

        out = []
        for _ in range(n):
            i = len(self.workers)
            wdir = self.workdir / f"{self.name}-{i}"
            w = WorkerProcess(self.bootstrap, self.tritons[i % len(self.tritons)], wdir, app_id=self.app_id, batch_max=self.batch_max,
                              batch_within=self.batch_within, env=self.env, log_path=self.log_path(i),
                              extra_args=self._args())
            self.workers.append(w.start())
            self.started_at.append(time.monotonic())
            log.info("fleet_worker_started", worker=i, pid=w.proc.pid, web_port=w.web_port, group=self.app_id)
            out.append(i)
        return out

    @property
    def active(self) -> list[int]:
        return [i for i in range(len(self.workers)) if i not in self.ended]

    def stop(self, *indices: int, timeout: float = 30.0) -> None:
        """SIGTERM these workers at once (a graceful leave: commit, LeaveGroup) and wait for them to exit."""
        todo = [i for i in indices if i not in self.ended]
        for i in todo:
            self.snapshot(i)
        with ThreadPoolExecutor(max(1, len(todo))) as ex:
            list(ex.map(lambda i: self.workers[i].stop(timeout), todo))
        for i in todo:
            self.ended[i] = "stopped"
            log.info("fleet_worker_stopped", worker=i, rc=self.workers[i].proc.returncode)

    def kill(self, i: int) -> None:
        """SIGKILL worker ``i`` (no commit, no LeaveGroup: the group waits out its session timeout)."""
        self.snapshot(i, timeout_s=1.0)
        self.workers[i].kill()
        self.workers[i].stop()  # already dead: only closes its log file
        self.ended[i] = "killed"
        log.info("fleet_worker_killed", worker=i)

    def scale_to(self, k: int) -> list[int]:
        """Start workers, or SIGTERM the newest ones, until ``k`` are active; returns the indices
        started (scale up) or stopped (scale down)."""
        act = self.active
        if k > len(act):
            return self.start(k - len(act))
        gone = sorted(act, reverse=True)[: len(act) - k]
        if gone:
            self.stop(*gone)
        return gone

    def close(self) -> None:
        """Stop every active worker (call in a ``finally``: a leaked worker outlives the test)."""
        self.stop(*self.active)

    def __enter__(self) -> WorkerFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- observation ------------------------------------------------------------------------------
    def alive(self, i: int) -> bool:
        return self.workers[i].alive()

    def all_alive(self) -> bool:
        """Every active worker's process is still running (none crashed or exited on its own)."""
        return all(self.alive(i) for i in self.active)

    def log_path(self, i: int) -> Path:
        return self.workdir / f"{self.name}-{self.app_id}-{i}.log"

    def log_text(self, i: int) -> str:
        p = self.log_path(i)
        return p.read_text(errors="replace") if p.is_file() else ""

    def log_mark(self, i: int) -> int:
        """The log's current size: pass as ``since`` to :meth:`wait_log` to see only what comes after."""
        p = self.log_path(i)
        return p.stat().st_size if p.is_file() else 0

    def wait_log(self, i: int, needle: str, *, since: int = 0, timeout_s: float = 60.0, poll_s: float = 0.05) -> bool:
        """Wait until ``needle`` appears in worker ``i``'s log after byte ``since``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.log_path(i), "rb") as f:
                f.seek(since)
                if needle.encode() in f.read():
                    return True
            if not self.alive(i):
                return False
            time.sleep(poll_s)
        return False

    def snapshot(self, i: int, timeout_s: float = 3.0) -> dict[str, float]:
        """Scrape worker ``i``'s /metrics now (kept in ``last_metrics``); a gone worker's last scrape."""
        if i not in self.ended and self.alive(i):
            m = scrape_metrics(self.workers[i].web_port, timeout_s=timeout_s)
            if m:
                self.last_metrics[i] = m
        return self.last_metrics.get(i, {})

    def metric(self, i: int, name: str) -> float:
        return self.snapshot(i).get(name, 0.0)

    def frames_in(self, i: int) -> float:
        return self.metric(i, FRAMES_IN)

    def wait_frames_in(self, indices: Iterable[int], *, above: float = 0.0, timeout_s: float = 60.0) -> bool:
        """Wait until every worker in ``indices`` has consumed more than ``above`` frames (it holds partitions)."""
        todo = set(indices)
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            todo = {i for i in todo if self.frames_in(i) <= above}
            if any(not self.alive(i) for i in todo):
                return False
            if todo:
                time.sleep(0.2)
        return not todo

    def assignments(self, i: int, topic: str | None = None) -> list[set[int]]:
        """Worker ``i``'s partition assignments of ``topic`` (default: the frames topic), one set per
        rebalance it took part in, from its log (aiokafka 'Setting newly assigned partitions')."""
        topic = topic or self.topics["frames"]
        return [{int(p) for t, p in _TP.findall(m.group(1)) if t == topic}
                for m in _ASSIGNED.finditer(self.log_text(i))]

    def crashes(self) -> int:
        return sum(_crash_lines(self.log_path(i)) for i in range(len(self.workers)))

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(f"--- {self.log_path(i).name} ({self.ended.get(i, 'active')})\n"
                         + "\n".join(self.log_text(i).splitlines()[-lines:]) for i in range(len(self.workers)))

    def summary(self) -> list[dict[str, Any]]:
        for i in self.active:  # fresh counters of the live ones; a gone worker keeps its last scrape
            self.snapshot(i)
        return [{"worker": i, "state": self.ended.get(i, "active" if self.alive(i) else "exited"),
                 "frames_in": self.last_metrics.get(i, {}).get(FRAMES_IN, 0.0),
                 "assignments": [sorted(a) for a in self.assignments(i)]} for i in range(len(self.workers))]


# ----------------------------------------------------------------------------- per-camera order


def read_results(bootstrap: str, topic: str, *, idle_s: float = 2.0, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every result record on ``topic`` as its JSON dict plus ``_partition``/``_offset``, in
    (partition, offset) order (a camera's results share one partition: results are keyed by camera)."""
    from stream.kafka.clients import read_topics

    recs = asyncio.run(read_topics(bootstrap, [topic], idle_s=idle_s, timeout_s=timeout_s))[topic]
    out = []
    for r in sorted(recs, key=lambda r: (r.partition, r.offset)):
        try:
            d = json.loads(r.value)
        except (TypeError, ValueError):
            continue
        if isinstance(d, dict):
            out.append({**d, "_partition": r.partition, "_offset": r.offset})
    return out


@dataclass
class OrderReport:
    cameras: int
    results: int  # records checked
    frames: int  # distinct frames among them
    duplicates: int  # records beyond a frame's first result (at-least-once redelivery)
    late_duplicates: int  # duplicates that came after a later frame's first result (redelivered after moving on)
    violations: list[dict[str, Any]] = field(default_factory=list)  # first results out of publish order
    unknown: int = 0  # results for frames the order does not know (skipped)
    duplicate_records: list[dict[str, Any]] = field(default_factory=list)  # the first 100, for diagnosis
    per_camera: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _field(r: Any, name: str) -> Any:
    return r.get(name) if isinstance(r, Mapping) else getattr(r, name, None)


def check_camera_order(results: Iterable[Any], order: Sequence[str] | Mapping[str, int] | None = None) -> OrderReport:
    """Per camera, the first result of each frame must come in publish order.

    ``results``: result records (dicts as :func:`read_results` returns, or
    :class:`~contracts.envelope.InspectionResult`) in the order they sit on the results topic.
    ``order``: the frame ids in publish order (or {frame_id: rank}); without it the frames' ``ts_ms``
    is the order (equal timestamps never count as a violation). A result whose frame the order does
    not know is skipped (``unknown``); a repeated result is a duplicate, never a violation."""
    rank = dict(order) if isinstance(order, Mapping) else (
        {f: i for i, f in enumerate(order)} if order is not None else None)
    seen: set[str] = set()
    last: dict[str, tuple[float, str]] = {}  # camera -> (highest rank so far, its frame)
    cams: dict[str, dict[str, int]] = {}
    rep = OrderReport(cameras=0, results=0, frames=0, duplicates=0, late_duplicates=0)
    for r in results:
        fid, cam = _field(r, "frame_id"), _field(r, "camera") or _field(r, "camera_id")
        if rank is not None:
            k = rank.get(fid)
        else:
            k = _field(r, "ts_ms")
        if k is None or not isinstance(fid, str) or cam is None:
            rep.unknown += 1
            continue
        rep.results += 1
        c = cams.setdefault(cam, {"frames": 0, "duplicates": 0, "violations": 0})
        if fid in seen:
            rep.duplicates += 1
            c["duplicates"] += 1
            late = last.get(cam, (k, ""))[0] > k
            rep.late_duplicates += late
            if len(rep.duplicate_records) < 100:
                rep.duplicate_records.append({"camera": cam, "frame_id": fid, "rank": k, "late": late,
                                              "partition": _field(r, "_partition"), "offset": _field(r, "_offset"),
                                              "processed_ts_ms": _field(r, "processed_ts_ms")})
            continue
        seen.add(fid)
        c["frames"] += 1
        prev = last.get(cam)
        if prev is not None and k < prev[0]:
            rep.violations.append({"camera": cam, "frame_id": fid, "rank": k, "after_frame_id": prev[1],
                                   "after_rank": prev[0], "partition": _field(r, "_partition"),
                                   "offset": _field(r, "_offset")})
            c["violations"] += 1
        else:
            last[cam] = (k, fid)
    rep.frames, rep.cameras, rep.per_camera = len(seen), len(cams), cams
    return rep
