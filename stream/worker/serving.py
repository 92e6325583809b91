"""The worker's view of the serving state (contracts/serving_state.py; issue #16 item 2).

Read whole before the first batch and followed afterwards: each entry routes its product to its model
(it wins over the static ``routing`` config) and gives the worker the spec of that model version, so a
replica that never saw a rollout routes and judges exactly like the others. Workers never call Triton's
model control; the controller (stream/lifecycle/service.py) is the only writer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from contracts.config import Settings
from contracts.logs import get_logger
from contracts.operating_point import operating_point_of
from contracts.serving_state import ServingEntry, decode_entry
from contracts.spec import parse_spec
from stream.inference.routing import Route
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

    def route_of(self, product: str | None, task: str | None) -> Route | None:
        """The route the serving state gives ``product``, whether or not Triton has its model loaded now
        (None: the serving state does not serve it). The serving state is the authority (issue #26 item 4): a
        product it routes is never ``unknown_product``; while its model is not loaded its frames wait."""
        e = self.entries.get(product or "")
        if e is None:
            return None
        spec = self.triton.spec_for(e.model)
        tasks = spec.tasks if spec is not None else ()
        if tasks:  # a multi-task model: the product's task (the model routes when it has none)
            t = task or (e.product if e.product in tasks else "")
            return Route(e.model, t, e.product, routed=not t)
        return Route(e.model, task or "", e.product, routed=False)

    def served_models(self) -> set[str]:
        return {e.model for e in self.entries.values()}

    async def start(self, timeout_s: float = 30.0) -> None:
        """Read the topic to its end (the worker routes nothing before), then follow it."""
        await self.follower.start(timeout_s)

    async def sync(self) -> None:
        """Before a frame's product is called unknown: apply every entry written so far (the controller writes
        the serving state before it announces ``promoted``, so a frame sent after that routes)."""
        await self.follower.sync()

    async def stop(self) -> None:
        await self.follower.stop()


class ResyncThrottle:
    """Whether a batch whose frames name products nothing routes should re-sync the serving state and re-read
    Triton's specs (both cost a round trip; per batch, a camera publishing a product before it is onboarded, or
    rotating product names, made every batch pay them: issue #26 item 11).

    A name not asked about recently: yes, at once (read-your-writes right after a promotion). The same name
    again: after ``min_s``, its interval doubling to ``max_s`` while it stays unknown. All names together: at
    most once per ``min_s``. Remembers the last ``max_names`` names (untrusted headers: bounded).
    """

    def __init__(self, min_s: float = 0.5, max_s: float = 10.0, max_names: int = 1024):
        self.min_s, self.max_s, self.max_names = min_s, max_s, max_names
        self._next: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (next due, its interval)
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._next)

    def due(self, names: Iterable[str], now: float) -> bool:
        names = set(names)
        if not names or now - self._last < self.min_s:
            return False
        if not any(n not in self._next or now >= self._next[n][0] for n in names):
            return False
        self._last = now
        for n in names:
            prev = self._next.pop(n, None)
            interval = self.min_s if prev is None else min(prev[1] * 2, self.max_s)
            self._next[n] = (now + interval, interval)
        while len(self._next) > self.max_names:
            self._next.popitem(last=False)
        return True

    def forget(self, names: Iterable[str]) -> None:
        """Names that route now: unknown again later, they are re-synced at once."""
        for n in names:
            self._next.pop(n, None)
