"""``linewatch account``: prove that every produced frame ended in the results topic or the DLQ.

Reads the frames, results and DLQ topics from the beginning up to their end offsets (group-less,
no commits) and reports: frames produced, frames accounted for, the frame ids that are missing,
results duplicated by at-least-once redelivery (count per frame_id > 1), and frames DLQ'd (by
reason). Exit status 1 when any frame is missing or the topics could not be read to their end.

Identity: a frame is its ``frame_id`` header. A frame without one can never get a result; the
worker DLQs it with its original key and bytes (or, for an oversized frame, their sha256), so it
is matched by a digest of those instead (``anon:<sha256>``).

The counting (:class:`Ledger`) is pure; :func:`account` does the Kafka reading.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from contracts.config import Settings
from contracts.envelope import headers_to_dict, peek_ids
from contracts.logs import get_logger

log = get_logger("stream.ops.accounting")


def _content_digest(key: bytes | None, value: bytes | None, headers: Any) -> str:
    """sha256 over the record key and the sha256 of its value. A DLQ record whose oversized value was
    dropped carries the original's digest in ``error_original_sha256``, so it still matches its frame."""
    h = headers_to_dict(headers)
    vd = h.get("error_original_sha256") if not value else None
    vdig = vd.decode("ascii", "replace") if vd else hashlib.sha256(value or b"").hexdigest()
    k = key or b""
    return hashlib.sha256(len(k).to_bytes(8, "big") + k + vdig.encode()).hexdigest()


def _frame_id(headers: Any) -> str | None:
    return peek_ids(headers, max_chars=None)[0]


def _frame_key(key: bytes | None, value: bytes | None, headers: Any) -> str:
    """``frame_id`` header, or ``anon:<content digest>`` without one."""
    return _frame_id(headers) or "anon:" + _content_digest(key, value, headers)[:40]


@dataclass
class Report:
    produced: int  # distinct frames on the frames topic
    frame_records: int  # records on the frames topic (a frame published twice counts twice here)
    accounted: int  # produced frames with a result or a DLQ record
    missing: list[str]  # produced frames with neither
    results: int  # result records for produced frames
    duplicated: dict[str, int]  # frame_id -> result count, for counts > 1 (at-least-once redelivery)
    duplicate_results: int  # result records beyond the first per frame
    dlq: int  # distinct produced frames with a DLQ record
    dlq_records: int
    dlq_reasons: dict[str, int]
    in_both: list[str]  # frames with a result AND a DLQ record (should not happen)
    unexpected: int  # result/DLQ records for frame ids not on the frames topic (other producers, shadow)
    unreadable_results: int  # result records that are not JSON objects with a string frame_id
    complete: bool = True  # every topic was read up to its end offset
    end_offsets: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and self.complete

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary_line(self) -> str:
        return (f"produced {self.produced}, accounted {self.accounted}, missing {len(self.missing)}, "
                f"results {self.results} (duplicated frames {len(self.duplicated)}, extra copies "
                f"{self.duplicate_results}), DLQ'd {self.dlq} {dict(self.dlq_reasons) or ''}".rstrip())


