"""Drift windows that survive a worker restart and a partition move (issue #16 item 3).

Each worker publishes a camera's windows (:meth:`stream.lifecycle.drift.DriftMonitor.snapshot`) on the
compacted ``drift-state`` topic every ``drift.check_every`` frames of that camera, with the batch's
results (before its offsets commit). The record key is the frame's own key (the camera id by contract),
so with as many partitions as ``frames`` the state of a camera sits in the partition number its frames
use. When Faust assigns ``frames`` partitions to a worker, it reads the state of those partitions to the
end (every partition when the counts differ) and restores the latest snapshot of each camera that hashes
there; on revocation it drops those cameras. A new owner thus continues the previous owner's windows
(at most ``check_every`` frames behind) instead of starting empty.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.config import Settings
from contracts.logs import get_logger
from stream.kafka.clients import client_kwargs, ensure_topics, partition_for_key, partitions_of
from stream.kafka.follow import read_to_end
from stream.lifecycle.drift import DriftMonitor
from stream.worker.records import Batch, Outgoing

log = get_logger("stream.lifecycle.drift_state")


class DriftStateStore:
    def __init__(self, s: Settings, monitor: DriftMonitor, topic: Any):
        self.s, self.monitor, self.topic = s, monitor, topic
        self.every = s.drift.check_every
        self._count: dict[str, int] = {}
        self._where: dict[str, int] = {}  # camera -> frames partition it was last seen on
        self.restored = 0

    # -- write
    def outgoing(self, batch: Batch) -> list[Outgoing]:
        """Snapshots of the cameras in ``batch`` that reached another ``check_every`` frames."""
        due: dict[str, bytes] = {}
        for sc in batch.scored:
            if sc.result.shadow or sc.result.warmup:  # the drift hook skips them too
                continue
            cam = sc.result.camera
            self._where[cam] = sc.raw.partition
            n = self._count[cam] = self._count.get(cam, 0) + 1
            if n % self.every == 0:
                due[cam] = sc.raw.key or cam.encode()
        return [Outgoing(self.topic, key, orjson.dumps({"camera": cam, "ts_ms": int(time.time() * 1000),
                                                         "tracks": self.monitor.snapshot(cam)}), None)
                for cam, key in due.items()]

    # -- rebalance
    async def on_assigned(self, frames_partitions: set[int]) -> None:
        if not frames_partitions:
            return
        t0 = time.monotonic()
        try:
            snaps = await self._read(frames_partitions)
        except Exception as e:  # the windows start empty: drift detection is delayed, nothing is lost
            log.warning("drift_state_restore_failed", error=f"{type(e).__name__}: {e}"[:300])
            return
        for cam, snap in snaps.items():
            self.restored += self.monitor.restore(cam, snap)
        log.info("drift_state_restored", cameras=len(snaps), partitions=sorted(frames_partitions),
                 seconds=round(time.monotonic() - t0, 3))

    def on_revoked(self, frames_partitions: set[int]) -> None:
        gone = [c for c, p in self._where.items() if p in frames_partitions]
        for cam in gone:
            self.monitor.drop(cam)
            self._where.pop(cam, None)
            self._count.pop(cam, None)

    async def _read(self, frames_partitions: set[int], timeout_s: float = 15.0) -> dict[str, dict]:
        s, topic = self.s, self.s.topic_drift_state
        c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", **client_kwargs("consumer", s))
        await c.start()
        try:
            n_frames = len(await partitions_of(c, s.topic_frames))
            parts = await partitions_of(c, topic)
            if not parts and s.dev_broker and n_frames:  # the embedded broker: created like Faust's changelogs
                await ensure_topics(s.kafka_bootstrap, [topic], partitions=n_frames, settings=s,
                                    config={"cleanup.policy": "compact"})
                return {}
            if not parts or not n_frames:
                return {}
            wanted = frames_partitions if len(parts) == n_frames else parts  # co-partitioned: read only ours
            latest: dict[str, dict] = {}

            def keep(batch: dict) -> None:  # the latest snapshot of each camera whose frames are ours now
                for recs in batch.values():
                    for r in recs:
                        if r.key is None or partition_for_key(r.key, n_frames) not in frames_partitions:
                            continue
                        try:
                            d = orjson.loads(r.value)
                            latest[str(d["camera"])] = dict(d.get("tracks") or {})
                        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                            continue  # one bad record never blocks the restore

            await read_to_end(c, [TopicPartition(topic, p) for p in sorted(wanted & parts)], keep, timeout_s=timeout_s)
            return latest
        finally:
            await c.stop()


def connect(app: Any, store: DriftStateStore, frames_topic: str) -> None:
    """Restore on Faust's partition assignment (awaited before the partitions are consumed), drop on revoke."""

    async def assigned(sender: Any, assigned: set, **_: Any) -> None:
        await store.on_assigned({tp.partition for tp in assigned if tp.topic == frames_topic})

    async def revoked(sender: Any, revoked: set, **_: Any) -> None:
        store.on_revoked({tp.partition for tp in revoked if tp.topic == frames_topic})

    app.on_partitions_assigned.connect(assigned)
    app.on_partitions_revoked.connect(revoked)
    app.linewatch_drift_state = store  # type: ignore[attr-defined]
