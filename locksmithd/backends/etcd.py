"""The etcd v3 reboot semaphore: the I/O shell around ``locksmithd.semaphore``.

Theory of operation
-------------------
The semaphore is one key (locksmith's path and JSON value) in etcd's v3 key space, reached through etcd's
JSON gateway (``/v3/…``) with an ``etcd3gw`` client per endpoint. Every change is read → pure transition → one
transaction that compares the key's ``mod_revision`` with the one read (``version == 0`` for a missing key);
a lost race returns the current value in the same round trip and the transition is applied again to it, a
bounded number of times. Reads are linearizable, so ``status`` never shows a stale holder list (locksmith#64).

A node taking the lock first creates the key if it is missing and reads it, in one transaction. If no slot is
free it watches the key from the revision it read, with one watch for the whole wait. Values that arrive
faster than the node handles them are folded into the newest, which is decoded in place; only one that shows
a free slot leads to a lock attempt, after a short random delay so that a fleet of waiters does not answer
one release with a burst of conflicting transactions (the first waiter's write reaches the others' watches
before most of them fire). If the watch cannot be opened or breaks, or etcd does not answer, the node falls
back to locksmith's polling: 10 s, 20 s, 40 s … capped at 5 min.

Were every waiter to watch the key, each hand-off would cost etcd two events per waiter, and a fleet waiting
at once would cost it the square of its size. So waiters queue in a line, and only the front few (at most
``FRONT_WAITERS``, and no more than ``max``) watch the key. A node whose first attempt finds no free slot takes
an etcd lease (30 s, renewed about every 10 s) and puts ``<semaphore key>/waiters/<machine id>`` under it; the
key's ``create_revision`` is its place, and the same transaction reads the semaphore and the keys just ahead.
Its rank is the number of line keys created before its own. At the front it follows the semaphore key as
above; behind that it watches only the line key ``FRONT_WAITERS`` places ahead, and when that key goes (its
waiter took a slot, gave up or died) it reads its rank again, together with the semaphore, so a node reaching
the front attempts from that value without another round trip. At the front, the rank counts only the
waiters ahead not yet seen among the holders: a node with fewer of them than free slots is entitled to a slot
and writes at once, with no delay, and after losing a race (to another entitled waiter, or to a node outside
the line) tries again at once while the answer still leaves it a slot. A node not entitled waits one
hand-off delay for each waiter served before it (in case one of them is gone) plus the random delay, so the
line leaves in order and each departure wakes the next in line.
The transaction that takes a slot also deletes the taker's line key; when the wait ends in any other way
the node revokes its lease, which deletes the key (after a success the revoke only tidies up, in the
background). A crashed node's key goes when its lease expires, and a node whose lease expired (etcd out
of reach for a whole TTL) queues again. The line is for load and rough fairness only: the compare-and-swap
on the semaphore key is still all that bounds the holders. The semaphore key, read with an exact range,
never shows the line, so locksmith and
``locksmithctl`` see the same value as before, and a node that does not queue (locksmith itself, or this
daemon on an etcd that refuses leases or the line's keys, which it reports once and then waits as every
node once did) simply competes for free slots with those at the front.

Endpoints are tried in order on connection failures and the one that answered is remembered. Every request
carries an explicit timeout: etcd3gw 2.0 (Debian bookworm) keeps ``timeout`` as a session attribute that
requests ignores, and its watcher swallows stream errors, so requests go through the client's configured
session (TLS, client certificate, API path) rather than through its helpers. etcd3gw has no authentication
support: with a user name the backend gets a token from ``/v3/auth/authenticate`` and sends it as
``Authorization``, authenticating again once when the server reports the token invalid.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import json
import logging
import math
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests  # type: ignore[import-untyped, unused-ignore]
from etcd3gw.client import Etcd3Client

from coreos_common.backoff import BackoffPolicy
from coreos_common.goduration import format_go_duration
from locksmithd.backends import (
    LockBackendError,
    LockBackendUnavailable,
    LockPhase,
    LockProgress,
    ProgressCallback,
)
from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoint
from locksmithd.semaphore import Semaphore, SemaphoreError, SemaphoreFullError

log = logging.getLogger(__name__)

API_PATH = "/v3/"

# The waiting line: ``<semaphore key>/waiters/<machine id>``, each key under a lease of the waiter.
LINE_SUFFIX = "/waiters/"
# At most this many waiters (fewer when ``max`` is smaller) follow the semaphore key; each one behind watches
# the line key this many places ahead of its own.
FRONT_WAITERS = 3
LEASE_GRANT_PATH = "lease/grant"
LEASE_KEEPALIVE_PATH = "lease/keepalive"
LEASE_REVOKE_PATH = "lease/revoke"

# HTTP statuses of the gateway that mean "this member cannot serve now" (no leader, timeout, overloaded).
_UNAVAILABLE_STATUSES = frozenset({408, 500, 502, 503, 504})


class EtcdTransientError(LockBackendUnavailable):
    """No endpoint answered, or writers kept racing for the key: trying again later may succeed."""


class _WatchRestart(Exception):
    """The watch ended without an error (idle timeout, history compacted): read the key again and re-watch."""


@dataclass(frozen=True)
class UpdateResult:
    """What one read-modify-write did: the value before and after, and the key's revision after."""

    previous: Semaphore
    current: Semaphore
    revision: int
    written: bool


@dataclass(frozen=True)
class LockAttempt:
    acquired: bool
    semaphore: Semaphore
    revision: int


@dataclass(frozen=True)
class KeyChange:
    """One event of the watch: the key's value at ``revision``; ``value`` is None when the key was deleted."""

    revision: int
    value: bytes | None


def _b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def _short_reason(exc: BaseException) -> str:
    """A one-line cause for an endpoint failure, without requests' pool/retry wrapping."""
    text = str(exc)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Name or service not known", "host not found"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
        ("No route to host", "no route to host"),
    ):
        if needle in text:
            return reason
    return text if len(text) <= 200 else text[:200] + "…"


def _prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (its last byte plus one)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


class LineUnavailable(LockBackendError):
    """etcd refuses the waiting line's requests (an etcd without the lease API, or no permission on the
    line's keys): the node waits without the line."""


