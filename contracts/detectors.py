"""The detector registry: what every layer knows about a detector without importing ``models`` (no torch).

One line per detector in :data:`DETECTORS`. Adding a detector = its own package under ``models/``
(implementing ``models.detector.Detector``) + ONE line here. The stream side reads model naming from
here (stream/inference/routing.py), the models side resolves ``implementation`` lazily
(models/registry.py), the demo and the train job go through both.

Model naming (Triton model names):

* ``per_product``: one model per product, ``model`` is a template with ``{product}``
  (EfficientAD: ``efficientad_bottle``); the model has no tasks.
* ``multi_task``: ONE model whose tasks are products (MoLE-Flow: ``moleflow`` with a task adapter per
  product); ``model`` is its default name, requests name the task (or let the model route).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Naming = Literal["per_product", "multi_task"]


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    naming: Naming
    model: str  # per_product: template with "{product}"; multi_task: the one model's default name
    implementation: str  # "module:attribute" of the models-side implementation (models.detector.Detector)

    def __post_init__(self) -> None:
        if self.naming == "per_product" and "{product}" not in self.model:
            raise ValueError(f"detector {self.name}: per_product model template needs '{{product}}'")
        if ":" not in self.implementation:
            raise ValueError(f"detector {self.name}: implementation must be 'module:attribute'")

    @property
    def multi_task(self) -> bool:
        return self.naming == "multi_task"

    def model_name(self, product: str | None = None, model: str | None = None) -> str:
        """Triton model name for ``product`` (``model``: an overriding template / name, e.g. from routing)."""
        m = model or self.model
        if self.multi_task:
            return m
        if not product:
            raise ValueError(f"detector {self.name}: a per-product model name needs a product")
        if "{product}" not in m:
            raise ValueError(f"detector {self.name}: model template {m!r} lacks '{{product}}'")
        return m.format(product=product)

    def product_of(self, model_name: str, model: str | None = None) -> str | None:
        """The product a per-product model name stands for (None: not this detector's name / multi_task)."""
        m = model or self.model
        if self.multi_task:
            return None
        head, _, tail = m.partition("{product}")
        if len(model_name) > len(head) + len(tail) and model_name.startswith(head) and model_name.endswith(tail):
            return model_name[len(head): len(model_name) - len(tail)]
        return None

    def task_of(self, product: str) -> str | None:
        """The task a product is served as (multi_task: the product; per_product: none)."""
        return product if self.multi_task else None


# Order matters only where a default is needed: the first entry is the train job's default detector and
# the demo's first choice. Routing prefers per-product models over multi-task ones whatever the order.
DETECTORS: dict[str, DetectorInfo] = {d.name: d for d in (
    DetectorInfo("moleflow", "multi_task", "moleflow", "models.moleflow.detector:DETECTOR"),
    DetectorInfo("efficientad", "per_product", "efficientad_{product}", "models.efficientad.detector:DETECTOR"),
)}


def detector_info(name: str) -> DetectorInfo:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; registered: {', '.join(DETECTORS)}") from None


def detector_names() -> list[str]:
    return list(DETECTORS)