class Ledger:
    """Pure bookkeeping: feed records of the three topics in any order, then :meth:`report`.

    A DLQ record is matched to its frame by ``frame_id`` header, else (no header: dropped or never
    there) by content digest (key + value, or ``error_original_sha256`` when the value was dropped)."""

    def __init__(self) -> None:
        self.frames: Counter[str] = Counter()
        self.by_digest: dict[str, list[str]] = {}
        self.results: Counter[str] = Counter()
        self._dlq: list[tuple[str | None, str, str]] = []  # (frame_id header, content digest, reason)
        self.unreadable_results = 0

    def add_frame(self, key: bytes | None, value: bytes | None, headers: Any) -> str:
        fid = _frame_key(key, value, headers)
        if fid not in self.frames:
            self.by_digest.setdefault(_content_digest(key, value, headers), []).append(fid)
        self.frames[fid] += 1
        return fid

    def add_result(self, value: bytes | None) -> str | None:
        try:
            d = orjson.loads(value or b"")
            fid = d.get("frame_id") if isinstance(d, dict) else None
        except orjson.JSONDecodeError:
            fid = None
        if not isinstance(fid, str) or not fid:
            self.unreadable_results += 1
            return None
        self.results[fid] += 1
        return fid

    def add_dlq(self, key: bytes | None, value: bytes | None, headers: Any) -> None:
        reason = headers_to_dict(headers).get("error", b"") or b"?"
        self._dlq.append((_frame_id(headers), _content_digest(key, value, headers), reason.decode("utf-8", "replace")))

    def dlq(self) -> tuple[Counter[str], dict[str, str], int]:
        """({produced frame id: DLQ records}, {frame id: last reason}, records matching no produced frame)."""
        counts: Counter[str] = Counter()
        reason: dict[str, str] = {}
        unmatched = 0
        for fid, digest, why in self._dlq:
            if fid is None or fid not in self.frames:
                cands = self.by_digest.get(digest, [])
                fid = next((c for c in cands if c not in counts), cands[0] if cands else None)
            if fid is None:
                unmatched += 1
                continue
            counts[fid] += 1
            reason[fid] = why
        return counts, reason, unmatched

    def missing(self) -> list[str]:
        dlq = self.dlq()[0]
        return [f for f in self.frames if f not in self.results and f not in dlq]

    def report(self, *, complete: bool = True, end_offsets: dict[str, int] | None = None,
               elapsed_s: float = 0.0) -> Report:
        produced = set(self.frames)
        dlq, reason, dlq_unmatched = self.dlq()
        missing = [f for f in self.frames if f not in self.results and f not in dlq]
        dup = {f: n for f, n in self.results.items() if n > 1 and f in produced}
        return Report(
            produced=len(produced),
            frame_records=sum(self.frames.values()),
            accounted=len(produced) - len(missing),
            missing=missing,
            results=sum(n for f, n in self.results.items() if f in produced),
            duplicated=dup,
            duplicate_results=sum(n - 1 for n in dup.values()),
            dlq=len(dlq),
            dlq_records=sum(dlq.values()),
            dlq_reasons=dict(Counter(reason.values())),
            in_both=sorted(f for f in dlq if f in self.results),
            unexpected=sum(n for f, n in self.results.items() if f not in produced) + dlq_unmatched,
            unreadable_results=self.unreadable_results,
            complete=complete,
            end_offsets=dict(end_offsets or {}),
            elapsed_s=round(elapsed_s, 3),
        )


class TopicReader:
    """Group-less reader of whole topics, resumable: each :meth:`catch_up` reads from where the last
    one stopped up to the topics' *current* end offsets (then drains briefly: Tansu may under-report
    the end of a partition holding multi-record batches)."""

    def __init__(self, bootstrap: str, topics: list[str], *, required: tuple[str, ...] = (),
                 settings: Settings | None = None):
        from aiokafka import AIOKafkaConsumer

        from stream.kafka.clients import client_kwargs
        from stream.kafka.codecs import require_codecs

        require_codecs()
        self.topics = topics
        self.required = required
        self.c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                  auto_offset_reset="earliest", **client_kwargs("consumer", settings))
        self.tps: list = []

    async def start(self, timeout_s: float = 10.0) -> None:
        from aiokafka import TopicPartition

        from stream.kafka.clients import partitions_of

        await self.c.start()
        deadline = time.monotonic() + timeout_s
        while True:
            parts = {t: await partitions_of(self.c, t) for t in self.topics}
            if all(parts[t] for t in self.required) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        absent = [t for t in self.required if not parts[t]]
        if absent:
            await self.c.stop()
            raise ValueError(f"topic(s) {', '.join(absent)} do not exist on the broker")
        self.tps = [TopicPartition(t, p) for t in self.topics for p in sorted(parts[t])]
        if self.tps:
            self.c.assign(self.tps)
            await self.c.seek_to_beginning(*self.tps)

    async def stop(self) -> None:
        await self.c.stop()

    async def catch_up(self, on_record, timeout_s: float = 30.0, drain_s: float = 0.3) -> tuple[bool, dict[str, int]]:
        """Read up to the current end offsets. Returns (reached every end offset, {topic: total end offset})."""
        if not self.tps:
            return True, {}
        ends = await self.c.end_offsets(self.tps)
        deadline = time.monotonic() + timeout_s

        async def behind() -> list:
            return [tp for tp in self.tps if await self.c.position(tp) < ends[tp]]

        todo = await behind()
        quiet_since = None
        while time.monotonic() < deadline:
            batch = await self.c.getmany(timeout_ms=200, max_records=1000)
            for tp, recs in batch.items():
                for r in recs:
                    on_record(tp.topic, r)
            if todo:
                todo = await behind()
                continue
            if batch:  # past the reported end: keep draining
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= drain_s:
                break
        per_topic: dict[str, int] = {}
        for tp, off in ends.items():
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + off
        return not todo, per_topic


