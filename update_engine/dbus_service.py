"""update-engine's D-Bus face: ``com.coreos.update1.Manager`` at ``/com/coreos/update1`` on the system bus.

Theory of operation. The update engine (an :class:`UpdateManager`) owns all state; this module only translates.
Besides the original's methods it serves ``GetStatusDetails() → a{sv}`` (``coreos_common.status.StatusDetails``:
the last attempt's error, the set-up's warnings, what is pending), so ``GetStatus`` keeps its ``(x d s s x)``.
Method calls arrive on the event-loop thread and call the manager directly. The manager reports every new status
snapshot to a listener, which queues it on the loop (``call_soon_threadsafe``, safe from any thread), where a
:class:`StatusEmitter` applies the original's rate rule and the survivors become ``StatusUpdate`` signals. Access
control is the bus policy (``units/com.coreos.update1.conf``); ``Rollback``, the one call that changes which
partition boots, additionally checks that the caller's uid is 0, so a loosened policy cannot hand it to ordinary
users. Calls that change something are logged with the caller's uid and pid. ``AttemptUpdate`` and ``ResetStatus``
are left to the policy alone, so a site can delegate them (as the original let the ``core`` user) with a policy
drop-in.

This module deliberately avoids ``from __future__ import annotations``: dbus-fast reads the D-Bus signatures from
the annotations at class-creation time, and string signatures such as ``"xdssx"`` must stay plain strings there.
"""

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from dbus_fast import BusType, DBusError, Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, signal

from coreos_common.dbus import DBusCallError, connection_unix_user, describe_connection
from coreos_common.status import (
    BUS_NAME,
    DETAILS_TYPES,
    INTERFACE,
    OBJECT_PATH,
    StatusDetails,
    StatusSnapshot,
    UpdateStatus,
)
from update_engine.engine.errors import ResetNotAllowed, RollbackRefused

log = logging.getLogger(__name__)

ERROR_RESET_NOT_ALLOWED = "com.coreos.update1.Error.ResetNotAllowed"
ERROR_ROLLBACK_REFUSED = "com.coreos.update1.Error.RollbackRefused"
ERROR_ACCESS_DENIED = "com.coreos.update1.Error.AccessDenied"

# Argument names in the introspection data, as the original's update_engine.xml names them.
STATUS_ARG_NAMES = ("last_checked_time", "progress", "current_operation", "new_version", "new_size")
ROLLBACK_ARG_NAME = "next_boot"
DETAILS_ARG_NAME = "details"


class NameNotAcquired(RuntimeError):
    """The daemon could not become the primary owner of ``com.coreos.update1`` (another instance, or the policy)."""


class UpdateManager(Protocol):
    """What the D-Bus service needs from the update attempter.

    Methods are called on the event-loop thread and must return promptly. ``snapshot`` must be safe to call while
    worker threads update the state. ``attempt_update`` in IDLE moves to CHECKING_FOR_UPDATE before it returns (as
    the original does), so a GetStatus right after it sees the attempt.
    """

    def snapshot(self) -> StatusSnapshot:
        """The current ``(x d s s x)`` status."""
        ...

    def attempt_update(self) -> None:
        """Start a check now when IDLE; a no-op (still success) in any other state."""
        ...

    def reset_status(self) -> None:
        """Back to IDLE from IDLE or UPDATED_NEED_REBOOT (disarming the new partition); else ResetNotAllowed."""
        ...

    def rollback(self) -> str:
        """Arm the other partition for the next boot and say what will boot; RollbackRefused if it cannot."""
        ...

    def add_status_listener(self, listener: Callable[[StatusSnapshot], None]) -> None:
        """Call ``listener`` with every new snapshot, from whichever thread changed the state."""
        ...

    def details(self) -> StatusDetails:
        """What ``GetStatusDetails`` returns: the status, the last attempt's result, warnings, what is used."""
        ...


