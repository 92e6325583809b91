"""Tansu (embedded dev broker) workarounds, applied only when ``Settings.dev_broker`` is true.

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


def apply_if_enabled(settings=None) -> bool:
    from contracts.config import Settings  # noqa: PLC0415

    s = settings or Settings()
    return apply_dev_broker_workarounds() if s.dev_broker else False
