"""Capped exponential backoff with jitter: the one delay schedule of every retry loop (no dependencies).

Retry ``n`` (1-based) waits within the envelope ``min(cap_s, base_s * 2 ** (n - 1))``:

- ``"equal"`` jitter (the default): half the envelope plus a uniform share of the other half, so a retry
  never comes sooner than half its step and never later than the step;
- ``"full"`` jitter: uniform in ``[0, envelope]`` (the least contention when many clients retry at once);
- ``"none"``: the envelope itself (a deterministic schedule: one client, nothing to de-synchronise).

Jitter spreads the retries of many clients that failed together (every worker when Triton restarts,
every producer when the broker comes back), so they do not all return in the same instant; the schedules
and their names are those of M. Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog (2015).
The random source is injectable (``rng``: a callable returning a float in [0, 1)), so a test seeds it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["equal", "full", "none"]
JITTERS: tuple[str, ...] = ("equal", "full", "none")
_MAX_DOUBLINGS = 62  # 2 ** 62 * any positive base is past every cap; keeps the power finite for huge n


@dataclass(frozen=True)
class Backoff:
    """The delay before retry ``attempt`` (1-based): :meth:`delay`; :meth:`envelope` is its upper bound."""

    base_s: float
    cap_s: float
    jitter: Jitter = "equal"
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.base_s > 0 or not self.cap_s > 0:
            raise ValueError(f"backoff base_s and cap_s must be > 0, got {self.base_s!r}, {self.cap_s!r}")
        if self.jitter not in JITTERS:
            raise ValueError(f"backoff jitter must be one of {', '.join(JITTERS)}, got {self.jitter!r}")

    def envelope(self, attempt: int) -> float:
        """``min(cap_s, base_s * 2 ** (attempt - 1))``: non-decreasing in ``attempt``, capped."""
        if attempt < 1:
            raise ValueError(f"backoff attempts count from 1, got {attempt!r}")
        return min(float(self.cap_s), float(self.base_s) * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt``: in ``[envelope / 2, envelope]`` (equal jitter),
        ``[0, envelope]`` (full) or exactly the envelope (none)."""
        env = self.envelope(attempt)
        if self.jitter == "none":
            return env
        u = min(max(float(self.rng()), 0.0), 1.0)
        return env * u if self.jitter == "full" else env * (0.5 + 0.5 * u)


def backoff_delay(attempt: int, base_s: float, cap_s: float, *, jitter: Jitter = "equal",
                  rng: Callable[[], float] = random.random) -> float:
    """``Backoff(base_s, cap_s, jitter, rng).delay(attempt)`` in one call."""
    return Backoff(base_s, cap_s, jitter, rng).delay(attempt)
