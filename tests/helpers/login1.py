"""The logind stand-in: ``org.freedesktop.login1.Manager`` on a private bus, recording what it is asked.

systemd-logind cannot run in a test container and a real ``Reboot`` would end the test, so this small
dbus-fast service takes logind's name and object path on the private bus from ``tests.helpers.dbus`` and
records every ``Reboot``/``PowerOff`` call. ``fail_times`` makes the first N calls fail with a logind-like
D-Bus error, so callers' error handling and retries can be tested.
"""

# No ``from __future__ import annotations`` here: dbus-fast reads the "b" signature annotations at runtime.
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from dbus_fast import BusType, DBusError, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from tests.helpers.dbus import PrivateBus

LOGIN1_NAME = "org.freedesktop.login1"
LOGIN1_PATH = "/org/freedesktop/login1"
LOGIN1_MANAGER = "org.freedesktop.login1.Manager"
REFUSAL_ERROR = "org.freedesktop.login1.OperationInProgress"


class Login1Manager(ServiceInterface):
    """Records ``Reboot(b)`` and ``PowerOff(b)`` calls; the first ``fail_times`` calls are refused."""

    def __init__(self, fail_times: int = 0) -> None:
        super().__init__(LOGIN1_MANAGER)
        self.fail_times = fail_times
        self.calls: list[tuple[str, bool]] = []
        self.refused: list[tuple[str, bool]] = []
        self.called = asyncio.Event()

    def _record(self, member: str, interactive: bool) -> None:
        if self.fail_times > 0:
            self.fail_times -= 1
            self.refused.append((member, interactive))
            raise DBusError(REFUSAL_ERROR, "There's already a shutdown or sleep operation in progress")
        self.calls.append((member, interactive))
        self.called.set()

    @property
    def reboots(self) -> list[bool]:
        """The ``interactive`` argument of every accepted Reboot call."""
        return [arg for member, arg in self.calls if member == "Reboot"]

    @method(name="Reboot")
    def reboot(self, interactive: "b") -> None:  # type: ignore[name-defined]  # noqa: F821
        self._record("Reboot", interactive)

    @method(name="PowerOff")
    def power_off(self, interactive: "b") -> None:  # type: ignore[name-defined]  # noqa: F821
        self._record("PowerOff", interactive)


@dataclass
class Login1StandIn:
    bus: MessageBus
    manager: Login1Manager
    address: str = field(default="")

    def stop(self) -> None:
        """Release the name and disconnect."""
        self.bus.disconnect()


async def start_login1(address: str, fail_times: int = 0) -> Login1StandIn:
    """Connect to the bus at ``address``, export the manager and own ``org.freedesktop.login1``."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    manager = Login1Manager(fail_times)
    bus.export(LOGIN1_PATH, manager)
    reply = await bus.request_name(LOGIN1_NAME)
    if reply != RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise RuntimeError(f"could not own {LOGIN1_NAME} on {address}: {reply}")
    return Login1StandIn(bus, manager, address)


@pytest.fixture
async def login1(private_bus: PrivateBus) -> AsyncIterator[Login1StandIn]:
    """The logind stand-in on the ``private_bus`` fixture's bus (needs root: only root may own the name)."""
    stand_in = await start_login1(private_bus.address)
    try:
        yield stand_in
    finally:
        stand_in.stop()
