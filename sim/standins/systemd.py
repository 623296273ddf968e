"""A stand-in for systemd's manager on a private bus (PID 1 cannot run in a test): ``GetUnit`` for
``boot-complete.target`` and that unit's ``ActiveState`` and ``Job`` properties, which update-engine (healthy-boot
marking) and locksmithd (lock release after boot) both ask about.

Rules: the unit starts ``inactive`` with a start job queued (as during a boot); the caller sets
``unit.state = "active"`` when its simulated boot completes (``unit.queued = False``: no job either, as on a system
whose boot does not pull the target in; ``unit.error``: ``GetUnit`` fails with that D-Bus error). Any other unit is
``NoSuchUnit``. Nothing is started. ``unit.state_reads`` counts the questions about ``ActiveState``, so that a test
can wait for a number of polls instead of guessing how long they take.
"""

from __future__ import annotations

from types import TracebackType
from typing import NamedTuple

from dbus_fast import BusType, DBusError, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, dbus_property, method

BOOT_COMPLETE_PATH = "/org/freedesktop/systemd1/unit/boot_2dcomplete_2etarget"


class BootCompleteUnit(ServiceInterface):
    """``state`` is the ActiveState to report; a start job is queued while it is not active, unless ``queued``
    is False; with ``error`` set, ``GetUnit`` fails with that D-Bus error name."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.state = "inactive"
        self.queued = True
        self.error: str | None = None
        self.state_reads = 0

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> "s":  # type: ignore[name-defined]  # noqa: F821, UP037
        self.state_reads += 1
        return self.state

    @dbus_property(access=PropertyAccess.READ)
    def Job(self) -> "(uo)":  # type: ignore[name-defined]  # noqa: F821, UP037
        if self.state == "active" or not self.queued:
            return [0, "/"]
        return [17, "/org/freedesktop/systemd1/job/17"]


class SystemdManagerStandIn(ServiceInterface):
    def __init__(self, unit: BootCompleteUnit) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.unit = unit

    @method()
    def GetUnit(self, name: "s") -> "o":  # type: ignore[name-defined]  # noqa: F821, UP037
        if self.unit.error is not None:
            raise DBusError(self.unit.error, "the stand-in was told to fail")
        if name != "boot-complete.target":
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return BOOT_COMPLETE_PATH


class SystemdStandIn(NamedTuple):
    """The stand-in's connection and the unit whose state the caller drives; ``bus, unit = …`` unpacks it."""

    bus: MessageBus
    unit: BootCompleteUnit

    def stop(self) -> None:
        self.bus.disconnect()

    async def __aenter__(self) -> SystemdStandIn:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def start_systemd_standin(address: str) -> SystemdStandIn:
    """Stand-in for systemd's manager (PID 1 cannot run here): GetUnit and boot-complete.target's state."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    unit = BootCompleteUnit()
    bus.export("/org/freedesktop/systemd1", SystemdManagerStandIn(unit))
    bus.export(BOOT_COMPLETE_PATH, unit)
    reply = await bus.request_name("org.freedesktop.systemd1")
    if reply != RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise RuntimeError(f"could not own org.freedesktop.systemd1 on {address}: {reply}")
    return SystemdStandIn(bus, unit)