class StatusEmitter:
    """Decides which snapshots become StatusUpdate signals (the original's rate rule); pure, clock injected.

    Any change other than progress is always signalled. While DOWNLOADING, a progress-only change is signalled when
    progress moved by at least 1 % since the last signal, reached 1.0, or 10 s passed since the last signal; this
    keeps a fast download from flooding the bus while a slow one still shows life. Outside DOWNLOADING every change
    is signalled. An identical snapshot is never signalled twice.
    """

    PROGRESS_STEP = 0.01
    MAX_SILENCE_SECONDS = 10.0
    # 0.03 - 0.02 is 0.0099999… in binary floating point; a 1 % step must still count as 1 %.
    _EPSILON = 1e-9

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: StatusSnapshot | None = None
        self._last_time = 0.0

    def should_signal(self, snapshot: StatusSnapshot) -> bool:
        """True when ``snapshot`` must be signalled; it is then remembered as the last signalled one."""
        now = self._clock()
        if not self._decide(snapshot, now):
            return False
        self._last = snapshot
        self._last_time = now
        return True

    def _decide(self, snapshot: StatusSnapshot, now: float) -> bool:
        last = self._last
        if last is None:
            return True
        if snapshot == last:
            return False
        if snapshot.current_operation != last.current_operation:
            return True
        if (snapshot.last_checked_time, snapshot.new_version, snapshot.new_size) != (
            last.last_checked_time,
            last.new_version,
            last.new_size,
        ):
            return True
        if snapshot.current_operation != UpdateStatus.DOWNLOADING.value:
            return True
        moved = abs(snapshot.progress - last.progress) >= self.PROGRESS_STEP - self._EPSILON
        finished = snapshot.progress >= 1.0 > last.progress
        quiet = now - self._last_time >= self.MAX_SILENCE_SECONDS
        return moved or finished or quiet


def details_body(details: StatusDetails) -> dict[str, Variant]:
    """The ``a{sv}`` of GetStatusDetails: each entry with its type of ``DETAILS_TYPES``."""
    return {name: Variant(DETAILS_TYPES[name], value) for name, value in details.as_values().items()}


def status_body(snapshot: StatusSnapshot) -> list[object]:
    """The ``(x d s s x)`` message body; coerces numbers so an int progress still marshals as a double."""
    return [
        int(snapshot.last_checked_time),
        float(snapshot.progress),
        str(snapshot.current_operation),
        str(snapshot.new_version),
        int(snapshot.new_size),
    ]


# The unique bus name of the connection whose method call is being dispatched. dbus-fast does not hand the message
# to method implementations; a message handler records the sender here just before dispatch, and the task running
# an ``async`` method inherits the value (tasks copy the context they are created in).
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("update_engine_dbus_caller", default=None)


def _note_caller(message: Message) -> None:
    if message.message_type is MessageType.METHOD_CALL and message.path == OBJECT_PATH:
        _CALLER.set(message.sender)