@dataclass(frozen=True)
class LinePosition:
    """One read of a waiter's place: the semaphore and its ``mod_revision``, whether the waiter's own line
    key is still there, the keys ahead of it (nearest first, as many as asked for), and the store revision
    of the read (a watch from the next revision misses nothing)."""

    semaphore: Semaphore
    revision: int
    present: bool
    ahead: tuple[str, ...]
    read_revision: int


class _EndpointDown(Exception):
    """This endpoint did not answer usefully; another one may."""


class EtcdSemaphoreStore:
    """Synchronous access to one group's semaphore key; safe to use from several threads."""

    def __init__(self, settings: EtcdSettings, *, max_conflict_retries: int = 50) -> None:
        settings.validate()
        self.settings = settings
        self.key = settings.key
        self._key_b64 = _b64(self.key)
        self._endpoints = [parse_endpoint(url) for url in settings.endpoints]
        self._clients: dict[int, Etcd3Client] = {}
        self._authenticated: set[int] = set()
        self._current = 0
        self._lock = threading.Lock()
        self._max_conflict_retries = max_conflict_retries
        # For benchmarks and debugging: HTTP requests sent, compare-and-swaps lost to another writer, and
        # changes the watches of this store received.
        self.requests_sent = 0
        self.conflicts = 0
        self.watch_events = 0
        # Watches opened on the semaphore key and on line keys.
        self.semaphore_watches = 0
        self.line_watches = 0
        # Passed on every request: a session-level ``verify`` loses to REQUESTS_CA_BUNDLE in the environment.
        self._verify: str | bool = settings.ca_file or True

    # -- transport -------------------------------------------------------------------------------------------

    @property
    def current_endpoint(self) -> str:
        return self._endpoints[self._current].url

    def _client(self, index: int) -> Etcd3Client:
        with self._lock:
            client = self._clients.get(index)
            if client is None:
                ep = self._endpoints[index]
                client = Etcd3Client(
                    host=ep.host,
                    port=ep.port,
                    protocol=ep.scheme,
                    ca_cert=self.settings.ca_file,
                    cert_key=self.settings.key_file,
                    cert_cert=self.settings.cert_file,
                    timeout=self.settings.request_timeout,
                    api_path=API_PATH,
                )
                self._clients[index] = client
            return client

    def _raw_post(self, index: int, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request to one endpoint; raises _EndpointDown, or LockBackendError for a refusal."""
        client = self._client(index)
        url = client.get_url(path)
        self.requests_sent += 1
        try:
            resp = client.session.post(url, json=body, timeout=(timeout, timeout), verify=self._verify)
        except requests.RequestException as exc:
            raise _EndpointDown(_short_reason(exc)) from None
        if resp.status_code == 200:
            try:
                doc = resp.json()
            except ValueError:
                raise _EndpointDown(f"answered {path} with something that is not JSON") from None
            if not isinstance(doc, dict):
                raise _EndpointDown(f"answered {path} with unexpected JSON")
            return doc
        message = _error_message(resp)
        if resp.status_code in _UNAVAILABLE_STATUSES:
            raise _EndpointDown(f"HTTP {resp.status_code}: {message}")
        if resp.status_code == 401 and "auth token" in message:
            raise _TokenRejected(message)
        raise LockBackendError(
            f"etcd at {self._endpoints[index].url} refused {path} on key {self.key!r}: {message}"
        )

    def _authenticate(self, index: int, timeout: float) -> None:
        if self.settings.username is None or index in self._authenticated:
            return
        client = self._client(index)
        client.session.headers.pop("Authorization", None)  # an expired token must not ride along
        body = {"name": self.settings.username, "password": self.settings.password or ""}
        try:
            doc = self._raw_post(index, "auth/authenticate", body, timeout)
        except LockBackendError as exc:
            if "authentication is not enabled" in str(exc):
                # A user name against a server without auth works, as it did with locksmith.
                log.debug(
                    "etcd at %s has authentication disabled; sending no token", self._endpoints[index].url
                )
                self._authenticated.add(index)
                return
            raise LockBackendError(
                f"etcd at {self._endpoints[index].url} refused user {self.settings.username!r}: "
                f"{str(exc).rsplit(': ', 1)[-1]}"
            ) from None
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise _EndpointDown("auth/authenticate answered without a token")
        client.session.headers["Authorization"] = token
        self._authenticated.add(index)

    def _post_to(self, index: int, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._authenticate(index, timeout)
        try:
            return self._raw_post(index, path, body, timeout)
        except _TokenRejected:
            self._authenticated.discard(index)
            self._authenticate(index, timeout)
            try:
                return self._raw_post(index, path, body, timeout)
            except _TokenRejected as exc:
                raise LockBackendError(
                    f"etcd at {self._endpoints[index].url} rejects our token: {exc}"
                ) from None

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send to the remembered endpoint, moving on to the next ones while endpoints are down."""
        limit = self.settings.request_timeout if timeout is None else timeout
        start = self._current
        failures: list[str] = []
        for step in range(len(self._endpoints)):
            index = (start + step) % len(self._endpoints)
            try:
                doc = self._post_to(index, path, body, limit)
            except _EndpointDown as exc:
                failures.append(f"{self._endpoints[index].url}: {exc}")
                continue
            if index != self._current:
                log.info("etcd endpoint %s answers; using it from now on", self._endpoints[index].url)
                self._current = index
            return doc
        raise EtcdTransientError(f"no etcd endpoint answered ({'; '.join(failures)})")

    # -- key operations --------------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> Semaphore:
        try:
            return Semaphore.decode(raw)
        except SemaphoreError as exc:
            raise LockBackendError(f"etcd key {self.key!r} holds a corrupt semaphore: {exc}") from None

    def _from_kvs(self, kvs: object) -> tuple[Semaphore, int]:
        if not kvs:
            return Semaphore.default(), 0
        if not isinstance(kvs, list) or not isinstance(kvs[0], dict):
            raise EtcdTransientError(f"etcd answered a read of {self.key!r} with unexpected JSON")
        kv = kvs[0]
        raw = base64.b64decode(kv.get("value", ""))
        return self._decode(raw), int(kv.get("mod_revision", 0))

    def get(self) -> tuple[Semaphore, int]:
        """The current value and its ``mod_revision``; a missing key reads as the default at revision 0."""
        doc = self._post("kv/range", {"key": self._key_b64})
        return self._from_kvs(doc.get("kvs"))

    def ensure_exists(self) -> bool:
        """Create the key with the default value if it is missing, in one transaction; True if created."""
        txn = {
            "compare": [{"key": self._key_b64, "target": "VERSION", "result": "EQUAL", "version": 0}],
            "success": [{"request_put": {"key": self._key_b64, "value": _b64(Semaphore.default().encode())}}],
            "failure": [],
        }
        created = bool(self._post("kv/txn", txn).get("succeeded", False))
        if created:
            log.info("Created semaphore %s with %s", self.key, Semaphore.default().encode())
        return created

    def ensure_exists_and_get(self) -> tuple[Semaphore, int]:
        """``ensure_exists`` and ``get`` in one transaction: the value and ``mod_revision`` after creation.

        A node about to take the lock needs both; one round trip instead of two matters when a whole fleet
        starts waiting at once.
        """
        read = {"request_range": {"key": self._key_b64}}
        txn = {
            "compare": [{"key": self._key_b64, "target": "VERSION", "result": "EQUAL", "version": 0}],
            "success": [
                {"request_put": {"key": self._key_b64, "value": _b64(Semaphore.default().encode())}},
                read,
            ],
            "failure": [read],
        }
        doc = self._post("kv/txn", txn)
        created = bool(doc.get("succeeded", False))
        if created:
            log.info("Created semaphore %s with %s", self.key, Semaphore.default().encode())
        responses = doc.get("responses") or []
        if not isinstance(responses, list) or len(responses) < (2 if created else 1):
            raise EtcdTransientError(f"etcd answered the creation of {self.key!r} with unexpected JSON")
        answer = responses[-1]
        if not isinstance(answer, dict):
            raise EtcdTransientError(f"etcd answered the creation of {self.key!r} with unexpected JSON")
        return self._from_kvs((answer.get("response_range") or {}).get("kvs"))

    def _compare_and_put(
        self, revision: int, new: Semaphore, also_delete: str | None = None
    ) -> tuple[bool, Semaphore, int]:
        """Write ``new`` if the key is still at ``revision``; else return the value that is there now.

        ``also_delete`` is deleted in the same transaction when the write succeeds (a waiter's line key: the
        next waiter moves up without waiting for another round trip).
        """
        # Round-trip through the decoder: a value that fails validation is never written.
        checked = Semaphore.decode(new.encode())
        if revision == 0:
            compare = {"key": self._key_b64, "target": "VERSION", "result": "EQUAL", "version": 0}
        else:
            compare = {"key": self._key_b64, "target": "MOD", "result": "EQUAL", "mod_revision": revision}
        success: list[dict[str, Any]] = [{"request_put": {"key": self._key_b64, "value": _b64(checked.encode())}}]
        if also_delete is not None:
            success.append({"request_delete_range": {"key": _b64(also_delete)}})
        txn = {
            "compare": [compare],
            "success": success,
            "failure": [{"request_range": {"key": self._key_b64}}],
        }
        doc = self._post("kv/txn", txn)
        if doc.get("succeeded", False):
            return True, checked, int(doc.get("header", {}).get("revision", 0))
        self.conflicts += 1
        responses = doc.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs")
        current, current_rev = self._from_kvs(kvs)
        return False, current, current_rev

    def apply(
        self, fn: Callable[[Semaphore], Semaphore], start: tuple[Semaphore, int] | None = None
    ) -> UpdateResult:
        """Read (or start from ``start``), apply ``fn`` and write with compare-and-swap, retrying lost races.

        ``fn`` raising SemaphoreError aborts with nothing written; a result equal to the value read is not
        written.
        """
        current, revision = self.get() if start is None else start
        for attempt in range(self._max_conflict_retries):
            new = fn(current)
            if new == current:
                return UpdateResult(current, current, revision, written=False)
            ok, now, now_rev = self._compare_and_put(revision, new)
            if ok:
                return UpdateResult(current, now, now_rev, written=True)
            log.debug(
                "lost a race for %s at revision %d (attempt %d); retrying", self.key, revision, attempt + 1
            )
            # The failed transaction returned the value now stored: retry at once, any pause would only let
            # it go stale again.
            current, revision = now, now_rev
        raise EtcdTransientError(
            f"gave up on {self.key!r} after {self._max_conflict_retries} conflicting writes by other nodes"
        )

    def update(self, fn: Callable[[Semaphore], Semaphore]) -> Semaphore:
        """``apply`` returning only the value now stored."""
        return self.apply(fn).current

    def try_acquire(
        self,
        holder: str,
        start: tuple[Semaphore, int] | None = None,
        *,
        tries: int | None = None,
        leave_line: bool = False,
        retry_while: Callable[[Semaphore], bool] | None = None,
    ) -> LockAttempt:
        """Take a slot if there is one (or ``holder`` already has one); never waits for a release.

        ``leave_line`` deletes the holder's line key in the transaction that takes the slot. A lost race is
        retried up to ``tries`` times while the value still shows a free slot (and ``retry_while`` holds for
        it); after that the attempt reports the value it last saw (which may show a free slot another node is
        about to take).
        """
        current, revision = self.get() if start is None else start
        limit = self._max_conflict_retries if tries is None else max(1, tries)
        for _ in range(limit):
            try:
                new = current.lock(holder)
            except SemaphoreFullError:
                return LockAttempt(False, current, revision)
            if new == current:
                return LockAttempt(True, current, revision)
            ok, now, now_rev = self._compare_and_put(
                revision, new, self.line_key(holder) if leave_line else None
            )
            if ok:
                return LockAttempt(True, now, now_rev)
            current, revision = now, now_rev
            if retry_while is not None and not retry_while(current):
                break
        return LockAttempt(current.holds(holder), current, revision)

    def release(self, holder: str) -> bool:
        """Free ``holder``'s slot if it has one; True when something was released."""
        result = self.apply(lambda sem: sem.unlock_if_held(holder))
        return result.previous.holds(holder) and result.written

    def ping(self, timeout: float = 2.0) -> bool:
        """True when some endpoint serves a linearizable read of the key within ``timeout`` per endpoint."""
        try:
            self._post("kv/range", {"key": self._key_b64, "count_only": True}, timeout=timeout)
        except LockBackendError as exc:
            log.debug("etcd is not usable: %s", exc)
            return False
        return True

    def watch(
        self, after_revision: int, idle_timeout: float = 300.0, *, key: str | None = None, deletes_only: bool = False
    ) -> KeyWatch:
        """A watch on the semaphore key (or ``key``) for changes after ``after_revision``.

        Not connected until iterated; ``deletes_only`` asks etcd not to send puts.
        """
        return KeyWatch(self, after_revision + 1, idle_timeout, key=key, deletes_only=deletes_only)

    def _open_watch_stream(
        self, start_revision: int, idle_timeout: float, key: str | None = None, deletes_only: bool = False
    ) -> Any:
        """POST a watch create request (with endpoint failover) and return the streaming response."""
        request: dict[str, Any] = {
            "key": self._key_b64 if key is None else _b64(key),
            "start_revision": start_revision,
        }
        if deletes_only:
            request["filters"] = ["NOPUT"]
        if key is None:
            self.semaphore_watches += 1
        else:
            self.line_watches += 1
        body: dict[str, Any] = {"create_request": request}
        connect = self.settings.request_timeout
        failures: list[str] = []
        for step in range(len(self._endpoints)):
            index = (self._current + step) % len(self._endpoints)
            url = self._endpoints[index].url
            try:
                self._authenticate(index, connect)
                client = self._client(index)
                self.requests_sent += 1
                resp = client.session.post(
                    client.get_url("watch"),
                    json=body,
                    stream=True,
                    timeout=(connect, idle_timeout),
                    verify=self._verify,
                )
            except _EndpointDown as exc:
                failures.append(f"{url}: {exc}")
                continue
            except requests.RequestException as exc:
                failures.append(f"{url}: {_short_reason(exc)}")
                continue
            if resp.status_code != 200:
                failures.append(f"{url}: HTTP {resp.status_code}: {_error_message(resp)}")
                resp.close()
                continue
            return resp
        raise EtcdTransientError(f"cannot watch {key or self.key!r} ({'; '.join(failures)})")

    # -- the waiting line ------------------------------------------------------------------------------------

    @property
    def line_prefix(self) -> str:
        """Where waiters queue: below the semaphore key, which is only ever read with an exact range."""
        return self.key + LINE_SUFFIX

    def line_key(self, machine_id: str) -> str:
        return self.line_prefix + machine_id

    def _line_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``_post`` for the line: a refusal (unknown path on an old etcd, no permission) is LineUnavailable."""
        try:
            return self._post(path, body)
        except EtcdTransientError:
            raise
        except LockBackendError as exc:
            raise LineUnavailable(str(exc)) from None

    def grant_lease(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up to whole seconds, as etcd counts them); its ID."""
        doc = self._line_post(LEASE_GRANT_PATH, {"TTL": max(1, math.ceil(ttl)), "ID": 0})
        try:
            lease_id = int(doc["ID"])
        except (KeyError, TypeError, ValueError):
            raise LineUnavailable(f"lease grant answered without an ID: {doc}") from None
        if doc.get("error"):
            raise LineUnavailable(f"lease grant failed: {doc['error']}")
        return lease_id

    def keep_lease_alive(self, lease_id: int) -> bool:
        """Renew the lease once; False when etcd no longer has it (it expired, or was revoked)."""
        doc = self._line_post(LEASE_KEEPALIVE_PATH, {"ID": lease_id})
        result = doc.get("result") or {}
        return int(result.get("TTL", 0) or 0) > 0

    def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease and so delete the line key attached to it; a lease already gone is fine."""
        try:
            self._line_post(LEASE_REVOKE_PATH, {"ID": lease_id})
        except LineUnavailable as exc:
            if "lease not found" not in str(exc):
                raise

    def join_line(self, machine_id: str, lease_id: int) -> int:
        """Put this machine's line key under ``lease_id``; its ``create_revision`` (its place in the line).

        A key left by an earlier wait of the same machine keeps its place and moves to the new lease.
        """
        return self.join_line_and_look(machine_id, lease_id, 0)[0]

    def join_line_and_look(self, machine_id: str, lease_id: int, limit: int) -> tuple[int, LinePosition | None]:
        """``join_line``, and in the same transaction what ``line_position`` with ``limit`` would read.

        The position comes from the newest line keys, so it is known only when this machine's key is the
        newest (always, for a key just created); otherwise it is None and ``line_position`` must be asked.
        """
        key = _b64(self.line_key(machine_id))
        success: list[dict[str, Any]] = [
            {"request_put": {"key": key, "value": _b64(machine_id), "lease": lease_id}},
            {"request_range": {"key": key, "keys_only": True}},
        ]
        if limit > 0:
            success += [{"request_range": {"key": self._key_b64}}, self._line_range(limit + 1)]
        doc = self._line_post("kv/txn", {"compare": [], "success": success, "failure": []})
        try:
            responses = doc["responses"]
            create_revision = int(responses[1]["response_range"]["kvs"][0]["create_revision"])
            if limit <= 0:
                return create_revision, None
            sem_kvs = responses[2]["response_range"].get("kvs")
            newest = [base64.b64decode(kv["key"]).decode() for kv in responses[3]["response_range"].get("kvs") or []]
            read_revision = int(doc["header"]["revision"])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise EtcdTransientError(f"etcd answered the line put for {machine_id!r} with unexpected JSON") from None
        if not newest or newest[0] != self.line_key(machine_id):
            return create_revision, None
        semaphore, revision = self._from_kvs(sem_kvs)
        return create_revision, LinePosition(semaphore, revision, True, tuple(newest[1:]), read_revision)

    def _line_range(self, limit: int, below_create_revision: int | None = None) -> dict[str, Any]:
        """A read of the newest line keys (created before ``below_create_revision``), newest first."""
        prefix = self.line_prefix
        query: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(_prefix_end(prefix)),
            "keys_only": True,
            "sort_order": "DESCEND",
            "sort_target": "CREATE",
            "limit": max(1, limit),
        }
        if below_create_revision is not None:
            query["max_create_revision"] = below_create_revision - 1
        return {"request_range": query}

    def line_position(self, machine_id: str, create_revision: int, limit: int) -> LinePosition:
        """In one linearizable read: the semaphore, whether this machine's line key is still there, and the
        line keys created before it, nearest first, at most ``limit`` of them.

        etcd's ``count`` ignores ``max_create_revision``, so the rank is the number of keys returned: exact
        below ``limit``, "at least ``limit``" at it.
        """
        txn = {
            "compare": [],
            "success": [
                {"request_range": {"key": self._key_b64}},
                {"request_range": {"key": _b64(self.line_key(machine_id)), "keys_only": True}},
                self._line_range(limit, below_create_revision=create_revision),
            ],
            "failure": [],
        }
        doc = self._line_post("kv/txn", txn)
        try:
            responses = doc["responses"]
            sem_kvs = responses[0]["response_range"].get("kvs")
            mine = responses[1]["response_range"].get("kvs") or []
            ahead_kvs = responses[2]["response_range"].get("kvs") or []
            header_revision = int(doc["header"]["revision"])
            ahead = tuple(base64.b64decode(kv["key"]).decode() for kv in ahead_kvs)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise EtcdTransientError(f"etcd answered the line read of {machine_id!r} with unexpected JSON") from None
        semaphore, revision = self._from_kvs(sem_kvs)
        return LinePosition(semaphore, revision, bool(mine), ahead, header_revision)

    def line_keys(self) -> list[str]:
        """Every line key now present, oldest first (for status and tests)."""
        prefix = self.line_prefix
        doc = self._post(
            "kv/range",
            {
                "key": _b64(prefix),
                "range_end": _b64(_prefix_end(prefix)),
                "keys_only": True,
                "sort_order": "ASCEND",
                "sort_target": "CREATE",
            },
        )
        return [base64.b64decode(kv["key"]).decode() for kv in doc.get("kvs") or []]

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.session.close()
            self._clients.clear()
            self._authenticated.clear()


class _TokenRejected(Exception):
    pass


def _error_message(resp: Any) -> str:
    try:
        doc = resp.json()
    except ValueError:
        text = str(resp.text).strip()
        return text[:200] or f"HTTP {resp.status_code}"
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("error") or doc)
    return str(doc)


class KeyWatch:
    """A streaming watch on the semaphore key, read by one thread; ``stop`` from any thread ends it promptly.

    ``changes()`` yields every change after the start revision and returns when the watch was stopped or
    nothing happened for ``idle_timeout`` (a silent member cannot keep a waiter forever). A broken stream
    raises EtcdTransientError; compacted history raises _WatchRestart (read the key again).
    """

    def __init__(
        self,
        store: EtcdSemaphoreStore,
        start_revision: int,
        idle_timeout: float,
        *,
        key: str | None = None,
        deletes_only: bool = False,
    ) -> None:
        self._store = store
        self._key = key
        self._name = store.key if key is None else key
        self._deletes_only = deletes_only
        self._start_revision = start_revision
        self._idle_timeout = idle_timeout
        self._stopped = threading.Event()
        self._response: Any = None
        self._resp_lock = threading.Lock()

    def changes(self) -> Iterator[KeyChange]:
        if self._stopped.is_set():
            return
        resp = self._store._open_watch_stream(
            self._start_revision, self._idle_timeout, self._key, self._deletes_only
        )
        with self._resp_lock:
            self._response = resp
        try:
            if self._stopped.is_set():
                return
            yield from self._read(resp)
        finally:
            with self._resp_lock:
                self._response = None
            resp.close()

    def _read(self, resp: Any) -> Iterator[KeyChange]:
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8")()
        buffer = ""
        try:
            for chunk in resp.iter_content(chunk_size=None):
                buffer += text_decoder.decode(chunk)
                while True:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # incomplete message; wait for more bytes
                    buffer = buffer[end:]
                    yield from self._interpret(message)
        except requests.RequestException as exc:
            if self._stopped.is_set():
                return
            cause = exc.args[0] if exc.args else None
            if "Read timed out" in str(cause) or isinstance(exc, requests.Timeout):
                log.debug("no change of %s for %.0fs; reading it again", self._name, self._idle_timeout)
                return
            raise EtcdTransientError(f"watch on {self._name!r} broke: {_short_reason(exc)}") from None
        except OSError as exc:
            if self._stopped.is_set():
                return
            raise EtcdTransientError(f"watch on {self._name!r} broke: {exc}") from None
        if not self._stopped.is_set():
            raise EtcdTransientError(f"etcd closed the watch on {self._name!r}")

    def _interpret(self, message: object) -> Iterator[KeyChange]:
        if not isinstance(message, dict):
            raise EtcdTransientError(f"unexpected watch message {message!r}")
        if "error" in message and "result" not in message:
            raise EtcdTransientError(
                f"watch on {self._name!r} failed: {message.get('message') or message}"
            )
        result = message.get("result") or {}
        if result.get("canceled"):
            if result.get("compact_revision"):
                raise _WatchRestart(f"history before revision {result['compact_revision']} was compacted")
            reason = result.get("cancel_reason", "no reason given")
            raise EtcdTransientError(f"etcd cancelled the watch on {self._name!r}: {reason}")
        for event in result.get("events") or []:
            self._store.watch_events += 1
            kv = event.get("kv") or {}
            revision = int(kv.get("mod_revision", 0))
            if event.get("type") == "DELETE":
                yield KeyChange(revision, None)
            else:
                yield KeyChange(revision, base64.b64decode(kv.get("value", "")))

    def stop(self) -> None:
        """End ``changes()`` from any thread: shut the stream's socket so a blocked read returns at once."""
        self._stopped.set()
        with self._resp_lock:
            resp = self._response
        if resp is None:
            return
        with contextlib.suppress(Exception):
            fd = resp.raw.fileno()
            sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


# ------------------------------------------------------------------------------------------------------------
# asyncio backend


class _ThreadedWatch:
    """Runs a KeyWatch in its own thread and hands the newest change to the event loop.

    A waiter only acts on the key's latest value, so changes that arrive faster than the loop takes them are
    folded into the newest one, and the loop is woken once per batch rather than once per event: behind a
    busy key (every acquire and release of the fleet) that is most of the events.
    """

    _END = object()

    def __init__(self, watch: KeyWatch, name: str) -> None:
        self._watch = watch
        self._loop = asyncio.get_running_loop()
        self._mutex = threading.Lock()
        self._latest: KeyChange | None = None  # newest change not yet taken by next_change
        self._ending: object = None  # _END or the exception that ended the stream, after _latest
        self._wakeup_pending = False  # a call to _ready.set is on its way to the loop
        self._ready = asyncio.Event()
        self._finished: asyncio.Future[None] = self._loop.create_future()
        # The newest revision the stream has delivered, written by the watch thread; lets an attempt queued
        # behind other work notice that it would compare against an outdated revision.
        self.latest_revision = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _offer(self, change: KeyChange | None, ending: object = None) -> None:
        with self._mutex:
            if change is not None:
                self._latest = change
            if ending is not None:
                self._ending = ending
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._ready.set)

    def _run(self) -> None:
        try:
            for change in self._watch.changes():
                self.latest_revision = max(self.latest_revision, change.revision)
                self._offer(change)
            self._offer(None, self._END)
        except BaseException as exc:
            self._offer(None, exc)
        finally:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._mark_finished)

    def _mark_finished(self) -> None:
        if not self._finished.done():
            self._finished.set_result(None)

    def _take(self) -> KeyChange | None:
        """The pending change, else raise how the stream ended, else None (and arm the next wake-up)."""
        with self._mutex:
            change, self._latest = self._latest, None
            ending = self._ending
            if change is None and ending is None:
                self._wakeup_pending = False
                self._ready.clear()
        if change is not None:
            return change
        if ending is self._END:
            raise _WatchRestart("watch ended")
        if isinstance(ending, BaseException):
            raise ending
        return None

    async def next_change(self, timeout: float | None = None) -> KeyChange | None:
        """The newest change not yet returned; None when ``timeout`` passed first. Raises what the watch raised.

        A change that has arrived already is returned even with a zero timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            change = self._take()
            if change is not None:
                return change
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                return self._take()

    async def close(self) -> None:
        """Stop the watch and wait (without blocking the loop) for its thread to end."""
        self._watch.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), 5.0)
        except TimeoutError:
            # Only a request still connecting can take this long; the thread ends when it times out.
            log.debug("watch thread %s still finishing its request", self._thread.name)


SEMAPHORE = "semaphore"


class _Line:
    """This node's place in the waiting line: a lease, the key under it, and the task that keeps it alive.

    The lease is renewed about every third of its TTL; when etcd reports it gone (the renewals could not reach
    etcd for a whole TTL), the node joins again at the back rather than wait unseen.
    """

    def __init__(self, store: EtcdSemaphoreStore, machine_id: str, ttl: float) -> None:
        self.store = store
        self.machine_id = machine_id
        self.key = store.line_key(machine_id)
        self.ttl = ttl
        self.lease_id = 0
        self.create_revision = 0
        # Near the head: the machine ids of the waiters ahead that have not been seen holding a slot yet.
        self.ahead: set[str] = set()
        # The place read with the last join (up to ``read_ahead`` keys ahead), until it is used.
        self.joined_at: LinePosition | None = None
        self.read_ahead = 0
        self._keepalive: asyncio.Task[None] | None = None

    def entitled(self, sem: Semaphore) -> bool:
        """Whether ``sem`` has a free slot left for this node once each waiter ahead has taken one.

        Waiters ahead that ``sem`` shows holding a slot are no longer ahead.
        """
        self.ahead.difference_update(sem.holders)
        return len(self.ahead) < sem.semaphore

    async def join(self, read_ahead: int = 0) -> None:
        """Take a lease and put the line key (again, after the lease was lost).

        With ``read_ahead``, the same round trip reads the place in the line: ``joined_at``.
        """
        self.read_ahead = read_ahead
        old = self.lease_id
        self.lease_id = await asyncio.to_thread(self.store.grant_lease, self.ttl)
        if old:
            await self._revoke(old)
        self.create_revision, self.joined_at = await asyncio.to_thread(
            self.store.join_line_and_look, self.machine_id, self.lease_id, self.read_ahead
        )
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_alive(), name=f"etcd-lease {self.key}")

    async def _keep_alive(self) -> None:
        while True:
            # A little earlier at random each time: nodes that joined together do not renew together.
            await asyncio.sleep(self.ttl / 3 * random.uniform(0.8, 1.0))
            try:
                alive = await asyncio.to_thread(self.store.keep_lease_alive, self.lease_id)
            except LockBackendError as exc:
                log.debug("could not renew the lease of %s: %s", self.key, exc)
                continue
            if not alive:
                log.info("the lease of %s expired; joining the line again", self.key)
                try:
                    await self.join()
                except LockBackendError as exc:
                    log.debug("could not join the line again: %s", exc)

    async def _revoke(self, lease_id: int) -> None:
        try:
            await asyncio.to_thread(self.store.revoke_lease, lease_id)
        except LockBackendError as exc:
            log.debug("could not revoke lease %x (%s); %s goes when it expires", lease_id, exc, self.key)

    async def leave(self) -> None:
        """Stop renewing and revoke the lease, which deletes the line key: the node behind moves up."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        if self.lease_id:
            await self._revoke(self.lease_id)
            self.lease_id = 0


