"""The waiting line's requests, as procedures (see ``gateway``): leases, line keys, a waiter's place.

A waiter puts ``<semaphore key>/waiters/<machine id>`` under a lease of its own; the key's ``create_revision``
is its place, so the line is ordered by creation and a dead waiter's key goes when its lease expires. Reads of
the line are ranges of keys only, newest first, limited to the few a waiter needs (etcd's ``count`` ignores
``max_create_revision``, so a rank is the number of keys returned). The rules of ``gateway`` and ``ops``
hold; a refusal of any of these requests (an etcd without the lease API, no permission on the line's prefix)
is LineRefused, after which a node waits without the line.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd.gateway import (
    EtcdRefused,
    GatewayFormatError,
    GatewaySession,
    Procedure,
    parse_range,
    parse_txn,
    put_op,
    range_request,
    read_op,
    txn_request,
)
from locksmithd.backends.etcd.ops import SemaphoreKeys, Snapshot, decode_snapshot, format_error

LEASE_GRANT = "lease/grant"


class LineRefused(LockBackendError):
    """etcd refuses the waiting line's requests (no lease API, or no permission on the line's keys)."""


class LeaseGone(LockBackendError):
    """The lease a request named no longer exists (it expired before the request arrived): take a new one."""


def _line_call(session: GatewaySession, path: str, body: dict[str, object]) -> Procedure[dict[str, object]]:
    """A call for the line. A lease that has expired meanwhile is LeaseGone; any other refusal (no such API
    on an old etcd, no permission on the line's keys) is LineRefused."""
    try:
        return (yield from session.call(path, body))
    except EtcdRefused as exc:
        if "lease not found" in exc.reason:
            raise LeaseGone(str(exc)) from None
        raise LineRefused(str(exc)) from None


def grant_lease(session: GatewaySession, ttl: float) -> Procedure[int]:
    """A new lease of ``ttl`` seconds (rounded up, as etcd counts whole seconds); its ID."""
    doc = yield from _line_call(session, LEASE_GRANT, {"TTL": max(1, math.ceil(ttl)), "ID": 0})
    lease = doc.get("ID")
    if doc.get("error") or not isinstance(lease, str | int) or not str(lease).isdigit():
        raise LineRefused(f"lease grant failed: {doc.get('error') or 'no lease ID in the answer'}")
    return int(lease)


def keep_lease_alive(session: GatewaySession, lease: int) -> Procedure[bool]:
    """Renew the lease once; False when etcd no longer has it (expired, or revoked)."""
    doc = yield from _line_call(session, "lease/keepalive", {"ID": lease})
    result = doc.get("result") or {}
    try:
        return int(result.get("TTL", 0) or 0) > 0 if isinstance(result, dict) else False
    except (TypeError, ValueError):
        return False


def revoke_lease(session: GatewaySession, lease: int) -> Procedure[None]:
    """Revoke the lease, which deletes the line key under it; a lease already gone is fine."""
    with contextlib.suppress(LeaseGone):
        yield from _line_call(session, "lease/revoke", {"ID": lease})


@dataclass(frozen=True)
class LinePosition:
    """One read of a waiter's place: the semaphore, whether its own line key is still there, the machine ids
    of the waiters ahead (nearest first, as many as were asked for), how many wait in all, and the store
    revision of the read (a watch from the next revision misses nothing)."""

    now: Snapshot
    present: bool
    ahead: tuple[str, ...]
    waiting: int
    read_revision: int


def _newest_in_line(keys: SemaphoreKeys, limit: int, below: int = 0) -> dict[str, object]:
    return read_op(
        keys.line_prefix, prefix=True, keys_only=True, newest_first=True, limit=max(1, limit),
        max_create_revision=below - 1 if below else 0,
    )  # fmt: skip


def _line_count(keys: SemaphoreKeys) -> dict[str, object]:
    return read_op(keys.line_prefix, prefix=True, count_only=True)


def join_line(
    session: GatewaySession, keys: SemaphoreKeys, machine_id: str, lease: int, read_ahead: int
) -> Procedure[tuple[int, LinePosition | None]]:
    """Put this machine's line key under ``lease``; its ``create_revision`` (its place), and in the same
    transaction the place read with ``read_ahead`` keys ahead.

    A key left by an earlier wait of the same machine keeps its place and moves to the new lease. The place
    comes from the newest line keys, so it is known only when this key is the newest (always, for a key just
    created); otherwise it is None and ``line_position`` must be asked.
    """
    key = keys.line_key(machine_id)
    ops = [put_op(key, machine_id, lease), read_op(key, keys_only=True), read_op(keys.semaphore)]
    ops += [_newest_in_line(keys, read_ahead + 1), _line_count(keys)]
    doc = yield from _line_call(session, "kv/txn", txn_request([], ops))
    try:
        result = parse_txn(doc)
        mine = result.read(1).first()
        if mine is None:
            raise GatewayFormatError("the line key just put is not there")
        newest = [kv.key for kv in result.read(3).kvs]
        now = decode_snapshot(keys, result.read(2).first())
        waiting = result.read(4).count
    except GatewayFormatError as exc:
        raise format_error(keys, f"the line put of {machine_id!r}", exc) from None
    if not newest or newest[0] != key:
        return mine.create_revision, None
    ahead = tuple(k[len(keys.line_prefix) :] for k in newest[1:])
    return mine.create_revision, LinePosition(now, True, ahead, waiting, result.revision)


def line_position(
    session: GatewaySession, keys: SemaphoreKeys, machine_id: str, create_revision: int, limit: int
) -> Procedure[LinePosition]:
    """In one linearizable read: the semaphore, whether this machine's line key is still there, and the
    line keys created before it, nearest first, at most ``limit`` of them.

    etcd's ``count`` ignores ``max_create_revision``, so the rank is the number of keys returned: exact
    below ``limit``, "at least ``limit``" at it.
    """
    ops = [
        read_op(keys.semaphore),
        read_op(keys.line_key(machine_id), keys_only=True),
        _newest_in_line(keys, limit, below=create_revision),
        _line_count(keys),
    ]
    doc = yield from _line_call(session, "kv/txn", txn_request([], ops))
    try:
        result = parse_txn(doc)
        now = decode_snapshot(keys, result.read(0).first())
        present = result.read(1).first() is not None
        ahead = tuple(kv.key[len(keys.line_prefix) :] for kv in result.read(2).kvs)
        waiting = result.read(3).count
    except GatewayFormatError as exc:
        raise format_error(keys, f"the line read of {machine_id!r}", exc) from None
    return LinePosition(now, present, ahead, waiting, result.revision)


def line_members(session: GatewaySession, keys: SemaphoreKeys) -> Procedure[list[str]]:
    """The machine ids waiting in line now, first in line first."""
    doc = yield from session.call(
        "kv/range", range_request(keys.line_prefix, prefix=True, keys_only=True, newest_first=False)
    )
    try:
        return [kv.key[len(keys.line_prefix) :] for kv in parse_range(doc).kvs]
    except GatewayFormatError as exc:
        raise format_error(keys, "the line read", exc) from None
