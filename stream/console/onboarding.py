"""The console's onboarding page: what it knows of each new product, and the Onboard action's child process.

:class:`OnboardingView` (pure) folds the ``onboarding-events`` records (stream/lifecycle/onboarding.py) and
the ``frames-dlq`` records of reason ``unknown_product`` (the capture candidates an operator can select)
into one entry per product: images captured, the capture arm, candidate frames, and each onboarding run's
steps (``onboard_started`` -> ``training_started`` -> ``training_finished`` -> ``released`` -> the outcome).

:class:`OnboardRunner` runs ``linewatch onboard --product P --detector D --wait --bootstrap B`` as a child
process (``Settings.console_onboard_runner``: ``local`` trains in that child, ``k8s`` adds ``--k8s`` so the
cluster runs the training Job, ``off`` refuses). The child publishes its own progress on the onboarding
topic, which this page reads back like any other record; the runner keeps only its exit code and the last
lines of its output (shown on the page). Local runs go one at a time (training takes the machine); a
console that stops terminates its running children (an interrupted run shows ``failed`` or no outcome;
run it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from contracts.config import Settings
from contracts.detectors import detector_names
from contracts.logs import get_logger
from contracts.names import is_safe_name
from stream.lifecycle.onboarding import OnboardEvent

log = get_logger("stream.console")

STEPS = ("onboard_started", "training_started", "training_finished", "released", "promoted")
FINAL = ("promoted", "rolled_back", "refused", "failed")
MAX_PRODUCTS, MAX_CANDIDATES, MAX_RUNS, MAX_IDS = 64, 48, 8, 5000
READ_CHUNK, MAX_TAIL = 64 * 1024, 64 * 1024  # the child's output: read in chunks, an unended "line" cut here
_SEP = re.compile(rb"(\r\n|\r|\n)")


def _product(name: str) -> dict[str, Any]:
    return {"product": name, "captured": 0, "armed": None, "updated_ms": 0, "candidates": OrderedDict(),
            "captured_ids": OrderedDict(), "selected": set(), "runs": OrderedDict(), "refused": None}


def _step(ev: OnboardEvent) -> dict[str, Any]:
    keep = ("model", "version", "images", "runner", "job", "rc", "seconds", "reasons", "step", "error", "detector")
    return {"type": ev.type, "ts_ms": ev.ts_ms, "detail": {k: ev.detail[k] for k in keep if k in ev.detail}}


class OnboardingView:
    """Per product, bounded: the newest ``MAX_PRODUCTS`` products, ``MAX_CANDIDATES`` candidates and
    ``MAX_RUNS`` runs each."""

    def __init__(self) -> None:
        self.products: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _get(self, product: str) -> dict[str, Any]:
        p = self.products.pop(product, None) or _product(product)
        self.products[product] = p
        while len(self.products) > MAX_PRODUCTS:
            self.products.popitem(last=False)
        return p

    def apply_event(self, ev: OnboardEvent) -> dict[str, Any]:
        p = self._get(ev.product)
        p["updated_ms"] = max(p["updated_ms"], ev.ts_ms)
        d = ev.detail
        if ev.type == "captured":
            p["captured"] = int(d.get("count") or 0)
            for fid in d.get("frame_ids") or []:
                p["captured_ids"][str(fid)] = None
            while len(p["captured_ids"]) > MAX_IDS:
                p["captured_ids"].popitem(last=False)
        elif ev.type == "capture_armed":
            p["armed"] = {"ts_ms": ev.ts_ms, "until_ms": d.get("until_ms"), "camera": d.get("camera"),
                          "reasons": d.get("reasons")}
        elif ev.type == "capture_refused":  # a quota, or a selection that could not be honoured
            p["refused"] = {"ts_ms": ev.ts_ms, "reason": d.get("reason"), "message": str(d.get("message") or "")[:300],
                            "frame_ids": [str(f) for f in (d.get("frame_ids") or [])[:50]]}
            for fid in p["refused"]["frame_ids"]:
                p["selected"].discard(fid)
        elif ev.type == "capture_select":
            p["selected"].update(str(f) for f in (d.get("frame_ids") or [])[:MAX_IDS])
        elif ev.run_id:
            run = p["runs"].pop(ev.run_id, None) or {"run_id": ev.run_id, "started_ms": ev.ts_ms, "steps": []}
            p["runs"][ev.run_id] = run
            if not any(s["type"] == ev.type and s["ts_ms"] == ev.ts_ms for s in run["steps"]):
                run["steps"].append(_step(ev))
            while len(p["runs"]) > MAX_RUNS:
                p["runs"].popitem(last=False)
        return self.product_view(ev.product)

    def apply_candidate(self, product: str | None, frame_id: str | None, camera: str | None, ts_ms: int) -> bool:
        """A DLQ'd ``unknown_product`` frame: selectable for capture. False without a usable product / id."""
        if not product or not frame_id or not is_safe_name(product):
            return False
        p = self._get(product)
        p["candidates"].pop(frame_id, None)
        p["candidates"][frame_id] = {"frame_id": frame_id, "camera": camera, "ts_ms": ts_ms}
        while len(p["candidates"]) > MAX_CANDIDATES:
            p["candidates"].popitem(last=False)
        return True

    @staticmethod
    def _run_view(run: dict[str, Any]) -> dict[str, Any]:
        """Each step ``done`` / ``active`` (under way) / ``pending`` / ``failed`` / ``skipped``; a rollback or
        refusal takes the place of ``promoted``."""
        types = [s["type"] for s in run["steps"]]
        final = next((t for t in reversed(types) if t in FINAL), None)
        states = [{"step": name, "state": "done" if name in types else "pending"} for name in STEPS]
        if final in ("rolled_back", "refused"):
            states[-1] = {"step": final, "state": "failed"}
        nxt = next((s for s in states if s["state"] == "pending"), None)
        if nxt is not None:
            nxt["state"] = "failed" if final == "failed" else "active" if final is None else "skipped"
        for s in states:
            if s["state"] == "pending" and final is not None:
                s["state"] = "skipped"
        return {**run, "steps": list(run["steps"]), "progress": states, "outcome": final}

    def product_view(self, product: str, runner: dict[str, Any] | None = None) -> dict[str, Any]:
        p = self.products[product]
        cands = [{**c, "captured": c["frame_id"] in p["captured_ids"], "selected": c["frame_id"] in p["selected"]}
                 for c in reversed(p["candidates"].values())]
        runs = [self._run_view(r) for r in reversed(p["runs"].values())]
        return {"product": product, "captured": p["captured"], "armed": p["armed"], "updated_ms": p["updated_ms"],
                "candidates": cands, "runs": runs, "runner": runner, "refused": p["refused"]}

    def view(self, runner: OnboardRunner | None = None) -> list[dict[str, Any]]:
        return [self.product_view(name, runner.status(name) if runner else None)
                for name in sorted(self.products, key=lambda n: -self.products[n]["updated_ms"])]


