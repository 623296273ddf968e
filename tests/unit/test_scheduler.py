"""The check scheduler's arithmetic: first check, regular interval, PollInterval, 500/503 and network back-off."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine.scheduler import CheckScheduler, InvalidSchedule, ScheduleConfig, fuzz

HOUR = 3600


class FakeClock:
    """Simulated wall time: the test advances it by each delay the scheduler hands out."""

    def __init__(self) -> None:
        self.now = 0

    def sleep(self, seconds: int) -> None:
        self.now += seconds


@settings(max_examples=200, deadline=None)
@given(value=st.integers(-10**6, 10**6), spread=st.integers(0, 10**6), seed=st.integers(0, 2**32))
def test_fuzz_stays_within_the_originals_bounds(value: int, spread: int, seed: int) -> None:
    result = fuzz(value, spread, random.Random(seed))
    assert value - spread // 2 <= result <= value + spread - spread // 2


def test_fuzz_reaches_both_ends_of_an_odd_range() -> None:
    rng = random.Random(1)
    seen = {fuzz(10, 3, rng) for _ in range(500)}
    assert seen == {9, 10, 11, 12}


def test_fuzz_rejects_a_negative_spread() -> None:
    with pytest.raises(InvalidSchedule, match="spread"):
        fuzz(10, -1, random.Random(0))


def test_first_check_is_seven_minutes_plus_or_minus_five() -> None:
    delays = [CheckScheduler(random.Random(seed)).first_delay() for seed in range(2000)]
    assert min(delays) >= 120
    assert max(delays) <= 720
    # The whole range is used, not a fixed value.
    assert min(delays) < 150
    assert max(delays) > 690


def test_regular_checks_are_hourly_plus_or_minus_five_minutes_over_a_month() -> None:
    scheduler = CheckScheduler(random.Random(42))
    clock = FakeClock()
    clock.sleep(scheduler.first_delay())
    checks = 0
    while clock.now < 30 * 24 * HOUR:
        delay = scheduler.next_interval(None, 200, False)
        assert 3300 <= delay <= 3900
        clock.sleep(delay)
        checks += 1
    # 30 days of hourly checks, each between 55 and 65 minutes.
    assert 30 * 24 * HOUR // 3900 <= checks <= 30 * 24 * HOUR // 3300 + 1


def test_base_interval_and_fuzz_are_configurable() -> None:
    scheduler = CheckScheduler(random.Random(3), ScheduleConfig(interval=2700, interval_fuzz=600))
    delays = [scheduler.next_interval(None, 200, False) for _ in range(2000)]
    assert min(delays) >= 2400
    assert max(delays) <= 3000


def test_server_poll_interval_wins_over_everything() -> None:
    scheduler = CheckScheduler(random.Random(5))
    for status, network_error in ((200, False), (503, False), (None, True)):
        delay = scheduler.next_interval(7200, status, network_error)
        # ±1/12 of the interval, like the base interval's ±5 min per hour.
        assert 6600 <= delay <= 7800


def test_short_server_poll_interval_is_honoured_down_to_the_floor() -> None:
    scheduler = CheckScheduler(random.Random(6))
    assert all(110 <= scheduler.next_interval(120, 200, False) <= 130 for _ in range(200))
    assert all(scheduler.next_interval(5, 200, False) == 60 for _ in range(50))


def test_zero_poll_interval_means_not_set() -> None:
    scheduler = CheckScheduler(random.Random(7))
    assert 3300 <= scheduler.next_interval(0, 200, False) <= 3900


def test_server_errors_double_the_unfuzzed_interval_up_to_four_hours() -> None:
    scheduler = CheckScheduler(random.Random(8))
    scheduler.next_interval(None, 200, False)
    expected_unfuzzed = [7200, 14400, 14400, 14400]
    for unfuzzed in expected_unfuzzed:
        delay = scheduler.next_interval(None, 503, False)
        spread = unfuzzed // 6
        assert unfuzzed - spread // 2 <= delay <= unfuzzed + spread - spread // 2
    # A healthy answer goes straight back to the base interval.
    assert 3300 <= scheduler.next_interval(None, 200, False) <= 3900
    # HTTP 500 backs off like 503; other errors do not.
    assert 6600 <= scheduler.next_interval(None, 500, False) <= 7800
    assert 3300 <= scheduler.next_interval(None, 404, False) <= 3900


def test_server_error_on_the_first_check_waits_the_base_interval_then_doubles() -> None:
    # The only earlier interval is the short first-check delay; doubling it stays below the base interval.
    scheduler = CheckScheduler(random.Random(9))
    scheduler.first_delay()
    assert 3300 <= scheduler.next_interval(None, 500, False) <= 3900
    assert 6600 <= scheduler.next_interval(None, 500, False) <= 7800


def test_server_error_after_a_long_poll_interval_doubles_that_interval() -> None:
    scheduler = CheckScheduler(random.Random(10))
    scheduler.next_interval(5400, 200, False)
    assert 9900 <= scheduler.next_interval(None, 503, False) <= 11700


def test_network_errors_retry_from_one_minute_doubling_to_the_base_interval() -> None:
    scheduler = CheckScheduler(random.Random(11))
    expected_unfuzzed = [60, 120, 240, 480, 960, 1920, 3600, 3600]
    for unfuzzed in expected_unfuzzed:
        delay = scheduler.next_interval(None, None, True)
        spread = unfuzzed // 6
        assert max(60, unfuzzed - spread // 2) <= delay <= unfuzzed + spread - spread // 2
    # Any HTTP answer resets the retry ladder.
    scheduler.next_interval(None, 200, False)
    assert 55 <= scheduler.next_interval(None, None, True) <= 65


def test_delays_never_drop_below_the_floor() -> None:
    config = ScheduleConfig(network_retry=10, floor=30)
    scheduler = CheckScheduler(random.Random(12), config)
    assert scheduler.next_interval(None, None, True) == 30


def test_bounds_hold_over_a_long_random_history() -> None:
    """A year of random outcomes: every delay within [floor, 4 h + its fuzz], time always moves on."""
    rng_outcomes = random.Random(2024)
    scheduler = CheckScheduler(random.Random(99))
    clock = FakeClock()
    first = scheduler.first_delay()
    assert 120 <= first <= 720
    clock.sleep(first)
    consecutive_network_errors = 0
    while clock.now < 365 * 24 * HOUR:
        roll = rng_outcomes.random()
        poll: int | None = None
        status: int | None = 200
        network_error = False
        if roll < 0.05:
            poll = rng_outcomes.choice([0, 30, 600, 7200, 86400])
        elif roll < 0.25:
            status, network_error = None, True
        elif roll < 0.45:
            status = rng_outcomes.choice([500, 503])
        elif roll < 0.5:
            status = rng_outcomes.choice([400, 404, 302])
        delay = scheduler.next_interval(poll, status, network_error)
        assert delay >= 60
        if poll:
            assert delay <= max(60, poll + poll // 12 + 1)
        elif network_error:
            consecutive_network_errors += 1
            assert delay <= min(3600, 60 * 2 ** (consecutive_network_errors - 1)) * 13 // 12 + 1
        else:
            assert delay <= 4 * HOUR + 4 * HOUR // 12
        if not network_error:
            consecutive_network_errors = 0
        clock.sleep(delay)


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval", 0), ("floor", -1), ("interval_fuzz", -5), ("interval_fuzz", 3600), ("first_check_fuzz", 900)],
)
def test_unworkable_settings_are_rejected_with_their_name(field: str, value: int) -> None:
    with pytest.raises(InvalidSchedule, match=field):
        ScheduleConfig(**{field: value})


def test_the_daemons_schedule_keeps_a_check_interval_shorter_than_a_minute() -> None:
    """``update_engine --check-interval 5`` checks every 5 s (it was raised to the 60 s floor, silently)."""
    scheduler = CheckScheduler(random.Random(9), ScheduleConfig.for_check_interval(5, 2))
    assert all(scheduler.next_interval(None, 200, False) == 5 for _ in range(50))
    assert all(scheduler.next_interval(1, 200, False) == 5 for _ in range(50))  # a PollInterval below it
    assert 1 <= scheduler.next_interval(None, None, True) <= 5  # a network error retries within the interval


def test_the_daemons_default_schedule_is_the_hourly_one() -> None:
    """Hourly ± 5 min, as documented (the daemon's own arithmetic gave ± 2.5 min)."""
    config = ScheduleConfig.for_check_interval(3600, 420)
    assert config == ScheduleConfig()
    with pytest.raises(InvalidSchedule, match="interval"):
        ScheduleConfig.for_check_interval(0, 420)
