"""The cluster reboot semaphore: key paths, JSON value and lock transitions, with no I/O.

Theory of operation: one etcd key per group holds ``{"semaphore":S,"max":M,"holders":[ids]}``, the key path
and value format locksmith uses. (locksmith keeps it in etcd's v2 key space and this project in v3, which are
separate stores: nodes running locksmith and nodes running this daemon only share a limit when the daemon's
v2 compatibility mode also holds the v2 semaphore, see ``locksmithd.backends.etcd.v2``.) A node may reboot
while its machine id is in ``holders``. Every change is a pure transition from one value to the next; the I/O
shell writes the result with a compare-and-swap on the key's revision, so two nodes can never both take the
last slot.

Invariant, checked on every decode and kept by every transition: ``semaphore == max - len(holders)``,
``max >= 0``, holders unique and sorted. ``semaphore`` is negative only when ``set_max`` lowered ``max`` below
the number of current holders: they keep their slots (taking them away would not stop a reboot already under
way) and nobody else gets one until enough of them release.

Deliberate difference from locksmith: a holder asking for the lock again succeeds without a change (locksmith
checks capacity first and answers ``semaphore is at 0`` to its own holder, locksmith#58), so
``locksmithctl reboot`` on a node that already holds the lock, or a daemon restarted mid-reboot, is not stuck.
"""

from __future__ import annotations

import bisect
import json
import time
import urllib.parse
from dataclasses import dataclass, field

SEMAPHORE_KEY = "coreos.com/updateengine/rebootlock/semaphore"
GROUPS_PREFIX = "coreos.com/updateengine/rebootlock/groups/"

# How much of a bad stored value an error message quotes.
_QUOTE_LIMIT = 200
# No semaphore is larger (30,000 holders); anything beyond is a corrupt value, not something to parse.
MAX_VALUE_SIZE = 1 << 20
# locksmith stores counts as Go ints (int64): a larger max would break every locksmith reading the key.
MAX_SLOTS = 2**63 - 1
HOLDERS_SUFFIX = "/holders/"
# When a holder took its slot: ISO 8601 in UTC, to the second.
SINCE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def key_for_group(group: str) -> str:
    """The etcd key of ``group``'s semaphore; the empty group is the cluster-wide default key.

    Group names are escaped like Go's ``url.QueryEscape`` (``prod/database`` → ``prod%2Fdatabase``, a space
    → ``+``), so the keys are the ones locksmith uses.
    """
    if not group:
        return SEMAPHORE_KEY
    return f"{GROUPS_PREFIX}{urllib.parse.quote_plus(group)}/semaphore"


class SemaphoreError(Exception):
    """A stored value or a requested change breaks the semaphore's rules; the message says which."""


class SemaphoreFullError(SemaphoreError):
    """``lock`` found no free slot (``semaphore is at N``)."""


class HolderNotFoundError(SemaphoreError):
    """``unlock`` of an id that holds no slot (``holder does not exist``)."""


