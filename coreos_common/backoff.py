"""Retry delays: one doubling-with-cap policy for every retry loop (lock requests, logind, systemd, etcd).

Rules: the n-th delay (n = 0, 1, …) is ``min(initial · 2ⁿ, maximum)``, so no delay is ever longer than
``maximum``, even when ``initial`` is; an optional ``jitter`` function maps each capped delay to the delay
really used (the caller injects its randomness, so the policy stays pure and tests stay exact).  A retry
loop takes a fresh ``delays()`` iterator when it should start again from ``initial`` (after a success).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Jitter = Callable[[float], float]


@dataclass(frozen=True)
class BackoffPolicy:
    """Delays between retries, in seconds: ``initial``, doubling, capped at ``maximum`` (locksmith's 10 s, 5 min)."""

    initial: float = 10.0
    maximum: float = 300.0
    jitter: Jitter | None = None

    def __post_init__(self) -> None:
        if not self.initial > 0 or not self.maximum > 0:
            raise ValueError(f"backoff delays must be positive, got initial {self.initial} and maximum {self.maximum}")

    def delay(self, attempt: int) -> float:
        """The delay after the ``attempt``-th failure in a row (0 for the first)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # Doubling past the cap needs no more exponent than the ratio allows (and must not overflow).
        capped = self.maximum
        if self.initial < self.maximum:
            doublings = 0
            value = self.initial
            while doublings < attempt and value < self.maximum:
                value *= 2
                doublings += 1
            capped = min(value, self.maximum)
        return self.jitter(capped) if self.jitter is not None else capped

    def delays(self) -> Iterator[float]:
        """The delays of one run of failures, endless: initial, 2·initial, … maximum, maximum, …"""
        return (self.delay(attempt) for attempt in itertools.count())
