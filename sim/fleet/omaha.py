"""The Omaha side of a simulated fleet: the server its nodes update from, as one pluggable piece.

:class:`OmahaSide` is what the fleet asks of it: start, the URL the nodes' ``SERVER=`` names, a one-line
description, a :class:`ServerSnapshot` (every Omaha event received so far, as :class:`OmahaEventRecord`, and the
server's own view of each instance when it keeps one, as :class:`ServerInstance`), stop. :class:`DevServerOmaha` is
the product's dev server (``update-engine-devserver``, every group offered the same release, no view of the
instances) behind a :class:`sim.link.SlowLink`, so that downloads take long enough to be watched; the update server
``coreupdate`` stands here too (:mod:`sim.fleet.coreupdate`).

Rules: events are returned oldest first, the whole list every time (the fleet keeps its own place in it); an
instance is read before its events, so a status the instance shows is never newer than the events read with it
(:func:`server_steps`, pure, turns two snapshots into the steps a person follows); a failed read is logged and
yields None, never an exception, as the fleet simply asks again; ``stop`` stops everything
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
    status: str | None = None  # the instance status the server says the event led to (None: it keeps none)
    at: float | None = None  # when the server received it (epoch seconds), when it says

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

    @classmethod
    def from_coreupdate(cls, machine_id: str, doc: Mapping[str, Any]) -> OmahaEventRecord:
        """From an event of coreupdate's ``GET /api/v1/apps/{app}/instances/{machine}``."""
        error, previous, status = doc.get("error_code"), doc.get("previous_version"), doc.get("status")
        return cls(
            machine_id=machine_id,
            app_version=str(doc.get("version") or ""),
            event_type=int(doc.get("type") or 0),
            event_result=int(doc.get("result") or 0),
            error_code=None if error is None else int(error),
            previous_version=None if previous is None else str(previous),
            status=None if status is None else str(status),
            at=float(doc.get("at") or 0),
        )

    @property
    def base_code(self) -> int | None:
        """The error code without the flag bits update-engine ORs into it."""
        return None if self.error_code is None else self.error_code & ~_ERROR_FLAGS


@dataclass(frozen=True)
class ServerInstance:
    """One instance as the update server sees it: the version it last reported and its status there."""

    machine_id: str
    version: str
    status: str  # coreupdate's names: Undefined, UpdateGranted, OnHold, Downloading, …, Complete, RolledBack, Error
    granted_version: str | None = None
    granted_at: float | None = None
    error_code: int | None = None

    @classmethod
    def from_coreupdate(cls, doc: Mapping[str, Any]) -> ServerInstance:
        """From coreupdate's instance JSON."""
        granted, granted_at, error = doc.get("granted_version"), doc.get("granted_at"), doc.get("error_code")
        return cls(
            machine_id=str(doc.get("machine_id") or ""),
            version=str(doc.get("version") or ""),
            status=str(doc.get("status") or ""),
            granted_version=None if granted is None else str(granted),
            granted_at=None if granted_at is None else float(granted_at),
            error_code=None if error is None else int(error),
        )


@dataclass(frozen=True)
class ServerSnapshot:
    """What the Omaha side has recorded: every event so far, oldest first, and (None: it keeps no such view) each
    instance as the server sees it."""

    events: list[OmahaEventRecord]
    instances: list[ServerInstance] | None = None


@dataclass(frozen=True)
class ServerStep:
    """The server's view of one instance moved to ``status`` from ``previous``; ``cause`` is the event that moved
    it, None for the server's own decisions (a grant, on hold) and for check-ins."""

    status: str
    previous: str | None
    cause: OmahaEventRecord | None = None


GRANTED = "UpdateGranted"


def server_steps(known: str | None, before: ServerInstance | None, now: ServerInstance,
                 new_events: Sequence[OmahaEventRecord]) -> list[ServerStep]:  # fmt: skip
    """The steps from the status last told (``known``) to ``now``, given the instance as it was (``before``) and
    the events read with it that were not seen before, oldest first.

    A snapshot is only where the instance is; several steps may lie between two of them: a grant is told by its
    time (``granted_at``) changing, every event that set a status by that status, and the instance's own status
    only when no new event set one (a status read before its events cannot be newer than them, but one read
    after newer events would be older: it waits for the next snapshot).
    """
    steps: list[ServerStep] = []
    if now.granted_at is not None and (before is None or before.granted_at != now.granted_at):
        steps.append(ServerStep(GRANTED, known))
        known = GRANTED
    set_by_events = False
    for event in new_events:
        if event.status is None:
            continue
        set_by_events = True
        if event.status != known:
            steps.append(ServerStep(event.status, known, event))
            known = event.status
    if not set_by_events and now.status != known:
        steps.append(ServerStep(now.status, known))
    return steps


async def close_reader_and_link(session: aiohttp.ClientSession | None, link: SlowLink | None) -> None:
    """The first steps of an Omaha side's ``stop``: the session that read its records, then the nodes' link."""
    if session is not None:
        await session.close()
    if link is not None:
        await link.stop()


class OmahaSide(Protocol):
    """The server a fleet's nodes update from (see the module)."""

    keeps_instances: bool  # whether ``instances`` answers (a server with a view of each instance)

    @property
    def node_url(self) -> str:
        """What the nodes' ``SERVER=`` names."""
        ...

    async def start(self, workdir: Path) -> None: ...

    def describe(self) -> str:
        """One line for a person: which server, where, offering what."""
        ...

    async def snapshot(self) -> ServerSnapshot | None:
        """What the server recorded (None: the read failed; the fleet asks again)."""
        ...

    async def stop(self) -> None: ...


class DevServerOmaha:
    """``update-engine-devserver`` offering ``releases`` (payload, version) to every group, behind a link paced
    at ``link_rate`` bytes/s."""

    keeps_instances = False

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

    async def snapshot(self) -> ServerSnapshot | None:
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
        return ServerSnapshot([OmahaEventRecord.from_json(doc) for doc in docs if isinstance(doc, dict)])

    async def stop(self) -> None:
        await close_reader_and_link(self._session, self.link)
        self._session, self.link = None, None
        if self.devserver is not None:
            await asyncio.to_thread(self.devserver.stop)
            self.devserver = None
