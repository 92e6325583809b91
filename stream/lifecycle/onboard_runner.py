"""``linewatch onboard --product P``: captured images -> training job -> ``released`` -> the rollout's outcome.

1. **images**: ``<capture_dir>/<P>/good`` (stream/lifecycle/onboarding.py) must hold ``--min-images``
   (``--capture-wait S`` waits for the capture service that long; else exit 2).
2. **model**: a multi-task detector (MoLE-Flow) adds the product as a task of the model that serves its
   other tasks: ``--model``, else the one model of that detector in the serving state, else the registry's
   name; its training store (frozen base + adapters) is ``<onboard_training_store>/<detector>`` and must
   exist when that model already serves. A per-product detector trains a new model. A product the serving
   state already routes is refused (tasks are immutable: exit 2).
3. **training**, locally: a subprocess ``linewatch-models job train --detector D --product P --train-dir
   <good> --store <onboard_model_store> --model M [--base-store ...] --bootstrap B --topic <model-events>
   [-- extra]`` (models/jobs/train_job.py: train, export, calibrate, publish ``released``). With ``--k8s``
   the cluster runs it: :func:`render_job` fills k8s/train/train-job.yaml with the product (Job
   ``linewatch-train-<product>-<run>``, args instead of the params ConfigMap, the train image of the
   kustomization) and ``kubectl apply -f -`` creates it (``--dry-run``: print only, no cluster needed);
   its ``released`` is then read from ``model-events``. The Job reads ``<capture_dir>/<P>/good`` as this
   command's settings name it: run it with ``LINEWATCH_CAPTURE_DIR`` / ``LINEWATCH_ONBOARD_MODEL_STORE``
   set to the paths inside the Job (the model store volume is mounted at ``/models``: ``/models/datasets``,
   ``/models/store``); without the capture volume here, the image count is the last ``captured`` record.
4. **outcome** (``--wait``): the controller's ``promoted`` / ``rolled_back`` / ``refused`` of that version.

Each step is published on ``topic_onboarding`` as an ``OnboardEvent`` sharing one ``run_id``
(``onboard_started``, ``training_started``, ``training_finished``, ``released``, then the outcome, or
``failed`` with the step). Exit: 0 released (promoted with ``--wait``); 1 a failed job, a rollback, a
refusal or a timeout; 2 usage / not enough images.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from contracts.cli import RuntimeFailure, UsageError
from contracts.config import REPO_ROOT, Settings
from contracts.detectors import detector_info
from contracts.logs import get_logger
from contracts.names import check_name
from stream.lifecycle.onboarding import CaptureStore, OnboardEvent

log = get_logger("stream.lifecycle.onboard_runner")

JOB_TEMPLATE = REPO_ROOT / "k8s" / "train" / "train-job.yaml"
OUTCOMES = ("promoted", "rolled_back", "refused")


# ----------------------------------------------------------------------------- the k8s Job (pure text)


def job_name(product: str, run: str = "") -> str:
    """A DNS-1123 Job name (<= 63) for ``product``: lowercase, a digest suffix when the product had to change,
    and ``run`` (a Job is immutable: each onboarding run creates its own)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", product.lower()).strip("-")[:32].strip("-") or "x"
    if slug != product:
        slug = f"{slug}-{hashlib.sha256(product.encode()).hexdigest()[:6]}"
    return f"linewatch-train-{slug}" + (f"-{run[:6]}" if run else "")


def train_image(kustomization: Path) -> str | None:
    """``newName:newTag`` of the train image in k8s/train/kustomization.yaml (None if absent)."""
    if not kustomization.is_file():
        return None
    text = kustomization.read_text()
    name, tag = re.search(r"newName:\s*(\S+)", text), re.search(r"newTag:\s*(\S+)", text)
    return f"{name.group(1)}:{tag.group(1)}" if name and tag else (name.group(1) if name else None)


