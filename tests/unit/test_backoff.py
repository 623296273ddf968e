"""The one retry policy: doubling from ``initial``, never longer than ``maximum``, jitter injected by the caller."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coreos_common.backoff import BackoffPolicy


def first(policy: BackoffPolicy, count: int) -> list[float]:
    return list(itertools.islice(policy.delays(), count))


def test_locksmiths_delays_double_from_ten_seconds_to_five_minutes() -> None:
    assert first(BackoffPolicy(), 8) == [10, 20, 40, 80, 160, 300, 300, 300]


def test_no_delay_is_longer_than_the_maximum_not_even_the_first() -> None:
    # locksmithd's settings used to wait the whole --backoff-initial once before the cap applied.
    assert first(BackoffPolicy(400, 300), 3) == [300, 300, 300]


def test_a_fresh_iterator_starts_again_from_the_initial_delay() -> None:
    policy = BackoffPolicy(0.1, 0.4)
    delays = policy.delays()
    assert [next(delays) for _ in range(4)] == [0.1, 0.2, 0.4, 0.4]
    assert next(policy.delays()) == 0.1


def test_jitter_is_applied_to_each_capped_delay() -> None:
    seen: list[float] = []

    def jitter(delay: float) -> float:
        seen.append(delay)
        return delay * 0.5

    assert first(BackoffPolicy(10, 30, jitter=jitter), 4) == [5, 10, 15, 15]
    assert seen == [10, 20, 30, 30]


@pytest.mark.parametrize(("initial", "maximum"), [(0, 10), (10, 0), (-1, 10), (float("nan"), 10)])
def test_delays_must_be_positive(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        BackoffPolicy(initial, maximum)


@given(
    st.floats(min_value=1e-3, max_value=1e6),
    st.floats(min_value=1e-3, max_value=1e6),
    st.integers(min_value=0, max_value=10**6),
)
def test_any_delay_is_between_the_smaller_setting_and_the_maximum(initial: float, maximum: float, n: int) -> None:
    delay = BackoffPolicy(initial, maximum).delay(n)
    assert min(initial, maximum) <= delay <= maximum
    assert BackoffPolicy(initial, maximum).delay(n + 1) >= delay
