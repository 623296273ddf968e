"""systemd notification (sd_notify(3)): READY, STATUS, STOPPING and watchdog pings, for both daemons.

Rules, as sd_notify(3) and systemd.service(5) define them:
* Messages go to ``$NOTIFY_SOCKET`` only; without it (not started by systemd as ``Type=notify``) the notifier is
  silent.  A message that cannot be sent is dropped: notification never stops a daemon.
* The watchdog is on when ``$WATCHDOG_USEC`` is a positive number of microseconds and ``$WATCHDOG_PID`` is unset
  or this process's pid (a variable inherited from a parent is not meant for us).  Pings go out every half of
  that interval, as systemd recommends.
* ``STATUS=`` is sent only when its text changes, so a progress callback may call ``status`` as often as it
  likes.

``watchdog_interval`` is the pure decision; ``SystemdNotifier`` is the thin shell that sends (through sdnotify).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``) when the watchdog is meant for ``pid``, else None."""
    if not environ.get("NOTIFY_SOCKET"):
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


class SystemdNotifier:
    """Sends sd_notify messages for this process; silent when systemd did not ask for them.

    The variables are read from the process environment when the notifier is made, as sdnotify reads
    ``$NOTIFY_SOCKET`` from there.
    """

    def __init__(self) -> None:
        self._environ = dict(os.environ)
        self._socket = sdnotify.SystemdNotifier() if self._environ.get("NOTIFY_SOCKET") else None
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, message: str) -> None:
        """One datagram (``READY=1``, ``STATUS=…``, several lines at once); nothing when not under systemd."""
        if self._socket is not None:
            self._socket.notify(message)

    def ready(self, status: str | None = None) -> None:
        """``READY=1``, with the first status line in the same message when given."""
        if status is None:
            self.send("READY=1")
        else:
            self._last_status = status
            self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=text`` for ``systemctl status``, sent only when it differs from the last one."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog_interval(self) -> float | None:
        return watchdog_interval(self._environ, os.getpid())

    async def run_watchdog(self) -> None:
        """Ping the watchdog until cancelled; returns at once when systemd asked for no watchdog."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        log.info("systemd watchdog enabled: pinging every %.1f s", interval)
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
