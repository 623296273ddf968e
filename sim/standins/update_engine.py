"""Stand-in update-engine: owns ``com.coreos.update1`` on a private bus and publishes the status a test sets.

It is the stand-in for the real update-engine daemon where only its D-Bus face matters (locksmithd's tests):
``GetStatus()`` answers the current ``(x d s s x)`` status, ``set_status`` changes it and emits
``StatusUpdate``, ``emit_raw`` sends a ``StatusUpdate`` with any signature and body (to test that malformed
ones are ignored) and ``emit_from_other_connection`` sends one from a connection that does not own the name (a
forged signal, or what ``locksmithctl send-need-reboot`` does).

Rules: the bus must let root own the name: include ``units/com.coreos.update1.conf`` (``policy_files()`` returns
it, or a minimal equivalent when the unit file is not in the tree). It installs nothing and touches no disk; use it
as ``async with UpdateEngineStandIn(address, status) as stand_in`` or ``start()``/``stop()``.
"""

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

from dbus_fast import BusType, Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, signal

from coreos_common.status import BUS_NAME, INTERFACE, OBJECT_PATH, StatusSnapshot, UpdateStatus
from sim.tools import UPDATE_ENGINE_POLICY

_MINIMAL_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="com.coreos.update1"/>
    <allow send_destination="com.coreos.update1"/>
  </policy>
</busconfig>
"""


def policy_files(workdir: Path) -> list[Path]:
    """The D-Bus policy that lets root own com.coreos.update1: the project's own, or a minimal one."""
    if UPDATE_ENGINE_POLICY.exists():
        return [UPDATE_ENGINE_POLICY]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "com.coreos.update1.conf"
    path.write_text(_MINIMAL_POLICY)
    return [path]


def status_of(operation: UpdateStatus, version: str = "0.0.0", size: int = 0) -> StatusSnapshot:
    return StatusSnapshot(
        last_checked_time=1_700_000_000,
        progress=0.0,
        current_operation=operation.value,
        new_version=version,
        new_size=size,
    )


class _Manager(ServiceInterface):
    def __init__(self, status: StatusSnapshot) -> None:
        super().__init__(INTERFACE)
        self.status = status
        self.get_status_calls = 0

    @method()
    def GetStatus(self) -> "xdssx":  # type: ignore[name-defined]  # noqa: F821
        self.get_status_calls += 1
        return list(self.status.as_tuple())

    @signal()
    def StatusUpdate(self) -> "xdssx":  # type: ignore[name-defined]  # noqa: F821
        return list(self.status.as_tuple())


class UpdateEngineStandIn:
    """Connected and owning the name after ``start()``; ``stop()`` disconnects (the name is released)."""

    def __init__(self, bus_address: str, status: StatusSnapshot | None = None) -> None:
        self.bus_address = bus_address
        self.manager = _Manager(status or status_of(UpdateStatus.IDLE))
        self.bus: MessageBus | None = None

    @property
    def unique_name(self) -> str:
        assert self.bus is not None and self.bus.unique_name is not None
        return self.bus.unique_name

    async def start(self) -> "UpdateEngineStandIn":
        bus = MessageBus(bus_address=self.bus_address, bus_type=BusType.SYSTEM)
        connected = await bus.connect()
        bus = connected if connected is not None else bus
        bus.export(OBJECT_PATH, self.manager)
        reply = await bus.request_name(BUS_NAME)
        if reply != RequestNameReply.PRIMARY_OWNER:
            bus.disconnect()
            raise RuntimeError(f"stand-in update-engine could not own {BUS_NAME}: {reply}")
        self.bus = bus
        return self

    async def set_status(self, status: StatusSnapshot, emit: bool = True) -> None:
        """Change what GetStatus answers and (by default) announce it with a StatusUpdate signal."""
        self.manager.status = status
        if emit:
            self.manager.StatusUpdate()
            await self._flush()

    async def emit_raw(self, signature: str, body: list[Any]) -> None:
        """A StatusUpdate from the owner with any signature (for malformed-signal tests)."""
        assert self.bus is not None
        await self.bus.send(_status_signal(signature, body))

    async def _flush(self) -> None:
        # A round trip to the bus daemon guarantees the signal queued before it has been written.
        assert self.bus is not None
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetId",
            )
        )

    async def stop(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            await asyncio.wait_for(self.bus.wait_for_disconnect(), 10)  # type: ignore[no-untyped-call]
            self.bus = None

    async def __aenter__(self) -> "UpdateEngineStandIn":
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _status_signal(signature: str, body: list[Any]) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        path=OBJECT_PATH,
        interface=INTERFACE,
        member="StatusUpdate",
        signature=signature,
        body=body,
    )


async def emit_from_other_connection(bus_address: str, status: StatusSnapshot) -> str:
    """Send a StatusUpdate from a fresh connection that does not own com.coreos.update1; returns its name."""
    bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
    connected = await bus.connect()
    bus = connected if connected is not None else bus
    try:
        await bus.send(_status_signal("xdssx", list(status.as_tuple())))
        name = bus.unique_name or ""
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetId",
            )
        )
        return name
    finally:
        bus.disconnect()
