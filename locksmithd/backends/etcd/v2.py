"""locksmith's semaphore in etcd's v2 key space, exactly as locksmith keeps it: procedures, no I/O.

For fleets in migration (compatibility mode, ``LOCKSMITHD_ETCD_V2_COMPAT``): nodes still running Flatcar's
Go locksmithd keep the semaphore in etcd's v2 keys, this daemon in v3, and etcd keeps the two apart. So each of
our nodes also holds the v2 semaphore, taken before the v3 one and released after it: every node of the fleet
then holds the v2 semaphore while it reboots, and the fleet never exceeds its ``max``.

The format is locksmith's (reference: ``lock/etcd.go``): the key ``/v2/keys/coreos.com/updateengine/rebootlock/
semaphore`` (a group's ``…/groups/<QueryEscape(group)>/semaphore``, the same string as the v3 key), the value
compact JSON in the order ``semaphore,max,holders``. A client first creates the key with ``PUT
?prevExist=false`` and ``{"semaphore":1,"max":1,"holders":null}`` (an "already exists" answer, HTTP 412
errorCode 105, is fine), reads it (``node.modifiedIndex`` is its revision), and writes with ``PUT
?prevIndex=<index>`` (HTTP 412 errorCode 101 means another writer came first: read and apply again). The v2
API authenticates with HTTP basic authentication.

Rules of this file: the same as ``gateway``'s — procedures yield HttpCalls and receive answers, endpoints
are tried in order and only an endpoint that gives no usable answer sends the call on, errors are one line.
Waiting for a change is a long poll (``?wait=true&waitIndex=``) that the shell sends with a long timeout; a
poll that times out or asks for history etcd no longer keeps (errorCode 401) just reads the key again.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from locksmithd.backends.etcd.gateway import (
    EtcdRefused,
    EtcdUnavailable,
    HttpAnswer,
    HttpCall,
    NoAnswer,
    Procedure,
    quote,
)
from locksmithd.backends.etcd.ops import CorruptSemaphore
from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoint
from locksmithd.semaphore import Semaphore, SemaphoreError, SemaphoreFullError, key_for_group

KEYS_PREFIX = "/v2/keys/"
# What locksmith's Init writes: ``holders`` is a nil slice, so null.
INITIAL_VALUE = '{"semaphore":1,"max":1,"holders":null}'
MAX_ANSWER = 2 << 20
MAX_CONFLICT_RETRIES = 50
# v2 errorCodes (etcd's ``error/error.go``).
KEY_NOT_FOUND = 100
COMPARE_FAILED = 101
NODE_EXIST = 105
EVENT_INDEX_CLEARED = 401


@dataclass(frozen=True)
class V2Snapshot:
    """The v2 semaphore as read and its ``modifiedIndex`` (0: the key does not exist)."""

    semaphore: Semaphore
    index: int


@dataclass(frozen=True)
class _Reply:
    """A v2 answer: the HTTP status, etcd's ``errorCode`` (0 for none) and the node, if any."""

    status: int
    error_code: int
    message: str
    node: dict[str, Any] | None
    etcd_index: int


