"""contracts.backoff (issue #27 item 3): the one capped exponential backoff, with jitter.

Bounds, the cap, a non-decreasing envelope, every jittered delay inside its range, the same schedule from
the same seed, and the bad arguments refused."""

from __future__ import annotations

import random

import pytest

from contracts.backoff import Backoff, backoff_delay


def test_envelope_doubles_from_base_and_is_capped():
    b = Backoff(0.2, 10.0, "none")
    assert [b.delay(a) for a in (1, 2, 3, 4, 6, 7, 50, 10**6)] == [0.2, 0.4, 0.8, 1.6, 6.4, 10.0, 10.0, 10.0]
    assert b.envelope(10**9) == 10.0  # no overflow for a retry loop that runs for ever
    assert Backoff(5.0, 1.0).envelope(1) == 1.0  # a base above the cap: the cap from the first retry


@pytest.mark.parametrize("jitter", ["equal", "full", "none"])
def test_delays_stay_in_range_under_a_non_decreasing_envelope(jitter):
    b = Backoff(0.05, 3.0, jitter, random.Random(1).random)
    envs = [b.envelope(a) for a in range(1, 40)]
    assert envs == sorted(envs) and envs[0] == 0.05 and envs[-1] == 3.0
    for a, env in enumerate(envs, start=1):
        for _ in range(50):
            d = b.delay(a)
            low = {"equal": env / 2, "full": 0.0, "none": env}[jitter]
            assert low <= d <= env <= 3.0


def test_jitter_spans_its_range_and_hits_both_ends():
    top, bottom = (lambda: 1.0), (lambda: 0.0)
    assert Backoff(1.0, 8.0, "equal", top).delay(3) == 4.0
    assert Backoff(1.0, 8.0, "equal", bottom).delay(3) == 2.0
    assert Backoff(1.0, 8.0, "full", top).delay(3) == 4.0
    assert Backoff(1.0, 8.0, "full", bottom).delay(3) == 0.0
    assert Backoff(1.0, 8.0, "full", lambda: 7.0).delay(1) == 1.0  # a bad source never leaves the envelope
    b = Backoff(1.0, 8.0, "equal", random.Random(3).random)
    many = [b.delay(4) for _ in range(2000)]
    assert 4.0 <= min(many) < 4.1 and 7.9 < max(many) <= 8.0 and 5.8 < sum(many) / len(many) < 6.2  # U[4, 8]


def test_seeded_rng_gives_the_same_schedule():
    def schedule(seed):
        b = Backoff(0.5, 10.0, "full", random.Random(seed).random)
        return [b.delay(a) for a in range(1, 12)]

    assert schedule(42) == schedule(42)
    assert schedule(42) != schedule(43)
    assert backoff_delay(3, 0.5, 10.0, jitter="equal", rng=random.Random(9).random) == \
        Backoff(0.5, 10.0, "equal", random.Random(9).random).delay(3)


@pytest.mark.parametrize("kw", [dict(base_s=0.0, cap_s=1.0), dict(base_s=1.0, cap_s=-1.0),
                                dict(base_s=1.0, cap_s=1.0, jitter="decorrelated")])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        Backoff(**kw)


def test_attempts_count_from_one():
    with pytest.raises(ValueError, match="from 1"):
        Backoff(1.0, 2.0).delay(0)
