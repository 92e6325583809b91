"""Operator feedback on defect events and the threshold it suggests (issue 18 item 4).

A record on the ``topic_feedback`` topic (key = product, value = orjson JSON :class:`Feedback`) says what
an operator found when looking at a flagged frame: ``confirmed`` (a real defect) or ``false_alarm`` (a
good part flagged). It carries what the console knew of the defect event (model, version, score, the
threshold it was judged with), so the proposal below needs nothing but the feedback topic.

Threshold proposal (:func:`propose_thresholds`), per product, from the feedback on the version that serves
it now (scores of other versions are not comparable). Every defect event's score is above the threshold
it was judged with, so feedback only ever argues for a *higher* threshold:

- ``C`` = scores the operators confirmed, ``F`` = scores they called false alarms (the latest verdict
  per frame counts);
- no false alarm, or no confirmed defect: no proposal (nothing to fix, or no evidence of where real
  defects start: raising a threshold with no confirmed defect would have no upper bound);
- else the proposal is the midpoint between the highest false-alarm score below ``min(C)`` and ``min(C)``:
  it never drops a confirmed defect, and when every false alarm scores below every confirmed defect it is
  exactly the midpoint between ``max(F)`` and ``min(C)`` (all of them separated). False alarms scoring at
  or above ``min(C)`` cannot be removed by any threshold that keeps the confirmed defects: they are
  counted (``overlapping``) and left flagged;
- no false alarm below ``min(C)``: no proposal.

A proposal is shown, never applied: thresholds change only through a release (a new version whose spec
carries the new threshold, rolled out by the controller).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

FEEDBACK_SCHEMA = 1
VERDICTS = ("confirmed", "false_alarm")
MAX_NOTE = 500


class FeedbackError(ValueError):
    """A feedback record or request that does not follow the schema."""


@dataclass(frozen=True)
class Feedback:
    frame_id: str
    verdict: str  # confirmed | false_alarm
    product: str
    camera: str
    model: str
    model_version: str
    score: float
    threshold: float
    line: str | None = None
    ts_ms: int = 0  # the frame's timestamp
    note: str = ""
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    source: str = "console"
    schema: int = FEEDBACK_SCHEMA

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}, got {str(self.verdict)[:40]!r}")
        for name in ("frame_id", "product", "camera", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > 256:
                raise FeedbackError(f"feedback field '{name}' must be a non-empty string of at most 256 chars")
        if not isinstance(self.note, str) or len(self.note) > MAX_NOTE:
            raise FeedbackError(f"note must be a string of at most {MAX_NOTE} chars")

    @property
    def key(self) -> bytes:
        return self.product.encode()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


_FIELDS = set(Feedback.__dataclass_fields__)


def decode_feedback(value: bytes | None) -> Feedback:
    try:
        d = orjson.loads(value or b"")
    except orjson.JSONDecodeError as e:
        raise FeedbackError(f"feedback is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != FEEDBACK_SCHEMA:
        raise FeedbackError(f"feedback schema must be {FEEDBACK_SCHEMA}")
    try:
        return Feedback(**{k: v for k, v in d.items() if k in _FIELDS})
    except TypeError as e:
        raise FeedbackError(f"feedback is missing a field: {e}") from None


def parse_request(body: Any) -> tuple[str, str]:
    """The JSON body of a feedback POST -> (verdict, note)."""
    if not isinstance(body, dict):
        raise FeedbackError("body must be a JSON object {\"verdict\": \"confirmed\"|\"false_alarm\", \"note\": ...}")
    verdict, note = body.get("verdict"), body.get("note", "")
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise FeedbackError(f"note must be a string of at most {MAX_NOTE} chars")
    return verdict, note


@dataclass
class Proposal:
    product: str
    model: str
    model_version: str
    current: float | None  # the serving threshold (serving state), else the one the feedback was judged with
    proposed: float | None
    confirmed: int
    false_alarms: int
    removed: int  # false alarms the proposal would no longer flag
    overlapping: int  # false alarms at or above the lowest confirmed score (no threshold removes them)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latest_verdicts(records: list[Feedback]) -> dict[str, Feedback]:
    """frame_id -> the operator's latest verdict on it (by ``created_ms``, then arrival order)."""
    out: dict[str, Feedback] = {}
    for r in records:
        old = out.get(r.frame_id)
        if old is None or r.created_ms >= old.created_ms:
            out[r.frame_id] = r
    return out


def propose(product: str, model: str, version: str, current: float | None, records: list[Feedback]) -> Proposal:
    """The proposal for one product's serving ``model`` v``version`` (see the module docstring)."""
    mine = [r for r in latest_verdicts(records).values()
            if r.product == product and r.model == model and str(r.model_version) == str(version)]
    conf = sorted(r.score for r in mine if r.verdict == "confirmed")
    fa = sorted(r.score for r in mine if r.verdict == "false_alarm")
    if current is None and mine:
        current = max(r.threshold for r in mine)
    p = Proposal(product, model, str(version), current, None, len(conf), len(fa), 0, 0, "")
    if not fa:
        p.reason = "no false alarms reported: nothing to change"
        return p
    if not conf:
        p.reason = "no confirmed defect yet: no evidence of where real defects start"
        return p
    lo = conf[0]
    below = [s for s in fa if s < lo]
    p.overlapping = len(fa) - len(below)
    if not below:
        p.reason = "every false alarm scores at or above the lowest confirmed defect: no threshold separates them"
        return p
    p.proposed = (below[-1] + lo) / 2.0
    p.removed = len(below)
    p.reason = (f"midpoint between the highest false-alarm score below the lowest confirmed one ({below[-1]:.6g}) "
                f"and the lowest confirmed score ({lo:.6g})")
    return p


def propose_thresholds(records: list[Feedback], serving: dict[str, dict[str, Any]]) -> list[Proposal]:
    """One proposal per product that has feedback: for its serving version (``serving``: product ->
    {model, version, threshold}) or, for a product the serving state does not name, the newest version
    the feedback is about."""
    latest = latest_verdicts(records)
    products = sorted({r.product for r in latest.values()})
    out = []
    for product in products:
        entry = serving.get(product)
        if entry is not None:
            out.append(propose(product, entry["model"], str(entry["version"]), float(entry["threshold"]), records))
            continue
        newest = max((r for r in latest.values() if r.product == product), key=lambda r: r.created_ms)
        out.append(propose(product, newest.model, newest.model_version, None, records))
    return out
