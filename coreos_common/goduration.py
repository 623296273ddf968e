"""Go ``time.Duration`` text: one parser and one printer, as locksmith's settings and log lines spell durations,
and a short printer for people (``90 min``, ``2 h``, ``1 d``) where a page shows a setting in a few words.

Rules: the syntax is Go's ``time.ParseDuration`` (units ``ns us µs ms s m h``, no ``d``, a sign allowed,
fractions allowed, an int64 of nanoseconds at most) and the output is Go's ``Duration.String()``.  Values are
``timedelta``s, so precision ends at microseconds.  Pure: no I/O.
"""

from __future__ import annotations

import re
from datetime import timedelta
from fractions import Fraction

_NANOS_PER_UNIT: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
# Go's time.Duration is an int64 of nanoseconds; a longer text is an overflow there, so it is here too.
_MAX_DURATION_NANOS = 2**63 - 1
_DURATION_TERM = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)?")


class DurationError(ValueError):
    """A duration text that Go would not parse; the message names the input."""


def parse_go_duration(text: str) -> timedelta:
    """Parse Go ``time.ParseDuration`` syntax (``1h30m``, ``90m``, ``1.5h``, ``300ms``, ``0``).

    Units are ``ns us µs ms s m h``; there is no ``d``.  The value keeps nanosecond precision while parsing
    and is truncated to microseconds (timedelta's resolution) at the end.  A sign is accepted as in Go;
    callers decide whether a negative duration makes sense.
    """
    original = text
    if not text:
        raise DurationError('invalid duration "": empty')
    negative = text[0] == "-"
    if text[0] in "+-":
        text = text[1:]
    if text == "0":
        return timedelta(0)
    if not text:
        raise DurationError(f"invalid duration {original!r}: no number")
    total = Fraction(0)
    position = 0
    while position < len(text):
        match = _DURATION_TERM.match(text, position)
        assert match is not None  # every group is optional, so the pattern always matches
        whole, fraction, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not fraction:
            raise DurationError(f"invalid duration {original!r}: expected a number at {text[position:]!r}")
        if unit is None:
            raise DurationError(
                f"invalid duration {original!r}: missing unit after {match.group(0)!r} "
                "(use ns, us, ms, s, m or h)"
            )
        number = Fraction(int(whole or "0"))
        if fraction:
            number += Fraction(int(fraction), 10 ** len(fraction))
        total += number * _NANOS_PER_UNIT[unit]
        if total > _MAX_DURATION_NANOS:
            raise DurationError(f"invalid duration {original!r}: too long")
        position = match.end()
    nanos = int(total)  # truncates toward zero, like Go
    return timedelta(microseconds=-(nanos // 1000) if negative else nanos // 1000)


def format_go_duration(value: timedelta | float) -> str:
    """A duration as Go prints one (``3h2m1s``, ``1h0m0s``, ``45s``, ``1.5s``, ``300ms``, ``0s``).

    A number is taken as seconds (the delays of sleeps and retries), rounded to microseconds.
    """
    if not isinstance(value, timedelta):
        value = timedelta(seconds=value)
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    if micros == 0:
        return "0s"
    if micros < 1000:
        return f"{sign}{micros}µs"
    if micros < 1_000_000:
        return f"{sign}{_trim(Fraction(micros, 1000))}ms"
    seconds = Fraction(micros, 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{_trim(secs)}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return sign + text


def format_short_duration(value: timedelta | float) -> str:
    """A whole duration in one unit when it fits one (``45 s``, ``90 min``, ``2 h``, ``3 d``), else Go's text.

    Minutes are used up to three hours (``90 min`` reads better than ``1h30m0s``), hours up to three days.
    """
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds <= 0 or seconds != int(seconds):
        return format_go_duration(seconds)
    whole = int(seconds)
    if whole % 86400 == 0 and whole >= 3 * 86400:
        return f"{whole // 86400} d"
    if whole % 3600 == 0 and whole >= 3 * 3600:
        return f"{whole // 3600} h"
    if whole % 60 == 0 and whole >= 60:
        return f"{whole // 60} min"
    if whole < 60:
        return f"{whole} s"
    return format_go_duration(seconds)


def _trim(value: Fraction) -> str:
    """Decimal text of a fraction with a finite expansion (microsecond values), without trailing zeros."""
    whole, rest = divmod(value, 1)
    if not rest:
        return str(int(whole))
    digits = f"{float(rest):.6f}"[2:].rstrip("0")
    return f"{int(whole)}.{digits}"
