"""The asyncio shell of the etcd protocol: procedures over ``coreos_common.http_async``, watches, a lease keeper.

Rules of this file: it decides nothing about the semaphore. ``EtcdClient.run`` carries a procedure's calls
and answers (``gateway``); ``watch`` opens a watch stream with the same endpoint order and authentication and
hands over its events; ``LeaseKeeper`` renews one lease in the background and says when etcd lost it. Every
failure reaching a caller is a LockBackendError (EtcdUnavailable when another try may work). One HTTP client
with kept-alive connections serves all requests of a daemon; each watch has a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from coreos_common.http1 import HttpError
from coreos_common.http_async import HttpClient, HttpStream
from coreos_common.tls import TlsFiles, TlsSettingsError, client_context
from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd import line, ops
from locksmithd.backends.etcd.gateway import (
    Answer,
    EndpointDown,
    EtcdStats,
    EtcdUnavailable,
    GatewayFormatError,
    GatewaySession,
    HttpAnswer,
    HttpCall,
    Procedure,
    answer_of,
    failure_of,
)
from locksmithd.backends.etcd.watch import WatchDecoder, WatchEvent, watch_request
from locksmithd.backends.etcd_settings import EtcdSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
# How much of a watch's refusal is read to explain it.
_REFUSAL_BODY = 64 * 1024


class WatchRestart(Exception):
    """The watch ended without an error (history compacted, cancelled by etcd): read again, watch again."""


def _tls_factory(settings: EtcdSettings) -> Callable[[], object]:
    def make() -> object:
        try:
            return client_context(TlsFiles(settings.ca_file, settings.cert_file, settings.key_file))
        except TlsSettingsError as exc:
            raise LockBackendError(f"etcd TLS settings: {exc}") from None

    return make


async def _answer(http: HttpClient, call: HttpCall) -> Answer:
    try:
        response = await http.request(
            call.method, call.endpoint + call.path, headers=call.headers, body=call.body, timeout=call.timeout,
            max_body=call.max_answer,
        )  # fmt: skip
    except HttpError as exc:
        return failure_of(exc, call)
    return answer_of(response)


class KeyWatch:
    """An open watch of one key: ``next`` returns the events that arrived next, folded per read."""

    def __init__(self, stream: HttpStream, name: str, stats: EtcdStats) -> None:
        self._stream = stream
        self._name = name
        self._stats = stats
        self._decoder = WatchDecoder()

    async def next(self, timeout: float | None) -> list[WatchEvent]:
        """Events at least one; TimeoutError when nothing came for ``timeout``; WatchRestart or EtcdUnavailable
        when the watch ended."""
        while True:
            try:
                data = await self._stream.read(timeout)
            except HttpError as exc:
                raise EtcdUnavailable(f"the watch on {self._name!r} broke: {exc}") from None
            if data is None:
                raise EtcdUnavailable(f"etcd closed the watch on {self._name!r}")
            try:
                messages = self._decoder.feed(data)
            except GatewayFormatError as exc:
                raise EtcdUnavailable(f"the watch on {self._name!r}: {exc}") from None
            events: list[WatchEvent] = []
            for message in messages:
                if message.canceled:
                    if message.compact_revision:
                        raise WatchRestart(f"history before revision {message.compact_revision} was compacted")
                    raise WatchRestart(f"etcd cancelled the watch: {message.cancel_reason or 'no reason given'}")
                events.extend(message.events)
            if events:
                self._stats.watch_events += len(events)
                return events


class EtcdClient:
    """One node's connection to etcd: the session (endpoints, tokens), the HTTP client, the group's keys."""

    def __init__(self, settings: EtcdSettings, stats: EtcdStats | None = None) -> None:
        self.session = GatewaySession(settings, stats)
        self.settings = settings
        self.keys = ops.SemaphoreKeys.for_group(settings.group)
        self._http = HttpClient(
            ssl_context=_tls_factory(settings),  # type: ignore[arg-type]
            connect_timeout=settings.request_timeout,
            user_agent="locksmithd",
        )

    @property
    def stats(self) -> EtcdStats:
        return self.session.stats

    async def run(self, procedure: Procedure[T]) -> T:
        """Carry ``procedure``'s calls to etcd; its result."""
        try:
            call = next(procedure)
            while True:
                call = procedure.send(await _answer(self._http, call))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def watch(self, key: str, after_revision: int, *, deletes_only: bool = False) -> AsyncIterator[KeyWatch]:
        """A watch of ``key`` for changes after ``after_revision`` (endpoint failover as for calls)."""
        body = watch_request(key, after_revision + 1, deletes_only=deletes_only)
        failures: list[str] = []
        session = self.session
        if key == self.keys.semaphore:
            session.stats.semaphore_watches += 1
        else:
            session.stats.line_watches += 1
        for index in session.order():
            opening = None
            try:
                call = await self.run(session.stream_call(index, "watch", body))
                manager = self._http.stream(
                    call.method, call.endpoint + call.path, headers=call.headers, body=call.body,
                    timeout=call.timeout,
                )  # fmt: skip
                stream = await manager.__aenter__()
                opening = manager
                if stream.head.status != 200:
                    session.check_stream_answer(index, "watch", await _refusal(stream))
            except (EndpointDown, HttpError) as exc:
                failures.append(f"{session.endpoints[index]}: {exc}")
                if opening is not None:
                    await opening.__aexit__(None, None, None)
                continue
            except BaseException:
                if opening is not None:
                    await opening.__aexit__(None, None, None)
                raise
            try:
                yield KeyWatch(stream, key, session.stats)
            finally:
                await opening.__aexit__(None, None, None)
            return
        raise EtcdUnavailable(f"cannot watch {key!r} ({'; '.join(failures)})")

    @property
    def open_watches(self) -> int:
        """Watches not closed yet (each holds a connection)."""
        return self._http.open_streams

    async def close(self) -> None:
        await self._http.close()


