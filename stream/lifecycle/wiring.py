"""Wire the adapter lifecycle into the worker's Faust app (stream/worker/app.py): the rollout agent on
``model-events``, a ``/rollout`` page and the per-batch :class:`stream.lifecycle.hooks.Lifecycle` hook
(shadow traffic + drift alerts). Options: ``settings.rollout`` and ``settings.drift`` (contracts.config)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from contracts.artifact import Artifact
from contracts.model_events import ModelEvent
from stream.lifecycle.controller import RolloutController
from stream.lifecycle.events import actionable
from stream.lifecycle.hooks import DriftHook, Lifecycle
from stream.lifecycle.policy import HealthPolicy
from stream.worker.config import WorkerConfig


def register(app: Any, cfg: WorkerConfig, pipeline_getter: Callable[[], Awaitable[Any]],
             repository: str | Path | None = None) -> Lifecycle:
    s = cfg.settings
    events_t = app.topic(s.topic_model_events, key_serializer="raw", value_serializer="raw")
    drift_t = app.topic(s.topic_drift, key_serializer="raw", value_serializer="raw")
    ctl = None
    if s.rollout.enabled:
        ctl = _rollout_agent(app, cfg, events_t, pipeline_getter, Path(repository or s.model_repository))
    drift = DriftHook.from_settings(s.drift) if s.drift.enabled else None
    return Lifecycle(ctl, drift, drift_t, events_t, retrain_on_ood=s.drift.retrain_on_ood)


def _rollout_agent(app: Any, cfg: WorkerConfig, events_t: Any, pipeline_getter: Callable[[], Awaitable[Any]],
                   repository: Path) -> RolloutController:
    s = cfg.settings

    async def publish(ev: ModelEvent) -> None:
        fut = await events_t.send(key=ev.key, value=ev.to_json(), force=True)
        await fut

    key = s.triton_control_key.get_secret_value() if s.triton_control_key else None
    ctl = RolloutController(s.triton_grpc_url, repository, publish, HealthPolicy.from_settings(s.rollout),
                            control_key=key)

    async def route_new_product(art: Artifact) -> None:
        p = await pipeline_getter()
        if art.product and art.detector != "moleflow":
            p.router.config.products[art.product] = art.model
        await p.refresh_models()

    ctl.on_promoted.append(route_new_product)

    @app.agent(events_t, name=f"{s.app_id}-rollout")
    async def rollout_agent(stream):
        async for value in stream:
            ev = actionable(value)
            if ev is not None:
                # in the background: frames keep flowing (and feed the shadow window) meanwhile
                asyncio.ensure_future(ctl.handle_safely(ev))

    @app.page("/rollout")
    async def rollout_page(web, request):
        return web.json(ctl.status())

    return ctl
