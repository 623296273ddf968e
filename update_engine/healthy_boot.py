"""Marking a boot healthy: when the running USR partition becomes successful=1, tries=0, top priority.

Rules of this file:

* **Once per boot.** A marker in the run directory (a tmpfs) says the boot was marked; a daemon restart in the
  same boot does nothing more.
* **The original's rule first.** The boot counts as healthy once ``boot-complete.target`` is active, when this
  boot has that unit; otherwise once the machine (``/proc/uptime``) has been up ``healthy_boot_delay`` seconds
  (45 by default; when the uptime cannot be read, once update-engine has been up that long).
* **Then the operator's hooks.** Every executable in the healthy-boot directory (``--healthy-boot-dir``, default
  ``/etc/update_engine/healthy-boot.d/``) must pass, in name order, each within ``healthy_hook_timeout``
  seconds. They run through ``coreos_common.hooks``, which skips files that are not executable, refuses files
  others could write, kills a hook that hangs with its process group and bounds what it may print, each with a
  warning naming the file. Their context is in the environment, as locksmithd's hooks get theirs:
  ``UPDATE_ENGINE_HOOK=healthy-boot``, ``UPDATE_ENGINE_HOOK_VERSION`` (the running version),
  ``UPDATE_ENGINE_HOOK_BOOTED_SLOT`` (``USR-A``/``USR-B``), ``UPDATE_ENGINE_HOOK_MACHINE_ID``.
* **A failing hook is retried**, after delays that double up to a cap (``coreos_common.backoff``), each failure
  logged with the hook's last output; the partition is marked only after a run in which every hook passed.
* **Never against an armed reboot.** While a reboot into the other partition is pending, marking the running one
  would undo it: nothing is marked, and the next boot decides.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dbus_fast.aio import MessageBus

from coreos_common.backoff import BackoffPolicy
from coreos_common.hooks import run_hooks
from coreos_common.identity import IdentityError, read_machine_id
from coreos_common.status import UpdateStatus
from coreos_common.systemd import BOOT_COMPLETE_TARGET, BootComplete, wait_for_boot_complete
from update_engine.engine.attempter import UpdateAttempter

log = logging.getLogger("update_engine")

BOOT_MARKED_NAME = "update_engine_boot_marked_good"
DEFAULT_HOOK_DIR = Path("etc/update_engine/healthy-boot.d")


class HealthyBootTiming(Protocol):
    """The durations this module needs (seconds); the daemon's DaemonTiming has them."""

    @property
    def healthy_boot_delay(self) -> float: ...

    @property
    def boot_complete_poll(self) -> float: ...

    @property
    def healthy_hook_timeout(self) -> float: ...

    @property
    def healthy_hook_retry(self) -> BackoffPolicy: ...


def read_uptime(root: Path) -> float | None:
    """The machine's uptime in seconds, from ``proc/uptime`` under ``root``; None when it cannot be read."""
    try:
        return float((root / "proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def wait_for_healthy_boot(
    bus: MessageBus, timing: HealthyBootTiming, uptime: Callable[[], float | None] = lambda: None
) -> str:
    """Wait until the boot counts as healthy by the original's rule; returns why it does (for the log line)."""
    result = await wait_for_boot_complete(
        bus,
        delays=itertools.repeat(timing.boot_complete_poll),
        purpose="before marking the running partition good",
    )
    if result is BootComplete.ACTIVE:
        return f"{BOOT_COMPLETE_TARGET} is active"
    delay = timing.healthy_boot_delay
    up = uptime()
    if up is None:
        log.info("%s is not part of this boot and the machine's uptime cannot be read; marking the boot good "
                 "once update-engine has been up %.0f s", BOOT_COMPLETE_TARGET, delay)
        await asyncio.sleep(delay)
        return f"no {BOOT_COMPLETE_TARGET}; update-engine up for {delay:.0f} s"
    log.info("%s is not part of this boot; marking the boot good once the machine has been up %.0f s (up %.0f s "
             "now)", BOOT_COMPLETE_TARGET, delay, up)
    await asyncio.sleep(max(0.0, delay - up))
    return f"no {BOOT_COMPLETE_TARGET}; machine up for {max(up, delay):.0f} s"


def hook_context(attempter: UpdateAttempter, booted_slot: str) -> dict[str, str]:
    """What the healthy-boot hooks are told, as environment variables."""
    root = attempter.options.config_root
    try:
        machine_id = read_machine_id(root)
    except IdentityError:
        machine_id = ""
    return {
        "UPDATE_ENGINE_HOOK": "healthy-boot",
        "UPDATE_ENGINE_HOOK_VERSION": attempter.load_settings().version,
        "UPDATE_ENGINE_HOOK_BOOTED_SLOT": booted_slot,
        "UPDATE_ENGINE_HOOK_MACHINE_ID": machine_id,
    }


async def run_until_passed(hook_dir: Path, context: dict[str, str], timing: HealthyBootTiming) -> str:
    """Run the hooks of ``hook_dir`` until one run passes whole; returns what passed (for the log line)."""
    delays = timing.healthy_hook_retry.delays()
    for attempt in itertools.count(1):
        result = await run_hooks(hook_dir, context=context, timeout=timing.healthy_hook_timeout)
        if result.passed:
            return f"{result.describe()} in {hook_dir}" if result.ran else f"no hooks in {hook_dir}"
        delay = next(delays)
        log.warning("Healthy-boot check %d failed: %s; the running partition is not marked good yet, trying again "
                    "in %.0f s", attempt, result.describe(), delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def mark_boot_healthy(
    attempter: UpdateAttempter, bus: MessageBus, timing: HealthyBootTiming, *, hook_dir: Path | None = None
) -> None:
    """Once per boot, after a healthy boot and passing hooks, make the running USR partition successful."""
    marker = attempter.options.run_dir / BOOT_MARKED_NAME
    if marker.exists():
        log.info("Running partition already marked good during this boot (%s)", marker)
        return
    reason = await wait_for_healthy_boot(bus, timing, lambda: read_uptime(attempter.options.config_root))
    if hook_dir is not None:
        slot = attempter.booted_slot() or ""
        reason += f"; {await run_until_passed(hook_dir, hook_context(attempter, slot), timing)}"
    if attempter.machine.status is UpdateStatus.UPDATED_NEED_REBOOT:
        log.info("Not marking the running partition good: a reboot into the other partition is pending")
        return
    try:
        label, flags = attempter.mark_running_good()
    except Exception as exc:
        log.error("Could not mark the running partition good: %s; will try again at the next start", exc)
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{label}\n")
    log.info("Boot is healthy (%s): %s marked good (priority=%d tries=%d successful=%d)", reason, label,
             flags.priority, flags.tries, int(flags.successful))
