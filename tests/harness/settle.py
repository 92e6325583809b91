"""Account for every frame of a test's line, waiting as long as the pipeline keeps making progress.

A slower machine gets more time by itself: the wait ends when every frame is accounted for, when no
further frame has been accounted for ``stall_s`` (a stuck pipeline), or at ``SETTLE_CAP_S`` (an upper
bound well past any measured run, below pytest's per-test timeout).
"""

from __future__ import annotations

import asyncio

from stream.ops.accounting import Report, account

SETTLE_CAP_S = 600.0


def settle(bootstrap: str, *, frames_topic: str = "frames", results_topic: str = "inspection-results",
           dlq_topic: str = "frames-dlq", stall_s: float = 90.0, **kw) -> Report:
    return asyncio.run(account(bootstrap, frames_topic=frames_topic, results_topic=results_topic,
                               dlq_topic=dlq_topic, wait_s=SETTLE_CAP_S, stall_s=stall_s, **kw))
