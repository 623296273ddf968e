"""The ``etcd-lock``/``best-effort`` LockBackend: the waiter (``waiter.Waiter``) driven over etcd.

Rules of this file: it performs the waiter's actions and feeds back what came of them; every decision is the
waiter's. In v2 compatibility mode the v2 semaphore (``v2``) is held first and released last: ``acquire``
waits for a v2 slot before it waits for a v3 one, and gives the v2 slot back if it took it and then fails for
any reason but an unreachable etcd (whose retry will want it again); ``release`` frees the v3 slot, then the v2
one. Each ``acquire`` has its own waiter, lease keeper and watches, all closed when it returns. A failure
ends ``acquire`` with the backend's error for the strategy to retry (``locksmithd.backends``): when etcd is out
of reach the line key is left to its lease (a retry within the lease's TTL puts the same key again and keeps
its place), otherwise the node leaves the line at once. After a success the lease is only revoked to tidy up,
in the background, so that the lock is not delayed (nor held up by an etcd that went away meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as random_module
import time
from collections.abc import Callable
from dataclasses import replace

from coreos_common.identity import read_hostname
from locksmithd.backends import (
    LockBackendError,
    LockBackendUnavailable,
    LockPhase,
    LockProgress,
    ProgressCallback,
    SlotHolding,
)
from locksmithd.backends.etcd import line, ops, v2
from locksmithd.backends.etcd.client import EtcdClient, KeyWatch, LeaseKeeper, WatchRestart
from locksmithd.backends.etcd.gateway import EtcdRefused, EtcdStats
from locksmithd.backends.etcd.waiter import (
    Action,
    AtFront,
    AwaitLeaving,
    Done,
    Event,
    Following,
    FollowKey,
    InLine,
    Joining,
    JoinLine,
    KeyChanged,
    KeyRead,
    LeaseLost,
    Left,
    LineJoined,
    LineRefused,
    Phase,
    PlaceRead,
    Quiet,
    Reading,
    ReadKey,
    ReadPlace,
    TakeResult,
    TakeSlot,
    Taking,
    Tuning,
    Waiter,
    WatchEnded,
)
from locksmithd.backends.etcd.watch import WatchEvent
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import HolderRecord, Semaphore, SemaphoreError

log = logging.getLogger(__name__)


DEFAULT_TUNING = Tuning()


class _Wait:
    """The I/O of one ``acquire``: the lease of its place in line and the watch it follows."""

    def __init__(self, backend: EtcdLockBackend, waiter: Waiter, version: str) -> None:
        self.backend = backend
        self.client = backend.client
        self.waiter = waiter
        self.version = version
        self.lease = LeaseKeeper(backend.client, backend.line_ttl, backend.random)
        self.following: tuple[contextlib.AbstractAsyncContextManager[KeyWatch], KeyWatch] | None = None

    async def perform(self, action: Action) -> Event:
        client, keys, session = self.client, self.client.keys, self.client.session
        if not isinstance(action, FollowKey | TakeSlot | ReadPlace):
            await self.stop_following()  # only the front of the line follows the semaphore key
        match action:
            case ReadKey():
                return KeyRead(await client.run(ops.create_and_read(session, keys)))
            case TakeSlot():
                record = HolderRecord.at(time.time(), self.backend.hostname, client.settings.group, self.version)
                attempt = await client.run(ops.try_take(
                    session, keys, self.waiter.machine_id, action.start, record=record, tries=action.tries,
                    leave_line=action.leave_line, retry_while=_entitled(action.entitled_among),
                ))  # fmt: skip
                return TakeResult(attempt.acquired, attempt.now)
            case JoinLine(read_ahead=read_ahead):
                try:
                    lease = await self.lease.fresh()
                    joined = await client.run(line.join_line(session, keys, self.waiter.machine_id, lease, read_ahead))
                except line.LeaseGone:
                    self.lease.lost.set()  # expired before the put arrived: the next join takes a new one
                    return LeaseLost()
                except line.LineRefused as exc:
                    return await self.refused(exc)
                return LineJoined(*joined)
            case ReadPlace(create_revision=created, limit=limit):
                machine_id = self.waiter.machine_id
                try:
                    position = await client.run(line.line_position(session, keys, machine_id, created, limit))
                except line.LineRefused as exc:
                    return await self.refused(exc)
                return PlaceRead(position)
            case FollowKey(after_revision=after, until=until):
                return await self.follow(after, until)
            case AwaitLeaving(machine_id=ahead, after_revision=after):
                async with client.watch(keys.line_key(ahead), after, deletes_only=True) as watch:
                    return await self.next_events(watch, None, lambda events: Left())
        raise AssertionError(f"no way to perform {action}")

    async def refused(self, exc: LockBackendError) -> Event:
        log.warning(
            "etcd refuses the waiting line under %s (%s); this node follows the semaphore like every waiter",
            self.client.keys.line_prefix, exc,
        )  # fmt: skip
        await self.lease.close(revoke=True)
        return LineRefused(str(exc))

    async def follow(self, after: int, until: float | None) -> Event:
        if self.following is None:
            manager = self.client.watch(self.client.keys.semaphore, after)
            self.following = manager, await manager.__aenter__()
        watch = self.following[1]
        while True:
            event = await self.next_events(watch, until, lambda events: _newest(events))
            if isinstance(event, KeyChanged) and event.revision <= after:
                continue  # already seen (in an answer that came faster than the watch)
            if isinstance(event, WatchEnded):
                await self.stop_following()
            return event

    async def next_events(
        self, watch: KeyWatch, until: float | None, make: Callable[[list[WatchEvent]], Event]
    ) -> Event:
        """The next events of ``watch`` made into an event; Quiet at ``until``, WatchEnded when idle for the
        backend's idle timeout or when etcd ended the watch, LeaseLost when the line's lease went."""
        idle = self.backend.watch_idle_timeout
        timeout = idle if until is None else min(idle, max(0.0, until - time.monotonic()))
        reading = asyncio.ensure_future(watch.next(timeout))
        # Only a wait in line can lose its place; a node that left the line has no lease to lose.
        lost = asyncio.ensure_future(self.lease.lost.wait() if self.lease.lease else asyncio.Event().wait())
        try:
            done, _ = await asyncio.wait({reading, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reading, lost):
                task.cancel()
        if reading not in done:
            return LeaseLost()
        try:
            return make(reading.result())
        except TimeoutError:
            return Quiet() if until is not None and time.monotonic() >= until else WatchEnded()
        except WatchRestart as exc:
            log.debug("watch of %s ended: %s", self.client.keys.semaphore, exc)
            return WatchEnded()

    async def stop_following(self) -> None:
        if self.following is not None:
            manager, self.following = self.following[0], None
            await manager.__aexit__(None, None, None)

    async def close(self, *, held: bool, keep_place: bool) -> asyncio.Task[None] | None:
        await self.stop_following()
        if held and self.lease.lease:
            return asyncio.create_task(self.lease.close(revoke=True), name="etcd-lease-revoke")
        await self.lease.close(revoke=not keep_place)
        return None


def _entitled(ahead: frozenset[str] | None) -> Callable[[Semaphore], bool] | None:
    """While a value leaves a slot for this node after the waiters ``ahead``, a lost race is tried again."""
    if ahead is None:
        return None
    return lambda sem: len(ahead - set(sem.holders)) < sem.semaphore


def _newest(events: list[WatchEvent]) -> Event:
    """A burst of changes folds into the newest; a deleted or undecodable value means "read it afresh"."""
    kv = events[-1].kv
    if events[-1].deleted:
        return KeyChanged(kv.mod_revision, None)
    try:
        return KeyChanged(kv.mod_revision, ops.Snapshot(Semaphore.decode(kv.value), kv.mod_revision))
    except SemaphoreError:
        return KeyChanged(kv.mod_revision, None)


class EtcdLockBackend:
    """locksmith's semaphore in etcd v3, waited for in a lease-bound line with watches."""

    name = "etcd-lock"

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        tuning: Tuning = DEFAULT_TUNING,
        line_ttl: float = 30.0,
        watch_idle_timeout: float = 300.0,
        stats: EtcdStats | None = None,
        random: Callable[[], float] = random_module.random,
        hostname: str | None = None,
    ) -> None:
        self.settings = settings
        self.client = EtcdClient(settings, stats)
        self.tuning = tuning
        self.line_ttl = line_ttl
        self.watch_idle_timeout = watch_idle_timeout
        self.random = random
        self.hostname = read_hostname() if hostname is None else hostname
        self.waiter: Waiter | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self.v2 = v2.V2Session(settings) if settings.v2_compat else None

    @property
    def phase(self) -> Phase | None:
        """Where the current ``acquire`` stands (None when none is running)."""
        return self.waiter.phase if self.waiter is not None else None

    async def reachable(self) -> bool:
        timeout = min(2.0, self.settings.request_timeout)
        return await self.client.run(ops.ping(self.client.session, self.client.keys, timeout))

    async def acquire(self, machine_id: str, *, version: str = "", on_progress: ProgressCallback | None = None) -> None:
        if not machine_id:
            raise LockBackendError("cannot take the reboot lock: the machine id is empty")
        took_v2 = False
        if self.v2 is not None:
            took_v2 = await self._hold_v2(machine_id, on_progress)
        try:
            await self._acquire_v3(machine_id, version, on_progress)
        except BaseException as exc:
            if took_v2 and not isinstance(exc, LockBackendUnavailable):
                await self._give_back_v2(machine_id)
            raise

    async def _hold_v2(self, machine_id: str, on_progress: ProgressCallback | None) -> bool:
        """Wait for a slot of locksmith's v2 semaphore; True when this call took it."""
        assert self.v2 is not None

        def waiting(sem: Semaphore) -> None:
            log.info("%s in the v2 semaphore %s; waiting for a release (compatibility mode)", sem.describe(),
                     self.v2.key if self.v2 is not None else "")  # fmt: skip
            if on_progress is not None:
                on_progress(LockProgress(LockPhase.WAITING, holders=sem.holders, slots=sem.max))

        if on_progress is not None:
            on_progress(LockProgress(LockPhase.ASKING))
        took = await self.client.run(v2.acquire(self.v2, machine_id, self.watch_idle_timeout, waiting))
        log.info("%s holds a slot of the v2 semaphore %s (compatibility mode)", machine_id, self.v2.key)
        return took

    async def _give_back_v2(self, machine_id: str) -> None:
        assert self.v2 is not None
        try:
            await self.client.run(v2.release(self.v2, machine_id))
        except LockBackendError as exc:
            log.error("Could not give back the v2 slot of %s (%s); it is released with the lock later", machine_id,
                      exc)  # fmt: skip

    async def _acquire_v3(self, machine_id: str, version: str, on_progress: ProgressCallback | None) -> None:
        waiter = self.waiter = Waiter(machine_id, self.tuning, self.random)
        wait = _Wait(self, waiter, version)
        reported: LockProgress | None = None
        action = waiter.start()
        keep_place = False
        try:
            while True:
                progress = waiter.progress()
                if on_progress is not None and progress != reported:
                    on_progress(progress)
                    reported = progress
                if isinstance(action, Done):
                    break
                before = waiter.phase
                action = waiter.handle(await wait.perform(action), time.monotonic())
                self._log_wait(machine_id, before, waiter.phase)
        except LockBackendUnavailable:
            keep_place = True
            raise
        finally:
            if not waiter.line_allowed:
                self.tuning = replace(self.tuning, line=False)  # refused once: this node waits without it
            cleanup = await wait.close(held=isinstance(action, Done), keep_place=keep_place)
            if cleanup is not None:
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)
            self.waiter = None
        log.info("Lock taken for %s: %s", machine_id, action.now.semaphore.describe())

    def _log_wait(self, machine_id: str, before: Phase, after: Phase) -> None:
        """One line when a node starts waiting, with the value that made it wait and where it waits."""
        if before.name is after.name:
            return
        log.debug("%s: %s -> %s", machine_id, before.name.value, after.name.value)
        if not isinstance(before, Joining | Reading | Taking):
            return
        prefix = self.client.keys.line_prefix
        match after:
            case AtFront():
                where = f"at the front of the line under {prefix}"
            case InLine(ahead_at_least=ahead):
                where = f"in line under {prefix}, behind {ahead} or more waiters"
            case Following():
                where = f"following {self.client.keys.semaphore} (no waiting line)"
            case _:
                return
        log.info("%s; %s waiting for a release %s", after.seen.semaphore.describe(), machine_id, where)

    async def holding(self, machine_id: str) -> SlotHolding:
        """Whether ``machine_id`` is among the v3 semaphore's holders, with its record's time when there is one.

        The v2 semaphore of compatibility mode is not read: it is taken with the v3 one and released after it,
        and reading it would create its key when missing. Without read access to the holder records the
        semaphore alone is read (no time).
        """
        session, keys = self.client.session, self.client.keys
        try:
            snapshot, records = await self.client.run(ops.status(session, keys))
        except EtcdRefused as exc:
            if "permission denied" not in exc.reason:
                raise
            snapshot, records = await self.client.run(ops.read(session, keys)), {}
        if not snapshot.semaphore.holds(machine_id):
            return SlotHolding(False)
        record = records.get(machine_id)
        return SlotHolding(True, record.taken_at() if record is not None else None)

    async def release(self, machine_id: str) -> bool:
        if not machine_id:
            raise LockBackendError("cannot release the reboot lock: the machine id is empty")
        released = await self.client.run(ops.release(self.client.session, self.client.keys, machine_id))
        if released:
            log.info("Released the lock of %s on %s", machine_id, self.client.keys.semaphore)
        else:
            log.debug("%s held no lock on %s", machine_id, self.client.keys.semaphore)
        # Last, so that no locksmith node reboots while this one still counts as rebooting.
        if self.v2 is not None and await self.client.run(v2.release(self.v2, machine_id)):
            log.info("Released the v2 slot of %s on %s (compatibility mode)", machine_id, self.v2.key)
            released = True
        return released

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await self.client.close()
