"""The reboot semaphore's operations on etcd v3, as procedures (see ``gateway``): no I/O, both shells run them.

Keys, for a group's semaphore key K (locksmith's path, ``locksmithd.semaphore.key_for_group``):

* ``K`` holds locksmith's JSON value. It is read with an exact range, so nothing below it shows in its value.
* ``K/holders/<machine id>`` records who holds a slot since when (``HolderRecord``). It is put in the same
  transaction that adds the id to ``holders`` and deleted in the same one that removes it, so it never tells
  of a slot that is not held. Without permission on that prefix, slots are taken without records (a warning,
  once per client).
* ``K/waiters/<machine id>`` is a waiter's place in line, bound to its lease (``line``, ``waiter``); its
  ``create_revision`` orders the line.

Every change is read → pure transition (``Semaphore``) → one transaction comparing the key's ``mod_revision``
(``version == 0`` for a missing key) with the value read. A lost race answers with the value now stored, in
the same round trip, and the transition is applied to it again, a bounded number of times. A value that does
not decode is a CorruptSemaphore naming the key: reported, never overwritten. Reads are linearizable, so
``status`` never shows a stale holder list (locksmith#64).
"""

from __future__ import annotations

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

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger, fetched when a line is logged: ops is on locksmithctl's start-up path, and the
    logging package alone costs it more than a millisecond or two, for lines a command rarely writes."""
    import logging

    return logging.getLogger(__name__)

LINE_SUFFIX = "/waiters/"
MAX_CONFLICT_RETRIES = 50


class CorruptSemaphore(LockBackendError):
    """The semaphore key holds something that is not a semaphore; left as it is for an operator to fix."""


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


def format_error(keys: SemaphoreKeys, what: str, exc: GatewayFormatError) -> EtcdUnavailable:
    return EtcdUnavailable(f"etcd answered {what} of {keys.semaphore!r} with unexpected JSON: {exc}")


def read(session: GatewaySession, keys: SemaphoreKeys, *, timeout: float | None = None) -> Procedure[Snapshot]:
    doc = yield from session.call("kv/range", range_request(keys.semaphore), timeout=timeout)
    try:
        found = parse_range(doc).first()
    except GatewayFormatError as exc:
        raise format_error(keys, "a read", exc) from None
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
        raise format_error(keys, "the creation", GatewayFormatError(str(exc))) from None
    if result.succeeded:
        _log().info("Created semaphore %s with %s", keys.semaphore, default)
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
        raise format_error(keys, "a read", exc) from None
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
        _log().warning(
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
        raise format_error(keys, "a write", exc) from None


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
        _log().debug("lost a race for %s at revision %d (attempt %d); retrying", keys.semaphore, current.revision,
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
        _log().debug("etcd is not usable: %s", exc)
        return False
    return True
