"""Frame -> (Triton model, task) routing.

Resolution order for the product: the frame's ``product`` header, else ``cameras[camera_id]``,
else ``lines[line_id]``. Then the model:

1. ``products[product]`` if configured and loaded in Triton (explicit model name);
2. ``<efficientad_prefix><product>`` (e.g. ``efficientad_bottle``) if loaded;
3. the MoLE-Flow model with ``task=product`` if it is loaded and knows that task;
4. the MoLE-Flow model task-agnostic (empty task, its prototype router decides) if loaded;
5. otherwise :class:`~contracts.envelope.EnvelopeError` ``unknown_product`` (-> DLQ).

A frame's explicit ``task`` header is passed to MoLE-Flow as-is when routed there.

Configuration (JSON file or dict)::

    {"cameras": {"cam-1": "bottle"}, "lines": {"line-a": "bottle"},
     "products": {"bottle": "efficientad_bottle"},
     "moleflow_model": "moleflow", "efficientad_prefix": "efficientad_"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from contracts.artifact import CANDIDATE_SUFFIX
from contracts.envelope import EnvelopeError, Frame


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
    moleflow_model: str = "moleflow"
    efficientad_prefix: str = "efficientad_"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingConfig:
        unknown = set(d) - {"cameras", "lines", "products", "moleflow_model", "efficientad_prefix"}
        if unknown:
            raise ValueError(f"routing config: unknown keys {sorted(unknown)}")
        for k in ("cameras", "lines", "products"):
            v = d.get(k, {})
            if not isinstance(v, Mapping) or not all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
                raise ValueError(f"routing config: '{k}' must map strings to strings")
        return cls(cameras=dict(d.get("cameras", {})), lines=dict(d.get("lines", {})),
                   products=dict(d.get("products", {})),
                   moleflow_model=str(d.get("moleflow_model", "moleflow")),
                   efficientad_prefix=str(d.get("efficientad_prefix", "efficientad_")))

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
        c = self.config
        product = self.product_of(frame)
        mf = c.moleflow_model
        if product:
            explicit = c.products.get(product)
            if explicit and explicit in self.available:
                if explicit == mf or self.available[explicit]:  # a MoLE-Flow model: pick the product's adapter
                    task = frame.task or (product if product in self.available[explicit] else "")
                    return Route(explicit, task, product, routed=not task)
                return Route(explicit, frame.task or "", product, routed=False)
            ead = f"{c.efficientad_prefix}{product}"
            if ead in self.available:
                return Route(ead, "", product, routed=False)
            if mf in self.available and product in self.available[mf]:
                return Route(mf, frame.task or product, product, routed=False)
            # any other MoLE-Flow model (it reports its tasks) with an adapter for this product; derived from
            # Triton's loaded models, so every worker replica agrees without sharing state. Rollout
            # candidates never take live decisions.
            for name, tasks in sorted(self.available.items()):
                if product in tasks and not name.endswith(CANDIDATE_SUFFIX):
                    return Route(name, frame.task or product, product, routed=False)
        if mf in self.available:
            task = frame.task if (frame.task and frame.task in self.available[mf]) else ""
            return Route(mf, task, product, routed=not task)
        why = f"product '{product}'" if product else f"camera '{frame.camera_id}' / line '{frame.line_id}' (no product)"
        raise EnvelopeError("unknown_product", f"no loaded model for {why}; loaded: {sorted(self.available) or 'none'}")