class V2Session:
    """The v2 exchange for one client: endpoints, which one answered last, basic authentication."""

    def __init__(self, settings: EtcdSettings) -> None:
        settings.validate()
        self.settings = settings
        self.endpoints = [parse_endpoint(url).url.rstrip("/") for url in settings.endpoints]
        self.current = 0
        self.key = key_for_group(settings.group)
        self.path = KEYS_PREFIX + urllib.parse.quote(self.key, safe="/")
        self.headers: tuple[tuple[str, str], ...] = ()
        if settings.username is not None:
            from coreos_common.http1 import basic_authorization

            self.headers = (("Authorization", basic_authorization(settings.username, settings.password or "")),)

    def _call(self, index: int, method: str, query: dict[str, str], form: dict[str, str] | None,
              timeout: float | None = None) -> HttpCall:  # fmt: skip
        headers = self.headers
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers = (*headers, ("Content-Type", "application/x-www-form-urlencoded"))
        target = self.path + ("?" + urllib.parse.urlencode(query) if query else "")
        return HttpCall(
            self.endpoints[index], method, target, body, headers,
            self.settings.request_timeout if timeout is None else timeout, MAX_ANSWER,
        )  # fmt: skip

    def _reply(self, index: int, answer: HttpAnswer) -> _Reply:
        """Read a v2 answer; raises _Down for an endpoint that cannot serve, EtcdRefused for a refusal."""
        try:
            doc = json.loads(answer.body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            if answer.status in (408, 500, 502, 503, 504):
                raise _Down(f"HTTP {answer.status} {answer.reason}".strip())
            raise EtcdRefused(
                f"etcd at {self.endpoints[index]} does not serve the v2 API (HTTP {answer.status} {answer.reason}): "
                "start etcd with --enable-v2, or turn the v2 compatibility mode off",
                f"HTTP {answer.status}",
            )
        code = doc.get("errorCode")
        error_code = code if isinstance(code, int) and not isinstance(code, bool) else 0
        if answer.status >= 500 and error_code not in (EVENT_INDEX_CLEARED,):
            raise _Down(f"HTTP {answer.status}: {quote(str(doc.get('message') or doc))}")
        node = doc.get("node")
        index_header = doc.get("index")
        return _Reply(
            answer.status, error_code, quote(str(doc.get("message") or "")),
            node if isinstance(node, dict) else None, index_header if isinstance(index_header, int) else 0,
        )  # fmt: skip

    def call(self, method: str, query: dict[str, str], form: dict[str, str] | None = None) -> Procedure[_Reply]:
        """One v2 request with endpoint failover; its reply (errors of etcd are replies, not exceptions)."""
        failures = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self.current + step) % count
            answer = yield self._call(index, method, query, form)
            try:
                if isinstance(answer, NoAnswer):
                    raise _Down(answer.reason)
                reply = self._reply(index, answer)
            except _Down as exc:
                failures.append(f"{self.endpoints[index]}: {exc}")
                continue
            if reply.status in (401, 403):
                raise EtcdRefused(f"etcd at {self.endpoints[index]} refused {self.key!r} (v2): {reply.message}",
                                  reply.message)  # fmt: skip
            self.current = index
            return reply
        raise EtcdUnavailable(f"no etcd endpoint answered for the v2 semaphore ({'; '.join(failures)})")


class _Down(Exception):
    pass


def _snapshot(session: V2Session, node: dict[str, Any] | None) -> V2Snapshot:
    if node is None:
        raise EtcdUnavailable(f"etcd answered a v2 read of {session.key!r} without the key's node")
    value, index = node.get("value"), node.get("modifiedIndex")
    if not isinstance(value, str) or not isinstance(index, int):
        raise EtcdUnavailable(f"etcd answered a v2 read of {session.key!r} with unexpected JSON")
    try:
        return V2Snapshot(Semaphore.decode(value), index)
    except SemaphoreError as exc:
        raise CorruptSemaphore(f"etcd v2 key {session.key!r} holds a corrupt semaphore: {exc}") from None


def read(session: V2Session) -> Procedure[V2Snapshot]:
    """The v2 semaphore, created first (as locksmith's Init does) when it is missing."""
    for _ in range(2):
        reply = yield from session.call("GET", {"quorum": "true"})
        if reply.status == 200:
            return _snapshot(session, reply.node)
        if reply.error_code != KEY_NOT_FOUND:
            raise EtcdRefused(f"etcd refused the v2 read of {session.key!r}: {reply.message}", reply.message)
        created = yield from session.call("PUT", {"prevExist": "false"}, {"value": INITIAL_VALUE})
        if created.status not in (200, 201) and created.error_code != NODE_EXIST:
            raise EtcdRefused(f"etcd refused to create the v2 key {session.key!r}: {created.message}", created.message)
    raise EtcdUnavailable(f"the v2 key {session.key!r} disappeared again right after it was created")


