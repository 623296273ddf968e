"""FleetLock client: request format, 200-only success, error bodies in the log, retry only while refused."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from locksmithd.backends import LockBackendError, LockBackendUnavailable, LockPhase, LockProgress
from locksmithd.backends.fleetlock import FleetLockBackend, endpoint_url, parse_refusal, request_body
from sim.ports import free_port

MACHINE = "0123456789abcdef0123456789abcdef"


def test_endpoint_url_keeps_the_base_path() -> None:
    assert endpoint_url("http://h/fleet/", "v1/pre-reboot") == "http://h/fleet/v1/pre-reboot"
    assert endpoint_url("http://h/fleet", "v1/steady-state") == "http://h/fleet/v1/steady-state"


def test_request_body() -> None:
    assert request_body(MACHINE, "workers") == (
        b'{"client_params":{"id":"0123456789abcdef0123456789abcdef","group":"workers"}}'
    )


@pytest.mark.parametrize(
    ("status", "body", "text", "retryable", "taken"),
    [
        (423, b'{"kind":"lock_held","value":"held by x"}', "code 423, lock_held: held by x", True, True),
        (
            500,
            b'{"kind":"failed_lock","value":"all 2 semaphore slots currently locked"}\n',
            "failed_lock",
            True,
            True,
        ),
        (
            400,
            b'{"kind":"invalid_client_identity","value":"bad"}',
            "code 400, invalid_client_identity: bad",
            False,
            False,
        ),
        (404, b"404 page not found", "code 404: 404 page not found", False, False),
        (502, b"", "code 502", True, False),
        (400, b'{"kind": 3}', 'code 400: {"kind": 3}', False, False),
    ],
)
def test_refusals(status: int, body: bytes, text: str, retryable: bool, taken: bool) -> None:
    refusal = parse_refusal(status, body)
    assert text in str(refusal)
    assert refusal.retryable is retryable
    assert refusal.lock_taken is taken


def test_long_error_bodies_are_cut() -> None:
    assert len(str(parse_refusal(500, b"x" * 5000))) < 300


class Script:
    """A FleetLock server that answers from a list of (status, body) and records requests."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str] | None]] = []
        self.requests: list[tuple[str, str | None, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.headers.get("fleet-lock-protocol"), await request.read()))
        status, body = self.answers.pop(0) if self.answers else (200, None)
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status)


@pytest.fixture
async def script() -> AsyncIterator[tuple[Script, str]]:
    server = Script()
    app = web.Application()
    app.router.add_post("/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield server, f"http://127.0.0.1:{port}/base/"
    finally:
        await runner.cleanup()


async def test_acquire_waits_while_the_lock_is_taken(
    script: tuple[Script, str], caplog: pytest.LogCaptureFixture
) -> None:
    """poseidon/fleetlock's 423 and airlock's 500 failed_lock both mean "taken": ask again later."""
    caplog.set_level(logging.INFO)
    server, url = script
    server.answers = [
        (423, {"kind": "lock_held", "value": "held"}),
        (500, {"kind": "failed_lock", "value": "all 2 semaphore slots currently locked"}),
        (200, None),
    ]
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    backend = FleetLockBackend(url, "g1", backoff_initial=10, backoff_max=15, sleep=sleep)
    progress: list[LockProgress] = []
    try:
        await backend.acquire(MACHINE, version="1.2.3", on_progress=progress.append)
    finally:
        await backend.close()
    assert sleeps == [10, 15]
    assert [p.phase for p in progress] == [LockPhase.ASKING, LockPhase.WAITING, LockPhase.WAITING, LockPhase.HELD]
    assert all(p.position is None for p in progress)  # a FleetLock server keeps no line we could see
    assert [r[0] for r in server.requests] == ["/base/v1/pre-reboot"] * 3
    assert all(r[1] == "true" for r in server.requests)
    assert b'"group":"g1"' in server.requests[0][2]
    assert "server-side error, code 423, lock_held: held. Retrying in 10s." in caplog.text


async def test_a_failing_server_is_the_strategys_to_retry(script: tuple[Script, str]) -> None:
    """A 5xx that does not say the lock is taken (a proxy's 503, airlock's failed_sem_init) is a failure:
    the backend does not sleep on it, the strategy retries with its backoff."""
    server, url = script
    server.answers = [(503, None), (500, {"kind": "failed_sem_init", "value": "etcd down"})]

    async def no_sleep(seconds: float) -> None:
        raise AssertionError("the backend must not retry a failure itself")

    backend = FleetLockBackend(url, "g1", sleep=no_sleep)
    try:
        with pytest.raises(LockBackendUnavailable, match="code 503"):
            await backend.acquire(MACHINE)
        with pytest.raises(LockBackendUnavailable, match="failed_sem_init: etcd down"):
            await backend.acquire(MACHINE)
    finally:
        await backend.close()


async def test_misconfiguration_is_an_error_not_a_retry(script: tuple[Script, str]) -> None:
    server, url = script
    server.answers = [(400, {"kind": "unknown_group", "value": "group g1 is not configured"})]
    backend = FleetLockBackend(url, "g1")
    try:
        with pytest.raises(LockBackendError, match="unknown_group: group g1 is not configured"):
            await backend.acquire(MACHINE)
    finally:
        await backend.close()


async def test_release(script: tuple[Script, str]) -> None:
    server, url = script
    server.answers = [(200, None), (500, {"kind": "failed_unlock", "value": "etcd down"})]
    backend = FleetLockBackend(url)
    try:
        assert await backend.release(MACHINE) is True
        with pytest.raises(LockBackendError, match=r"steady-state failure.*failed_unlock: etcd down"):
            await backend.release(MACHINE)
    finally:
        await backend.close()
    assert server.requests[0][0] == "/base/v1/steady-state"
    assert b'"group":"default"' in server.requests[0][2]


async def test_unreachable_server() -> None:
    backend = FleetLockBackend(f"http://127.0.0.1:{free_port()}/")
    try:
        assert await backend.reachable() is False
        with pytest.raises(LockBackendError, match="did not answer"):
            await backend.acquire(MACHINE)
    finally:
        await backend.close()


async def test_an_endless_answer_is_cut_at_one_mebibyte() -> None:
    """A server (or something posing as one) that answers with an endless body: the client reads at most
    1 MiB of it and reports the server, instead of filling its memory."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(status=423)
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(32 * 16):  # 32 MiB at most, far more than the client may read
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", endless)
    app.router.add_get("/{tail:.*}", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def no_sleep(seconds: float) -> None:
        raise AssertionError("an endless answer is not a refusal to wait on")

    backend = FleetLockBackend(f"http://127.0.0.1:{port}/", sleep=no_sleep)
    try:
        with pytest.raises(LockBackendError, match=r"127\.0\.0\.1.*more than 1 MiB"):
            await backend.acquire(MACHINE)
        with pytest.raises(LockBackendError, match="more than 1 MiB"):
            await backend.release(MACHINE)
    finally:
        await backend.close()
        await runner.cleanup()
    assert sent < 32 * 1024 * 1024