class EtcdLockBackend:
    """The ``etcd-lock`` strategy's LockBackend: locksmith's semaphore in etcd v3, waited on with a watch."""

    name = "etcd-lock"

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        first_backoff: float = 10.0,
        max_backoff: float = 300.0,
        use_watch: bool = True,
        watch_idle_timeout: float = 300.0,
        handoff_jitter: float = 0.2,
        max_handoff_jitter: float = 5.0,
        use_line: bool = True,
        line_ttl: float = 30.0,
        store: EtcdSemaphoreStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else EtcdSemaphoreStore(settings)
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._use_watch = use_watch
        self._watch_idle_timeout = watch_idle_timeout
        self._handoff_jitter = handoff_jitter
        self._max_handoff_jitter = max(handoff_jitter, max_handoff_jitter)
        self._use_line = use_line and use_watch
        self._line_ttl = line_ttl
        # What the current wait follows: None, SEMAPHORE, or the line key of the waiter ahead.
        self.waiting_on: str | None = None
        self._on_progress: ProgressCallback | None = None
        # Lease revocations left running after a successful acquire; ``close`` waits for them.
        self._cleanups: set[asyncio.Task[None]] = set()

    async def reachable(self) -> bool:
        return await asyncio.to_thread(self.store.ping, min(2.0, self.settings.request_timeout))

    async def _sleep_backoff(self, delays: Iterator[float], reason: str) -> None:
        delay = next(delays)
        log.warning("Failed to acquire lock: %s. Retrying in %s.", reason, format_go_duration(delay))
        await asyncio.sleep(delay)

    def _report(self, phase: LockPhase, sem: Semaphore | None = None, *, position: int | None = None,
                lower_bound: bool = False) -> None:
        if self._on_progress is None:
            return
        self._on_progress(
            LockProgress(
                phase,
                position=position,
                position_is_lower_bound=lower_bound,
                holders=sem.holders if sem is not None else (),
                slots=sem.max if sem is not None else None,
            )
        )

    async def acquire(
        self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None
    ) -> None:
        """Wait until ``machine_id`` holds a slot.

        Retries while etcd is unreachable; raises LockBackendError for a corrupt value or refused
        credentials, which waiting will not fix.
        """
        if not machine_id:
            raise LockBackendError("cannot take the reboot lock: the machine id is empty")
        store = self.store
        self._on_progress = on_progress
        self._report(LockPhase.ASKING)
        backoff = BackoffPolicy(self._first_backoff, self._max_backoff)
        delays = backoff.delays()
        watch: _ThreadedWatch | None = None
        # The value and revision a watch event showed with a free slot: the next attempt starts from it
        # instead of reading the key again.
        known: tuple[Semaphore, int] | None = None
        # How long a waiter may wait before using a free slot it saw; doubled each time another node was
        # faster, so the more waiters there are, the fewer of them race for each released slot.
        jitter = self._handoff_jitter
        created = False
        line: _Line | None = None
        acquired = False
        # Whether this wait follows the semaphore key: before joining the line, and once near its head.
        at_front = True
        try:
            while True:
                try:
                    if not created:
                        # Create the key if missing and read it in the same round trip: the first attempt
                        # starts from that value.
                        known = await asyncio.to_thread(store.ensure_exists_and_get)
                        created = True
                    if not at_front:
                        assert line is not None
                        if watch is not None:
                            await watch.close()
                            watch = None
                        known = await self._wait_in_line(line)
                        if known is None:
                            await line.leave()
                            line = None
                        at_front = True
                    attempt = await asyncio.to_thread(self._attempt, machine_id, known, watch, line)
                    if attempt is None:
                        # The key changed while this attempt waited for a thread: look at the news first.
                        assert watch is not None and known is not None
                        known = await self._wait_for_free_slot(watch, machine_id, known, jitter, line)
                        continue
                    known = None
                    if attempt.acquired:
                        log.info("Lock taken for %s: %s", machine_id, attempt.semaphore.describe())
                        self._report(LockPhase.HELD, attempt.semaphore)
                        acquired = True
                        return
                    if not self._use_watch:
                        await self._sleep_backoff(delays, f"semaphore is at {attempt.semaphore.semaphore}")
                        continue
                    if line is None and self._use_line:
                        line = await self._join_line(machine_id, attempt.semaphore.max)
                        if line is not None:
                            log.info(
                                "%s; waiting in line as %s", attempt.semaphore.describe(), line.key
                            )
                            at_front = False
                            continue
                    if attempt.semaphore.semaphore > 0:
                        jitter = min(jitter * 2, self._max_handoff_jitter)
                        log.debug("another node wrote %s first; trying again within %.3fs", store.key, jitter)
                    else:
                        log.info("%s; waiting for a release", attempt.semaphore.describe())
                    if line is None:
                        self._report(LockPhase.WAITING, attempt.semaphore)
                    if watch is None:
                        key_watch = store.watch(attempt.revision, self._watch_idle_timeout)
                        watch = _ThreadedWatch(key_watch, f"etcd-watch {store.key}")
                        self.waiting_on = SEMAPHORE
                    state = (attempt.semaphore, attempt.revision)
                    known = await self._wait_for_free_slot(watch, machine_id, state, jitter, line)
                    delays = backoff.delays()
                except _WatchRestart as exc:
                    log.debug("re-reading %s: %s", store.key, exc)
                    known = None
                    if watch is not None:
                        await watch.close()
                        watch = None
                except EtcdTransientError as exc:
                    known = None
                    if watch is not None:
                        await watch.close()
                        watch = None
                    await self._sleep_backoff(delays, str(exc))
        finally:
            self.waiting_on = None
            self._on_progress = None
            if line is not None and acquired:
                # The transaction that took the slot deleted the line key: the lease is only left to
                # revoke, which must not delay the lock (nor hang on an etcd that went away meanwhile).
                task = asyncio.create_task(line.leave(), name=f"etcd-lease-revoke {line.key}")
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
            elif line is not None:  # first: the waiter behind may be waiting for this key to go
                await line.leave()
            if watch is not None:
                await watch.close()

    async def _join_line(self, machine_id: str, slots: int) -> _Line | None:
        """Queue behind the waiters already there; None when etcd refuses the line (wait without it).

        The join also reads the ``slots`` waiters ahead (``max`` of the value last seen), so that the first
        look at the line costs no round trip of its own.
        """
        line = _Line(self.store, machine_id, self._line_ttl)
        try:
            await line.join(max(1, min(slots, FRONT_WAITERS)))
        except LineUnavailable as exc:
            self._refuse_line(exc)
            await line.leave()
            return None
        except BaseException:
            await line.leave()
            raise
        return line

    def _refuse_line(self, exc: LineUnavailable) -> None:
        log.warning(
            "etcd refuses the waiting line under %s (%s); every waiter of this node follows the semaphore",
            self.store.line_prefix,
            exc,
        )
        self._use_line = False

    async def _wait_in_line(self, line: _Line) -> tuple[Semaphore, int] | None:
        """Wait until fewer than ``max`` (at most ``FRONT_WAITERS``) line keys are ahead of this node's; the
        semaphore value and revision read then, to attempt the lock from. None when etcd refuses the line.

        Behind that, the node watches only the key that many places ahead for its deletion (that waiter took a
        slot, gave up, or its lease expired), so each line key has about one watcher and each hand-off wakes
        about one line waiter.
        """
        store = self.store
        limit = 1
        while True:
            try:
                if line.joined_at is not None:
                    position, line.joined_at, limit = line.joined_at, None, line.read_ahead
                else:
                    position = await asyncio.to_thread(
                        store.line_position, line.machine_id, line.create_revision, limit
                    )
                if not position.present:
                    log.info("%s is gone (its lease expired); joining the line again", line.key)
                    await line.join(limit)
                    continue
            except LineUnavailable as exc:
                self._refuse_line(exc)
                return None
            front = max(1, min(position.semaphore.max, FRONT_WAITERS))
            if len(position.ahead) >= limit and front > limit:
                limit = front  # ``max`` is larger than the last read assumed: read enough keys
                continue
            limit = front
            if len(position.ahead) < front:
                log.debug("%d waiters ahead of %s; following %s", len(position.ahead), line.key, store.key)
                line.ahead = {key[len(store.line_prefix) :] for key in position.ahead}
                self.waiting_on = SEMAPHORE
                self._report(LockPhase.WAITING, position.semaphore, position=len(position.ahead) + 1)
                return position.semaphore, position.revision
            ahead = position.ahead[front - 1]
            self._report(LockPhase.WAITING, position.semaphore, position=front + 1, lower_bound=True)
            log.debug("%d or more waiters ahead of %s; waiting for %s to go", front, line.key, ahead)
            self.waiting_on = ahead
            key_watch = store.watch(
                position.read_revision, self._watch_idle_timeout, key=ahead, deletes_only=True
            )
            watch = _ThreadedWatch(key_watch, f"etcd-watch {ahead}")
            try:
                await watch.next_change()
            except _WatchRestart:
                pass  # idle for a long time: look again
            finally:
                await watch.close()

    def _attempt(
        self,
        machine_id: str,
        known: tuple[Semaphore, int] | None,
        watch: _ThreadedWatch | None,
        line: _Line | None = None,
    ) -> LockAttempt | None:
        """One lock attempt (in a worker thread); None when the watch has news newer than ``known``."""
        if known is not None and watch is not None and watch.latest_revision > known[1]:
            return None
        if line is not None:
            # A slot this node is entitled to is raced for only by the other entitled waiters (when several
            # slots are free at once): after a lost race the answer shows the new value, so try again at once
            # while it still leaves a slot for this node.
            return self.store.try_acquire(
                machine_id, known, leave_line=True, retry_while=line.entitled
            )
        # A watching node outside the line makes one compare-and-swap per free slot it sees: after a lost
        # race the watch shows what happened, so retrying at once would only add to the stampede.
        return self.store.try_acquire(machine_id, known, tries=1 if self._use_watch else None)

    async def _wait_for_free_slot(
        self,
        watch: _ThreadedWatch,
        machine_id: str,
        state: tuple[Semaphore, int],
        jitter: float,
        line: _Line | None = None,
    ) -> tuple[Semaphore, int] | None:
        """From ``state`` on, follow the watch until a value shows a free slot throughout a random delay.

        In the line, a node knows its rank: the waiters ahead that have not been seen among the holders yet.
        When there are more free slots than that, the slot is its own and it tries at once, with no delay and
        no race. Otherwise the free slots belong to the waiters ahead, and it waits ``handoff_jitter`` for each
        waiter that is served before it (in case one of them is gone), plus the random delay. The line thus
        leaves in order, and the key each departure deletes is the one the next waiter in line is watching.

        Returns that value and revision to attempt the lock from, or None when the key should be read again
        (deleted, or a value that does not decode: the read will report it).
        """
        seen_revision = state[1]
        candidate: tuple[Semaphore, int] | None = None
        deadline = 0.0

        def delay(sem: Semaphore) -> float:
            if line is None:
                return random.uniform(0, jitter)
            if line.entitled(sem):
                return 0.0
            served_first = len(line.ahead) - sem.semaphore + 1  # waiters ahead that a free slot goes to first
            return served_first * self._handoff_jitter + random.uniform(0, jitter)

        if state[0].semaphore > 0 or state[0].holds(machine_id):
            candidate = state
            deadline = time.monotonic() + delay(state[0])
        while True:
            timeout = None if candidate is None else max(0.0, deadline - time.monotonic())
            change = await watch.next_change(timeout)
            if change is None:
                return candidate  # the free slot lasted through the delay
            if change.revision <= seen_revision:
                continue
            seen_revision = change.revision
            if change.value is None:
                return None
            try:
                sem = Semaphore.decode(change.value)
            except SemaphoreError:
                return None
            if sem.semaphore > 0 or sem.holds(machine_id):
                if candidate is None:
                    deadline = time.monotonic() + delay(sem)
                elif line is not None:  # fewer waiters ahead now: no need to let them go first
                    deadline = min(deadline, time.monotonic() + delay(sem))
                candidate = (sem, change.revision)
            else:
                if line is not None:
                    line.ahead.difference_update(sem.holders)
                candidate = None

    async def release(self, machine_id: str) -> bool:
        if not machine_id:
            raise LockBackendError("cannot release the reboot lock: the machine id is empty")
        released = await asyncio.to_thread(self.store.release, machine_id)
        if released:
            log.info("Released the lock of %s on %s", machine_id, self.store.key)
        else:
            log.debug("%s held no lock on %s", machine_id, self.store.key)
        return released

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.to_thread(self.store.close)