class ManagerInterface(ServiceInterface):
    """``com.coreos.update1.Manager``: AttemptUpdate, ResetStatus, GetStatus, Rollback and the StatusUpdate signal."""

    def __init__(self, manager: UpdateManager, bus: MessageBus) -> None:
        super().__init__(INTERFACE)
        self._manager = manager
        self._bus = bus

    @method()
    async def AttemptUpdate(self) -> None:
        who = await self._caller()
        before = self._manager.snapshot().current_operation
        log.info("AttemptUpdate from %s in %s", who, before)
        self._manager.attempt_update()

    @method()
    async def ResetStatus(self) -> None:
        who = await self._caller()
        try:
            self._manager.reset_status()
        except ResetNotAllowed as exc:
            log.info("ResetStatus from %s refused: %s", who, exc.message)
            raise DBusError(ERROR_RESET_NOT_ALLOWED, exc.message) from exc
        log.info("ResetStatus from %s done", who)

    @method()
    def GetStatus(self) -> "xdssx":  # type: ignore[name-defined]  # noqa: F821
        return status_body(self._manager.snapshot())

    @method()
    def GetStatusDetails(self) -> "a{sv}":  # type: ignore[valid-type]  # noqa: F722
        return details_body(self._manager.details())

    @method()
    async def Rollback(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        caller = _CALLER.get()
        await self._require_root(caller, "Rollback")
        who = await self._caller()
        try:
            next_boot = self._manager.rollback()
        except RollbackRefused as exc:
            log.info("Rollback from %s refused: %s", who, exc.reason)
            raise DBusError(ERROR_ROLLBACK_REFUSED, exc.reason) from exc
        log.info("Rollback from %s armed: next boot %s", who, next_boot)
        return next_boot

    @signal()
    def StatusUpdate(self, snapshot: StatusSnapshot) -> "xdssx":  # type: ignore[name-defined]  # noqa: F821
        return status_body(snapshot)

    def introspect(self) -> intr.Interface:
        """dbus-fast leaves out-arguments unnamed; name them as the original's introspection data does."""
        plain = super().introspect()
        names = {"GetStatus": STATUS_ARG_NAMES, "Rollback": (ROLLBACK_ARG_NAME,),
                 "GetStatusDetails": (DETAILS_ARG_NAME,)}
        methods = [
            intr.Method(m.name, m.in_args, _named(m.out_args, names[m.name]) if m.name in names else m.out_args)
            for m in plain.methods
        ]
        signals = [
            intr.Signal(s.name, _named(s.args, STATUS_ARG_NAMES) if s.name == "StatusUpdate" else s.args)
            for s in plain.signals
        ]
        return intr.Interface(plain.name, methods=methods, signals=signals, properties=plain.properties)

    async def _caller(self) -> str:
        """Who is calling, for the log: uid, pid and bus name (as far as the bus can tell)."""
        caller = _CALLER.get()
        if caller is None:
            return "an unknown caller"
        return await describe_connection(self._bus, caller)

    async def _require_root(self, caller: str | None, member: str) -> None:
        if caller is None:
            raise DBusError(ERROR_ACCESS_DENIED, f"{member}: cannot tell who is calling; refused")
        try:
            uid = await connection_unix_user(self._bus, caller)
        except DBusCallError as exc:
            raise DBusError(ERROR_ACCESS_DENIED, f"{member}: cannot look up the uid of {caller} ({exc})") from None
        if uid != 0:
            log.warning("%s from %s (uid %d) refused: root only", member, caller, uid)
            raise DBusError(ERROR_ACCESS_DENIED, f"{member} is allowed to root only (caller uid {uid})")


def _named(args: list[intr.Arg], names: tuple[str, ...]) -> list[intr.Arg]:
    return [intr.Arg(a.signature, a.direction, name) for a, name in zip(args, names, strict=True)]


@dataclass
class ManagerService:
    """A served Manager: the interface on the bus and the emitter gating its signals. ``close`` undoes ``serve``."""

    bus: MessageBus
    interface: ManagerInterface
    emitter: StatusEmitter
    owns_name: bool = field(default=False)
    closed: bool = field(default=False)

    def publish(self, snapshot: StatusSnapshot) -> None:
        """Signal ``snapshot`` if the rate rule says so; runs on the event-loop thread."""
        if self.closed or not self.bus.connected:
            return
        if self.emitter.should_signal(snapshot):
            log.debug("StatusUpdate %s", snapshot)
            self.interface.StatusUpdate(snapshot)

    async def close(self) -> None:
        """Stop signalling, give up the name and unexport the object (the bus connection stays open)."""
        if self.closed:
            return
        self.closed = True
        if self.owns_name and self.bus.connected:
            await self.bus.release_name(BUS_NAME)
        self.owns_name = False
        self.bus.unexport(OBJECT_PATH, self.interface)
        self.bus.remove_message_handler(_note_caller)


async def serve(
    bus: MessageBus, manager: UpdateManager, clock: Callable[[], float] = time.monotonic
) -> ManagerService:
    """Export the Manager on ``bus``, become the owner of ``com.coreos.update1`` and signal every status change.

    Raises NameNotAcquired when the name is owned by someone else (another update-engine on this bus) or the bus
    policy does not let this user own it.
    """
    interface = ManagerInterface(manager, bus)
    service = ManagerService(bus=bus, interface=interface, emitter=StatusEmitter(clock))
    bus.add_message_handler(_note_caller)
    bus.export(OBJECT_PATH, interface)
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as exc:
        await service.close()
        raise NameNotAcquired(
            f"the bus refused to give {BUS_NAME} to this process ({exc.type}: {exc.text}); "
            "is the com.coreos.update1.conf D-Bus policy installed, and is this running as root?"
        ) from exc
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        await service.close()
        raise NameNotAcquired(
            f"{BUS_NAME} is already owned on this bus ({reply.name}): another update-engine is running"
        )
    service.owns_name = True
    log.info("Serving %s at %s on %s", BUS_NAME, OBJECT_PATH, bus.unique_name)

    loop = asyncio.get_running_loop()

    def listener(snapshot: StatusSnapshot) -> None:
        if service.closed:
            return
        # RuntimeError: the loop has been closed, the daemon is shutting down and nobody is left to signal.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(service.publish, snapshot)

    manager.add_status_listener(listener)
    # The original announces its status once at start-up.
    service.publish(manager.snapshot())
    return service


async def connect_bus(address: str | None) -> MessageBus:
    """Connect to ``address``, or to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` or the standard socket) if None."""
    return await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
