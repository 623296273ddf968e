"""systemd's manager on the bus: a unit's state, and the wait for ``boot-complete.target``.

Rules:
* ``unit_state`` has one error rule: a unit systemd does not have loaded is ``None``; no systemd manager on the
  bus (a container, a test bus) raises ``SystemdUnavailable``; any other error, or a reply of the wrong type,
  raises ``DBusCallError``.  It never turns an error into a state.
* ``wait_for_boot_complete`` is the one answer to "is this boot complete?" for both daemons: it returns at once
  when the target is active, not loaded, or loaded but not being started (nothing will ever start it), or when
  there is no systemd on the bus; it waits while the target is activating or has a job queued.  Errors asking
  systemd are retried after the caller's backoff delays (an error is not an answer: treating it as "complete"
  would mark a boot healthy that nobody checked).  The result says why it returned, for the caller's log line.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from coreos_common.dbus import ERROR_INVALID_SIGNATURE, PROPERTIES, DBusCallError, call
from coreos_common.goduration import format_go_duration

log = logging.getLogger(__name__)

SYSTEMD_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT = "org.freedesktop.systemd1.Unit"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
BOOT_COMPLETE_TARGET = "boot-complete.target"

Sleep = Callable[[float], Awaitable[None]]


class SystemdUnavailable(Exception):
    """There is no systemd manager on this bus (a container, a test bus)."""


@dataclass(frozen=True)
class UnitState:
    """A loaded unit's ``ActiveState`` and whether a job (start, stop…) is queued for it."""

    active_state: str
    job_pending: bool


async def _unit_property(bus: MessageBus, path: str, name: str) -> tuple[str, Any]:
    reply = await call(
        bus,
        Message(
            destination=SYSTEMD_NAME,
            path=path,
            interface=PROPERTIES,
            member="Get",
            signature="ss",
            body=[SYSTEMD_UNIT, name],
        ),
        signature="v",
    )
    variant = reply.body[0]
    return variant.signature, variant.value


async def unit_state(bus: MessageBus, unit: str) -> UnitState | None:
    """State of ``unit`` as systemd sees it, or None when systemd does not have it loaded.

    Raises SystemdUnavailable when there is no systemd manager on the bus and DBusCallError on other errors.
    """
    try:
        reply = await call(
            bus,
            Message(
                destination=SYSTEMD_NAME,
                path=SYSTEMD_PATH,
                interface=SYSTEMD_MANAGER,
                member="GetUnit",
                signature="s",
                body=[unit],
            ),
            signature="o",
        )
    except DBusCallError as exc:
        if exc.no_service:
            raise SystemdUnavailable(str(exc)) from exc
        if exc.name == NO_SUCH_UNIT:
            return None
        raise
    path = reply.body[0]
    signature, active = await _unit_property(bus, path, "ActiveState")
    if signature != "s":
        raise DBusCallError(ERROR_INVALID_SIGNATURE, "ActiveState is not a string")
    signature, job = await _unit_property(bus, path, "Job")
    # Job is (uo): id 0 and path "/" when nothing is queued.
    job_pending = signature == "(uo)" and bool(job[0])
    return UnitState(active_state=active, job_pending=job_pending)


class BootComplete(enum.Enum):
    """Why ``wait_for_boot_complete`` returned; only ACTIVE means the target was reached."""

    ACTIVE = "active"
    """``boot-complete.target`` is active: every unit the boot requires for health has succeeded."""
    NOT_LOADED = "not loaded"
    """systemd does not have the target loaded: this system does not use it."""
    NOT_STARTING = "not being started"
    """Loaded but inactive with no job queued: nothing in this boot will start it."""
    NO_SYSTEMD = "no systemd"
    """No systemd manager on the bus."""


async def wait_for_boot_complete(
    bus: MessageBus, *, delays: Iterator[float], sleep: Sleep = asyncio.sleep, purpose: str
) -> BootComplete:
    """Wait while ``boot-complete.target`` is being started; see the module's rules for when it returns.

    ``delays`` gives the pauses between questions (and after errors); ``purpose`` completes the log line
    "Waiting for boot-complete.target (now activating) before …".
    """
    announced = False
    while True:
        try:
            state = await unit_state(bus, BOOT_COMPLETE_TARGET)
        except SystemdUnavailable as exc:
            log.info("No systemd manager on the bus (%s): not waiting for %s", exc, BOOT_COMPLETE_TARGET)
            return BootComplete.NO_SYSTEMD
        except DBusCallError as exc:
            delay = next(delays)
            log.warning(
                "Cannot ask systemd about %s: %s. Retrying in %s.", BOOT_COMPLETE_TARGET, exc, format_go_duration(delay)
            )
            await sleep(delay)
            continue
        if state is None:
            log.info("%s is not loaded on this system: not waiting for it", BOOT_COMPLETE_TARGET)
            return BootComplete.NOT_LOADED
        if state.active_state == "active":
            log.info("%s is active: the boot is complete", BOOT_COMPLETE_TARGET)
            return BootComplete.ACTIVE
        if not state.job_pending and state.active_state != "activating":
            log.info("%s is %s and not being started: not waiting for it", BOOT_COMPLETE_TARGET, state.active_state)
            return BootComplete.NOT_STARTING
        if not announced:
            log.info("Waiting for %s (now %s) %s", BOOT_COMPLETE_TARGET, state.active_state, purpose)
            announced = True
        await sleep(next(delays))
