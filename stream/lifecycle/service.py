"""The rollout controller service (``linewatch controller``; issue #16): the only component with Triton
model control.

- One active controller: it takes the lease (stream/lifecycle/lease.py) before anything else; a second
  ``linewatch controller`` stands by until the first dies, and one that lost the lease exits.
- Consumes ``model-events`` in its own consumer group, one event at a time, and commits an event's
  offset only once its outcome is published (stream/lifecycle/steps.py; a crash mid-rollout redelivers it:
  the controller re-runs it, the candidate is re-materialised, or a version already serving is
  re-announced). A redelivered event whose outcome is already on the topic (``detail.cause``) is skipped,
  so a rolled-back release never re-runs. During a rollout the consumer is paused and polled, so a rollout
  longer than ``rollout.max_poll_interval_s`` keeps it in its group.
- Loads and unloads on every Triton replica (``controller_triton_urls``, or every address of the
  headless Service ``controller_triton_service``, re-resolved on each reconcile pass).
- Writes the authoritative serving state (contracts/serving_state.py) on promotion and rollback; reads
  it at start and reconciles every ``rollout.reconcile_s``: a replica that does not serve a product's
  version (restarted in explicit mode, new pod) gets it loaded.
- Shadows a candidate on a sample of live frames from every ``frames`` partition
  (:class:`stream.lifecycle.sampler.ShadowSampler`).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from contracts.artifact import verify_artifact
from contracts.config import Settings
from contracts.logs import get_logger
from contracts.model_events import ModelEvent, ModelEventError, decode
from contracts.serving_state import ServingEntry, decode_entry, entries_for
from stream.kafka.clients import Producer, client_kwargs, ensure_topics, partitions_of
from stream.kafka.codecs import require_codecs
from stream.kafka.follow import TopicFollower, read_to_end
from stream.lifecycle.controller import OUTCOMES, RolloutController
from stream.lifecycle.events import actionable
from stream.lifecycle.lease import LEASE_FILE, ControllerLease, LeaseLost
from stream.lifecycle.policy import HealthPolicy
from stream.lifecycle.repository import model_dir, pinned_version, remove_model_dir, repository_models
from stream.lifecycle.sampler import ShadowSampler
from stream.lifecycle.supervise import run_until_stopped

log = get_logger("stream.lifecycle.service")


def triton_replicas(s: Settings) -> list[str]:
    """The Triton gRPC endpoints model control must reach: the headless Service's addresses, else the list."""
    if s.controller_triton_service:
        host, _, port = s.controller_triton_service.rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            addrs = sorted({i[4][0] for i in infos})
            if addrs:
                return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addrs]
        except OSError as e:
            log.warning("triton_service_unresolved", service=s.controller_triton_service, error=str(e))
    urls = [u.strip() for u in s.controller_triton_urls.split(",") if u.strip()]
    return urls or [s.triton_grpc_url]


@dataclass(frozen=True)
class ControllerTopics:
    """The Kafka resources the service uses: every method below reads them from here, and
    stream/ops/acls.py derives the controller's KafkaUser from the same object."""

    events: str  # model-events: read in ``group`` (``released``); outcomes written back
    commands: str  # model-commands: read in ``group`` (``rollback_requested``, the operator's)
    state: str  # serving-state (compacted): followed whole, written on promotion/rollback
    frames: str  # read (no group) by the shadow sampler
    group: str

    @classmethod
    def of(cls, s: Settings) -> ControllerTopics:
        return cls(s.topic_model_events, s.topic_model_commands, s.topic_serving_state, s.topic_frames,
                   s.rollout.group)

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.events, self.commands, self.state, self.frames)

    @property
    def writes(self) -> tuple[str, ...]:
        return (self.events, self.state)


