"""``--serve``: after the rolling update, the fleet and ``coreupdate`` keep running until Ctrl-C or SIGTERM.

:func:`serve_lines` is what a person needs to look around, and the one place to add to it: the server's URL (its
API, and the dashboard at ``/``), the dashboard's account (made by the operator with ``coreupdate user add``), the
API token, and a command to paste. :func:`serve_until_stopped` prints them
and waits.

Rules: Ctrl-C and SIGTERM end the wait, not the run: the caller then stops everything as usual and its exit status
stays the summary's verdict; while waiting, the caller's own handler of SIGTERM is set aside, and it is put back
(with the SIGINT handler there was) when the wait ends.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from demo.story import NOTE, Console
from sim.coreupdate import COREOS_APP_ID
from sim.fleet.coreupdate import CoreUpdateOmaha
from sim.tools import VENV_BIN


def serve_lines(omaha: CoreUpdateOmaha, sign_in: tuple[str, str]) -> list[str]:
    """The server's addresses, the dashboard's account and the API token, and how to use them."""
    ctl = VENV_BIN / "updateservicectl"
    return [
        f"coreupdate keeps serving at {omaha.url}/ (API and dashboard), and the fleet keeps running.",
        f"  dashboard:   {omaha.url}/",
        f"  sign in:     {sign_in[0]} / {sign_in[1]}",
        f"  API token:   {omaha.token}",
        f"  try:         UPDATECTL_SERVER={omaha.url} UPDATECTL_KEY={omaha.token} {ctl} instance list "
        f"--app-id {COREOS_APP_ID}",
        f"  nodes' URL:  {omaha.node_url} (through the slow link)",
        "Ctrl-C or SIGTERM stops everything.",
    ]


async def serve_until_stopped(omaha: CoreUpdateOmaha, console: Console, on_sigterm: Callable[[], object],
                              sign_in: tuple[str, str]) -> None:
    """Print :func:`serve_lines`, then wait for SIGINT or SIGTERM; ``on_sigterm`` is the caller's SIGTERM handler,
    put back afterwards; ``sign_in``: the dashboard's user and password."""
    console.plain()
    for index, line in enumerate(serve_lines(omaha, sign_in)):
        console.plain(line, NOTE if index == 0 else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    previous_sigint = signal.getsignal(signal.SIGINT)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
        console.plain("stopping the fleet and coreupdate")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
