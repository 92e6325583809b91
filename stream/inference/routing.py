"""Frame -> (Triton model, task) routing.

Resolution order for the product: the frame's ``product`` header, else ``cameras[camera_id]``,
else ``lines[line_id]``. Then the model:

1. ``products[product]`` if configured and loaded in Triton (explicit model name);
2. a per-product detector's model for the product (e.g. ``efficientad_bottle``) if loaded;
3. a multi-task detector's model (e.g. ``moleflow``) with ``task=product`` if loaded and it knows that task;
4. any other loaded model that reports the product as a task (never a rollout candidate);
5. a multi-task detector's model task-agnostic (empty task, the model's router decides) if loaded;
6. otherwise :class:`~contracts.envelope.EnvelopeError` ``unknown_product`` (-> DLQ).

A rollout candidate (``<model>__candidate``, contracts.names) never takes a live decision: a frame whose
``product`` or ``task`` header (or the product its camera/line maps to) names one is ``bad_header``
(-> DLQ), and a routing config naming one is rejected at startup.

Model names come from the detector registry (contracts/detectors.py), in its order;
``detector_models`` overrides a detector's name (multi-task) or template (per-product, with
``{product}``). A frame's explicit ``task`` header is passed to a multi-task model as-is.

Configuration (JSON file or dict)::

    {"cameras": {"cam-1": "bottle"}, "lines": {"line-a": "bottle"},
     "products": {"bottle": "efficientad_bottle"},
     "detector_models": {"moleflow": "line7_moleflow"}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from contracts.artifact import CANDIDATE_SUFFIX
from contracts.detectors import DETECTORS, DetectorInfo
from contracts.envelope import EnvelopeError, Frame
from contracts.names import is_candidate

_MAPS = ("cameras", "lines", "products", "detector_models")


@dataclass(frozen=True)
class Route:
    model: str
    task: str  # "" = task-agnostic (MoLE-Flow routes itself)
    product: str | None
    routed: bool  # True when the model (not the frame/config) chooses the task


@dataclass
class RoutingConfig:
    cameras: dict[str, str] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)
    products: dict[str, str] = field(default_factory=dict)
    detector_models: dict[str, str] = field(default_factory=dict)  # detector -> model name / template

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingConfig:
        unknown = set(d) - set(_MAPS)
        if unknown:
            raise ValueError(f"routing config: unknown keys {sorted(unknown)}")
        for k in _MAPS:
            v = d.get(k, {})
            if not isinstance(v, Mapping) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
                raise ValueError(f"routing config: '{k}' must map strings to strings")
        for k in _MAPS:
            for a, b in d.get(k, {}).items():
                if is_candidate(a) or (k != "detector_models" and is_candidate(b)) or \
                        (k == "detector_models" and CANDIDATE_SUFFIX in b):
                    raise ValueError(f"routing config: '{k}' names a rollout candidate ({a!r}: {b!r}); "
                                     f"candidates ({CANDIDATE_SUFFIX}) are never routed")
        cfg = cls(**{k: dict(d.get(k, {})) for k in _MAPS})
        for det, model in cfg.detector_models.items():
            if det not in DETECTORS:
                raise ValueError(f"routing config: detector_models: unknown detector {det!r}; "
                                 f"registered: {sorted(DETECTORS)}")
            if not DETECTORS[det].multi_task and "{product}" not in model:
                raise ValueError(f"routing config: detector_models.{det} must contain '{{product}}'")
        return cfg

    def model_of(self, det: DetectorInfo, product: str | None = None) -> str:
        return det.model_name(product, self.detector_models.get(det.name))

    def multi_task_models(self) -> list[str]:
        return [self.model_of(d) for d in DETECTORS.values() if d.multi_task]

    @classmethod
    def load(cls, source: str | os.PathLike | Mapping[str, Any] | None) -> RoutingConfig:
        """From a dict, a JSON file path, an inline JSON string, or None (empty)."""
        if source is None or source == "":
            return cls()
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        s = str(source).strip()
        if s.startswith("{"):
            return cls.from_dict(orjson.loads(s))
        p = Path(s)
        if not p.is_file():
            raise ValueError(f"routing config file {p} does not exist")
        return cls.from_dict(orjson.loads(p.read_bytes()))


class Router:
    """Stateless apart from the set of loaded models and MoLE-Flow's tasks, refreshed by the worker."""

    def __init__(self, config: RoutingConfig, available: Mapping[str, tuple[str, ...]] | set[str] | None = None):
        self.config = config
        self.available: dict[str, tuple[str, ...]] = {}
        self.update_models(available or {})

    def update_models(self, available: Mapping[str, tuple[str, ...]] | set[str]) -> None:
        """``available``: loaded model names -> tasks they know (MoLE-Flow) or ()."""
        if isinstance(available, Mapping):
            self.available = {k: tuple(v or ()) for k, v in available.items()}
        else:
            self.available = {k: () for k in available}

    def product_of(self, frame: Frame) -> str | None:
        c = self.config
        return frame.product or c.cameras.get(frame.camera_id) or (c.lines.get(frame.line_id) if frame.line_id else None)

    def route(self, frame: Frame) -> Route:
        product = self.product_of(frame)
        for what, v in (("product", product), ("task", frame.task)):
            if v and CANDIDATE_SUFFIX in v:
                raise EnvelopeError("bad_header", f"frame {what} {v[:80]!r} names a rollout candidate "
                                                  f"({CANDIDATE_SUFFIX}); candidates never take live decisions")
        r = self._route(frame, product)
        if is_candidate(r.model):  # defence in depth: no path above may pick one
            raise EnvelopeError("unknown_product", f"route for {product!r} resolved to candidate {r.model!r}")
        return r

    def _route(self, frame: Frame, product: str | None) -> Route:
        c = self.config
        multi = c.multi_task_models()
        if product:
            explicit = c.products.get(product)
            if explicit and explicit in self.available:
                if explicit in multi or self.available[explicit]:  # a multi-task model: pick the product's task
                    task = frame.task or (product if product in self.available[explicit] else "")
                    return Route(explicit, task, product, routed=not task)
                return Route(explicit, frame.task or "", product, routed=False)
            for det in DETECTORS.values():
                if not det.multi_task and (name := c.model_of(det, product)) in self.available:
                    return Route(name, "", product, routed=False)
            for name in multi:
                if name in self.available and product in self.available[name]:
                    return Route(name, frame.task or product, product, routed=False)
            # any other multi-task model (it reports its tasks) with a task for this product; derived from
            # Triton's loaded models, so every worker replica agrees without sharing state. Rollout
            # candidates never take live decisions.
            for name, tasks in sorted(self.available.items()):
                if product in tasks and not name.endswith(CANDIDATE_SUFFIX):
                    return Route(name, frame.task or product, product, routed=False)
        for name in multi:
            if name in self.available:
                task = frame.task if (frame.task and frame.task in self.available[name]) else ""
                return Route(name, task, product, routed=not task)
        why = f"product '{product}'" if product else f"camera '{frame.camera_id}' / line '{frame.line_id}' (no product)"
        raise EnvelopeError("unknown_product", f"no loaded model for {why}; loaded: {sorted(self.available) or 'none'}")