def render_job(template: str, *, product: str, detector: str, train_dir: str, model: str | None = None,
               image: str | None = None, namespace: str = "linewatch", run: str = "") -> str:
    """k8s/train/train-job.yaml for one product: the Job's name, its args filled in (no params ConfigMap),
    ``--model`` when given, the image and namespace kustomize would set. Text in, text out (no YAML library
    in the worker image); tests/unit/test_camera.py parses the result."""
    check_name(product, "product")
    out = template.replace("name: linewatch-train-adapter", f"name: {job_name(product, run)}\n  namespace: {namespace}", 1)
    for var, value in (("TRAIN_DETECTOR", detector), ("TRAIN_PRODUCT", product), ("TRAIN_IMAGES", train_dir)):
        out = out.replace(f"$({var})", value)
    out = re.sub(r"^\s*- configMapRef: \{name: linewatch-train-params\}\n", "", out, flags=re.M)
    if model:
        m = re.search(r"^(\s*)- --base-store=.*$", out, re.M) or re.search(r"^(\s*)- --store=.*$", out, re.M)
        if m is None:
            raise ValueError("train Job template has no --store argument")
        out = out[:m.end()] + f"\n{m.group(1)}- --model={model}" + out[m.end():]
    if image:
        out = re.sub(r"^(\s*)image: linewatch/train\s*$", rf"\g<1>image: {image}", out, flags=re.M)
    if "$(TRAIN_" in out:
        raise ValueError("train Job template still has TRAIN_* references after rendering")
    return out


# ----------------------------------------------------------------------------- Kafka reads


async def serving_entries(boot: str, s: Settings) -> dict[str, Any]:
    """{product: ServingEntry} from the compacted serving-state topic (tombstones applied)."""
    from contracts.serving_state import decode_entry
    from stream.kafka.clients import read_topics

    recs = await read_topics(boot, [s.topic_serving_state], timeout_s=15, idle_s=1.0, settings=s)
    out: dict[str, Any] = {}
    for r in recs[s.topic_serving_state]:
        key = (r.key or b"").decode()
        try:
            e = decode_entry(r.value)
        except ValueError:
            continue
        if e is None:
            out.pop(key, None)
        else:
            out[e.product] = e
    return out


async def wait_model_event(boot: str, s: Settings, match, timeout_s: float):
    """The first ``model-events`` event for which ``match(event)`` is true, or None after ``timeout_s``."""
    from contracts.model_events import ModelEventError, decode
    from stream.kafka.clients import read_topics

    found: list = []

    def on_record(r) -> None:
        try:
            ev = decode(r.value)
        except ModelEventError:
            return
        if not found and match(ev):
            found.append(ev)

    await read_topics(boot, [s.topic_model_events], until=lambda _o: bool(found), timeout_s=timeout_s,
                      on_record=on_record, settings=s)
    return found[0] if found else None


# ----------------------------------------------------------------------------- the run


def models_cli() -> list[str]:
    """The training CLI (``linewatch-models``) of this environment."""
    exe = Path(sys.executable).with_name("linewatch-models")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("linewatch-models")
    if found:
        return [found]
    raise RuntimeFailure("linewatch-models (the training CLI, the [models] extra) is not installed here; "
                         "run the training in the cluster with --k8s")


