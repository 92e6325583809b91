"""The rollout controller's Triton replicas (stream/lifecycle/controller.py): gRPC clients, what a replica serves
now, and model control (load / unload / reconcile) on every replica, with the control key
(contracts/triton_control.py). Every replica shares the model repository; reads go to the first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from contracts.logs import get_logger
from contracts.names import is_candidate
from stream.lifecycle.lease import LeaseLost

log = get_logger("stream.lifecycle.controller")

CONTROL_TIMEOUT_S = 10.0  # one model-control or readiness call to a replica (a hung replica never stalls a pass)


class TritonReplicas:
    """Mixed into RolloutController, which sets ``urls``, ``_clients``, ``headers``, ``policy`` and ``fence``."""

    @property
    def url(self) -> str:
        return self.urls[0]

    def set_replicas(self, urls: list[str]) -> None:
        """The Triton replicas (gRPC host:port) model control reaches; reads go to the first."""
        if not urls:
            raise ValueError("the rollout controller needs at least one Triton replica")
        self.urls = list(dict.fromkeys(urls))

    def client(self, url: str | None = None):
        url = url or self.url
        if url not in self._clients:
            import tritonclient.grpc.aio as grpcclient

            self._clients[url] = grpcclient.InferenceServerClient(url=url)
        return self._clients[url]

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.close()

    async def serving_spec(self, model: str) -> tuple[dict[str, Any] | None, int | None]:
        """(linewatch_spec, version) Triton serves for ``model`` now, or (None, None)."""
        c = self.client()
        try:
            if not await c.is_model_ready(model):
                return None, None
            cfg = (await c.get_model_config(model, as_json=True))["config"]
            meta = await c.get_model_metadata(model, as_json=True)
        except Exception:  # not loaded / unknown
            return None, None
        raw = cfg.get("parameters", {}).get("linewatch_spec", {}).get("string_value")
        versions = [int(v) for v in meta.get("versions", []) if str(v).isdigit()]
        spec = orjson.loads(raw) if raw else None
        return spec, (max(versions) if versions else (int(spec.get("version")) if spec else None))

    async def claims(self, exclude: str) -> dict[str, str]:
        """{product or task: model} over the READY models Triton serves now, except ``exclude`` and candidates."""
        c = self.client()
        idx = await c.get_model_repository_index(as_json=True, headers=self.headers)
        out: dict[str, str] = {}
        for m in idx.get("models", []):
            name = m.get("name", "")
            if m.get("state") != "READY" or name == exclude or is_candidate(name):
                continue
            spec, _ = await self.serving_spec(name)
            for k in _claimed(spec or {}):
                out.setdefault(k, name)
        return out

    async def _load(self, name: str, version: int | None = None) -> None:
        """Load ``name`` on every replica and wait until each serves ``version`` (all at once)."""
        await asyncio.gather(*(self._load_on(u, name, version) for u in self.urls))

    async def _load_on(self, url: str, name: str, version: int | None) -> None:
        self.fence()  # another controller holds the lease: no model control from this one (lease.py)
        c = self.client(url)
        await c.load_model(name, headers=self.headers, client_timeout=self.policy.load_timeout_s)
        t0 = time.monotonic()
        while True:
            try:
                if await c.is_model_ready(name, str(version) if version else "", client_timeout=CONTROL_TIMEOUT_S):
                    return
            except Exception:
                pass
            if time.monotonic() - t0 > self.policy.load_timeout_s:
                raise TimeoutError(f"{name} v{version} not ready on {url} after {self.policy.load_timeout_s}s")
            await asyncio.sleep(0.2)

    async def _unload(self, name: str) -> None:
        for u in self.urls:
            self.fence()
            try:
                await self.client(u).unload_model(name, headers=self.headers)
            except Exception as e:
                log.warning("rollout_unload_failed", model=name, replica=u, error=str(e)[:200])

    async def ensure_serving(self, model: str, version: int) -> list[str]:
        """Reconcile: load ``model`` on each replica that does not serve ``version`` (a restarted Triton
        in explicit mode serves nothing). Returns the replicas it loaded it on."""
        fixed = []
        for u in self.urls:
            try:
                if await self.client(u).is_model_ready(model, str(version), client_timeout=CONTROL_TIMEOUT_S):
                    continue
                await asyncio.wait_for(self._load_on(u, model, version), self.policy.load_timeout_s + CONTROL_TIMEOUT_S)
                fixed.append(u)
            except LeaseLost:
                raise
            except Exception as e:  # that replica is down: the next pass retries, on a fresh channel
                log.warning("reconcile_failed", model=model, version=version, replica=u,
                            error=f"{type(e).__name__}: {e}"[:200])
                await self._drop_client(u)
        return fixed

    async def _drop_client(self, url: str) -> None:
        """Forget ``url``'s gRPC channel: a replica that was killed and restarted (a replacement pod on the
        same address) is reached on a new connection, not one stuck in the old channel's reconnect backoff."""
        c = self._clients.pop(url, None)
        if c is not None:
            try:
                await c.close()
            except Exception:  # closing a broken channel
                pass


def _claimed(spec: dict[str, Any]) -> set[str]:
    """Products and tasks a spec serves (its product; a multi-task model's tasks)."""
    tasks = spec.get("tasks") or {}
    return ({spec["product"]} if spec.get("product") else set()) | set(tasks if isinstance(tasks, dict | list) else ())
