"""Hostile Omaha and payload servers: each misbehaviour is refused with a clear error, the disk is left alone, and
the daemon keeps running and checks again.

The attempter runs in-process against small aiohttp servers on 127.0.0.1 with shortened timeouts; the https case
runs ``update_engine --once`` (it needs a CA in the process's trust store); the last test runs the real daemon on
a private bus.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from coreos_common.status import UpdateStatus
from sim.bus import start_private_bus
from sim.disks import disk_facts
from sim.node import Node, make_node
from sim.omaha import Offer, OmahaStub, serve_bytes
from sim.payload import Keys, Release, build_release
from sim.tls import make_server_tls
from sim.tools import VENV_BIN
from tests.faults.figures import record
from tests.faults.support import FRESH_USR_A, MIB, NEW_VERSION, TEST_OMAHA_URL_FLAG, assert_nothing_armed
from update_engine import omaha
from update_engine.engine.attempter import UpdateAttempter
from update_engine.errors import ErrorCode
from update_engine.http_rules import HttpLimits

pytestmark = pytest.mark.faults

POLICY = Path(__file__).resolve().parents[2] / "units" / "com.coreos.update1.conf"
HUNDRED_MIB = 100 * MIB
# Generous upper bound on one refused attempt with the shortened limits below; reaching it means a hang.
HANG_BOUND = 15.0
QUICK = HttpLimits(
    connect_timeout=2.0, stall_timeout=0.5, omaha_total_timeout=2.0, resume_attempts=2, resume_delay=0.05
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



# --- hostile answers -------------------------------------------------------------------------------------------


def xml_answer(body: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="text/xml")

    return handler


def _billion_laughs() -> bytes:
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE response [", '  <!ENTITY lol0 "lol">']
    lines += [f'  <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    lines += ["]>", '<response protocol="3.0"><app appid="x" status="&lol9;"/></response>']
    return "\n".join(lines).encode()


def _quadratic_blowup() -> bytes:
    big = "A" * 50_000
    refs = "&big;" * 100_000
    return f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY big "{big}">]><response>{refs}</response>'.encode()


XXE = (
    b'<?xml version="1.0"?>\n<!DOCTYPE response [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    b'<response protocol="3.0"><app appid="x" status="&xxe;"/></response>\n'
)
EXTERNAL_DTD = b'<?xml version="1.0"?>\n<!DOCTYPE response SYSTEM "http://127.0.0.1:9/omaha.dtd">\n<response/>\n'


@dataclass
class Sent:
    """Bytes a hostile handler managed to push out before the client hung up."""

    bytes: int = 0


def endless_body(sent: Sent, *, declare: bool) -> Handler:
    """A 100 MiB answer, streamed (optionally announced in Content-Length); stops when the client goes away."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/xml"})
        if declare:
            resp.content_length = HUNDRED_MIB
        await resp.prepare(request)
        chunk = b"<response>" + b" " * (MIB - 10)
        try:
            while sent.bytes < HUNDRED_MIB:
                await resp.write(chunk)
                sent.bytes += len(chunk)
                chunk = b" " * MIB
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    return handler


def drip(prefix: bytes, interval: float, *, limit: float = 30.0, content_type: str = "text/xml") -> Handler:
    """``prefix``, then one more byte every ``interval`` seconds (at most ``limit`` seconds in all)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        deadline = time.monotonic() + limit
        try:
            await resp.write(prefix)
            while time.monotonic() < deadline:
                await asyncio.sleep(interval)
                await resp.write(b" " if content_type == "text/xml" else b"\0")
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    return handler


def redirect_to(location: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(location)

    return handler


def endless_redirect() -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        hop = int(request.query.get("hop", "0")) + 1
        raise web.HTTPFound(f"{request.path}?hop={hop}")

    return handler


def html_page(content_type: str, *, doctype: bool = True) -> Handler:
    """A captive portal's sign-in page."""

    async def handler(request: web.Request) -> web.StreamResponse:
        page = "<html><head><title>Sign in to the Wi-Fi</title></head><body>Welcome!</body></html>"
        if doctype:
            page = "<!DOCTYPE html>" + page
        return web.Response(text=page, content_type=content_type)

    return handler


def stall_at(data: bytes, position: int) -> Handler:
    """Serve ``data`` (honouring Range) up to byte ``position``, then send nothing more for a long time."""

    async def handler(request: web.Request) -> web.StreamResponse:
        start = request.http_range.start or 0
        resp = web.StreamResponse(status=206 if start else 200, headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data) - start
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        try:
            await resp.write(data[start:position])
            await asyncio.sleep(30)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    return handler