class ControllerService:
    def __init__(self, s: Settings, repository: Path, policy: HealthPolicy | None = None):
        require_codecs()  # every consumer of ours reads every codec a producer may use
        self.s = s
        self.topics = t = ControllerTopics.of(s)
        self.serving: dict[str, ServingEntry] = {}  # product -> entry (the compacted topic, as read)
        self.producer = Producer(s.kafka_bootstrap, settings=s)
        key = s.triton_control_key.get_secret_value() if s.triton_control_key else None
        self.ctl = RolloutController(triton_replicas(s), repository, self._publish_event,
                                     policy or HealthPolicy.from_settings(s.rollout), control_key=key,
                                     serving=s.serving)
        self.ctl.on_serving.append(self._publish_serving)
        self.sampler = ShadowSampler(s, self.ctl, t.frames)
        self.follower = TopicFollower(s.kafka_bootstrap, t.state, self._on_state, settings=s)
        self.reconciled = asyncio.Event()
        self.lease = ControllerLease(s.rollout.lease_path or Path(repository) / LEASE_FILE)
        self.ctl.fence = self.lease.check

    # -- serving state
    def _on_state(self, key: bytes | None, value: bytes | None) -> None:
        product = (key or b"").decode()
        e = decode_entry(value)
        if e is None:
            self.serving.pop(product, None)
        else:
            self.serving[e.product] = e

    async def _publish_serving(self, model: str, version: int, spec: dict) -> None:
        recs = [(e.key, e.to_json(), []) for e in entries_for(model, version, spec)]
        if not recs:
            return
        before = {e.model for e in self.serving.values()}
        await self.producer.send_many(self.topics.state, recs)
        for k, v, _ in recs:
            self._on_state(k, v)
        log.info("serving_state_written", model=model, version=version, products=[k.decode() for k, _, _ in recs])
        await self._retire(before - {e.model for e in self.serving.values()})

    async def _retire(self, models: set[str]) -> None:
        """A model whose every product was taken over (``release --take-over``) serves nothing any more:
        unload it everywhere and remove it from the repository (its released versions stay in the store),
        so neither a reconcile pass nor a restore brings it back."""
        for m in sorted(models):
            await self.ctl._unload(m)
            await asyncio.to_thread(remove_model_dir, self.ctl.repository, m)
            log.info("model_retired", model=m, reason="every product it served was taken over")

    async def _publish_event(self, ev: ModelEvent) -> None:
        await self.producer.send_many(self.topics.events, [(ev.key, ev.to_json(), [])])

    def served_versions(self) -> dict[str, int]:
        """{model: version} the serving state says must be served."""
        out: dict[str, int] = {}
        for e in self.serving.values():
            out[e.model] = max(out.get(e.model, 0), e.version)
        return out

    async def reconcile(self) -> dict[str, list[str]]:
        """Every replica serves every model at its serving-state version; returns {model: replicas fixed}."""
        self.ctl.set_replicas(triton_replicas(self.s))
        fixed = {}
        for model, version in sorted(self.served_versions().items()):
            if model in self.ctl.active:  # mid-rollout: the rollout owns that model now
                continue
            done = await self.ctl.ensure_serving(model, version)
            if done:
                fixed[model] = done
                log.info("reconciled", model=model, version=version, replicas=done)
        return fixed

    async def restore_from_repository(self) -> list[str]:
        """Models the repository pins but the serving state does not know (an embedded broker that lost its
        topics on restart, a first start): load each verified pinned version on every replica and write its
        serving state. The repository holds only what the controller materialised after verification."""
        known = {e.model for e in self.serving.values()}
        restored = []
        # oldest promotion first: where two pinned models claim one product, the later one's entry wins
        models = sorted(repository_models(self.ctl.repository),
                        key=lambda m: (model_dir(self.ctl.repository, m) / "config.pbtxt").stat().st_mtime)
        for model in models:
            version = pinned_version(self.ctl.repository, model)
            if model in known or version is None:
                continue
            v = await asyncio.to_thread(verify_artifact, model_dir(self.ctl.repository, model) / str(version),
                                        None, model, version, strict=True)
            if not v.ok:
                log.warning("restore_refused", model=model, version=version, reasons=v.reasons[:5])
                continue
            await self.ctl.ensure_serving(model, version)
            _, serving = await self.ctl.serving_spec(model)
            if serving != version:  # no replica took it: not recorded (the next start tries again)
                log.warning("restore_not_served", model=model, version=version, serving=serving)
                continue
            await self.ctl._record(model, version, v.artifact.metadata)
            restored.append(f"{model} v{version}")
        if restored:
            log.info("serving_restored_from_repository", models=restored)
        return restored

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.lease.check()  # an idle controller that lost its lease stops too
            try:
                await self.reconcile()
                self.reconciled.set()
            except LeaseLost:
                raise
            except Exception as e:
                log.warning("reconcile_pass_failed", error=f"{type(e).__name__}: {e}"[:300])
            try:
                await asyncio.wait_for(stop.wait(), self.s.rollout.reconcile_s)
            except TimeoutError:
                pass

    # -- model events
    async def _events(self, stop: asyncio.Event) -> None:
        s, t = self.s, self.topics
        c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=t.group, enable_auto_commit=False,
                             auto_offset_reset="earliest",
                             max_poll_interval_ms=int(s.rollout.max_poll_interval_s * 1000),
                             **client_kwargs("consumer", s))
        scan = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                **client_kwargs("consumer", s))
        await c.start()
        await scan.start()
        try:
            c.subscribe([t.events, t.commands])
            while not stop.is_set():
                batch = await c.getmany(timeout_ms=200, max_records=1)
                for tp, recs in batch.items():
                    for r in recs:
                        source = "commands" if tp.topic == t.commands else "events"
                        ev = actionable(r.value, source)
                        if ev is not None:
                            log.info("model_event_taken", type=ev.type, model=ev.model, version=ev.version,
                                     offset=r.offset, event_id=ev.event_id)
                            # outcomes go to model-events: a redelivered release or rollback is looked up there
                            done = await self._decided(scan, TopicPartition(tp.topic, tp.partition), r.offset, ev)
                            if done is not None:  # redelivered after its outcome was published: nothing to redo
                                log.info("model_event_already_decided", model=ev.model, version=ev.version,
                                         offset=r.offset, outcome=done.type)
                            else:
                                await self._handle_polled(c, ev)
                        # the outcome (promoted, rolled back or refused) is published: only now is it acked
                        await self._commit(c, TopicPartition(tp.topic, tp.partition), r.offset + 1)
        finally:
            await scan.stop()
            await c.stop()

    async def _decided(self, scan: AIOKafkaConsumer, tp: TopicPartition, offset: int,
                       ev: ModelEvent) -> ModelEvent | None:
        """The outcome already published for ``ev`` (its ``detail.cause``); None on a first delivery. A release's
        is read after its own offset (outcomes go to the same partition: the key is the model); a command's
        (``tp`` on model-commands) is on model-events at an unrelated offset, which is read whole (a small
        topic: one record per release and outcome)."""
        found: list[ModelEvent] = []
        if tp.topic == self.topics.events:
            tps, start = [tp], {tp: offset + 1}
        else:
            tps = [TopicPartition(self.topics.events, p) for p in sorted(await partitions_of(scan, self.topics.events))]
            start = None

        def apply(batch: dict) -> None:
            for recs in batch.values():
                for r in recs:
                    try:
                        out = decode(r.value)
                    except ModelEventError:
                        continue
                    if out.type in OUTCOMES and out.detail.get("cause") == ev.event_id:
                        found.append(out)

        await read_to_end(scan, tps, apply, timeout_s=self.s.rollout.load_timeout_s, start=start)
        return found[0] if found else None

    @staticmethod
    async def _commit(c: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        """Ack up to ``offset``; a group that moved on meanwhile (the partition revoked) redelivers the event
        to its new owner, which finds its outcome and skips it (:meth:`_decided`)."""
        try:
            await c.commit({tp: offset})
        except (CommitFailedError, IllegalStateError) as e:
            log.warning("model_event_commit_failed", partition=tp.partition, offset=offset,
                        error=f"{type(e).__name__}: {e}"[:300])

    async def _handle_polled(self, c: AIOKafkaConsumer, ev: ModelEvent) -> None:
        """Handle ``ev`` while the consumer stays in its group: a rollout (a load, a shadow window, a candidate
        waiting for traffic up to ``rollout.traffic_deadline_s``) can last longer than the consumer's
        ``max_poll_interval_ms``; its partitions are paused and polled (no record is taken) meanwhile."""
        task = asyncio.ensure_future(self.ctl.handle_until_decided(ev, self.s.rollout.max_attempts))
        parts = set(c.assignment())
        c.pause(*parts)
        try:
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                # paused: returns nothing, keeps the member's poll clock fresh. After a rebalance the new
                # assignment is unpaused: whatever it returns is given back (seek) and paused again, so no
                # record is skipped past and acked with the event in hand
                got = await c.getmany(timeout_ms=0)
                for tp, recs in got.items():
                    c.seek(tp, recs[0].offset)
                now = set(c.assignment())
                if got or now - parts:
                    c.pause(*now)
                    parts |= now
        finally:
            if not task.done():  # stopping mid-rollout: the event is not acked, it is redelivered
                task.cancel()
            live = parts & set(c.assignment())
            if live:
                c.resume(*live)
        await task

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        if not await self.lease.acquire(stop):  # a standby controller stopped before it became active
            return
        try:
            await self._run_active(stop)
        finally:
            self.lease.release()

    async def _run_active(self, stop: asyncio.Event) -> None:
        s, t = self.s, self.topics
        if s.dev_broker:  # the embedded broker; in k8s the KafkaTopics exist and the controller creates none
            await ensure_topics(s.kafka_bootstrap, [t.events, t.commands], settings=s)
            await ensure_topics(s.kafka_bootstrap, [t.state], settings=s, config={"cleanup.policy": "compact"})
        await self.producer.start()
        await self.follower.start()
        try:
            await self.restore_from_repository()
            log.info("controller_start", replicas=self.ctl.urls, generation=self.lease.generation,
                     serving={p: f"{e.model} v{e.version}" for p, e in sorted(self.serving.items())})
            await run_until_stopped(stop, self._reconcile_loop(stop), self._events(stop), self.sampler.run(stop))
        finally:
            await self.follower.stop()
            await self.producer.stop()
            await self.ctl.close()
