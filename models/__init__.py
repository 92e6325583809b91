"""linewatch's detectors (training, export, Triton serving) and their Python API.

``from models import Detector``: load an exported version and predict on an image (models/api.py).
Resolved on first use, so ``import models.<submodule>`` (every Triton model.py, the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.api import Detector, Prediction

__all__ = ["Detector", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from models import api

        return getattr(api, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
