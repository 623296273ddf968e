"""Watch update-engine's status over D-Bus: ``GetStatus()`` once, then the ``StatusUpdate`` signals.

Signals are checked strictly: the body must have the ``(x d s s x)`` signature, anything else is logged as a
WARNING and dropped.  By default a signal counts only when it comes from the connection that currently owns
``com.coreos.update1`` (tracked through ``NameOwnerChanged``), because on the system bus any local user may
emit a signal with that interface and member, and a forged ``UPDATE_STATUS_UPDATED_NEED_REBOOT`` would reboot
the node.

The trade-off: ``locksmithctl send-need-reboot`` works by emitting exactly such a signal from its own
connection, so with the filter on it is ignored (with a WARNING saying so).  ``accept_any_sender=True`` (the
daemon's ``--accept-any-sender`` / ``LOCKSMITHD_ACCEPT_ANY_SENDER=true``) restores the original behaviour of
accepting the signal from anyone.

Any local user can send such signals in a loop, so the warnings about them are bounded
(``coreos_common.logs.RepeatedWarning``): the first of a burst is logged in full, the rest are counted and summed
up once a minute while they keep coming. ``ignored_signals`` counts them all, by reason, for the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from coreos_common.dbus import DBUS_NAME, ERROR_INVALID_SIGNATURE, DBusCallError, add_match, call, get_name_owner
from coreos_common.logs import RepeatedWarning
from coreos_common.status import (
    BUS_NAME,
    INTERFACE,
    OBJECT_PATH,
    STATUS_SIGNATURE,
    StatusSnapshot,
    UpdateStatus,
)

log = logging.getLogger(__name__)

# Why a StatusUpdate signal was dropped (the ``reason`` label of the metric).
IGNORED_NOT_OWNER = "sender"
IGNORED_MALFORMED = "malformed"
REPEAT_SUMMARY_INTERVAL = 60.0

STATUS_SIGNAL = "StatusUpdate"
STATUS_MATCH_RULE = f"type='signal',interface='{INTERFACE}',member='{STATUS_SIGNAL}'"
OWNER_MATCH_RULE = (
    f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',member='NameOwnerChanged',arg0='{BUS_NAME}'"
)

StatusPredicate = Callable[[StatusSnapshot], bool]
StatusListener = Callable[[StatusSnapshot], None]


class UpdateEngineUnavailable(Exception):
    """GetStatus failed: update-engine is not on the bus, refused, or answered with something malformed."""


def is_need_reboot(status: StatusSnapshot) -> bool:
    return status.current_operation == UpdateStatus.UPDATED_NEED_REBOOT.value


def is_idle(status: StatusSnapshot) -> bool:
    return status.current_operation == UpdateStatus.IDLE.value


def describe(status: StatusSnapshot) -> str:
    """One-line form of a status, as the original printed every signal."""
    return (
        f"LastCheckedTime={status.last_checked_time} Progress={status.progress} "
        f'CurrentOperation="{status.current_operation}" NewVersion={status.new_version} '
        f"NewSize={status.new_size}"
    )


@dataclass
class _Waiter:
    predicate: StatusPredicate
    future: asyncio.Future[StatusSnapshot]


@dataclass
class _Subscribers:
    waiters: list[_Waiter] = field(default_factory=list)
    listeners: list[StatusListener] = field(default_factory=list)


class UpdateEngineWatcher:
    """Holds the latest status and wakes whoever waits for a particular one."""

    def __init__(
        self,
        bus: MessageBus,
        *,
        accept_any_sender: bool = False,
        retry_delay: float = 10.0,
        summary_interval: float = REPEAT_SUMMARY_INTERVAL,
    ) -> None:
        self._bus = bus
        self.accept_any_sender = accept_any_sender
        self._retry_delay = retry_delay
        self._owner: str | None = None
        self._owner_appeared = asyncio.Event()
        self._latest: StatusSnapshot | None = None
        self._subscribers = _Subscribers()
        self._refresh_task: asyncio.Task[None] | None = None
        self._started = False
        self._ignored = {
            IGNORED_NOT_OWNER: RepeatedWarning(log, f"{STATUS_SIGNAL} signals from senders that do not own {BUS_NAME}",
                                               summary_interval),
            IGNORED_MALFORMED: RepeatedWarning(log, f"malformed {STATUS_SIGNAL} signals", summary_interval),
        }

    @property
    def ignored_signals(self) -> dict[str, int]:
        """How many StatusUpdate signals were dropped since start-up, by reason."""
        return {reason: warning.total for reason, warning in self._ignored.items()}

    @property
    def latest(self) -> StatusSnapshot | None:
        return self._latest

    @property
    def owner(self) -> str | None:
        """Unique name of the connection that owns com.coreos.update1 now, if any."""
        return self._owner

    def add_listener(self, listener: StatusListener) -> None:
        """Call ``listener`` for every accepted status (from GetStatus or a signal)."""
        self._subscribers.listeners.append(listener)

    async def start(self) -> StatusSnapshot:
        """Subscribe, then GetStatus; waits (logging why) until update-engine is on the bus and answers."""
        self._bus.add_message_handler(self._on_message)
        await self._add_match(STATUS_MATCH_RULE)
        await self._add_match(OWNER_MATCH_RULE)
        self._set_owner(await self._name_owner())
        self._started = True
        while True:
            try:
                status = await self.get_status()
            except UpdateEngineUnavailable as exc:
                log.warning("Cannot get update engine status: %s. Waiting for update-engine.", exc)
                self._owner_appeared.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._owner_appeared.wait(), self._retry_delay)
                continue
            self._deliver(status)
            return status

    def close(self) -> None:
        self._bus.remove_message_handler(self._on_message)
        for warning in self._ignored.values():
            warning.close()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        for waiter in self._subscribers.waiters:
            waiter.future.cancel()

    async def get_status(self) -> StatusSnapshot:
        """Call GetStatus on com.coreos.update1 and check the reply's signature strictly."""
        message = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="GetStatus")
        try:
            reply = await call(self._bus, message, signature=STATUS_SIGNATURE)
        except DBusCallError as exc:
            # A wrong signature is our finding, not an error update-engine sent: say it without the error name.
            raise UpdateEngineUnavailable(exc.text if exc.name == ERROR_INVALID_SIGNATURE else str(exc)) from exc
        except Exception as exc:  # a broken connection surfaces as any exception type in dbus-fast
            raise UpdateEngineUnavailable(f"GetStatus call failed: {exc}") from exc
        try:
            return StatusSnapshot.from_values(reply.body)
        except ValueError as exc:
            raise UpdateEngineUnavailable(f"GetStatus answered a malformed status: {exc}") from exc

    async def wait_for(self, predicate: StatusPredicate, *, include_current: bool = True) -> StatusSnapshot:
        """The first accepted status that satisfies ``predicate`` (by default the current one counts)."""
        if include_current and self._latest is not None and predicate(self._latest):
            return self._latest
        future: asyncio.Future[StatusSnapshot] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(predicate, future)
        self._subscribers.waiters.append(waiter)
        try:
            return await future
        finally:
            self._subscribers.waiters.remove(waiter)

    async def _add_match(self, rule: str) -> None:
        try:
            await add_match(self._bus, rule)
        except DBusCallError as exc:
            raise UpdateEngineUnavailable(f"cannot subscribe to {rule}: {exc.name}") from None

    async def _name_owner(self) -> str | None:
        try:
            return await get_name_owner(self._bus, BUS_NAME)
        except DBusCallError as exc:
            log.warning("Cannot ask the bus who owns %s: %s", BUS_NAME, exc)
            return None

    def _set_owner(self, owner: str | None) -> None:
        if owner == self._owner:
            return
        if owner is None:
            log.warning("update-engine left the bus (%s has no owner)", BUS_NAME)
        else:
            log.info("update-engine is %s on the bus", owner)
        self._owner = owner
        if owner is not None:
            self._owner_appeared.set()

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL:
            return
        if message.interface == DBUS_NAME and message.member == "NameOwnerChanged":
            self._on_owner_changed(message)
        elif message.interface == INTERFACE and message.member == STATUS_SIGNAL:
            self._on_status_signal(message)

    def _on_owner_changed(self, message: Message) -> None:
        if message.sender != DBUS_NAME or message.signature != "sss" or message.body[0] != BUS_NAME:
            return
        new_owner = message.body[2] or None
        self._set_owner(new_owner)
        # A restarted update-engine may already be in another state; ask instead of waiting for a signal.
        idle = self._refresh_task is None or self._refresh_task.done()
        if new_owner is not None and self._started and idle:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._deliver(await self.get_status())
        except UpdateEngineUnavailable as exc:
            log.warning("Cannot get update engine status after it restarted: %s", exc)

    def _on_status_signal(self, message: Message) -> None:
        sender = message.sender or "(unknown sender)"
        if not self._started:
            # Before the owner is known nothing can be checked; the GetStatus that follows gives the state.
            log.debug("%s signal from %s before start-up finished; GetStatus follows", STATUS_SIGNAL, sender)
            return
        if not self.accept_any_sender and sender != self._owner:
            owner = self._owner or "nobody"
            self._ignored[IGNORED_NOT_OWNER].warn(
                "ignoring a %s signal from %s: it does not own %s (the owner is %s); "
                "set LOCKSMITHD_ACCEPT_ANY_SENDER=true to accept signals from anyone",
                STATUS_SIGNAL,
                sender,
                BUS_NAME,
                owner,
            )
            return
        if message.signature != STATUS_SIGNATURE:
            self._ignored[IGNORED_MALFORMED].warn(
                "ignoring a malformed %s signal from %s: signature %r, expected %r",
                STATUS_SIGNAL,
                sender,
                message.signature,
                STATUS_SIGNATURE,
            )
            return
        try:
            status = StatusSnapshot.from_values(message.body)
        except ValueError as exc:
            self._ignored[IGNORED_MALFORMED].warn(
                "ignoring a malformed %s signal from %s: %s", STATUS_SIGNAL, sender, exc
            )
            return
        self._deliver(status)

    def _deliver(self, status: StatusSnapshot) -> None:
        previous = self._latest
        self._latest = status
        if previous is None or previous.current_operation != status.current_operation:
            log.info("update-engine status: %s", describe(status))
        else:
            log.debug("update-engine status: %s", describe(status))
        for listener in list(self._subscribers.listeners):
            listener(status)
        for waiter in list(self._subscribers.waiters):
            if not waiter.future.done() and waiter.predicate(status):
                waiter.future.set_result(status)
