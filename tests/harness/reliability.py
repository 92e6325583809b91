"""Rows of the failure-safety scenarios (issue #15) for benchmarks/reliability.py: each integration test
that injects a failure records what ``linewatch account`` (stream.ops.accounting) found afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReliabilityLog:
    rows: list[dict] = field(default_factory=list)

    def bind(self, test: str) -> _Bound:
        return _Bound(self, test)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.rows, indent=2))


@dataclass
class _Bound:
    log: ReliabilityLog
    test: str

    def record(self, scenario: str, rep, expect_dlq: dict[str, int] | None = None, **extra) -> dict:
        """One row from an accounting report ``rep``; ``expect_dlq``: the DLQ records the scenario must
        produce by reason (a poison frame's DLQ record is the correct outcome, not a loss)."""
        return self.record_counts(scenario, frames_sent=rep.produced, lost=len(rep.missing),
                                  duplicated=rep.duplicate_results, dlq_reasons=dict(rep.dlq_reasons),
                                  complete=rep.complete, expect_dlq=expect_dlq, **extra)

    def record_counts(self, scenario: str, *, frames_sent: int, lost: int, duplicated: int = 0,
                      dlq_reasons: dict[str, int] | None = None, complete: bool = True,
                      expect_dlq: dict[str, int] | None = None, **extra) -> dict:
        reasons, want = dlq_reasons or {}, expect_dlq or {}
        row = {"scenario": scenario, "test": self.test, "frames_sent": frames_sent, "lost": lost,
               "duplicated": duplicated, "dlq": sum(reasons.values()), "dlq_reasons": reasons,
               "expected_dlq": want, "complete": complete, **extra}
        row["ok"] = bool(lost == 0 and complete and frames_sent > 0 and reasons == want)
        self.log.rows.append(row)
        return row