class RunnerRefused(Exception):
    """The Onboard action cannot start now (``status``: the HTTP status to answer)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OnboardRunner:
    """``linewatch onboard`` children, at most one local run (or four k8s runs) at a time."""

    def __init__(self, settings: Settings, bootstrap: str, on_change: Callable[[str, dict[str, Any]], None]
                 | None = None):
        self.s, self.bootstrap, self.on_change = settings, bootstrap, on_change
        self.mode = settings.console_onboard_runner
        self.limit = 1 if self.mode == "local" else 4
        self.runs: dict[str, dict[str, Any]] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task] = set()

    def argv(self, product: str, detector: str) -> list[str]:
        argv = [sys.executable, "-m", "stream.ops.cli", "onboard", "--product", product, "--detector", detector,
                "--wait", "--bootstrap", self.bootstrap]
        if self.mode == "k8s":
            argv.append("--k8s")
        return argv + (["--", *self.s.console_onboard_args] if self.s.console_onboard_args else [])

    def status(self, product: str) -> dict[str, Any] | None:
        r = self.runs.get(product)
        return None if r is None else {**r, "output": list(r["output"])}

    def running(self) -> list[str]:
        return [p for p, r in self.runs.items() if r["rc"] is None]

    async def start(self, product: str, detector: str) -> dict[str, Any]:
        if self.mode == "off":
            raise RunnerRefused(403, "onboarding from the console is off (console_onboard_runner = off): "
                                     "run `linewatch onboard --product P` instead")
        if not is_safe_name(product):
            raise RunnerRefused(400, "product must be a safe name (letters, digits, . _ -)")
        if detector not in detector_names():
            raise RunnerRefused(400, f"detector must be one of {', '.join(detector_names())}")
        if product in self.running():
            raise RunnerRefused(409, f"an onboarding run of {product} is already running")
        if len(self.running()) >= self.limit:
            raise RunnerRefused(409, f"{len(self.running())} onboarding run(s) in progress "
                                     f"({self.mode} runner: {self.limit} at a time); try again when it ends")
        argv = self.argv(product, detector)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        self.runs[product] = {"product": product, "detector": detector, "mode": self.mode, "pid": proc.pid,
                              "started_ms": int(time.time() * 1000), "rc": None, "ended_ms": None,
                              "output": deque(maxlen=40), "progress": None, "bytes": 0}
        self._procs[product] = proc
        log.info("console_onboard_started", product=product, detector=detector, pid=proc.pid, runner=self.mode)
        task = asyncio.ensure_future(self._follow(product, proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._emit(product)
        return self.status(product)

    def _emit(self, product: str) -> None:
        if self.on_change is not None:
            st = self.status(product)
            self.on_change("onboard_runner", {k: v for k, v in st.items() if k != "output"} if st else {})

    async def _follow(self, product: str, proc: asyncio.subprocess.Process) -> None:
        """Read the child's output in chunks (never lines: tqdm's ``\\r`` progress has no newline and one
        "line" can pass any limit), split on ``\\r`` and ``\\n`` with a bounded tail: ``\\n``-ended text
        is an output line, ``\\r``-ended text a progress update (the newest kept, announced at most once a
        second). The exit code is recorded whatever happens to the reader (a reader that fails kills the
        child rather than leave it blocked on a full pipe)."""
        run = self.runs[product]
        assert proc.stdout is not None
        tail, last_emit = b"", 0.0
        try:
            while chunk := await proc.stdout.read(READ_CHUNK):
                run["bytes"] += len(chunk)
                parts = _SEP.split(tail + chunk)
                tail = parts.pop()
                for seg, sep in zip(parts[0::2], parts[1::2], strict=True):
                    self._segment(run, seg, progress=sep == b"\r")
                if len(tail) > MAX_TAIL:  # a "line" that never ends: shown cut, not kept growing
                    self._segment(run, tail, progress=False)
                    tail = b""
                if run["progress"] is not None and time.monotonic() - last_emit >= 1.0:
                    last_emit = time.monotonic()
                    self._progress(product, run)
            if tail:
                self._segment(run, tail, progress=False)
        except Exception as e:  # noqa: BLE001 - the exit code below must be recorded whatever failed here
            log.error("console_onboard_reader_failed", product=product, error=f"{type(e).__name__}: {e}"[:300])
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            run["rc"] = await proc.wait()
            run["ended_ms"] = int(time.time() * 1000)
            self._procs.pop(product, None)
            if run["progress"] is not None:
                self._progress(product, run)
            log.info("console_onboard_ended", product=product, rc=run["rc"], output_bytes=run["bytes"])
            self._emit(product)

    @staticmethod
    def _segment(run: dict[str, Any], raw: bytes, *, progress: bool) -> None:
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return
        if progress:
            p = run["progress"] or {"updates": 0}
            run["progress"] = {"text": text[:200], "updates": p["updates"] + 1, "ts_ms": int(time.time() * 1000)}
        else:
            run["output"].append(text[:400])

    def _progress(self, product: str, run: dict[str, Any]) -> None:
        """A structured progress event: one JSON log line, and an SSE ``onboard_progress`` without the text (the
        child's output is for token holders: the page reloads it from /api/onboarding)."""
        log.info("console_onboard_progress", product=product, **run["progress"])
        if self.on_change is not None:
            self.on_change("onboard_progress", {"product": product, "updates": run["progress"]["updates"],
                                                "ts_ms": run["progress"]["ts_ms"]})

    async def stop(self) -> None:
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for task in list(self._tasks):
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except (TimeoutError, asyncio.CancelledError):
                for proc in list(self._procs.values()):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                task.cancel()