def _quote(raw: bytes | str) -> str:
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else raw
    if len(text) > _QUOTE_LIMIT:
        text = text[:_QUOTE_LIMIT] + "…"
    return repr(text)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Semaphore:
    """One group's reboot semaphore; constructing one that breaks the invariant raises SemaphoreError."""

    semaphore: int
    max: int
    holders: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _is_int(self.semaphore) or not _is_int(self.max):
            raise SemaphoreError(
                f"semaphore and max must be integers, got {self.semaphore!r} and {self.max!r}"
            )
        if not all(isinstance(h, str) for h in self.holders):
            raise SemaphoreError(f"holders must be strings, got {self.holders!r}")
        # Holders are a set kept in sorted order, as locksmith stores them; accept any order or sequence here.
        object.__setattr__(self, "holders", tuple(sorted(self.holders)))
        problem = _invariant_problem(self.semaphore, self.max, self.holders)
        if problem:
            raise SemaphoreError(f"invalid semaphore {self.encode()}: {problem}")

    @classmethod
    def default(cls) -> Semaphore:
        """The value a missing key is created with: one slot, free."""
        return cls(semaphore=1, max=1, holders=())

    # -- codec -----------------------------------------------------------------------------------------------

    def encode(self) -> str:
        """Compact JSON in locksmith's field order: ``{"semaphore":0,"max":1,"holders":["a"]}``."""
        return json.dumps(
            {"semaphore": self.semaphore, "max": self.max, "holders": list(self.holders)},
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> Semaphore:
        """Parse a stored value; raises SemaphoreError quoting ``raw`` for anything but a valid semaphore.

        ``holders`` may be ``null`` or missing (locksmith writes ``null`` for a fresh key); unknown fields are
        ignored; holders are returned sorted. Every way a value can fail to decode is a SemaphoreError: JSON
        nested too deep for the parser (RecursionError), values larger than any semaphore, anything else.
        """
        if len(raw) > MAX_VALUE_SIZE:
            raise SemaphoreError(
                f"semaphore value {_quote(raw)} is {len(raw)} bytes, larger than any semaphore "
                f"(at most {MAX_VALUE_SIZE} bytes)"
            )
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            doc = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise SemaphoreError(f"semaphore value {_quote(raw)} is not valid JSON: {exc}") from None
        except RecursionError:
            raise SemaphoreError(f"semaphore value {_quote(raw)} is JSON nested too deep to be a semaphore") from None
        except Exception as exc:  # any other way the parser gives up is still a bad value, never a crash
            raise SemaphoreError(f"semaphore value {_quote(raw)} cannot be decoded: {type(exc).__name__}") from None
        if not isinstance(doc, dict):
            raise SemaphoreError(f"semaphore value {_quote(raw)} is not a JSON object")
        for name in ("semaphore", "max"):
            if name not in doc:
                raise SemaphoreError(f"semaphore value {_quote(raw)} has no {name!r} field")
            if not _is_int(doc[name]):
                raise SemaphoreError(f"semaphore value {_quote(raw)}: {name!r} must be an integer")
        holders_doc = doc.get("holders")
        if holders_doc is None:
            holders_doc = []
        if not isinstance(holders_doc, list) or not all(isinstance(h, str) for h in holders_doc):
            raise SemaphoreError(
                f"semaphore value {_quote(raw)}: 'holders' must be a list of strings or null"
            )
        holders = tuple(sorted(holders_doc))
        problem = _invariant_problem(doc["semaphore"], doc["max"], holders)
        if problem:
            raise SemaphoreError(f"semaphore value {_quote(raw)}: {problem}")
        return cls(semaphore=doc["semaphore"], max=doc["max"], holders=holders)

    # -- transitions -----------------------------------------------------------------------------------------

    def holds(self, holder: str) -> bool:
        return holder in self.holders

    def lock(self, holder: str) -> Semaphore:
        """Give ``holder`` a slot; a current holder gets the value back unchanged (checked first)."""
        _check_id(holder)
        if holder in self.holders:
            return self
        if self.semaphore <= 0:
            raise SemaphoreFullError(f"semaphore is at {self.semaphore}")
        holders = list(self.holders)
        bisect.insort(holders, holder)
        return Semaphore(semaphore=self.semaphore - 1, max=self.max, holders=tuple(holders))

    def unlock(self, holder: str) -> Semaphore:
        """Free ``holder``'s slot; raises HolderNotFoundError when it has none."""
        _check_id(holder)
        if holder not in self.holders:
            raise HolderNotFoundError("holder does not exist")
        holders = tuple(h for h in self.holders if h != holder)
        return Semaphore(semaphore=self.semaphore + 1, max=self.max, holders=holders)

    def unlock_if_held(self, holder: str) -> Semaphore:
        """``unlock`` that leaves the value unchanged when ``holder`` has no slot (used after a reboot)."""
        return self.unlock(holder) if holder in self.holders else self

    def set_max(self, new_max: int) -> Semaphore:
        """Change the number of slots; holders keep theirs even when ``new_max`` is below their count."""
        if not _is_int(new_max) or not 0 <= new_max <= MAX_SLOTS:
            raise SemaphoreError(f"max must be between 0 and {MAX_SLOTS}, got {new_max!r}")
        return Semaphore(semaphore=new_max - len(self.holders), max=new_max, holders=self.holders)

    def describe(self) -> str:
        """``semaphore is at 0 (max 1, holders: a, b)`` for log lines."""
        holders = ", ".join(self.holders) if self.holders else "none"
        return f"semaphore is at {self.semaphore} (max {self.max}, holders: {holders})"


def _check_id(holder: str) -> None:
    if not isinstance(holder, str) or not holder:
        raise SemaphoreError(f"holder id must be a non-empty string, got {holder!r}")


def _invariant_problem(semaphore: int, max_: int, holders: tuple[str, ...]) -> str:
    """Why these fields do not form a valid semaphore, or '' when they do."""
    if not 0 <= max_ <= MAX_SLOTS:
        return f"max is {max_}, must be between 0 and {MAX_SLOTS}"
    if any(not h for h in holders):
        return "holders contain an empty id"
    if len(set(holders)) != len(holders):
        dupes = sorted({h for h in holders if holders.count(h) > 1})
        return f"duplicate holders {dupes}"
    if semaphore != max_ - len(holders):
        return (
            f"semaphore is {semaphore} but max {max_} minus {len(holders)} holder(s) is {max_ - len(holders)}"
        )
    return ""


# -- holder records ------------------------------------------------------------------------------------------


def holder_key(semaphore_key: str, holder: str) -> str:
    """Where the record of ``holder``'s slot lives: beside the semaphore, so its value stays locksmith's."""
    return f"{semaphore_key}{HOLDERS_SUFFIX}{holder}"


@dataclass(frozen=True)
class HolderRecord:
    """Who holds a slot and since when: written with the slot, removed with it, never consulted for a decision.

    ``since`` is the time the slot was taken, as an ISO 8601 UTC string (``2024-05-01T04:00:00Z``);
    ``hostname``, ``group`` and ``version`` (the version the holder is installing) may be empty.
    """

    since: str
    hostname: str = ""
    group: str = ""
    version: str = ""

    def encode(self) -> str:
        return json.dumps(
            {"since": self.since, "hostname": self.hostname, "group": self.group, "version": self.version},
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def at(cls, epoch_seconds: float, hostname: str = "", group: str = "", version: str = "") -> HolderRecord:
        """A record taken at ``epoch_seconds`` (the caller reads the clock)."""
        moment = time.gmtime(epoch_seconds)
        return cls(time.strftime(SINCE_FORMAT, moment), hostname, group, version)

    def taken_at(self) -> int | None:
        """``since`` as Unix seconds, or None when it does not parse."""
        return _epoch_of(self.since)

    def age(self, now: float) -> float | None:
        """Seconds from ``since`` to ``now`` (epoch seconds), or None when ``since`` does not parse."""
        taken = _epoch_of(self.since)
        return None if taken is None else max(0.0, now - taken)

    @classmethod
    def decode(cls, raw: bytes) -> HolderRecord | None:
        """The record, or None for anything that is not one (it is only shown, so a bad one shows as unknown)."""
        if len(raw) > 4096:
            return None
        try:
            doc = json.loads(raw)
        except Exception:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("since"), str):
            return None
        fields = {name: doc.get(name) for name in ("hostname", "group", "version")}
        return cls(doc["since"], **{k: v if isinstance(v, str) else "" for k, v in fields.items()})


def _epoch_of(since: str) -> int | None:
    """Epoch seconds of ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), or None; by arithmetic, without the time-parsing
    modules, which would cost locksmithctl status more than the rest of its start."""
    text = since.strip()
    if len(text) != 20 or text[4] + text[7] + text[10] + text[13] + text[16] + text[19] != "--T::Z":
        return None
    try:
        year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
    except ValueError:
        return None
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second
