"""Sign-in rate limiting: failed attempts counted per key (a user name, an address) in a sliding window.  Pure.

Rules: a key with ``max_failures`` failures within the last ``window_s`` seconds is refused until the oldest of
them leaves the window (``retry_after`` says how long); a successful sign-in clears the user's key, not the
address's (one good password must not reset an address that is guessing others).  Memory is bounded: at most
``max_keys`` keys are remembered, the stalest forgotten first.  Counts live in the server process (several
servers on one database each count their own attempts).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

Clock = Callable[[], float]


class FailureLimiter:
    def __init__(self, max_failures: int, window_s: float, clock: Clock, *, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def _recent(self, key: Hashable) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self.clock() - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: Hashable) -> float:
        """0 when ``key`` may try now, else the seconds until it may."""
        times = self._recent(key)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[-self.max_failures] + self.window_s - self.clock())

    def failed(self, key: Hashable) -> None:
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = deque(maxlen=self.max_failures)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        self._failures.move_to_end(key)
        times.append(self.clock())

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)