@dataclass(frozen=True)
class V2Update:
    before: V2Snapshot
    after: V2Snapshot
    written: bool


def compare_and_swap(session: V2Session, start: V2Snapshot, new: Semaphore) -> Procedure[tuple[bool, V2Snapshot]]:
    """Write ``new`` if the key is still at ``start.index``; else the value stored now."""
    checked = Semaphore.decode(new.encode())
    reply = yield from session.call("PUT", {"prevIndex": str(start.index)}, {"value": checked.encode()})
    if reply.status in (200, 201):
        node = reply.node or {}
        index = node.get("modifiedIndex")
        return True, V2Snapshot(checked, index if isinstance(index, int) else start.index)
    if reply.error_code in (COMPARE_FAILED, KEY_NOT_FOUND):
        return False, (yield from read(session))
    raise EtcdRefused(f"etcd refused the v2 write of {session.key!r}: {reply.message}", reply.message)


def apply(
    session: V2Session, change: Callable[[Semaphore], Semaphore], *, start: V2Snapshot | None = None
) -> Procedure[V2Update]:
    """Read (or start from ``start``), apply ``change``, write with prevIndex; again after a lost race."""
    current = start if start is not None else (yield from read(session))
    for _ in range(MAX_CONFLICT_RETRIES):
        new = change(current.semaphore)
        if new == current.semaphore:
            return V2Update(current, current, written=False)
        ok, now = yield from compare_and_swap(session, current, new)
        if ok:
            return V2Update(current, now, written=True)
        current = now
    raise EtcdUnavailable(f"gave up on the v2 key {session.key!r} after {MAX_CONFLICT_RETRIES} conflicting writes")


def try_take(session: V2Session, holder: str, start: V2Snapshot | None = None) -> Procedure[tuple[bool, V2Snapshot]]:
    """Take a v2 slot if there is one (or ``holder`` has one); the value seen last. Never waits."""
    current = start if start is not None else (yield from read(session))
    for _ in range(MAX_CONFLICT_RETRIES):
        try:
            new = current.semaphore.lock(holder)
        except SemaphoreFullError:
            return False, current
        if new == current.semaphore:
            return True, current
        ok, current = yield from compare_and_swap(session, current, new)
        if ok:
            return True, current
    raise EtcdUnavailable(f"gave up on the v2 key {session.key!r} after {MAX_CONFLICT_RETRIES} conflicting writes")


def release(session: V2Session, holder: str) -> Procedure[bool]:
    update = yield from apply(session, lambda sem: sem.unlock_if_held(holder))
    return update.written and update.before.semaphore.holds(holder)


def wait_for_change(session: V2Session, after: V2Snapshot, timeout: float) -> Procedure[V2Snapshot]:
    """Long-poll the key for its next change after ``after``; the value then (read again when the poll
    timed out, or asked for history etcd no longer keeps)."""
    call = session._call(session.current, "GET", {"wait": "true", "waitIndex": str(after.index + 1)}, None, timeout)
    answer = yield call
    if isinstance(answer, HttpAnswer):
        try:
            reply = session._reply(session.current, answer)
        except _Down:
            reply = None
        if reply is not None and reply.status == 200 and reply.node is not None and "value" in reply.node:
            return _snapshot(session, reply.node)
    return (yield from read(session))


def acquire(
    session: V2Session, holder: str, poll_timeout: float, on_wait: Callable[[Semaphore], None] | None = None
) -> Procedure[bool]:
    """Wait until ``holder`` holds a v2 slot; True when this call took it (False: it held one already)."""
    snapshot = yield from read(session)
    while True:
        if snapshot.semaphore.holds(holder):
            return False
        taken, snapshot = yield from try_take(session, holder, snapshot)
        if taken:
            return True
        if on_wait is not None:
            on_wait(snapshot.semaphore)
        snapshot = yield from wait_for_change(session, snapshot, poll_timeout)
