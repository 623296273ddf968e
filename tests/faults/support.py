"""What the update-engine fault tests share: keys, small releases, a node with its disk, an Omaha server under the
test's control, the disk facts every fault must leave alone, and a disk image held in memory for GPT trials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.conftest import require_tool
from tests.helpers.disks import USR_A_INDEX, USR_B_INDEX, make_usr_disk, partition_sha256
from tests.helpers.node import VENV_BIN, NodeRoot, make_node_root
from update_engine import omaha
from update_engine.attempter import EngineOptions
from update_engine.gpt import GptDisk, PartitionFlags
from update_engine.http import HttpLimits
from update_engine.payload.generate import generate_full_payload, make_key_pair

KIB = 1024
MIB = 1024 * KIB
OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
FRESH_USR_A = (1, 0, 1)  # (priority, tries, successful) of the running partition on a fresh image
TEST_OMAHA_URL_FLAG = 1 << 28


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    keys = Keys(directory / "key.pem", directory / "key.pub.pem")
    make_key_pair(keys.private, keys.public)
    return keys


@dataclass(frozen=True)
class Release:
    """A USR image, its kernel and their signed payload."""

    image: Path
    kernel: Path
    payload: Path

    @property
    def data(self) -> bytes:
        return self.payload.read_bytes()

    @property
    def size(self) -> int:
        return self.payload.stat().st_size

    @property
    def sha256_b64(self) -> str:
        return sha256_b64(self.data)


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def build_release(
    workdir: Path, keys: Keys, *, image_size: int, chunk_size: int = MIB, kernel_size: int = 9000, seed: int = 1
) -> Release:
    """Deterministic image content: half random (stored raw), half text (stored bzip2-compressed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    half = image_size // 2
    text = b"flatcar usr partition content " * (image_size // 30 + 1)
    image = workdir / "usr.img"
    image.write_bytes((rng.randbytes(half) + text)[:image_size])
    kernel = workdir / "vmlinuz"
    kernel.write_bytes(rng.randbytes(kernel_size))
    payload = workdir / "update.gz"
    generate_full_payload(image, payload, keys.private.read_bytes(), kernel=kernel, chunk_size=chunk_size)
    return Release(image, kernel, payload)


# --- the node --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A node root and its boot disk; USR-A is running."""

    root: NodeRoot
    disk: Path

    def options(self, keys: Keys, server: str, http: HttpLimits | None = None) -> EngineOptions:
        return EngineOptions(
            config_root=self.root.root, state_dir=self.root.state_dir, run_dir=self.root.run_dir, disk=self.disk,
            booted="USR-A", server=server, public_key=keys.public, kernel_dir=self.root.kernel_dir,
            http=http or HttpLimits(resume_delay=0.05),
        )

    def once_args(self, keys: Keys, *extra: str) -> list[str]:
        """``update_engine --once`` for this node (the server comes from update.conf)."""
        return [
            str(VENV_BIN / "update_engine"), "--once", "--disk", str(self.disk), "--booted", "USR-A",
            "--state-dir", str(self.root.state_dir), "--run-dir", str(self.root.run_dir),
            "--config-root", str(self.root.root), "--kernel-dir", str(self.root.kernel_dir),
            "--public-key", str(keys.public), "--resume-delay", "0.05", *extra,
        ]

    @property
    def reboot_marker(self) -> Path:
        return self.root.run_dir / "update_engine_autoupdate_completed"


def make_node(directory: Path, server: str, *, usr_mib: int = 8) -> Node:
    root = make_node_root(directory / "root", version=OLD_VERSION, server=server)
    disk = make_usr_disk(directory / "disk.img", usr_mib=usr_mib)
    return Node(root, disk)


@dataclass(frozen=True)
class DiskFacts:
    """What a fault must never change (the running partition) and what it may (the passive one's flags)."""

    usr_a_sha256: str
    usr_a_flags: tuple[int, int, int]
    usr_b_flags: tuple[int, int, int]
    valid_copies: int  # GPT copies our reader accepts


def cgpt_flags_checked(disk: Path, index: int) -> tuple[int, int, int]:
    """(priority, tries, successful) from cgpt, failing the test if cgpt finds no valid table."""
    shown = subprocess.run(
        [require_tool("cgpt"), "show", "-i", str(index), "-A", str(disk)], capture_output=True, text=True
    )
    assert shown.returncode == 0, f"cgpt cannot read {disk}: {shown.stderr.strip()}"
    flags = PartitionFlags.from_attributes(int(shown.stdout.strip(), 0) << 48)
    return flags.priority, flags.tries, int(flags.successful)


def disk_facts(disk: Path) -> DiskFacts:
    with GptDisk.open(disk, writable=False) as gpt_disk:
        snap = gpt_disk.snapshot
        valid = sum(copy.problem is None for copy in (snap.primary, snap.backup))
        ours = {i: gpt_disk.flags(i) for i in (USR_A_INDEX, USR_B_INDEX)}
    a, b = cgpt_flags_checked(disk, USR_A_INDEX), cgpt_flags_checked(disk, USR_B_INDEX)
    for index, theirs in ((USR_A_INDEX, a), (USR_B_INDEX, b)):
        mine = ours[index]
        assert (mine.priority, mine.tries, int(mine.successful)) == theirs, f"cgpt and GptDisk disagree on {index}"
    return DiskFacts(partition_sha256(disk, USR_A_INDEX), a, b, valid)


def assert_running_untouched(before: DiskFacts, after: DiskFacts) -> None:
    assert after.usr_a_sha256 == before.usr_a_sha256, "the running partition's bytes changed"
    assert after.usr_a_flags == before.usr_a_flags, "the running partition's flags changed"
    assert after.valid_copies >= 1


def assert_nothing_armed(node: Node, before: DiskFacts) -> None:
    """A refused update: USR-A as it was, USR-B not bootable, no kernel installed, no reboot pending."""
    after = disk_facts(node.disk)
    assert_running_untouched(before, after)
    assert after.usr_b_flags[0] == 0, f"USR-B is bootable after a refused update: {after.usr_b_flags}"
    assert after.valid_copies == 2
    assert not (node.root.kernel_dir / "vmlinuz-b").exists()
    assert not node.reboot_marker.exists()


# --- an Omaha server under the test's control ------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Offer:
    """What the Omaha answer announces; every field can lie about the payload actually served."""

    version: str
    size: int
    sha256_b64: str
    codebase: str | None = None  # default: this server's /packages/
    package_name: str = "update.gz"


@dataclass
class OmahaStub:
    """An Omaha server and payload host on 127.0.0.1, running in the test's event loop.

    By default it answers every update check with ``offer`` and serves ``payload`` (with Range); ``omaha`` and
    ``package`` replace those handlers for hostile behaviour. ``checks``, ``events`` and ``bytes_sent`` say what
    clients did. ``throttle`` (bytes per 10 ms) slows the payload so a test can act in the middle of a download.
    """

    payload: bytes = field(default=b"", repr=False)
    offer: Offer | None = None
    omaha: Handler | None = None
    package: Handler | None = None
    throttle: int | None = None
    checks: int = 0
    requests: int = 0
    events: list[tuple[int, int, int | None]] = field(default_factory=list)
    bytes_sent: int = 0
    on_sent: Callable[[int], None] | None = None  # called with bytes_sent after every payload write
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1/update/"

    async def start(self) -> OmahaStub:
        app = web.Application(client_max_size=4 * MIB)
        app.router.add_post("/v1/update/", self._omaha)
        app.router.add_get("/packages/{name}", self._package)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def answer(self, version: str) -> bytes:
        """The honest Omaha answer to a client at ``version``."""
        offer = self.offer
        if offer is None or not omaha.version_less(version, offer.version):
            app = omaha.AppResponse(app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", updatecheck=omaha.NOUPDATE)
        else:
            app = omaha.AppResponse(
                app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}",
                updatecheck=omaha.PayloadOffer(
                    version=offer.version, codebases=(offer.codebase or f"{self.base}/packages/",),
                    package_name=offer.package_name, size=offer.size, sha256_b64=offer.sha256_b64,
                    disable_payload_backoff=True,
                ),
            )
        return omaha.build_response([app])

    async def _omaha(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        version = OLD_VERSION
        with contextlib.suppress(omaha.OmahaError):
            parsed = omaha.parse_request(body)
            for app in parsed.apps:
                version = app.version or version
                self.checks += int(app.update_check)
                self.events.extend((e.type, e.result, e.error_code) for e in app.events)
        if self.omaha is not None:
            return await self.omaha(request)
        return web.Response(body=self.answer(version), content_type="text/xml")

    async def _package(self, request: web.Request) -> web.StreamResponse:
        if self.package is not None:
            return await self.package(request)
        return await serve_bytes(request, self.payload, self)


async def serve_bytes(request: web.Request, data: bytes, stub: OmahaStub | None = None) -> web.StreamResponse:
    """``data`` with Range support, paced by ``stub.throttle`` and counted in ``stub.bytes_sent``."""
    start = 0
    status = 200
    if request.http_range.start is not None:
        start = request.http_range.start
        status = 206
    body = data[start:]
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/octet-stream"})
    resp.content_length = len(body)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    await resp.prepare(request)
    step = stub.throttle if stub is not None and stub.throttle else 256 * KIB
    try:
        for pos in range(0, len(body), step):
            await resp.write(body[pos : pos + step])
            if stub is not None:
                stub.bytes_sent += len(body[pos : pos + step])
                if stub.on_sent is not None:
                    stub.on_sent(stub.bytes_sent)
                if stub.throttle:
                    await asyncio.sleep(0.01)
        await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError):
        pass
    return resp


# --- a disk image in memory ----------------------------------------------------------------------------------

# Bytes kept in memory at each end of the image: both GPT copies at 512- and 4096-byte sectors fit.
REGION = 128 * 1024


class MemoryDisk:
    """A :class:`update_engine.gpt.BlockIO` over the first and last ``REGION`` bytes of an image; zeros between.

    Only the GPT areas matter here, and copying 256 KiB per trial instead of the whole image keeps thousands of
    trials cheap. A write outside the two regions fails the test (the GPT code must not write there).
    """

    def __init__(self, size: int, head: bytearray, tail: bytearray) -> None:
        self._size = size
        self.head = head
        self.tail = tail

    @classmethod
    def from_file(cls, path: Path) -> MemoryDisk:
        data = path.read_bytes()
        assert len(data) >= 2 * REGION
        return cls(len(data), bytearray(data[:REGION]), bytearray(data[-REGION:]))

    def clone(self) -> MemoryDisk:
        return MemoryDisk(self._size, bytearray(self.head), bytearray(self.tail))

    def state(self) -> bytes:
        return bytes(self.head) + bytes(self.tail)

    def digest(self) -> str:
        return hashlib.sha256(self.state()).hexdigest()

    def write_file(self, path: Path) -> None:
        """A sparse image file with this content, for cgpt."""
        with path.open("wb") as f:
            f.truncate(self._size)
            f.write(self.head)
            f.seek(self._size - REGION)
            f.write(self.tail)

    # BlockIO

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(max(0, min(length, self._size - offset)))
        for base, region in ((0, self.head), (self._size - REGION, self.tail)):
            start, end = max(offset, base), min(offset + len(out), base + len(region))
            if start < end:
                out[start - offset : end - offset] = region[start - base : end - base]
        return bytes(out)

    def pwrite(self, data: bytes, offset: int) -> None:
        end = offset + len(data)
        if end <= REGION:
            self.head[offset:end] = data
        elif offset >= self._size - REGION and end <= self._size:
            base = self._size - REGION
            self.tail[offset - base : end - base] = data
        else:
            raise AssertionError(f"GPT write of {len(data)} bytes at {offset} is outside both GPT areas")

    def fsync(self) -> None:
        pass

    def size(self) -> int:
        return self._size

    def logical_sector_size(self) -> int | None:
        return None

    def close(self) -> None:
        pass
