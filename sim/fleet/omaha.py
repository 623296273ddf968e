"""The Omaha side of a simulated fleet: the server its nodes update from, as one pluggable piece.

:class:`OmahaSide` is what the fleet asks of it: start, the URL the nodes' ``SERVER=`` names, a one-line
description, every Omaha event received so far (as :class:`OmahaEventRecord`), stop. :class:`DevServerOmaha` is the
product's dev server (``update-engine-devserver``, every group offered the same release) behind a
:class:`sim.link.SlowLink`, so that downloads take long enough to be watched. The update server ``coreupdate``
(:mod:`sim.coreupdate`) can stand here as another implementation without the fleet changing.

Rules: events are returned oldest first, the whole list every time (the fleet keeps its own place in it); a failed
read is logged and yields None, never an exception, as the fleet simply asks again; ``stop`` stops everything
``start`` started and may be called when ``start`` failed half-way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from sim.devserver import DevServerProcess, start_devserver
from sim.link import SlowLink
from update_engine.errors import FLAG_DEV_MODE, FLAG_RESUMED, FLAG_TEST_IMAGE, FLAG_TEST_OMAHA_URL

log = logging.getLogger(__name__)

MIB = 1 << 20
_ERROR_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL


@dataclass(frozen=True)
class OmahaEventRecord:
    """One event as the Omaha side recorded it."""

    machine_id: str
    app_version: str
    event_type: int
    event_result: int
    error_code: int | None
    previous_version: str | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> OmahaEventRecord:
        """From the dev server's ``GET /events`` entry."""
        error = doc.get("error_code")
        previous = doc.get("previous_version")
        return cls(
            machine_id=str(doc.get("machine_id") or ""),
            app_version=str(doc.get("app_version") or ""),
            event_type=int(doc.get("event_type") or 0),
            event_result=int(doc.get("event_result") or 0),
            error_code=None if error is None else int(error),
            previous_version=None if previous is None else str(previous),
        )

    @property
    def base_code(self) -> int | None:
        """The error code without the flag bits update-engine ORs into it."""
        return None if self.error_code is None else self.error_code & ~_ERROR_FLAGS


class OmahaSide(Protocol):
    """The server a fleet's nodes update from (see the module)."""

    @property
    def node_url(self) -> str:
        """What the nodes' ``SERVER=`` names."""
        ...

    async def start(self, workdir: Path) -> None: ...

    def describe(self) -> str:
        """One line for a person: which server, where, offering what."""
        ...

    async def events(self) -> list[OmahaEventRecord] | None: ...

    async def stop(self) -> None: ...


class DevServerOmaha:
    """``update-engine-devserver`` offering ``releases`` (payload, version) to every group, behind a link paced
    at ``link_rate`` bytes/s."""

    def __init__(self, releases: Sequence[tuple[Path, str]], link_rate: int) -> None:
        self.releases = list(releases)
        self.link_rate = link_rate
        self.devserver: DevServerProcess | None = None
        self.link: SlowLink | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def node_url(self) -> str:
        if self.link is None:
            raise RuntimeError("the dev server is not started")
        return f"{self.link.url}/v1/update/"

    async def start(self, workdir: Path) -> None:
        offered: list[tuple[Path, str, str | None]] = [(payload, version, None) for payload, version in self.releases]
        self.devserver = await asyncio.to_thread(start_devserver, workdir, offered)
        self.link = await SlowLink(self.devserver.base, self.link_rate).start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    def describe(self) -> str:
        assert self.devserver is not None and self.link is not None
        versions = ", ".join(version for _, version in self.releases)
        return (f"Omaha dev server at {self.devserver.url} offering {versions} to every group; "
                f"the nodes reach it through a {self.link_rate / MIB:g} MiB/s link at {self.link.url}")  # fmt: skip

    async def events(self) -> list[OmahaEventRecord] | None:
        assert self.devserver is not None and self._session is not None
        try:
            async with self._session.get(f"{self.devserver.base}/events") as resp:
                docs = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("dev server events: %s", exc)
            return None
        if not isinstance(docs, list):
            log.warning("dev server events: not a list: %.200r", docs)
            return None
        return [OmahaEventRecord.from_json(doc) for doc in docs if isinstance(doc, dict)]

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.link is not None:
            await self.link.stop()
            self.link = None
        if self.devserver is not None:
            await asyncio.to_thread(self.devserver.stop)
            self.devserver = None
