"""The worker's view of the serving state (contracts/serving_state.py; issue #16 item 2).

Read whole before the first batch and followed afterwards: each entry routes its product to its model
(it wins over the static ``routing`` config) and gives the worker the spec of that model version, so a
replica that never saw a rollout routes and judges exactly like the others. Workers never call Triton's
model control; the controller (stream/lifecycle/service.py) is the only writer.
"""

from __future__ import annotations

from contracts.config import Settings
from contracts.logs import get_logger
from contracts.operating_point import operating_point_of
from contracts.serving_state import ServingEntry, decode_entry
from contracts.spec import parse_spec
from stream.kafka.follow import TopicFollower

log = get_logger("stream.worker.serving")


class ServingView:
    def __init__(self, s: Settings, router, triton):
        self.router, self.triton = router, triton
        self.entries: dict[str, ServingEntry] = {}
        self._static = dict(router.config.products)  # the operator's routing, where no entry overrides it
        # missing_ok: before any controller ran there is no serving state (the static routing applies)
        self.follower = TopicFollower(s.kafka_bootstrap, s.topic_serving_state, self.apply, settings=s, missing_ok=True)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        product = (key or b"").decode()
        e = decode_entry(value)
        products = self.router.config.products
        if e is None:  # tombstone: the product is retired; the static routing (if any) applies again
            self.entries.pop(product, None)
            if product in self._static:
                products[product] = self._static[product]
            else:
                products.pop(product, None)
            log.info("serving_state_retired", product=product)
            return
        self.entries[e.product] = e
        products[e.product] = e.model
        self.triton.add_spec(e.model, e.version, parse_spec(e.spec))
        log.info("serving_state", product=e.product, model=e.model, version=e.version,
                 threshold=operating_point_of(e.spec, e.product).threshold)  # the one its frames are judged with

    async def start(self, timeout_s: float = 30.0) -> None:
        """Read the topic to its end (the worker routes nothing before), then follow it."""
        await self.follower.start(timeout_s)

    async def sync(self) -> None:
        """Before a frame's product is called unknown: apply every entry written so far (the controller writes
        the serving state before it announces ``promoted``, so a frame sent after that routes)."""
        await self.follower.sync()

    async def stop(self) -> None:
        await self.follower.stop()
