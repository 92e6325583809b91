"""Tansu (embedded dev broker) workarounds, applied by the worker only when ``Settings.dev_broker`` is true,
and the worker consumer's fetch wait (:func:`limit_fetch_wait`, ``Settings.worker_fetch_max_wait_ms``).

Tansu numbers a group's first generation 0 (Kafka: 1). aiokafka only sends
LeaveGroup for ``generation > 0``, so a consumer leaving a fresh group is never removed and the
next member waits a whole session timeout to join. We make it send LeaveGroup for
``generation >= 0`` (it still skips -1, "no generation", and static membership).
"""

from __future__ import annotations

from aiokafka.consumer import group_coordinator as gc
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from contracts.logs import get_logger

log = get_logger("stream.kafka.compat")


async def _maybe_leave_group_gen0(self) -> None:
    if self.generation >= 0 and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except KafkaError as err:
            log.warning("leave_group_failed", group=self.group_id, error=str(err))
        else:
            log.info("leave_group_sent", group=self.group_id, generation=self.generation)
    self.reset_generation()


def apply_dev_broker_workarounds() -> bool:
    """Idempotently patch aiokafka for Tansu. Returns True if it patched now, False if already done."""
    cls = gc.GroupCoordinator
    if getattr(cls, "_linewatch_dev_broker", False):
        return False
    cls._maybe_leave_group = _maybe_leave_group_gen0
    cls._linewatch_dev_broker = True
    return True



_fetch_patch_ms: list[int] = []


def limit_fetch_wait(ms: int) -> None:
    """Faust hard-codes the worker consumer's fetch_max_wait_ms=1500. Tansu answers a fetch only
    when that wait expires (measured: frames arrived in bursts every ~500 ms, p50 e2e ~500 ms at
    10 fps); Apache Kafka answers as soon as fetch_min_bytes is met, so a short wait is harmless
    there (a few more empty fetches while idle). Patched on the consumer before it starts."""
    from faust.transport.drivers import aiokafka as fa  # the worker only: the aiokafka-only verbs lack faust

    _fetch_patch_ms[:] = [ms]
    if getattr(fa.AIOKafkaConsumerThread, "_linewatch_patched", False):
        return
    orig = fa.AIOKafkaConsumerThread._create_worker_consumer

    def _create_worker_consumer(self, transport):
        consumer = orig(self, transport)
        consumer._fetch_max_wait_ms = _fetch_patch_ms[0]
        return consumer

    fa.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer
    fa.AIOKafkaConsumerThread._linewatch_patched = True
