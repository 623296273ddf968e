"""The reboot semaphore's operations on etcd v3, as procedures (see ``gateway``): no I/O, both shells run them.

Keys, for a group's semaphore key K (locksmith's path, ``locksmithd.semaphore.key_for_group``):

* ``K`` holds locksmith's JSON value. It is read with an exact range, so nothing below it shows in its value.
* ``K/holders/<machine id>`` records who holds a slot since when (``HolderRecord``). It is put in the same
  transaction that adds the id to ``holders`` and deleted in the same one that removes it, so it never tells
  of a slot that is not held. Without permission on that prefix, slots are taken without records (a warning,
  once per client).
* ``K/waiters/<machine id>`` is a waiter's place in line, bound to its lease (see ``waiter``); its
  ``create_revision`` orders the line.

Every change is read → pure transition (``Semaphore``) → one transaction comparing the key's ``mod_revision``
(``version == 0`` for a missing key) with the value read. A lost race answers with the value now stored, in
the same round trip, and the transition is applied to it again, a bounded number of times. A value that does
not decode is a CorruptSemaphore naming the key: reported, never overwritten. Reads are linearizable, so
``status`` never shows a stale holder list (locksmith#64).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd.gateway import (
    EtcdRefused,
    EtcdUnavailable,
    GatewayFormatError,
    GatewaySession,
    KeyValue,
    Procedure,
    delete_op,
    mod_revision_is,
    parse_range,
    parse_txn,
    put_op,
    range_request,
    read_op,
    txn_request,
    version_is,
)
from locksmithd.semaphore import (
    HOLDERS_SUFFIX,
    HolderRecord,
    Semaphore,
    SemaphoreError,
    SemaphoreFullError,
    holder_key,
    key_for_group,
)

log = logging.getLogger(__name__)

LINE_SUFFIX = "/waiters/"
MAX_CONFLICT_RETRIES = 50
LEASE_GRANT = "lease/grant"


class CorruptSemaphore(LockBackendError):
    """The semaphore key holds something that is not a semaphore; left as it is for an operator to fix."""


class LineRefused(LockBackendError):
    """etcd refuses the waiting line's requests (no lease API, or no permission on the line's keys)."""


@dataclass(frozen=True)
class SemaphoreKeys:
    """The keys of one group's semaphore."""

    semaphore: str

    @classmethod
    def for_group(cls, group: str) -> SemaphoreKeys:
        return cls(key_for_group(group))

    @property
    def line_prefix(self) -> str:
        return self.semaphore + LINE_SUFFIX

    @property
    def holders_prefix(self) -> str:
        return self.semaphore + HOLDERS_SUFFIX

    def line_key(self, machine_id: str) -> str:
        return self.line_prefix + machine_id

    def holder_key(self, machine_id: str) -> str:
        return holder_key(self.semaphore, machine_id)


@dataclass(frozen=True)
class Snapshot:
    """The semaphore as read, and the key's ``mod_revision`` then (0: the key does not exist yet)."""

    semaphore: Semaphore
    revision: int


def decode_snapshot(keys: SemaphoreKeys, kv: KeyValue | None) -> Snapshot:
    """A missing key reads as the default value at revision 0; CorruptSemaphore for anything undecodable."""
    if kv is None:
        return Snapshot(Semaphore.default(), 0)
    try:
        return Snapshot(Semaphore.decode(kv.value), kv.mod_revision)
    except SemaphoreError as exc:
        raise CorruptSemaphore(f"etcd key {keys.semaphore!r} holds a corrupt semaphore: {exc}") from None


def _format(keys: SemaphoreKeys, what: str, exc: GatewayFormatError) -> EtcdUnavailable:
    return EtcdUnavailable(f"etcd answered {what} of {keys.semaphore!r} with unexpected JSON: {exc}")


def read(session: GatewaySession, keys: SemaphoreKeys, *, timeout: float | None = None) -> Procedure[Snapshot]:
    doc = yield from session.call("kv/range", range_request(keys.semaphore), timeout=timeout)
    try:
        found = parse_range(doc).first()
    except GatewayFormatError as exc:
        raise _format(keys, "a read", exc) from None
    return decode_snapshot(keys, found)


