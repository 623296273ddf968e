"""The logind stand-in: ``org.freedesktop.login1.Manager`` on a private bus, recording what it is asked.

systemd-logind cannot run in a test container and a real ``Reboot`` would end the test, so this small
dbus-fast service takes logind's name and object path on a private bus (:mod:`sim.bus`) and records every
``Reboot``/``PowerOff`` call. ``fail_times`` makes the first N calls fail with a logind-like D-Bus error, so
callers' error handling and retries can be tested. A subclass may override ``_record`` to act on a call (the
demo's nodes go down).

Rules: only root may own ``org.freedesktop.login1`` on a private bus (its stand-in policy); the stand-in answers
and records, and never reboots anything itself.
"""

# No ``from __future__ import annotations`` here: dbus-fast reads the "b" signature annotations at runtime.
import asyncio
from dataclasses import dataclass, field
from types import TracebackType

from dbus_fast import BusType, DBusError, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

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
    """The manager, connected and owning logind's name; ``stop()`` (or leaving ``async with``) disconnects."""

    bus: MessageBus
    manager: Login1Manager
    address: str = field(default="")

    def stop(self) -> None:
        """Release the name and disconnect."""
        self.bus.disconnect()

    async def __aenter__(self) -> "Login1StandIn":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def start_login1(address: str, fail_times: int = 0, manager: Login1Manager | None = None) -> Login1StandIn:
    """Connect to the bus at ``address``, export ``manager`` (default: a recording one refusing ``fail_times``
    calls) and own ``org.freedesktop.login1``."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    manager = manager if manager is not None else Login1Manager(fail_times)
    bus.export(LOGIN1_PATH, manager)
    reply = await bus.request_name(LOGIN1_NAME)
    if reply != RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise RuntimeError(f"could not own {LOGIN1_NAME} on {address}: {reply}")
    return Login1StandIn(bus, manager, address)