async def account(bootstrap: str, *, frames_topic: str = "frames", results_topic: str = "inspection-results",
                  dlq_topic: str = "frames-dlq", wait_s: float = 0.0, read_timeout_s: float = 60.0,
                  poll_s: float = 1.0, stall_s: float | None = None, settings: Settings | None = None) -> Report:
    """Read the three topics to their end offsets and account for every frame.

    ``wait_s`` > 0: while frames are missing, keep catching up (new results may still be on their
    way) until none are missing or ``wait_s`` has passed. ``stall_s``: also stop once no further
    frame has been accounted for that long (a slow machine keeps making progress and gets the whole
    ``wait_s``; a stuck pipeline is reported after ``stall_s``).
    """
    t0 = time.monotonic()
    progress_at, last_missing = t0, None
    ledger = Ledger()
    feed = {frames_topic: lambda r: ledger.add_frame(r.key, r.value, r.headers),
            results_topic: lambda r: ledger.add_result(r.value),
            dlq_topic: lambda r: ledger.add_dlq(r.key, r.value, r.headers)}
    reader = TopicReader(bootstrap, [frames_topic, results_topic, dlq_topic], required=(frames_topic,),
                         settings=settings)
    await reader.start()
    try:
        while True:
            complete, ends = await reader.catch_up(lambda topic, r: feed[topic](r), timeout_s=read_timeout_s)
            missing = ledger.missing()
            now = time.monotonic()
            if last_missing is None or len(missing) < last_missing:
                progress_at, last_missing = now, len(missing)
            if (not missing and complete) or now - t0 >= wait_s or (stall_s is not None and now - progress_at >= stall_s):
                break
            log.info("account_waiting", missing=len(missing), produced=len(ledger.frames),
                     waited_s=round(time.monotonic() - t0, 1))
            await asyncio.sleep(poll_s)
    finally:
        await reader.stop()
    rep = ledger.report(complete=complete, end_offsets=ends, elapsed_s=time.monotonic() - t0)
    log.info("account_report", ok=rep.ok, produced=rep.produced, accounted=rep.accounted, missing=len(rep.missing),
             duplicated=len(rep.duplicated), dlq=rep.dlq, complete=rep.complete)
    return rep


# ----------------------------------------------------------------------------- CLI


def _cmd_account(a) -> int:
    from stream.ops.cli_worker import _bootstrap

    if a.wait < 0:
        raise ValueError("--wait must be >= 0")
    s = a.settings
    rep = asyncio.run(account(_bootstrap(a), frames_topic=a.frames_topic or s.topic_frames,
                              results_topic=a.results_topic or s.topic_results, dlq_topic=a.dlq_topic or s.topic_dlq,
                              wait_s=a.wait, settings=s))
    if a.json:
        print(json.dumps(rep.to_dict(), indent=2, sort_keys=True))
    else:
        print(rep.summary_line())
        if rep.duplicated:
            top = sorted(rep.duplicated.items(), key=lambda kv: -kv[1])[:10]
            print("duplicated results: " + ", ".join(f"{f} x{n}" for f, n in top)
                  + (" ..." if len(rep.duplicated) > 10 else ""))
        if rep.in_both:
            print(f"frames with both a result and a DLQ record: {len(rep.in_both)} (e.g. {rep.in_both[0]})")
        if rep.missing:
            print(f"MISSING ({len(rep.missing)}): " + " ".join(rep.missing[:20]) + (" ..." if len(rep.missing) > 20 else ""))
        if not rep.complete:
            print(f"INCOMPLETE: could not read every topic to its end offset {rep.end_offsets}")
    return 0 if rep.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("account", help="prove every produced frame has a result or a DLQ record (exit 1 if not)")
    p.add_argument("--frames-topic", help="default: settings topic_frames")
    p.add_argument("--results-topic", help="default: settings topic_results")
    p.add_argument("--dlq-topic", help="default: settings topic_dlq")
    p.add_argument("--bootstrap", help="Kafka bootstrap host:port (default from settings / a running stack)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="while frames are missing, keep reading new results for up to this long")
    p.add_argument("--json", action="store_true", help="full report as JSON")
    p.set_defaults(func=_cmd_account)


if __name__ == "__main__":  # pragma: no cover
    from stream.ops.cli import main

    sys.exit(main(["account", *sys.argv[1:]]))
