"""The records between the worker's stages (stream/worker/pipeline.py) and what a batch publishes.

    RawRecord -> Decoded -> Routed -> Prepared -> Scored | DeadLetter;  Batch -> Outgoing

Plain frozen dataclasses: the pipeline, its infer stage (stream/worker/infer_stage.py), the worker app and
the lifecycle's hooks (drift state, events) share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.envelope import Frame, InspectionResult
from contracts.spec import ModelSpec
from stream.inference.routing import Route


@dataclass(frozen=True)
class RawRecord:
    """One ``frames`` record as the broker delivered it."""

    index: int  # position in the micro-batch
    key: bytes | None
    value: bytes | None
    headers: Any
    kafka_ts_s: float | None
    partition: int = -1  # of the frames topic (drift state follows its cameras: stream/lifecycle/drift_state.py)


@dataclass(frozen=True)
class Decoded:
    raw: RawRecord
    frame: Frame
    t_start: float  # perf_counter when the frame's decode began


@dataclass(frozen=True)
class Routed:
    decoded: Decoded
    route: Route
    spec: ModelSpec


@dataclass(frozen=True)
class Prepared:
    raw: RawRecord
    frame: Frame
    route: Route
    tensor: np.ndarray  # (C, H, W) uint8 pixels per the model's spec (normalised at send: contracts.spec.model_input)
    latency_ms: dict[str, float]  # queue, decode, preprocess


@dataclass(frozen=True)
class Scored:
    raw: RawRecord
    key: bytes  # the frame's camera id: results and defect events are keyed by camera
    spec: ModelSpec  # of the model version that scored it
    result: InspectionResult
    result_json: bytes
    defect_json: bytes | None  # a defect event when the frame is anomalous


@dataclass(frozen=True)
class DeadLetter:
    raw: RawRecord
    reason: str
    stage: str
    record: tuple[bytes | None, bytes, Any]  # (key, value, headers) for frames-dlq (contracts.envelope.dlq_record)


@dataclass(frozen=True)
class Outgoing:
    """A record to publish with the batch (before its offsets commit)."""

    topic: Any  # a Faust topic
    key: bytes | None
    value: bytes
    headers: Any


@dataclass(frozen=True)
class Batch:
    records: list[RawRecord]
    scored: list[Scored]  # input order
    dead: list[DeadLetter]
