"""When the next update check happens: the check scheduler's arithmetic, free of clocks and timers.

Theory of operation. The daemon asks :class:`CheckScheduler` for a delay once at start-up (:meth:`first_delay`) and
again every time an attempt ends (:meth:`next_interval`, told what the last exchange with the server looked like).
It sleeps for the returned number of seconds and checks. Every delay is fuzzed so a fleet booted together does not
hit the server together. The rules, in order of precedence:

1. The server's ``PollInterval`` (when > 0) is used as given, fuzzed.
2. A network error (no HTTP response at all) is retried sooner than the base interval: 1 min, then doubling on each
   consecutive network error, up to the base interval. A server that answers, whatever the answer, resets this.
3. HTTP 500 or 503 (from the check or the download) doubles the previous unfuzzed interval, capped at 4 h and never
   below the base interval, so an overloaded server gets relief.
4. Otherwise the base interval (default 1 h).

Fuzz: the first check is 7 min ± 5 min after start. Every later delay is fuzzed by the same *relative* amount as the
base interval (default ±5 min per hour, i.e. ±1/12): a 2 h back-off is spread over ±10 min, a 1 min network retry
over ±5 s. The unfuzzed interval is what doubling and capping work on. No delay after the first is below ``floor``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from coreos_common.backoff import BackoffPolicy

log = logging.getLogger(__name__)

SERVER_OVERLOADED_STATUSES = frozenset({500, 503})


class InvalidSchedule(ValueError):
    """A schedule setting that cannot work (negative, zero or inconsistent durations)."""


def fuzz(value: int, spread: int, rng: random.Random) -> int:
    """Uniform integer in ``[value - spread//2, value + spread - spread//2]`` (the original's FuzzInt)."""
    if spread < 0:
        raise InvalidSchedule(f"fuzz spread must be >= 0 seconds, got {spread}")
    low = value - spread // 2
    return rng.randint(low, low + spread)


@dataclass(frozen=True)
class ScheduleConfig:
    """Durations in seconds; the defaults are the project's (hourly checks), every one can be configured."""

    interval: int = 3600
    interval_fuzz: int = 600
    first_check_delay: int = 420
    first_check_fuzz: int = 600
    max_backoff: int = 4 * 3600
    network_retry: int = 60
    floor: int = 60

    def __post_init__(self) -> None:
        for name in ("interval", "first_check_delay", "max_backoff", "network_retry", "floor"):
            value = getattr(self, name)
            if value <= 0:
                raise InvalidSchedule(f"{name} must be > 0 seconds, got {value}")
        for name in ("interval_fuzz", "first_check_fuzz"):
            value = getattr(self, name)
            if value < 0:
                raise InvalidSchedule(f"{name} must be >= 0 seconds, got {value}")
        if self.interval_fuzz >= self.interval:
            raise InvalidSchedule(
                f"interval_fuzz ({self.interval_fuzz} s) must be smaller than interval ({self.interval} s)"
            )
        if self.first_check_fuzz // 2 >= self.first_check_delay:
            raise InvalidSchedule(
                f"first_check_fuzz ({self.first_check_fuzz} s) would allow a first check at or before start "
                f"(first_check_delay {self.first_check_delay} s)"
            )

    @classmethod
    def for_check_interval(cls, interval: int, first_check_delay: int) -> ScheduleConfig:
        """The daemon's schedule for ``--check-interval`` and ``--first-check-delay``: the interval fuzzed by
        ±1/12 (a spread of 1/6), the first check by up to ±5 min; the floor and the network retry never exceed the
        interval asked for, so an interval below a minute is kept as given rather than raised to one."""
        return cls(
            interval=interval,
            interval_fuzz=interval // 6,
            first_check_delay=first_check_delay,
            first_check_fuzz=min(600, max(0, 2 * first_check_delay - 2)),
            network_retry=min(cls.network_retry, interval),
            floor=min(cls.floor, interval),
        )


class CheckScheduler:
    """Delays between update checks; pure: the caller owns the clock and the timer, this owns the arithmetic."""

    def __init__(self, rng: random.Random, config: ScheduleConfig | None = None) -> None:
        self.config = config if config is not None else ScheduleConfig()
        self._rng = rng
        self._last_unfuzzed = 0
        self._network_failures = 0  # network errors in a row

    def first_delay(self) -> int:
        """Seconds from daemon start to the first check (default 120–720 s)."""
        c = self.config
        delay = fuzz(c.first_check_delay, c.first_check_fuzz, self._rng)
        log.info("First update check in %d s (%d s ± %d s)", delay, c.first_check_delay, c.first_check_fuzz // 2)
        return delay

    def next_interval(
        self, poll_interval_from_server: int | None, last_http_status: int | None, network_error: bool
    ) -> int:
        """Seconds until the next check, given how the last attempt's exchange with the server went."""
        c = self.config
        if poll_interval_from_server is not None and poll_interval_from_server > 0:
            unfuzzed, reason = poll_interval_from_server, "server PollInterval"
            self._network_failures = 0
        elif network_error:
            unfuzzed = int(BackoffPolicy(c.network_retry, c.interval).delay(self._network_failures))
            self._network_failures += 1
            reason = "network error retry"
        elif last_http_status in SERVER_OVERLOADED_STATUSES:
            cap = max(c.max_backoff, c.interval)
            unfuzzed = max(c.interval, min(2 * self._last_unfuzzed, cap))
            reason = f"HTTP {last_http_status} back-off"
            self._network_failures = 0
        else:
            unfuzzed, reason = c.interval, "regular interval"
            self._network_failures = 0
        self._last_unfuzzed = unfuzzed
        spread = self.relative_spread(unfuzzed)
        delay = max(c.floor, fuzz(unfuzzed, spread, self._rng))
        log.info("Next update check in %d s (%s: %d s ± %d s)", delay, reason, unfuzzed, spread // 2)
        return delay

    def relative_spread(self, unfuzzed: int) -> int:
        """Fuzz range for an interval: the base interval's fuzz scaled to this interval's length."""
        return unfuzzed * self.config.interval_fuzz // self.config.interval
