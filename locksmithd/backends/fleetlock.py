"""FleetLock client: the reboot-lock protocol of Zincati, served by airlock or poseidon/fleetlock.

``POST <base>v1/pre-reboot`` takes the lock and ``POST <base>v1/steady-state`` gives it back, both with the
header ``fleet-lock-protocol: true`` and the body ``{"client_params": {"id": …, "group": …}}``.  Only HTTP 200
means success; a server explains a refusal with a ``{"kind", "value"}`` JSON body, which we put into the log
line. Locks are owned and recursive on the server side, so asking again for a lock we hold, or releasing one
we do not hold, is harmless.

Waiting and failing are kept apart, as the backend seam asks (``locksmithd.backends``): the protocol has no
way to wait but asking again, so ``acquire`` asks again, with a doubling delay, while the server answers that
the lock is taken (423 Locked, as poseidon/fleetlock says it, or airlock's 500 ``failed_lock`` when its slots
are full). Any other answer is a failure for the strategy to retry: LockBackendUnavailable for no answer or a
server error (5xx), LockBackendError for a refusal (4xx: a wrong group or URL). The protocol cannot tell
whether a release freed something: ``release`` returns True whenever the server answered 200.

Answers are read through ``coreos_common.http_async`` and capped at 1 MiB (a FleetLock answer is a few
bytes; anything posing as a server cannot fill the node's memory), proxies come from the environment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from coreos_common.backoff import BackoffPolicy
from coreos_common.goduration import format_go_duration
from coreos_common.http1 import HttpError, ResponseTooLarge, describe_limit
from coreos_common.http_async import HttpClient
from locksmithd.backends import (
    LockBackendError,
    LockBackendUnavailable,
    LockPhase,
    LockProgress,
    ProgressCallback,
)

log = logging.getLogger(__name__)

PROTOCOL_HEADER = "fleet-lock-protocol"
PRE_REBOOT = "v1/pre-reboot"
STEADY_STATE = "v1/steady-state"
DEFAULT_GROUP = "default"
GROUP_PATTERN = re.compile(r"[a-zA-Z0-9.-]+")
# How much of an unexpected error body goes into a log line.
_MAX_SHOWN_BODY = 200
# The most of an answer that is read: FleetLock answers are a few bytes of JSON.
MAX_ANSWER = 1 << 20
# airlock's ``kind`` for "all slots are taken" (it answers 500 with it).
FULL_KINDS = frozenset({"failed_lock"})

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class ServerRefusal:
    """A non-200 answer: the HTTP status and the server's ``kind``/``value`` when it sent them."""

    status: int
    kind: str
    value: str

    @property
    def lock_taken(self) -> bool:
        """The server says the lock is held by others: wait and ask again (423, or airlock's full slots)."""
        return self.status == 423 or (self.status >= 500 and self.kind in FULL_KINDS)

    @property
    def retryable(self) -> bool:
        """Worth asking again: the lock is taken, or the server (or a proxy before it) failed (5xx)."""
        return self.lock_taken or self.status >= 500

    def __str__(self) -> str:
        if self.kind:
            return f"code {self.status}, {self.kind}: {self.value}"
        return f"code {self.status}: {self.value}" if self.value else f"code {self.status}"


def parse_refusal(status: int, body: bytes) -> ServerRefusal:
    """Read the ``{"kind": …, "value": …}`` error body; anything else is shown (truncated) as the value."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("kind"), str):
        value = document.get("value")
        return ServerRefusal(status, document["kind"], value if isinstance(value, str) else "")
    shown = text if len(text) <= _MAX_SHOWN_BODY else text[:_MAX_SHOWN_BODY] + "…"
    return ServerRefusal(status, "", shown)


def endpoint_url(base_url: str, operation: str) -> str:
    """``base_url`` must end with ``/`` (the settings add it), so joining keeps its last path segment."""
    if not base_url.endswith("/"):
        base_url += "/"
    return base_url + operation


def request_body(machine_id: str, group: str) -> bytes:
    return json.dumps({"client_params": {"id": machine_id, "group": group}}, separators=(",", ":")).encode()


class FleetLockBackend:
    """LockBackend over a FleetLock server; one HTTP client with kept-alive connections for the daemon's life."""

    name = "fleet-lock"

    def __init__(
        self,
        base_url: str,
        group: str = DEFAULT_GROUP,
        *,
        backoff_initial: float = 10.0,
        backoff_max: float = 300.0,
        timeout: float = 60.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``backoff_initial``/``backoff_max`` pace the polling while the lock is taken."""
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.group = group
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._timeout = timeout
        self._sleep = sleep
        self._http = HttpClient(user_agent="locksmithd")

    async def _post(self, operation: str, machine_id: str) -> ServerRefusal | None:
        """POST one request; None on 200, the refusal otherwise; LockBackendUnavailable when there is no answer."""
        url = endpoint_url(self.base_url, operation)
        try:
            response = await self._http.request(
                "POST",
                url,
                headers=[(PROTOCOL_HEADER, "true"), ("Content-Type", "application/json")],
                body=request_body(machine_id, self.group),
                timeout=self._timeout,
                max_body=MAX_ANSWER,
            )
        except ResponseTooLarge:
            raise LockBackendUnavailable(
                f"FleetLock server {url} answered with more than {describe_limit(MAX_ANSWER)}; is the URL right?"
            ) from None
        except HttpError as exc:
            raise LockBackendUnavailable(f"FleetLock server {url} did not answer: {exc}") from None
        if response.status == 200:
            return None
        return parse_refusal(response.status, response.body)

    async def reachable(self) -> bool:
        """True when the server answers HTTP at all (any status)."""
        try:
            await self._http.request("GET", self.base_url, timeout=min(self._timeout, 10.0), max_body=MAX_ANSWER)
        except HttpError:
            return False
        return True

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        """Ask until the server grants the lock, waiting while it says the lock is taken; ``version`` is not
        part of the protocol."""

        def report(phase: LockPhase) -> None:
            if on_progress is not None:
                on_progress(LockProgress(phase))

        delays = BackoffPolicy(self.backoff_initial, self.backoff_max).delays()
        report(LockPhase.ASKING)
        while True:
            refusal = await self._post(PRE_REBOOT, machine_id)
            if refusal is None:
                report(LockPhase.HELD)
                log.info(
                    "FleetLock lock taken for %s in group %s at %s", machine_id, self.group, self.base_url
                )
                return
            if not refusal.lock_taken:
                failure = f"lock-manager pre-reboot failure: server-side error, {refusal}"
                if refusal.retryable:
                    raise LockBackendUnavailable(failure)
                raise LockBackendError(failure)
            report(LockPhase.WAITING)
            delay = next(delays)
            log.info(
                "lock-manager pre-reboot failure: server-side error, %s. Retrying in %s.",
                refusal,
                format_go_duration(delay),
            )
            await self._sleep(delay)

    async def holding(self, machine_id: str) -> None:
        """The protocol has no read: the server alone knows who holds its lock."""
        return None

    async def release(self, machine_id: str) -> bool:
        refusal = await self._post(STEADY_STATE, machine_id)
        if refusal is not None:
            failure = f"lock-manager steady-state failure: server-side error, {refusal}"
            raise LockBackendUnavailable(failure) if refusal.retryable else LockBackendError(failure)
        log.info("FleetLock lock released for %s in group %s at %s", machine_id, self.group, self.base_url)
        return True

    async def close(self) -> None:
        await self._http.close()
