"""Detectors by name: the entries of contracts/detectors.py resolved lazily to their implementations.

``get("efficientad")`` imports ``models.efficientad.detector`` on first use only (detector modules
import torch inside their methods, so resolving the registry is cheap).
"""

from __future__ import annotations

import functools
import importlib

from contracts.detectors import DETECTORS, detector_info
from models.detector import Detector


@functools.cache
def get(name: str) -> Detector:
    info = detector_info(name)
    module, _, attr = info.implementation.partition(":")
    det = getattr(importlib.import_module(module), attr)
    if not isinstance(det, Detector) or det.name != info.name:
        raise TypeError(f"{info.implementation} is not a models.detector.Detector named {info.name!r}")
    return det


def names() -> list[str]:
    return list(DETECTORS)


def all_detectors() -> list[Detector]:
    return [get(n) for n in DETECTORS]
