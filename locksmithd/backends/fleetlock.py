"""FleetLock client: the reboot-lock protocol of Zincati, served by airlock or poseidon/fleetlock.

``POST <base>v1/pre-reboot`` takes the lock and ``POST <base>v1/steady-state`` gives it back, both with the
header ``fleet-lock-protocol: true`` and the body ``{"client_params": {"id": …, "group": …}}``.  Only HTTP 200
means success; a server explains a refusal with a ``{"kind", "value"}`` JSON body, which we put into the log
line. Locks are owned and recursive on the server side, so asking again for a lock we hold, or releasing one
we do not hold, is harmless.

``acquire`` keeps asking while the server refuses (423 Locked, or any 5xx: airlock answers 500 when its slots
are full) with a doubling delay; connection failures and other answers raise LockBackendError so the strategy
can decide.  The protocol cannot tell whether a release freed something: ``release`` returns True whenever the
server answered 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from coreos_common.goduration import format_go_duration
from locksmithd.backends import LockBackendError, LockPhase, LockProgress, ProgressCallback

log = logging.getLogger(__name__)

PROTOCOL_HEADER = "fleet-lock-protocol"
PRE_REBOOT = "v1/pre-reboot"
STEADY_STATE = "v1/steady-state"
DEFAULT_GROUP = "default"
GROUP_PATTERN = re.compile(r"[a-zA-Z0-9.-]+")
# How much of an unexpected error body goes into a log line.
_MAX_SHOWN_BODY = 200

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class ServerRefusal:
    """A non-200 answer: the HTTP status and the server's ``kind``/``value`` when it sent them."""

    status: int
    kind: str
    value: str

    @property
    def retryable(self) -> bool:
        """423 (lock held) and 5xx (server busy or its store failing) are worth asking again."""
        return self.status == 423 or self.status >= 500

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
    """LockBackend over a FleetLock server; one aiohttp session for the daemon's life."""

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
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.group = group
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env: honour HTTP(S)_PROXY / NO_PROXY like every other client on the node.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=True)
        return self._session

    async def _post(self, operation: str, machine_id: str) -> ServerRefusal | None:
        """POST one request; None on 200, the refusal otherwise; LockBackendError when there is no answer."""
        url = endpoint_url(self.base_url, operation)
        try:
            async with self._client().post(
                url,
                data=request_body(machine_id, self.group),
                headers={PROTOCOL_HEADER: "true", "Content-Type": "application/json"},
                allow_redirects=False,
            ) as response:
                body = await response.read()
                if response.status == 200:
                    return None
                return parse_refusal(response.status, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise LockBackendError(f"FleetLock server {url} did not answer: {reason}") from exc

    async def reachable(self) -> bool:
        """True when the server answers HTTP at all (any status)."""
        try:
            async with self._client().get(self.base_url, allow_redirects=False) as response:
                await response.read()
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        """Ask until the server grants the lock; ``version`` is not part of the protocol."""

        def report(phase: LockPhase) -> None:
            if on_progress is not None:
                on_progress(LockProgress(phase))

        delay = self.backoff_initial
        report(LockPhase.ASKING)
        while True:
            refusal = await self._post(PRE_REBOOT, machine_id)
            if refusal is None:
                report(LockPhase.HELD)
                log.info(
                    "FleetLock lock taken for %s in group %s at %s", machine_id, self.group, self.base_url
                )
                return
            if not refusal.retryable:
                raise LockBackendError(f"lock-manager pre-reboot failure: server-side error, {refusal}")
            report(LockPhase.WAITING)
            log.info(
                "lock-manager pre-reboot failure: server-side error, %s. Retrying in %s.",
                refusal,
                format_go_duration(delay),
            )
            await self._sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def release(self, machine_id: str) -> bool:
        refusal = await self._post(STEADY_STATE, machine_id)
        if refusal is not None:
            raise LockBackendError(f"lock-manager steady-state failure: server-side error, {refusal}")
        log.info("FleetLock lock released for %s in group %s at %s", machine_id, self.group, self.base_url)
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
