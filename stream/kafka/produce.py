"""Publishing a batch's records safely: producer errors classified, each record sent once, only the
unacknowledged ones sent again (issue #15 item 2).

:func:`classify` sorts an aiokafka / Faust producer error into

- ``"retriable"``: the broker may take it later (connection lost, broker paused, leader moving, a
  delivery timeout, too few in-sync replicas). :func:`send_all` re-sends the records that failed so,
  with capped exponential backoff and equal jitter (:class:`contracts.backoff.Backoff`), for as long as
  it takes (the batch is not acked meanwhile);
- ``"fatal"``: it can never succeed (authorization denied, a record over ``max.message.bytes`` or the
  producer's ``max_request_size``, an invalid topic, a closed producer, a bug). :func:`send_all` raises
  :class:`FatalProduceError` at once; the worker stops without acking the batch (stream/worker/app.py),
  so its frames are redelivered once the cause is fixed.

Records the broker acknowledged are never sent again (no duplicates from a retry of the whole list).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from aiokafka import errors as ke

from contracts.backoff import Backoff
from contracts.logs import get_logger

log = get_logger("stream.kafka.produce")

T = TypeVar("T")
Kind = Literal["retriable", "fatal"]

# never succeed on a retry, whatever aiokafka's `retriable` flag says
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    ke.TopicAuthorizationFailedError, ke.ClusterAuthorizationFailedError, ke.GroupAuthorizationFailedError,
    ke.TransactionalIdAuthorizationFailed, ke.AuthenticationFailedError, ke.SaslAuthenticationFailed,
    ke.AuthenticationMethodNotSupported, ke.UnsupportedSaslMechanismError, ke.IllegalSaslStateError,
    ke.MessageSizeTooLargeError, ke.RecordTooLargeError, ke.RecordListTooLargeError, ke.InvalidTopicError,
    ke.UnsupportedVersionError, ke.UnsupportedForMessageFormatError, ke.InvalidRequiredAcksError,
    ke.PolicyViolationError, ke.InvalidRequestError, ke.KafkaConfigurationError, ke.UnsupportedCodecError,
    ke.ProducerClosed, ke.ProducerFenced, ke.IllegalStateError, ke.IllegalArgumentError,
)
# transient although aiokafka does not flag them retriable: a batch expired in the client while the broker
# was unreachable (KafkaTimeoutError), the broker's own request timeout, a CRC error on the wire
RETRIABLE_ERRORS: tuple[type[BaseException], ...] = (
    ke.KafkaTimeoutError, ke.RequestTimedOutError, ke.KafkaConnectionError, ke.NodeNotReadyError,
    ke.NotEnoughReplicasError, ke.NotEnoughReplicasAfterAppendError, ke.CorruptRecordException,
    ke.KafkaUnavailableError, ke.BrokerNotAvailableError, ke.LeaderNotAvailableError,
    ke.NotLeaderForPartitionError, ke.UnknownTopicOrPartitionError, ke.KafkaStorageError,
)


class FatalProduceError(RuntimeError):
    """A record that can never be published: the worker must stop without acking its batch."""

    def __init__(self, target: str, cause: BaseException):
        self.target, self.cause = target, cause
        super().__init__(f"{target}: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}")


def root_cause(exc: BaseException) -> BaseException:
    """The Kafka error behind Faust's wrappers (``ProducerSendError(...) from KafkaError``)."""
    seen: set[int] = set()
    e = exc
    while not isinstance(e, ke.KafkaError) and e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    return e


def classify(exc: BaseException) -> Kind:
    """``"retriable"`` or ``"fatal"`` for a producer error (see the module docstring)."""
    e = root_cause(exc)
    if isinstance(e, FATAL_ERRORS):
        return "fatal"
    if isinstance(e, ke.KafkaError):
        return "retriable" if (getattr(e, "retriable", False) or isinstance(e, RETRIABLE_ERRORS)) else "fatal"
    if isinstance(e, (TimeoutError, ConnectionError)):  # asyncio.TimeoutError is TimeoutError (3.11)
        return "retriable"
    return "fatal"  # a bug (TypeError, ...): retrying would only repeat it


async def _delivery_reports(futs: list[Awaitable], timeout_s: float | None) -> list:
    """Each future's result or exception (as ``asyncio.gather(..., return_exceptions=True)``); with ``timeout_s``
    a future still pending then reports a TimeoutError (retriable) and is left to finish on its own."""
    if timeout_s is None or not futs:
        return list(await asyncio.gather(*futs, return_exceptions=True))
    tasks = [asyncio.ensure_future(f) for f in futs]
    await asyncio.wait(tasks, timeout=timeout_s)
    out: list = []
    for t in tasks:
        if not t.done():
            out.append(TimeoutError(f"no delivery report within {timeout_s:g} s"))
            log.warning("produce_delivery_timeout", timeout_s=timeout_s)
        elif t.cancelled():
            out.append(asyncio.CancelledError())
        else:
            out.append(t.exception() or t.result())
    return out


async def send_all(records: Sequence[T], send: Callable[[T], Awaitable[Awaitable]], *,
                   target: Callable[[T], str] = lambda r: "?", backoff_s: float = 0.2, backoff_max_s: float = 10.0,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                   rng: Callable[[], float] = random.random, delivery_timeout_s: float | None = None) -> int:
    """Publish every record; returns the number of retry rounds it took (0: all acknowledged at once).

    ``send(record)`` schedules one record and returns its delivery future (Faust ``topic.send`` /
    aiokafka ``producer.send``). A round sends every pending record, then awaits all their futures;
    the ones acknowledged are done for good, the ones that failed retriably are the next round's pending
    (after a capped exponential backoff: ``backoff_s`` doubling up to ``backoff_max_s``, equal jitter from
    ``rng``). A fatal error raises :class:`FatalProduceError` at once. ``delivery_timeout_s``: a record whose
    delivery report has not come back by then is re-sent in the next round like a retriable failure (at least
    once: a late first copy can still land), so one lost report cannot hold its batch, and with it the
    partition's acks and every rebalance, for ever."""
    backoff = Backoff(backoff_s, backoff_max_s, "equal", rng)
    pending = list(range(len(records)))
    rounds = 0
    while pending:
        failed: list[tuple[int, BaseException]] = []
        futs: list[tuple[int, Awaitable]] = []
        for i in pending:
            try:
                futs.append((i, await send(records[i])))
            except Exception as e:  # refused before it left the client (e.g. over max_request_size)
                if classify(e) == "fatal":
                    raise FatalProduceError(target(records[i]), root_cause(e)) from e
                failed.append((i, e))
        outcomes = await _delivery_reports([f for _, f in futs], delivery_timeout_s)
        for (i, _), r in zip(futs, outcomes, strict=True):
            if isinstance(r, asyncio.CancelledError):  # the producer is going away: so is this batch
                raise r
            if isinstance(r, BaseException):
                if not isinstance(r, Exception) or classify(r) == "fatal":
                    raise FatalProduceError(target(records[i]), root_cause(r)) from r
                failed.append((i, r))
        if not failed:
            return rounds
        rounds += 1
        delay = backoff.delay(rounds)
        i0, e0 = failed[0]
        log.warning("produce_retry", attempt=rounds, failed=len(failed), of=len(records), target=target(records[i0]),
                    error=f"{type(root_cause(e0)).__name__}: {e0}"[:300], delay_s=round(delay, 3))
        await sleep(delay)
        pending = sorted(i for i, _ in failed)
    return rounds
