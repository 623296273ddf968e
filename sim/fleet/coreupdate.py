"""The update server ``coreupdate`` as the Omaha side of a simulated fleet, behind a slow link.

``coreupdate serve`` runs as a process on 127.0.0.1 (:func:`sim.coreupdate.start_coreupdate`) with SQLite in the
data directory it is given, where its API token was made beforehand (by whoever plays the operator), and with
``--payload-public-key``, so that it stores only payloads signed by the fleet's key. The nodes reach it through a
:class:`sim.link.SlowLink`: the server builds its payload URLs from the request's Host, so downloads pass through
the link too. What the server recorded is read through its JSON API, directly: each instance of the application
(one ``GET`` of the list, then one per instance, which returns the instance and then its events).

Rules: those of :mod:`sim.fleet.omaha`. The API gives each instance's events newest first (its newest 100, plenty
for a simulated node); they are kept here per instance and handed on as one list that only grows, in the order
they were first read.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, start_coreupdate
from sim.fleet.omaha import OmahaEventRecord, ServerInstance, ServerSnapshot, close_reader_and_link
from sim.link import SlowLink

log = logging.getLogger(__name__)

MIB = 1 << 20
READ_TIMEOUT = 5.0  # seconds for one API call; a slow answer is a failed read, asked again
# A demo's rollout lasts about a minute: the dashboard's versions-over-time chart gets a point every 5 s.
HISTORY_RESOLUTION_S = 5


class CoreUpdateOmaha:
    """``coreupdate serve`` on ``data_dir`` with ``token`` (None: one is made), its uploads checked with
    ``payload_public_key``, reached by the nodes through a link paced at ``link_rate`` bytes/s."""

    keeps_instances = True

    def __init__(self, data_dir: Path, token: str | None, payload_public_key: Path, link_rate: int, *,
                 app_id: str = COREOS_APP_ID) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.token = token
        self.payload_public_key = payload_public_key
        self.link_rate = link_rate
        self.app_id = app_id
        self.server: CoreUpdateServer | None = None
        self.link: SlowLink | None = None
        self._session: aiohttp.ClientSession | None = None
        self._seen: dict[str, int] = {}  # machine id → how many of its events are in _events
        self._events: list[OmahaEventRecord] = []
        self._reading = asyncio.Lock()  # one snapshot at a time: each takes its new events once

    @property
    def url(self) -> str:
        """The server itself (its API and dashboard), as an operator on this machine reaches it."""
        if self.server is None:
            raise RuntimeError("coreupdate is not started")
        return self.server.url

    @property
    def node_url(self) -> str:
        if self.link is None:
            raise RuntimeError("coreupdate is not started")
        return f"{self.link.url}/v1/update/"

    @property
    def command(self) -> list[str]:
        """The ``coreupdate serve`` command line the server runs with."""
        if self.server is None:
            raise RuntimeError("coreupdate is not started")
        return [str(arg) for arg in self.server.process.args]  # type: ignore[union-attr]

    async def start(self, workdir: Path) -> None:
        """Start the server on the data directory given at construction (``workdir`` is not needed)."""
        extra = ("--payload-public-key", str(self.payload_public_key),
                 "--history-resolution", str(HISTORY_RESOLUTION_S))
        self.server = await asyncio.to_thread(start_coreupdate, self.data_dir, extra_args=extra, token=self.token)
        self.token = self.server.token
        self.link = await SlowLink(self.server.url, self.link_rate).start()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT), headers={"Authorization": f"Bearer {self.token}"}
        )

    def describe(self) -> str:
        assert self.server is not None and self.link is not None
        return (f"coreupdate at {self.server.url} (SQLite in {self.data_dir}); the nodes reach it through a "
                f"{self.link_rate / MIB:g} MiB/s link at {self.link.url}")  # fmt: skip

    async def _get(self, path: str) -> Any:
        assert self.server is not None and self._session is not None
        async with self._session.get(f"{self.server.url}/api/v1/apps/{self.app_id}{path}") as resp:
            if resp.status != 200:
                raise ValueError(f"GET {path}: HTTP {resp.status}: {(await resp.text())[:200]}")
            return await resp.json()

    async def snapshot(self) -> ServerSnapshot | None:
        async with self._reading:
            return await self._read()

    async def _read(self) -> ServerSnapshot | None:
        try:
            page = await self._get("/instances?limit=1000")
            machines = [str(doc["machine_id"]) for doc in page["instances"]]
            instances = []
            for machine in machines:
                doc = await self._get(f"/instances/{urllib.parse.quote(machine, safe='')}")
                instances.append(ServerInstance.from_coreupdate(doc))
                newest_first = [OmahaEventRecord.from_coreupdate(machine, e) for e in doc["events"]]
                seen = self._seen.get(machine, 0)
                self._events.extend(reversed(newest_first[: max(0, len(newest_first) - seen)]))
                self._seen[machine] = max(seen, len(newest_first))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.warning("coreupdate API: %s", exc)
            return None
        return ServerSnapshot(list(self._events), instances)

    async def stop(self) -> None:
        await close_reader_and_link(self._session, self.link)
        self._session, self.link = None, None
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
            self.server = None