class Onboarding:
    def __init__(self, a, s: Settings, boot: str):
        self.a, self.s, self.boot = a, s, boot
        self.product = check_name(a.product, "product")
        self.det = detector_info(a.detector)
        self.run_id = uuid.uuid4().hex
        self.store = CaptureStore(s.capture_dir)
        self.model_store = Path(a.store or s.onboard_model_store)
        self.base_store = Path(a.base_store) if a.base_store else Path(s.onboard_training_store) / self.det.name
        self.producer = None

    async def emit(self, type_: str, **detail) -> None:
        ev = OnboardEvent(type_, self.product, detail, run_id=self.run_id)
        await self.producer.send_many(self.s.topic_onboarding, [ev.record()])
        log.info("onboard_step", type=type_, product=self.product, run_id=self.run_id, detail=detail)

    async def images(self) -> int:
        """Captured images of the product: counted in good/, or (``--k8s`` from a machine without the
        capture volume) the count of its last ``captured`` record on the onboarding topic."""
        deadline = time.monotonic() + (self.a.capture_wait or 0)
        good = self.store.good_dir(self.product)
        while True:
            n = count_images(good) if good.is_dir() or not self.a.k8s else await self.captured_on_topic()
            if n >= self.a.min_images or time.monotonic() >= deadline:
                return n
            await asyncio.sleep(1.0)

    async def captured_on_topic(self) -> int:
        from stream.kafka.clients import read_topics
        from stream.lifecycle.onboarding import OnboardEventError, decode_event

        t = self.s.topic_onboarding
        n = 0
        for r in (await read_topics(self.boot, [t], timeout_s=15, idle_s=1.0, settings=self.s))[t]:
            try:
                ev = decode_event(r.value)
            except OnboardEventError:
                continue
            if ev.type == "captured" and ev.product == self.product:
                n = int(ev.detail.get("count") or 0)
        return n

    async def choose_model(self) -> str:
        if self.a.dry_run and self.a.model:  # printing a Job for a given model needs no broker
            return self.a.model
        entries = await serving_entries(self.boot, self.s)
        if self.product in entries:
            e = entries[self.product]
            raise UsageError(f"product {self.product} is already served by {e.model} v{e.version}")
        if not self.det.multi_task:
            return self.a.model or self.det.model_name(self.product)
        serving = sorted({e.model for e in entries.values() if e.detector == self.det.name})
        model = self.a.model or (serving[0] if len(serving) == 1 else None)
        if model is None and serving:
            raise UsageError(f"several {self.det.name} models serve ({', '.join(serving)}): pass --model")
        model = model or self.det.model_name(self.product)
        if model in serving and not self.a.k8s and not self.base_store.is_dir():
            raise UsageError(f"{model} serves now but its training store {self.base_store} is missing: the adapter "
                             "must be trained on the base it serves (--base-store)")
        return model

    def train_argv(self, model: str) -> list[str]:
        s, a = self.s, self.a
        argv = [*models_cli(), "job", "train", "--detector", self.det.name, "--product", self.product,
                "--train-dir", str(self.store.good_dir(self.product)), "--store", str(self.model_store),
                "--model", model, "--bootstrap", self.boot, "--topic", s.topic_model_events]
        if self.det.multi_task:
            argv += ["--base-store", str(self.base_store)]
        return argv + (["--", *a.extra] if a.extra else [])

    async def train_local(self, model: str) -> dict[str, Any]:
        argv = self.train_argv(model)
        await self.emit("training_started", runner="local", argv=argv)
        t0 = time.monotonic()

        def run() -> tuple[int, deque[str]]:
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            timer = threading.Timer(self.a.train_timeout, p.kill)  # a hung job: killed, exit 124 below
            timer.start()
            lines: deque[str] = deque(maxlen=200)  # the summary is among the last lines; a long job's output is not kept
            try:
                for line in p.stdout:  # echoed: the job's summary and the released event are JSON lines
                    sys.stdout.write(line)
                    lines.append(line)
                rc = p.wait()
            finally:
                timer.cancel()
            return (124 if rc == -9 else rc), lines

        rc, lines = await asyncio.to_thread(run)
        summary = next((d for d in map(_json_line, reversed(lines)) if d and "artifact" in d and "version" in d), {})
        await self.emit("training_finished", rc=rc, seconds=round(time.monotonic() - t0, 1),
                        **{k: summary.get(k) for k in ("artifact", "version", "sha256")})
        if rc != 0:
            why = "evaluation gate failed (artifact written, not released)" if rc == 3 else f"exit code {rc}"
            raise RuntimeFailure(f"training job failed: {why}")
        return summary

    async def train_k8s(self, model: str) -> int | None:
        a = self.a
        tpl = Path(a.job_template or JOB_TEMPLATE)
        if not tpl.is_file():
            raise FileNotFoundError(f"train Job template {tpl} not found")
        doc = render_job(tpl.read_text(), product=self.product, detector=self.det.name,
                         train_dir=str(self.store.good_dir(self.product)), model=model,
                         image=train_image(tpl.with_name("kustomization.yaml")), run=self.run_id)
        print(doc)
        if a.dry_run:
            return None
        if not shutil.which("kubectl"):
            raise RuntimeFailure("kubectl not found (use --dry-run to print the Job only)")
        await self.emit("training_started", runner="k8s", job=job_name(self.product, self.run_id))
        p = await asyncio.to_thread(subprocess.run, ["kubectl", "apply", "-f", "-"], input=doc, text=True,
                                    capture_output=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeFailure(f"kubectl apply failed: {' '.join(p.stderr.split())[:300]}")
        return 0

    def is_release(self, e, model: str, version: int | None, since_ms: int) -> bool:
        """``e`` is this run's ``released``: its version (the local job said which), else (k8s) the first
        release of the product's task / product of ``model`` since the run began."""
        if e.type != "released" or e.model != model:
            return False
        if version:
            return e.version == version
        task = self.det.task_of(self.product)
        return (e.task == task if task else e.product == self.product) and e.ts_ms >= since_ms

    async def run(self) -> int:
        from stream.kafka.clients import Producer, ensure_topics

        a, s = self.a, self.s
        n = await self.images()
        if n < a.min_images:
            raise UsageError(f"only {n} captured images of {self.product} in {self.store.good_dir(self.product)} "
                             f"(--min-images {a.min_images})")
        model = await self.choose_model()
        if a.k8s and a.dry_run:
            await self.train_k8s(model)
            return 0
        if s.dev_broker:
            await ensure_topics(self.boot, [s.topic_onboarding, s.topic_model_events], settings=s)
        self.producer = Producer(self.boot, settings=s)
        await self.producer.start()
        step = "training"
        try:
            t_start = int(time.time() * 1000)
            await self.emit("onboard_started", detector=self.det.name, model=model, images=n,
                            min_images=a.min_images, runner="k8s" if a.k8s else "local")
            summary = await self.train_k8s(model) if a.k8s else await self.train_local(model)
            step = "release"
            want = summary.get("version") if isinstance(summary, dict) else None
            rel = await wait_model_event(self.boot, s, lambda e: self.is_release(e, model, want, t_start),
                                         a.train_timeout if a.k8s else 60)
            if rel is None:
                raise RuntimeFailure(f"no released event of {model} for {self.product} on {s.topic_model_events}")
            await self.emit("released", model=model, version=rel.version, sha256=rel.sha256)
            print(f"released {model} v{rel.version} ({self.product})")
            if not a.wait:
                return 0
            step = "rollout"
            out = await wait_model_event(self.boot, s, lambda e: e.type in OUTCOMES and e.model == model
                                         and e.version == rel.version, a.timeout)
            if out is None:
                raise RuntimeFailure(f"no rollout outcome for {model} v{rel.version} within {a.timeout:.0f}s")
            await self.emit(out.type, model=model, version=out.version, reasons=out.reasons)
            why = f" ({'; '.join(out.reasons)})" if out.reasons else ""
            print(f"{out.type} {model} v{out.version} ({self.product}){why}")
            return 0 if out.type == "promoted" else 1
        except Exception as e:
            with contextlib.suppress(Exception):  # the broker itself may be what failed
                await self.emit("failed", step=step, error=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            await self.producer.stop()


def count_images(folder: Path) -> int:
    """Images the training job would read from ``folder`` (what an operator left in good/)."""
    from stream.sources.inputs import IMAGE_EXT

    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXT) if folder.is_dir() else 0


def _json_line(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        d = json.loads(line)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None