async def send_and_drop(request: web.Request, data: bytes, count: int) -> web.StreamResponse:
    """Announce all of ``data``, send its first ``count`` bytes, and close the connection."""
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = len(data)
    await resp.prepare(request)
    await resp.write(data[:count])
    assert request.transport is not None
    request.transport.close()
    return resp


def resume_from_wrong_offset(data: bytes, drop_at: int, wrong_times: int) -> Handler:
    """Drop the first request after ``drop_at`` bytes; answer the next ``wrong_times`` Range requests with 206 and
    the right length, but bytes from the start of the file (a cache or proxy that ignores where a range starts),
    saying so in Content-Range; then serve properly."""
    wrong_left = wrong_times

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal wrong_left
        start = request.http_range.start or 0
        if not start:
            return await send_and_drop(request, data, drop_at)
        if not wrong_left:
            return await serve_bytes(request, data)
        wrong_left -= 1
        body = data[: len(data) - start]
        resp = web.StreamResponse(status=206, headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(body)
        resp.headers["Content-Range"] = f"bytes 0-{len(body) - 1}/{len(data)}"
        await resp.prepare(request)
        await resp.write(body)
        return resp

    return handler


def offer_answer(release: Release, version: str) -> bytes:
    """An honest offer of ``release`` under a ``version`` no client should take."""
    return omaha.build_response([omaha.AppResponse(
        app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}",
        updatecheck=omaha.PayloadOffer(version=version, codebases=("http://127.0.0.1:9/packages/",),
                                       package_name="update.gz", size=release.size, sha256_b64=release.sha256_b64),
    )])


@dataclass(frozen=True)
class Hostile:
    """One misbehaving server: its Omaha and/or payload handler and the refusal expected."""

    name: str
    code: int
    words: str  # a regular expression the error message must match
    omaha: Callable[[Release], Handler] | None = None  # replaces the honest Omaha answer
    package: Callable[[Release], Handler] | None = None  # replaces the honest payload download
    offer: Callable[[Release], Offer] | None = None  # replaces what the honest answer announces
    sent: Sent = field(default_factory=Sent)

    def __str__(self) -> str:
        return self.name


XML_PARSE = ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR
INVALID = ErrorCode.OMAHA_RESPONSE_INVALID
TRANSFER = ErrorCode.DOWNLOAD_TRANSFER_ERROR
NO_RESPONSE = ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE

_huge_streamed = Sent()
_huge_declared = Sent()

