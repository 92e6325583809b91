"""Async Triton gRPC client (one shared ``tritonclient.grpc.aio`` client per process).

- ``specs()``: READY models in the repository and their ``linewatch_spec`` (from the model
  config's ``parameters``, never hard-coded), cached and refreshed on demand; ``spec_for(model)``
  looks one up (a model seen READY before keeps its spec while it reloads), ``available()`` lists
  the routable models and their tasks.
- ``infer()``: one micro-batch for one model, split into chunks of the model's max_batch_size,
  retried (up to ``max_retries``, capped exponential backoff with equal jitter:
  :class:`contracts.backoff.Backoff`) on transient errors; then
  :class:`TransientInferError`. Permanent errors (bad input shape, unknown task) raise
  :class:`PermanentInferError` so the caller can DLQ those frames. Both carry the gRPC ``code``.
- Transient or permanent is decided by the gRPC **status code** only (:data:`TRANSIENT_CODES`:
  UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, NOT_FOUND = model not
  loaded), or a connection-level error; never by the error's text, which may echo a frame's own
  headers (MoLE-Flow: ``unknown task '<task>'``, INTERNAL).
- ``live()`` / ``health(model)``: is Triton reachable, is the model READY: the worker's circuit
  breaker and per-frame retry budget tell "Triton is down" from "this frame keeps failing".
- ``tasks_of(model)``: the tasks the model reports in its spec (MoLE-Flow), for validating ``task``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
import orjson
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from contracts.backoff import Backoff
from contracts.logs import get_logger
from contracts.spec import ModelSpec, model_input, parse_spec

log = get_logger("stream.triton")

# gRPC status codes worth retrying (Triton: server unreachable / overloaded / model not loaded yet)
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
                             "NOT_FOUND"})
PROBE_TIMEOUT_S = 2.0  # liveness / readiness probes


class InferError(RuntimeError):
    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # the gRPC status code name ("UNAVAILABLE"), None for a non-gRPC error


class TransientInferError(InferError):
    pass


class PermanentInferError(InferError):
    pass


def channel_args(url: str) -> list[tuple[str, int | str]] | None:
    """gRPC channel options for ``url``: a resolver target naming several replicas (``dns:///`` a headless
    Service, every pod address; ``ipv4:a:p,b:q``) gets round-robin load balancing, so one worker spreads its
    requests over every Triton replica instead of pinning one connection. A plain host:port: defaults."""
    if not url.startswith(("dns:", "ipv4:", "ipv6:")):
        return None
    return [("grpc.lb_policy_name", "round_robin"), ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1), ("grpc.dns_min_time_between_resolutions_ms", 5000)]


def status_code(exc: BaseException) -> str | None:
    """The gRPC status code name of a tritonclient / grpc error ("UNAVAILABLE"), else None."""
    if isinstance(exc, InferenceServerException):
        st = exc.status()
        return st.rpartition(".")[2] if st else None
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return getattr(code, "name", None)
    return None


def is_transient(exc: BaseException) -> bool:
    """Retry-worthy: a connection-level error or a transient gRPC status code (never the message text)."""
    if isinstance(exc, asyncio.TimeoutError | ConnectionError | OSError):
        return True
    return status_code(exc) in TRANSIENT_CODES


@dataclass
class InferOutput:
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W)
    tasks: list[str] | None  # MoLE-Flow: chosen task per item
    route_distance: np.ndarray | None  # (N,)
    infer_ms: float
    attempts: int
    versions: list[str] | None = None  # per item: the model version Triton says served it (the response's)


class TritonInfer:
    def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 6, backoff_s: float = 0.2,
                 backoff_max_s: float = 5.0, metrics=None):
        self.url = url
        self.client = grpcclient.InferenceServerClient(url=url, channel_args=channel_args(url))
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff = Backoff(backoff_s, backoff_max_s, "equal")
        self.metrics = metrics
        self._specs: dict[str, ModelSpec] = {}
        self.last_specs: dict[str, ModelSpec] = {}
        self._max_batch: dict[str, int] = {}
        self._inputs: dict[str, set[str]] = {}
        self._refreshed = 0.0
        # (model, version) -> spec: every version seen in Triton's config or announced by the serving state,
        # so a score is judged by the spec of the version that served it (not the newest one configured)
        self._versioned: dict[tuple[str, str], ModelSpec] = {}

    async def close(self) -> None:
        await self.client.close()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        t0 = time.monotonic()
        while True:
            try:
                if await self.client.is_server_live():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"Triton at {self.url} not live after {timeout_s}s")
            await asyncio.sleep(0.5)

    async def live(self) -> bool:
        """Is tritonserver reachable and live (a short probe; any error = no)? A failed probe also replaces
        the gRPC channel: one left behind by a stalled, killed or restarted server can keep failing (its
        reconnect backoff, a call hung on the dead connection) after the server is back."""
        try:
            return bool(await self.client.is_server_live(client_timeout=PROBE_TIMEOUT_S))
        except Exception as e:
            log.info("triton_live_probe_failed", url=self.url, error=f"{type(e).__name__}: {e}"[:200])
            await self._reconnect()
            return False

    async def _reconnect(self) -> None:
        old, self.client = self.client, grpcclient.InferenceServerClient(url=self.url, channel_args=channel_args(self.url))
        try:
            await old.close()
        except Exception:  # a broken channel
            pass

    async def health(self, model: str) -> str:
        """``"down"`` (Triton unreachable), ``"unready"`` (live, ``model`` not READY) or ``"ok"``."""
        if not await self.live():
            return "down"
        try:
            ready = await self.client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S)
        except Exception:
            ready = False
        return "ok" if ready else "unready"

    def tasks_of(self, model: str) -> tuple[str, ...] | None:
        """The tasks ``model`` reports in its spec (() for a single-task model); None: model unknown."""
        spec = self.spec_for(model)
        return None if spec is None else spec.tasks

    async def refresh(self) -> dict[str, ModelSpec]:
        """Reload the READY model list and their specs. Models without linewatch_spec are skipped."""
        # the statistics API lists the READY models and stays open to workers; the repository index is model
        # control, restricted to the rollout controller's key (contracts/triton_control.py)
        stats = await self.client.get_inference_statistics("", as_json=True)
        specs: dict[str, ModelSpec] = {}
        for name in sorted({m["name"] for m in stats.get("model_stats", []) if m.get("name")}):
            try:
                cfg = (await self.client.get_model_config(name, as_json=True))["config"]
                raw = cfg.get("parameters", {}).get("linewatch_spec", {}).get("string_value")
                if not raw:
                    log.warning("model_without_spec", model=name)
                    continue
                spec = parse_spec(raw)
                specs[name] = spec
                self._max_batch[name] = int(cfg.get("max_batch_size", 0) or 0)
                self._inputs[name] = {i["name"] for i in cfg.get("input", [])}
            except (InferenceServerException, ValueError, orjson.JSONDecodeError) as e:
                log.warning("model_spec_unreadable", model=name, error=str(e))
        self._specs = specs
        for name, spec in specs.items():
            self._versioned[(name, str(spec.version))] = spec
        self.last_specs.update(specs)  # every model ever seen: a reloading model keeps its spec
        self._refreshed = time.monotonic()
        return specs

    async def specs(self, max_age_s: float = 30.0) -> dict[str, ModelSpec]:
        if not self._specs or time.monotonic() - self._refreshed > max_age_s:
            try:
                await self.refresh()
            except Exception as e:  # keep serving with the last known specs
                if not (self._specs or self.last_specs):  # never reached Triton: nothing to fall back on
                    raise
                log.warning("model_refresh_failed", error=str(e)[:300])
        return self._specs

    def spec_for(self, model: str) -> ModelSpec | None:
        """The spec of ``model``: READY now, else the last one seen (reloading / Triton restarting), else None."""
        return self._specs.get(model) or self.last_specs.get(model)

    def add_spec(self, model: str, version: int | str, spec: ModelSpec) -> None:
        """A spec for ``model`` v``version`` from the serving state (stream/worker/serving.py); the model
        list is re-read on the next batch (a newly promoted model is READY now)."""
        self._versioned[(model, str(version))] = spec
        # the serving version's spec is this model's until Triton says otherwise: a worker started while Triton
        # is empty (restarted, reloading) preprocesses and routes by it (spec_for) instead of calling it unknown
        self.last_specs[model] = spec
        self._refreshed = 0.0

    def spec_at(self, model: str, version: str | None) -> ModelSpec | None:
        """The spec of the version that served (``version`` from the response); None when unknown."""
        if version:
            return self._versioned.get((model, str(version)))
        return self.spec_for(model)

    def available_specs(self) -> dict[str, ModelSpec]:
        """{model: spec} of the READY models, as of the last refresh."""
        return dict(self._specs)

    def ready_models(self) -> list[str]:
        """READY models with a spec, as of the last refresh."""
        return sorted(self._specs)

    def available(self, *, include_unready: bool = False) -> dict[str, tuple[str, ...]]:
        """{model: tasks} of the READY models (``include_unready``: every model seen READY before too)."""
        specs = {**self.last_specs, **self._specs} if include_unready else self._specs
        return {k: v.tasks for k, v in specs.items()}

    async def _infer_once(self, model: str, spec: ModelSpec, has_task: bool, batch: np.ndarray,
                          tasks: list[str] | None) -> tuple:
        batch = model_input(batch, spec)
        inp = grpcclient.InferInput(spec.input.name, list(batch.shape), spec.input.dtype)
        inp.set_data_from_numpy(batch)
        inputs = [inp]
        out_names = [spec.outputs.get("score", "score"), spec.outputs.get("anomaly_map", "anomaly_map")]
        if has_task:
            t = np.array([[(x or "").encode()] for x in (tasks or [""] * len(batch))], dtype=np.object_)
            ti = grpcclient.InferInput("task", list(t.shape), "BYTES")
            ti.set_data_from_numpy(t)
            inputs.append(ti)
            out_names += ["task", "route_distance"]
        outputs = [grpcclient.InferRequestedOutput(n) for n in out_names]
        res = await self.client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        served = str(res.get_response().model_version or "")
        scores = res.as_numpy(out_names[0]).reshape(len(batch), -1)[:, 0].astype(np.float32)
        amap = res.as_numpy(out_names[1])  # the model's native resolution; FP16 from UINT8 models
        amap = amap.reshape(len(batch), amap.shape[-2], amap.shape[-1]).astype(np.float32, copy=False)
        otasks = rdist = None
        if has_task:
            otasks = [(x.decode() if isinstance(x, bytes) else str(x)) for x in res.as_numpy("task").reshape(-1)]
            rdist = res.as_numpy("route_distance").reshape(-1).astype(np.float32)
        return scores, amap, otasks, rdist, served

    async def infer(self, model: str, batch: np.ndarray, tasks: list[str] | None = None) -> InferOutput:
        if model not in self._specs:
            try:
                await self.refresh()
            except Exception as e:  # Triton down/restarting: not the frames' fault, never DLQ them
                raise TransientInferError(f"model {model}: cannot list Triton's models: {type(e).__name__}: {e}",
                                          status_code(e) or "UNAVAILABLE") from e
            if model not in self._specs:
                raise TransientInferError(f"model {model} is not READY in Triton", "NOT_FOUND")
        spec = self._specs[model]  # captured: a concurrent refresh must not change it mid-request
        has_task = "task" in self._inputs.get(model, set())
        mb = self._max_batch.get(model, 0) or len(batch)
        parts = []
        t0 = time.perf_counter()
        attempts_total = 0
        for s in range(0, len(batch), mb):
            sub, subt = batch[s:s + mb], (tasks[s:s + mb] if tasks else None)
            attempt = 0
            while True:
                attempt += 1
                try:
                    parts.append(await self._infer_once(model, spec, has_task, sub, subt))
                    break
                except Exception as e:
                    if self.metrics is not None:
                        self.metrics.triton_errors.labels(model=model, kind="transient" if is_transient(e) else "permanent").inc()
                    if not is_transient(e):
                        raise PermanentInferError(f"{type(e).__name__}: {e}", status_code(e)) from e
                    if attempt > self.max_retries:
                        raise TransientInferError(f"{model}: {attempt} attempts failed, last: {e}",
                                                  status_code(e)) from e
                    delay = self.backoff.delay(attempt)
                    log.warning("triton_retry", model=model, attempt=attempt, delay_s=round(delay, 3), error=str(e)[:300])
                    await asyncio.sleep(delay)
            attempts_total += attempt
        scores = np.concatenate([p[0] for p in parts])
        maps = np.concatenate([p[1] for p in parts])
        tasks_o = sum((p[2] for p in parts), []) if parts[0][2] is not None else None
        rdist = np.concatenate([p[3] for p in parts]) if parts[0][3] is not None else None
        versions = [p[4] for p in parts for _ in range(len(p[0]))]
        if any(self.spec_at(model, v) is None for v in set(versions)):  # a version just loaded: read its spec
            try:
                await self.refresh()
            except Exception as e:
                log.warning("model_refresh_failed", error=str(e)[:300])
        return InferOutput(scores, maps, tasks_o, rdist, (time.perf_counter() - t0) * 1000, attempts_total, versions)