async def _refusal(stream: HttpStream) -> HttpAnswer:
    """The head and the first bytes of a watch that did not open, to explain why."""
    body = b""
    with contextlib.suppress(TimeoutError, HttpError):
        while len(body) < _REFUSAL_BODY and (piece := await stream.read(2.0)) is not None:
            body += piece
    return HttpAnswer(stream.head.status, stream.head.reason, body[:_REFUSAL_BODY])


class LeaseKeeper:
    """One lease, renewed in the background about every third of its TTL (earlier at random each time, so
    nodes that joined together do not renew together); ``lost`` is set when etcd says the lease is gone."""

    def __init__(self, client: EtcdClient, ttl: float, random: Callable[[], float]) -> None:
        self._client = client
        self._ttl = ttl
        self._random = random
        self.lease = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def fresh(self) -> int:
        """A lease to put the line key under: the current one, or a new one after it was lost."""
        if self.lease and not self.lost.is_set():
            return self.lease
        old, self.lease = self.lease, await self._client.run(line.grant_lease(self._client.session, self._ttl))
        self.lost.clear()
        if old:
            await self._revoke(old)
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name=f"etcd-lease {self._client.keys.semaphore}")
        return self.lease

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3 * (0.8 + 0.2 * self._random()))
            if self.lost.is_set():
                continue
            try:
                alive = await self._client.run(line.keep_lease_alive(self._client.session, self.lease))
            except line.LeaseGone:
                alive = False
            except LockBackendError as exc:
                log.debug("could not renew lease %x: %s", self.lease, exc)
                continue
            if not alive:
                log.info("lease %x of this node's place in line expired; joining the line again", self.lease)
                self.lost.set()

    async def _revoke(self, lease: int) -> None:
        try:
            await self._client.run(line.revoke_lease(self._client.session, lease))
        except LockBackendError as exc:
            log.debug("could not revoke lease %x (%s); its line key goes when it expires", lease, exc)

    async def close(self, *, revoke: bool) -> None:
        """Stop renewing; ``revoke`` deletes the line key now (otherwise it goes when the lease expires)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke and self.lease:
            await self._revoke(self.lease)
        self.lease = 0
        self.lost.clear()
