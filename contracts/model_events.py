"""Codecs for the ``model-events`` topic: key = model name, value = orjson JSON.

Event types (``type``):

- ``released``          a training job wrote a new artifact to the model store (uri + sha256).
- ``promoted``          the rollout controller switched serving to the released version.
- ``rolled_back``       the candidate failed a health check (or an operator asked for a rollback);
                        the previous version keeps / resumes serving.
- ``refused``           the artifact never reached Triton (sha256 mismatch, incompatible base or input
                        spec, unreadable metadata); the previous version keeps serving.
- ``shadow_waiting``    progress, not an outcome: the candidate of a served product saw no live frame in its
                        shadow window and waits for traffic (up to ``detail.deadline_s``; idle is not failure).
- ``rollback_requested`` operator verb ``linewatch rollback``: serve ``version`` (an older one) again.
- ``retrain_requested`` a drift alert (route_ood) suggests a new product/task: train an adapter.

Every event carries ``schema`` (:data:`SCHEMA_VERSION`), ``event_id``, ``ts_ms``, ``model``,
``version`` (int >= 1 except retrain_requested), and optionally ``task``, ``product``,
``detector``, ``artifact_uri``, ``sha256`` (hex digest of ``metadata.json`` of the artifact, which
itself lists the sha256 of every artifact file), ``previous_version``, ``reasons`` (list of strings),
``detail`` (dict), ``take_over`` (bool, ``released`` only: the release may take over a product or task
another model serves; without it the controller refuses such a release). ``model``, ``product`` and
``task`` are strict names (:mod:`contracts.names`: no ``..``, ``/``, leading ``.``; 1-128 chars) and a
``released`` / ``rollback_requested`` model is never a rollout candidate (``__candidate``). Decoding validates and raises :class:`ModelEventError` naming the bad field.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from contracts.names import CANDIDATE_SUFFIX, is_candidate, is_safe_name

SCHEMA_VERSION = 1
EVENT_TYPES = ("released", "promoted", "rolled_back", "refused", "rollback_requested", "retrain_requested",
               "shadow_waiting")
_SHA = re.compile(r"[0-9a-f]{64}")  # fullmatch only


class ModelEventError(ValueError):
    """A model-events record that does not follow the schema."""


@dataclass
class ModelEvent:
    type: str
    model: str
    version: int = 0
    task: str | None = None
    product: str | None = None
    detector: str | None = None
    artifact_uri: str | None = None
    sha256: str | None = None
    previous_version: int | None = None
    reasons: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    take_over: bool = False
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        validate(asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "take_over" and v is False)}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)

    @property
    def key(self) -> bytes:
        return self.model.encode()


def validate(d: dict[str, Any]) -> None:
    def bad(f: str, why: str):
        raise ModelEventError(f"model event: field '{f}' {why}")

    if not isinstance(d, dict):
        raise ModelEventError("model event: value is not a JSON object")
    if d.get("schema") != SCHEMA_VERSION:
        bad("schema", f"must be {SCHEMA_VERSION}, got {d.get('schema')!r}")
    t = d.get("type")
    if t not in EVENT_TYPES:
        bad("type", f"must be one of {EVENT_TYPES}, got {t!r}")
    m = d.get("model")
    if not is_safe_name(m):
        bad("model", f"must be a model name ([A-Za-z0-9_.-], 1-128 chars, no '..', not starting with '.'), "
                     f"got {str(m)[:80]!r}")
    if t in ("released", "rollback_requested") and is_candidate(m):
        bad("model", f"names a rollout candidate ({CANDIDATE_SUFFIX}); release or roll back the model itself")
    for f in ("product", "task"):
        if d.get(f) is not None and not is_safe_name(d[f]):
            bad(f, f"must be a name ([A-Za-z0-9_.-], 1-128 chars, no '..'), got {str(d[f])[:80]!r}")
    if not isinstance(d.get("take_over", False), bool):
        bad("take_over", f"must be a boolean, got {d.get('take_over')!r}")
    v = d.get("version", 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        bad("version", f"must be a non-negative integer, got {v!r}")
    if t != "retrain_requested" and v < 1:
        bad("version", f"must be >= 1 for a {t} event, got {v!r}")
    if t == "released":
        if not d.get("artifact_uri") or not isinstance(d["artifact_uri"], str):
            bad("artifact_uri", "is required for a released event")
        if not isinstance(d.get("sha256"), str):
            bad("sha256", "is required for a released event")
    sha = d.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA.fullmatch(sha)):
        bad("sha256", f"must be 64 lowercase hex digits, got {str(sha)[:80]!r}")
    pv = d.get("previous_version")
    if pv is not None and (not isinstance(pv, int) or isinstance(pv, bool) or pv < 1):
        bad("previous_version", f"must be an integer >= 1, got {pv!r}")
    for f in ("task", "product", "detector", "artifact_uri", "event_id"):
        if d.get(f) is not None and not isinstance(d[f], str):
            bad(f, "must be a string")
    r = d.get("reasons", [])
    if not isinstance(r, list) or not all(isinstance(x, str) for x in r):
        bad("reasons", "must be a list of strings")
    if t in ("rolled_back", "refused") and not r:
        bad("reasons", f"must name at least one reason for a {t} event")
    if not isinstance(d.get("detail", {}), dict):
        bad("detail", "must be an object")
    ts = d.get("ts_ms", 0)
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        bad("ts_ms", f"must be a non-negative integer, got {ts!r}")


_FIELDS = set(ModelEvent.__dataclass_fields__)


def decode(value: bytes | str | dict) -> ModelEvent:
    """Parse + validate one record value. Unknown fields are ignored (forward compatible)."""
    if isinstance(value, dict):
        d = value
    else:
        try:
            d = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise ModelEventError(f"model event: not JSON ({e})") from None
    validate(d)
    return ModelEvent(**{k: v for k, v in d.items() if k in _FIELDS})


def encode(event: ModelEvent) -> tuple[bytes, bytes]:
    """(key, value) for the producer."""
    return event.key, event.to_json()


def fold_status(events: list[ModelEvent]) -> dict[str, dict[str, Any]]:
    """Latest rollout state per model from an ordered event history (``linewatch rollout status``)."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        s = out.setdefault(e.model, {"model": e.model, "serving_version": None, "candidate_version": None,
                                     "candidate_state": None, "last_event": None, "history": []})
        s["last_event"] = e.type
        s["history"].append({"type": e.type, "version": e.version, "ts_ms": e.ts_ms,
                             **({"reasons": e.reasons} if e.reasons else {})})
        if e.type == "released":
            s["candidate_version"] = e.version
            s["candidate_state"] = None
        elif e.type == "shadow_waiting":
            if s["candidate_version"] == e.version:
                s["candidate_state"] = "waiting for traffic"
        elif e.type == "promoted":
            s["serving_version"] = e.version
            if s["candidate_version"] == e.version:
                s["candidate_version"] = None
                s["candidate_state"] = None
        elif e.type in ("rolled_back", "refused"):
            if s["candidate_version"] == e.version:
                s["candidate_version"] = None
                s["candidate_state"] = None
            if e.type == "rolled_back" and e.previous_version is not None and e.detail.get("operator"):
                s["serving_version"] = e.previous_version
        if e.type in ("promoted", "rolled_back") and (e.detail or {}).get("rule"):
            s["decided_by"] = e.detail["rule"]  # the shadow rule that decided (stream/lifecycle/policy.py)
        if e.product:
            s["product"] = e.product
    return out