def create_and_read(session: GatewaySession, keys: SemaphoreKeys) -> Procedure[Snapshot]:
    """Create the key with the default value if it is missing, and read it, in one round trip."""
    default = Semaphore.default().encode()
    body = txn_request(
        [version_is(keys.semaphore, 0)],
        [put_op(keys.semaphore, default), read_op(keys.semaphore)],
        [read_op(keys.semaphore)],
    )
    doc = yield from session.call("kv/txn", body)
    try:
        result = parse_txn(doc)
        found = result.read(len(result.responses) - 1).first()
    except (GatewayFormatError, IndexError) as exc:
        raise _format(keys, "the creation", GatewayFormatError(str(exc))) from None
    if result.succeeded:
        log.info("Created semaphore %s with %s", keys.semaphore, default)
    return decode_snapshot(keys, found)


def status(session: GatewaySession, keys: SemaphoreKeys) -> Procedure[tuple[Snapshot, dict[str, HolderRecord]]]:
    """The semaphore and the records of its holders, in one read (records of ids not holding are left out)."""
    body = txn_request([], [read_op(keys.semaphore), read_op(keys.holders_prefix, prefix=True)])
    doc = yield from session.call("kv/txn", body)
    try:
        result = parse_txn(doc)
        snapshot = decode_snapshot(keys, result.read(0).first())
        found = result.read(1).kvs
    except GatewayFormatError as exc:
        raise _format(keys, "a read", exc) from None
    records = {}
    for kv in found:
        holder = kv.key[len(keys.holders_prefix) :]
        record = HolderRecord.decode(kv.value)
        if record is not None and snapshot.semaphore.holds(holder):
            records[holder] = record
    return snapshot, records


@dataclass(frozen=True)
class Written:
    """Whether a compare-and-swap wrote, and the value now stored (the one written, or the winner's)."""

    ok: bool
    now: Snapshot


def _record_ops(
    keys: SemaphoreKeys, before: Semaphore, after: Semaphore, records: Mapping[str, HolderRecord]
) -> list[dict[str, object]]:
    """Side-key puts for ids that gain a slot (when a record is given) and deletes for ids that lose one."""
    ops: list[dict[str, object]] = []
    for holder in sorted(set(after.holders) - set(before.holders)):
        if holder in records:
            ops.append(put_op(keys.holder_key(holder), records[holder].encode()))
    for holder in sorted(set(before.holders) - set(after.holders)):
        ops.append(delete_op(keys.holder_key(holder)))
    return ops


def compare_and_swap(
    session: GatewaySession,
    keys: SemaphoreKeys,
    start: Snapshot,
    new: Semaphore,
    *,
    records: Mapping[str, HolderRecord] | None = None,
    also_delete: str | None = None,
) -> Procedure[Written]:
    """Write ``new`` if the key is still at ``start.revision``, with the holders' side keys in the same
    transaction (and ``also_delete``, a waiter's line key); else the value stored now."""
    checked = Semaphore.decode(new.encode())  # a value that fails validation is never written
    compare = version_is(keys.semaphore, 0) if start.revision == 0 else mod_revision_is(keys.semaphore, start.revision)
    extra = _record_ops(keys, start.semaphore, checked, records or {}) if session.holder_records else []
    if also_delete is not None:
        extra.append(delete_op(also_delete))
    body = txn_request([compare], [put_op(keys.semaphore, checked.encode()), *extra], [read_op(keys.semaphore)])
    try:
        doc = yield from session.call("kv/txn", body)
    except EtcdRefused as exc:
        if not extra or "permission denied" not in exc.reason or not session.holder_records:
            raise
        log.warning(
            "etcd refuses the holder records under %s (%s): taking and releasing slots without them; give "
            "this user read-write access to that prefix to see who holds a slot since when",
            keys.holders_prefix,
            exc.reason,
        )
        session.holder_records = False
        return (yield from compare_and_swap(session, keys, start, new, also_delete=also_delete))
    try:
        result = parse_txn(doc)
        if result.succeeded:
            return Written(True, Snapshot(checked, result.revision))
        session.stats.conflicts += 1
        return Written(False, decode_snapshot(keys, result.read(0).first()))
    except GatewayFormatError as exc:
        raise _format(keys, "a write", exc) from None


@dataclass(frozen=True)
class Update:
    """What one read-modify-write did: the value it started from, the value stored after, whether it wrote."""

    before: Snapshot
    after: Snapshot
    written: bool


