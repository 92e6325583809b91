"""The authoritative serving state (issue #16): which model version serves each product, on a compacted topic.

The rollout controller is its only writer (stream/lifecycle/service.py); every worker reads it to its end at
startup and follows it (stream/worker/serving.py). One record per product (or multi-task model task), key =
the product, value = :class:`ServingEntry` as JSON; a tombstone (value ``None``) retires a product. The entry
carries the served spec itself (input contract, threshold, tasks), so a worker judges a score with the
threshold of the version Triton says it served, never a stale cache, and ``spec_sha256`` lets anyone check
the spec against what Triton's config holds.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

SERVING_STATE_VERSION = 1


def spec_digest(spec: dict[str, Any]) -> str:
    """sha256 of the spec's canonical JSON (sorted keys)."""
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class ServingEntry:
    product: str  # the record key: a product (per-product detectors) or a task of a multi-task model
    model: str
    version: int
    threshold: float
    spec: dict[str, Any]  # the linewatch_spec of that version (contracts.spec.parse_spec reads it)
    spec_sha256: str = ""
    detector: str = ""
    updated_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    v: int = SERVING_STATE_VERSION

    def __post_init__(self) -> None:
        if not self.product or not self.model:
            raise ValueError("serving state entry needs a product and a model")
        if int(self.version) < 1:
            raise ValueError(f"serving state entry {self.product}: version must be >= 1, got {self.version}")
        if not self.spec_sha256:
            object.__setattr__(self, "spec_sha256", spec_digest(self.spec))

    @property
    def key(self) -> bytes:
        return self.product.encode()

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    def verify(self) -> bool:
        return self.spec_sha256 == spec_digest(self.spec)


def decode_entry(value: bytes | None) -> ServingEntry | None:
    """A record's value -> entry; ``None`` for a tombstone. Raises ValueError on a malformed value."""
    if value is None:
        return None
    try:
        d = orjson.loads(value)
        d.pop("v", None)
        e = ServingEntry(**d)
    except (orjson.JSONDecodeError, TypeError) as err:
        raise ValueError(f"malformed serving state record: {err}") from err
    if not e.verify():
        raise ValueError(f"serving state {e.product}: spec_sha256 does not match its spec")
    return e


def entries_for(model: str, version: int, spec: dict[str, Any]) -> list[ServingEntry]:
    """The entries a promoted ``model`` v``version`` with ``spec`` owns: its product, or one per task of a
    multi-task model. ``threshold`` is the one the worker judges that product's served scores with: its
    operating point's (contracts.operating_point; per task for a multi-task model)."""
    from contracts.operating_point import operating_point_of

    tasks = spec.get("tasks") or {}
    names = [str(t) for t in tasks] if isinstance(tasks, dict | list) else []
    if not names and spec.get("product"):
        names = [str(spec["product"])]
    return [ServingEntry(product=n, model=model, version=int(version),
                         threshold=operating_point_of(spec, n if isinstance(tasks, dict) and n in tasks else None).threshold,
                         spec=spec, detector=str(spec.get("detector", ""))) for n in names]
