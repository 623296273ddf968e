"""What the journal says during a download: a line every 10 % or every 30 s, and one at the end. Pure.

A download of a gigabyte over a slow link takes long enough that an operator wonders whether anything happens;
the D-Bus progress is only seen by someone asking. :class:`DownloadMeter` is fed the bytes delivered and the time
(the caller's clock) and answers with a line when one is due: at each further tenth of the payload, or when 30 s
passed since the last line, whichever comes first, never more often. Each line gives the share done, the rate
since the start and the time left at that rate; the last one the duration and the mean rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from coreos_common.goduration import format_go_duration

STEP = 0.10
INTERVAL_S = 30.0


def format_bytes(count: float) -> str:
    """``812 B``, ``3.4 KiB``, ``12.0 MiB``, ``1.25 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def format_seconds(seconds: float) -> str:
    """A duration as Go prints it, to the tenth below a minute, the second below an hour, else the minute:
    ``4.2s``, ``3m7s``, ``8h31m0s``."""
    rounded = round(seconds, 1) if seconds < 60 else round(seconds) if seconds < 3600 else round(seconds / 60) * 60
    return format_go_duration(timedelta(seconds=max(rounded, 0)))


@dataclass
class DownloadMeter:
    """Decides when a progress line is due and writes it; ``started`` and every ``now`` come from one clock."""

    total: int
    started: float
    step: float = STEP
    interval: float = INTERVAL_S
    _next_share: float = field(init=False)
    _last_line: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_share = self.step
        self._last_line = self.started

    def feed(self, delivered: int, now: float) -> str | None:
        """A line when one is due after ``delivered`` bytes at ``now``, else None."""
        share = delivered / self.total if self.total > 0 else 1.0
        if share >= 1.0 or (share < self._next_share and now - self._last_line < self.interval):
            return None
        while self._next_share <= share:
            self._next_share += self.step
        self._last_line = now
        elapsed = max(now - self.started, 1e-6)
        rate = delivered / elapsed
        left = f"about {format_seconds((self.total - delivered) / rate)} left" if rate > 0 else "no data yet"
        return (f"Downloaded {share:.0%} ({format_bytes(delivered)} of {format_bytes(self.total)}) at "
                f"{format_bytes(rate)}/s, {left}")

    def summary(self, delivered: int, now: float) -> str:
        """The closing words: how much, how long, how fast."""
        elapsed = max(now - self.started, 1e-6)
        return f"{format_bytes(delivered)} in {format_seconds(elapsed)} ({format_bytes(delivered / elapsed)}/s)"