def apply(
    session: GatewaySession,
    keys: SemaphoreKeys,
    change: Callable[[Semaphore], Semaphore],
    *,
    start: Snapshot | None = None,
    records: Mapping[str, HolderRecord] | None = None,
    retries: int = MAX_CONFLICT_RETRIES,
) -> Procedure[Update]:
    """Read (or start from ``start``), apply ``change`` and write it with compare-and-swap, again on a lost race.

    ``change`` raising SemaphoreError aborts with nothing written; a result equal to the value read is not
    written. ``records`` are written for ids that gain a slot.
    """
    current = start if start is not None else (yield from read(session, keys))
    for attempt in range(retries):
        new = change(current.semaphore)
        if new == current.semaphore:
            return Update(current, current, written=False)
        written = yield from compare_and_swap(session, keys, current, new, records=records)
        if written.ok:
            return Update(current, written.now, written=True)
        log.debug("lost a race for %s at revision %d (attempt %d); retrying", keys.semaphore, current.revision,
                  attempt + 1)
        current = written.now  # the answer carried the value now stored: retry at once
    raise EtcdUnavailable(f"gave up on {keys.semaphore!r} after {retries} conflicting writes by other nodes")


def release(session: GatewaySession, keys: SemaphoreKeys, holder: str) -> Procedure[bool]:
    """Free ``holder``'s slot (and its record) if it has one; True when something was released."""
    update = yield from apply(session, keys, lambda sem: sem.unlock_if_held(holder))
    return update.written and update.before.semaphore.holds(holder)


@dataclass(frozen=True)
class Attempt:
    acquired: bool
    now: Snapshot


def try_take(
    session: GatewaySession,
    keys: SemaphoreKeys,
    holder: str,
    start: Snapshot,
    *,
    record: HolderRecord | None = None,
    tries: int = 1,
    leave_line: bool = False,
    retry_while: Callable[[Semaphore], bool] | None = None,
) -> Procedure[Attempt]:
    """Take a slot if ``start`` shows one (a holder already has one); never waits for a release.

    A lost race is tried again, up to ``tries`` times in all, while the value stored still shows a free slot
    and ``retry_while`` holds for it. ``leave_line`` deletes the holder's line key in the same transaction.
    """
    current = start
    for _ in range(max(1, tries)):
        try:
            new = current.semaphore.lock(holder)
        except SemaphoreFullError:
            return Attempt(False, current)
        if new == current.semaphore:
            return Attempt(True, current)
        written = yield from compare_and_swap(
            session,
            keys,
            current,
            new,
            records={holder: record} if record is not None else None,
            also_delete=keys.line_key(holder) if leave_line else None,
        )
        if written.ok:
            return Attempt(True, written.now)
        current = written.now
        if retry_while is not None and not retry_while(current.semaphore):
            break
    return Attempt(current.semaphore.holds(holder), current)


def ping(session: GatewaySession, keys: SemaphoreKeys, timeout: float) -> Procedure[bool]:
    """True when some endpoint serves a linearizable read of the key within ``timeout`` each."""
    try:
        yield from session.call("kv/range", range_request(keys.semaphore, count_only=True), timeout=timeout)
    except LockBackendError as exc:
        log.debug("etcd is not usable: %s", exc)
        return False
    return True


# -- the waiting line ----------------------------------------------------------------------------------------


def _line_call(session: GatewaySession, path: str, body: dict[str, object]) -> Procedure[dict[str, object]]:
    """A call for the line: a refusal (no such API on an old etcd, no permission) is LineRefused."""
    try:
        return (yield from session.call(path, body))
    except EtcdRefused as exc:
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
    try:
        yield from _line_call(session, "lease/revoke", {"ID": lease})
    except LineRefused as exc:
        if "lease not found" not in str(exc):
            raise


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
        raise _format(keys, f"the line put of {machine_id!r}", exc) from None
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
        raise _format(keys, f"the line read of {machine_id!r}", exc) from None
    return LinePosition(now, present, ahead, waiting, result.revision)


def line_members(session: GatewaySession, keys: SemaphoreKeys) -> Procedure[list[str]]:
    """The machine ids waiting in line now, first in line first."""
    doc = yield from session.call(
        "kv/range", range_request(keys.line_prefix, prefix=True, keys_only=True, newest_first=False)
    )
    try:
        return [kv.key[len(keys.line_prefix) :] for kv in parse_range(doc).kvs]
    except GatewayFormatError as exc:
        raise _format(keys, "the line read", exc) from None