CASES = [
    Hostile("billion laughs (nested entities)", XML_PARSE, "DTD|entities",
          omaha=lambda r: xml_answer(_billion_laughs())),
    Hostile("quadratic blow-up (one big entity)", XML_PARSE, "DTD|entities",
          omaha=lambda r: xml_answer(_quadratic_blowup())),
    Hostile("external entity (XXE)", XML_PARSE, "entities|DTD", omaha=lambda r: xml_answer(XXE)),
    Hostile("external DTD", XML_PARSE, "DTD", omaha=lambda r: xml_answer(EXTERNAL_DTD)),
    Hostile("UTF-16 declared", XML_PARSE, "encoding|UTF-8",
          omaha=lambda r: xml_answer('<?xml version="1.0" encoding="UTF-16"?><response/>'.encode("utf-16"))),
    Hostile("100 MiB body, streamed", XML_PARSE, "1 MiB",
            omaha=lambda r: endless_body(_huge_streamed, declare=False), sent=_huge_streamed),
    Hostile("100 MiB body, announced", XML_PARSE, "1 MiB",
            omaha=lambda r: endless_body(_huge_declared, declare=True), sent=_huge_declared),
    Hostile("slow drip slower than the stall timeout", NO_RESPONSE, "timed out",
          omaha=lambda r: drip(b"<response", 2.0)),
    Hostile("endless drip faster than the stall timeout", NO_RESPONSE, "timed out",
          omaha=lambda r: drip(b"<response", 0.1)),
    Hostile("Omaha redirect to file://", TRANSFER, "non-http", omaha=lambda r: redirect_to("file:///etc/passwd")),
    Hostile("Omaha redirect to ftp://", TRANSFER, "non-http", omaha=lambda r: redirect_to("ftp://127.0.0.1/x")),
    Hostile("Omaha redirect to javascript:", TRANSFER, "non-http",
          omaha=lambda r: redirect_to("javascript:alert(1)")),
    Hostile("Omaha endless redirects", ErrorCode.OMAHA_REQUEST_ERROR, "redirects", omaha=lambda r: endless_redirect()),
    Hostile("Omaha answers an HTML page", XML_PARSE, "DTD", omaha=lambda r: html_page("text/html")),
    Hostile("Omaha answers an HTML page without DOCTYPE", INVALID, "<html>",
          omaha=lambda r: html_page("text/html", doctype=False)),
    Hostile("payload URL with file: scheme", INVALID, "not http",
          offer=lambda r: Offer(NEW_VERSION, r.size, r.sha256_b64, codebase="file:///dev/")),
    Hostile("payload URL with a port out of range", INVALID, "[Pp]ort",
          offer=lambda r: Offer(NEW_VERSION, r.size, r.sha256_b64, codebase="http://127.0.0.1:70000/packages/")),
    Hostile("version that would forge a log line", INVALID, "control characters",
          omaha=lambda r: xml_answer(offer_answer(r, "3.0.0\n<3>update-engine: forged"))),
    Hostile("version that is a path", INVALID, "path separators",
          omaha=lambda r: xml_answer(offer_answer(r, "../../../../etc/cron.d/x"))),
    Hostile("payload URL without a host", INVALID, "host",
          offer=lambda r: Offer(NEW_VERSION, r.size, r.sha256_b64, codebase="http:///packages/")),
    Hostile("payload redirect to file://", TRANSFER, "non-http",
          package=lambda r: redirect_to("file:///etc/shadow")),
    Hostile("payload redirect to gopher://", TRANSFER, "non-http",
          package=lambda r: redirect_to("gopher://127.0.0.1/1")),
    Hostile("payload endless redirects", TRANSFER, "redirects", package=lambda r: endless_redirect()),
    Hostile("payload URL returns HTML", TRANSFER, "HTML", package=lambda r: html_page("text/html")),
    Hostile("payload URL returns HTML labelled as binary", TRANSFER, "Range|magic",
          package=lambda r: html_page("application/octet-stream")),
    Hostile("payload stalls at 1.5 MiB, every time", TRANSFER, "resumes",
          package=lambda r: stall_at(r.data, 3 * MIB // 2)),
    Hostile("payload stalls at 1000 bytes, every time", TRANSFER, "resumes",
          package=lambda r: stall_at(r.data, 1000)),
    Hostile("payload longer than announced", ErrorCode.DOWNLOAD_SIZE_MISMATCH, "bytes",
          offer=lambda r: Offer(NEW_VERSION, r.size - 1, r.sha256_b64)),
    Hostile("payload resumes answered from the wrong offset, every time", TRANSFER, "Content-Range",
            package=lambda r: resume_from_wrong_offset(r.data, MIB + 1000, wrong_times=100)),
]

SLOW_DRIP_PAYLOAD = Hostile(
    "payload slow drip (4 B/s, never stalling)", TRANSFER, "slow|rate|B/s",
    package=lambda r: drip(r.data[:100], 0.25, content_type="application/octet-stream"),
)


@pytest.fixture
async def stub(release_for_hostile: Release) -> AsyncIterator[OmahaStub]:
    server = await OmahaStub(payload=release_for_hostile.data).start()
    server.offer = Offer(NEW_VERSION, release_for_hostile.size, release_for_hostile.sha256_b64)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def release_for_hostile(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    """About 2 MiB of payload: large enough for the downloader to deliver a first 1 MiB before a fault."""
    return build_release(
        tmp_path_factory.mktemp("hostile-release"), keys, image_size=4 * MIB, kernel_size=9000, seed=2
    )


async def _attempt(
    node: Node, keys: Keys, stub: OmahaStub, bound: float = HANG_BOUND
) -> tuple[UpdateAttempter, int | None, str]:
    attempter = UpdateAttempter(node.options(keys, stub.url, QUICK))
    try:
        outcome = await asyncio.wait_for(attempter.check_and_update(), bound)
    except TimeoutError:
        raise AssertionError(f"the attempt was still running after {bound:.0f} s: the server holds it") from None
    return attempter, outcome.error_code, outcome.error_message or ""


async def _refused(
    case: Hostile, tmp_path: Path, keys: Keys, stub: OmahaStub, release: Release, bound: float = HANG_BOUND
) -> None:
    if case.omaha is not None:
        stub.omaha = case.omaha(release)
    if case.package is not None:
        stub.package = case.package(release)
    if case.offer is not None:
        stub.offer = case.offer(release)
    node = make_node(tmp_path, stub.url)
    before = disk_facts(node.disk)
    try:
        attempter, code, message = await _attempt(node, keys, stub, bound)
    except AssertionError:
        record("hostile Omaha / payload server", trials=1, refused=0, survived=0)  # held: neither refused nor free
        raise
    record("hostile Omaha / payload server", trials=1, refused=int(code == case.code),
           survived=int(attempter.machine.status is UpdateStatus.IDLE))
    assert code == case.code, f"{case.name}: expected error {case.code}, got {code}: {message}"
    assert re.search(case.words, message, re.IGNORECASE), f"{case.name}: unclear message {message!r}"
    assert attempter.machine.status is UpdateStatus.IDLE
    assert_nothing_armed(node, before)
    if case.omaha is None:
        # The Omaha server itself behaves, so it hears why the update failed.
        assert stub.events[-1] == (3, 0, case.code | TEST_OMAHA_URL_FLAG)


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_hostile_server_is_refused_and_nothing_changes(
    case: Hostile, tmp_path: Path, keys: Keys, stub: OmahaStub, release_for_hostile: Release
) -> None:
    await _refused(case, tmp_path, keys, stub, release_for_hostile)
    if case.sent.bytes:
        # The client hung up long before the server could push 100 MiB: memory stayed bounded.
        assert case.sent.bytes < HUNDRED_MIB


async def test_slow_drip_payload_is_abandoned(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release_for_hostile: Release
) -> None:
    # A minimum-rate rule over stall_timeout (0.5 s here) ends this within a second or two.
    await _refused(SLOW_DRIP_PAYLOAD, tmp_path, keys, stub, release_for_hostile, bound=8.0)


def drop_once(data: bytes, count: int) -> Handler:
    """The first request gets ``count`` bytes and a closed connection; later ones are served properly."""
    requests = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal requests
        requests += 1
        if requests > 1:
            return await serve_bytes(request, data)
        return await send_and_drop(request, data, count)

    return handler


async def test_connection_dropped_early_is_resumed(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release_for_hostile: Release
) -> None:
    stub.package = drop_once(release_for_hostile.data, 1000)
    node = make_node(tmp_path, stub.url)
    attempter, code, message = await _attempt(node, keys, stub)
    assert code is None, message
    assert attempter.machine.status is UpdateStatus.UPDATED_NEED_REBOOT


async def test_a_resume_answered_from_the_wrong_offset_is_resumed_again(
    tmp_path: Path, keys: Keys, stub: OmahaStub, release_for_hostile: Release
) -> None:
    """None of the misplaced bytes reach the payload: the resume is tried again, and the update installs."""
    stub.package = resume_from_wrong_offset(release_for_hostile.data, MIB + 1000, wrong_times=1)
    node = make_node(tmp_path, stub.url)
    attempter, code, message = await _attempt(node, keys, stub)
    assert code is None, message
    assert attempter.machine.status is UpdateStatus.UPDATED_NEED_REBOOT


async def test_honest_server_still_works(tmp_path: Path, keys: Keys, stub: OmahaStub) -> None:
    """The control case: the same harness with a well-behaved server installs the update."""
    node = make_node(tmp_path, stub.url)
    attempter, code, message = await _attempt(node, keys, stub)
    assert code is None, message
    assert attempter.machine.status is UpdateStatus.UPDATED_NEED_REBOOT
    facts = disk_facts(node.disk)
    assert facts.usr_a_flags == FRESH_USR_A and facts.usr_b_flags == (2, 1, 0)


# --- https configured, http offered ----------------------------------------------------------------------------


async def _once(node: Node, keys: Keys, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *node.once_args(keys), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


@pytest.mark.parametrize(
    "payload_scheme",
    [
        "https",
        "http",
    ],
)
async def test_https_server_offering_http_payload(
    payload_scheme: str, tmp_path: Path, keys: Keys, small_release: Release
) -> None:
    tls = make_server_tls(tmp_path / "tls", "fault test CA")
    async with OmahaStub(payload=small_release.data, tls=tls) as stub:
        base = stub.https_base if payload_scheme == "https" else stub.base
        stub.offer = Offer(NEW_VERSION, small_release.size, small_release.sha256_b64, codebase=f"{base}/packages/")
        node = make_node(tmp_path, stub.https_url)
        before = disk_facts(node.disk)
        result = await _once(node, keys, {**os.environ, "SSL_CERT_FILE": str(tls.ca_file)})
        if payload_scheme == "https":
            # Control: the trust store and the https server work, so a refusal below is about the scheme.
            assert result.returncode == 0, result.stderr
            assert disk_facts(node.disk).usr_b_flags == (2, 1, 0)
            return
        record("hostile Omaha / payload server", trials=1, refused=int(result.returncode != 0),
               survived=int(disk_facts(node.disk).usr_a_flags == FRESH_USR_A))
        assert result.returncode != 0, "an https Omaha server's plain-http payload URL was used"
        assert "http" in result.stderr
        assert_nothing_armed(node, before)


# --- the daemon survives and checks again ----------------------------------------------------------------------


async def _client(bus_address: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "update_engine_client"), *args, "--bus-address", bus_address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode()


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Daemon:
    """The real ``update_engine`` daemon on a private bus; first scheduled check one second after start."""

    process: subprocess.Popen[bytes]
    log_path: Path
    bus_address: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        assert self.process.poll() is None, f"update_engine exited with {self.process.returncode}:\n{self.log()}"

    async def refused_checks(self, count: int) -> bool:
        """At least ``count`` attempts failed, each followed by a scheduled next check."""
        self.alive()
        log = self.log()
        return log.count("Update attempt failed") >= count and len(re.findall(r"Next update check in", log)) >= count

    async def has_status(self, status: str) -> bool:
        self.alive()
        return f"CURRENT_OP=UPDATE_STATUS_{status}" in await _client(self.bus_address, "-status")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def bus_address(tmp_path: Path) -> Iterator[str]:
    bus = start_private_bus(tmp_path / "dbus", [POLICY])
    try:
        yield bus.address
    finally:
        bus.stop()


async def test_daemon_survives_hostile_answers_and_checks_again(
    tmp_path: Path, keys: Keys, stub: OmahaStub, bus_address: str
) -> None:
    node = make_node(tmp_path, stub.url)
    before = disk_facts(node.disk)
    hostile = [xml_answer(_billion_laughs()), redirect_to("file:///etc/passwd"), html_page("text/html")]
    stub.omaha = hostile[0]
    args = [
        str(VENV_BIN / "update_engine"), "--bus-address", bus_address, "--disk", str(node.disk), "--booted", "USR-A",
        "--public-key", str(keys.public), "--state-dir", str(node.root.state_dir), "--run-dir",
        str(node.root.run_dir), "--config-root", str(node.root.root), "--kernel-dir", str(node.root.kernel_dir),
        "--first-check-delay", "1", "--healthy-boot-delay", "3600", "--stall-timeout", "2",
    ]
    log_path = tmp_path / "update_engine.log"
    with log_path.open("wb") as log:
        daemon = Daemon(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), log_path, bus_address)
    try:
        # The scheduled first check meets the first hostile answer; the daemon schedules the next one.
        await _eventually(functools.partial(daemon.refused_checks, 1), "the first refused check")
        for number, handler in enumerate(hostile[1:], start=2):
            stub.omaha = handler
            await _eventually(functools.partial(daemon.has_status, "IDLE"), "IDLE")
            await _client(bus_address, "-check_for_update")
            await _eventually(functools.partial(daemon.refused_checks, number), f"refused check {number}")
        assert disk_facts(node.disk).usr_b_flags[0] == 0
        # The server behaves again: the same daemon process checks once more and installs the update.
        stub.omaha = None
        await _eventually(functools.partial(daemon.has_status, "IDLE"), "IDLE")
        await _client(bus_address, "-check_for_update")
        await _eventually(functools.partial(daemon.has_status, "UPDATED_NEED_REBOOT"), "the update", timeout=60)
        after = disk_facts(node.disk)
        assert after.usr_a_sha256 == before.usr_a_sha256 and after.usr_a_flags == FRESH_USR_A
        assert after.usr_b_flags == (2, 1, 0)
        assert stub.checks == len(hostile) + 1
        record("hostile Omaha / payload server", trials=len(hostile), refused=len(hostile), survived=len(hostile),
               note=f"daemon: {len(hostile)} hostile answers refused, then the same process installed the update")
    finally:
        daemon.stop()
