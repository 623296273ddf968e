"""A simulated fleet on one machine, updated by the real daemons: ``python -m demo.fleet`` (``demo/run``).

Real parts: one ``etcd`` member holding the reboot semaphore (``max`` set with ``locksmithctl set-max``), the
Omaha dev server offering a 2.0.0 payload made and signed here with the project's generator, and per node a
GPT disk image with USR-A (1.0.0) and USR-B, a private system-like ``dbus-daemon`` with the project's D-Bus
policy, and the ``update_engine`` and ``locksmithd`` daemons as subprocesses, each node with its own file
system root (update.conf, release file, machine id, state and run directories).

Simulated, because it cannot run here (stand-ins on the node's bus, or in this process):

* **logind** (``org.freedesktop.login1``): accepts ``Reboot(b)``, then reboots the node: both daemons are
  SIGKILLed (a power cut, not a clean stop), the run directory is emptied (a tmpfs) and the node boots again.
* **systemd** (``org.freedesktop.systemd1``): ``GetUnit("boot-complete.target")`` and that unit's
  ``ActiveState`` and ``Job``, which both daemons ask about; the target becomes active a moment after each
  boot.
* **the bootloader**: GRUB's ``gptprio.next`` on the node's disk through the project's GPT code: among the USR
  partitions with tries left or marked successful, the one with the highest priority (ties to the lowest
  index, priority 0 never); its tries are decremented, both GPT copies written, before it boots. The chosen
  slot's version is read from the first block of the partition (``COREOS_RELEASE_VERSION=…``) and becomes the
  node's release file.
* **the network**: a link that paces downloads, so that the progress of one on loopback can be watched.

The demo prints one line per event, time-stamped from its start, and checks as it goes that at most ``max``
nodes are down at once (from their logind ``Reboot`` to ``boot-complete.target`` of the next boot) and that no
revision of the semaphore key ever has more than ``max`` holders. It ends with a summary and exit status 0
when every node reached its expected end state. ``--scenario rollback`` makes node-1's first boot of USR-B
fail (a kernel panic): the bootloader falls back to USR-A, update-engine reports the rollback and refuses to
install 2.0.0 again, and the other nodes update.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web
from dbus_fast import BusType, Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus

from coreos_common.dbus import DBusCallError, add_match
from coreos_common.status import INTERFACE, StatusSnapshot, UpdateStatus
from locksmithd.backends.etcd import EtcdSemaphoreStore, KeyChange, KeyWatch
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import SEMAPHORE_KEY, Semaphore, SemaphoreError
from sim.bus import PrivateBus, start_private_bus
from sim.devserver import DevServerProcess
from sim.devserver import start_devserver as start_devserver_process
from sim.disks import make_usr_disk
from sim.etcd import EtcdCluster
from sim.node import NodeRoot, make_node_root
from sim.payload import key_files
from sim.ports import free_port
from sim.standins.login1 import LOGIN1_NAME, LOGIN1_PATH, Login1Manager
from sim.standins.systemd import BootCompleteUnit, start_systemd_standin
from sim.tools import VENV_BIN
from update_engine import gpt
from update_engine.errors import FLAG_DEV_MODE, FLAG_RESUMED, FLAG_TEST_IMAGE, FLAG_TEST_OMAHA_URL, ErrorCode
from update_engine.errors import describe as describe_code
from update_engine.omaha import EventResult, EventType
from update_engine.payload.generate import generate_full_payload

log = logging.getLogger("demo.fleet")

REPO = Path(__file__).resolve().parents[1]
UPDATE_POLICY = REPO / "units" / "com.coreos.update1.conf"

OLD_VERSION = "1.0.0"
NEW_VERSION = "2.0.0"
RELEASE_KEY = "COREOS_RELEASE_VERSION"
GROUP = "stable"
USR_MIB = 8
SEMAPHORE_MAX = 1
MIB = 1 << 20

# Simulated durations (seconds).
BOOT_COMPLETE_AFTER = 2.0  # daemons started → boot-complete.target active
SHUTDOWN_AFTER_REBOOT_CALL = 0.2  # logind answers the call, then the power goes
POWER_OFF_TIME = 1.0  # power cut → bootloader
FAILED_BOOT_TIME = 2.0  # kernel panic → reset
FIRST_CHECK_DELAY = 2  # update_engine --first-check-delay
LINK_RATE = 4 * MIB  # bytes/s of each download between the nodes and the dev server
PROGRESS_STEP = 20  # percent between two progress lines (update-engine delivers about 1 MiB at a time)
POLL_INTERVAL = 0.25  # events, GPT flags, end-state checks

SCENARIOS = ("update", "rollback")
DEFAULT_TIMEOUT = 110.0

_ERROR_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL

GOOD, BAD, NOTE, DIM = "32", "31;1", "1", "2"  # SGR colour codes


# ------------------------------------------------------------------------------------------------------------
# The stand-in bootloader's rules and other pure helpers


def gptprio_choose(entries: Sequence[gpt.GptEntry]) -> gpt.GptEntry | None:
    """GRUB's ``gptprio.next`` choice: of the USR-type entries with tries left or marked successful, the first
    (in index order) with the highest priority; priority 0 is never chosen. None: nothing is bootable."""
    best: gpt.GptEntry | None = None
    best_priority = 0
    for entry in sorted(entries, key=lambda e: e.index):
        if entry.type_guid != gpt.USR_TYPE_GUID:
            continue
        flags = entry.flags
        if (flags.tries > 0 or flags.successful) and flags.priority > best_priority:
            best, best_priority = entry, flags.priority
    return best


@dataclass(frozen=True)
class BootChoice:
    """What the bootloader picked and what it did to the partition's flags before booting it."""

    index: int
    label: str
    before: gpt.PartitionFlags
    after: gpt.PartitionFlags
    version: str | None

    def describe(self) -> str:
        version = self.version or "(no release file)"
        if self.before.tries != self.after.tries:
            detail = f"tries {self.before.tries}→{self.after.tries}"
        else:
            detail = f"successful={int(self.after.successful)}, tries {self.after.tries}"
        return f"boot {self.label} {version} ({detail})"


def release_version(block: bytes) -> str | None:
    """``COREOS_RELEASE_VERSION`` from the first block of a USR partition (the demo's images begin so)."""
    prefix = RELEASE_KEY.encode() + b"="
    for line in block.split(b"\n"):
        if line.startswith(prefix):
            try:
                return line[len(prefix) :].strip().decode("ascii") or None
            except UnicodeDecodeError:
                return None
    return None


def gptprio_next(disk_path: Path) -> BootChoice | None:
    """The bootloader on ``disk_path``: repair the GPT, choose, decrement tries (both copies written), read
    the chosen slot's version. None when no partition is bootable."""
    with gpt.GptDisk.open(disk_path) as disk:
        disk.update_flags({})  # grub_gpt_repair: writes both copies only when they are not valid and equal
        chosen = gptprio_choose(disk.entries)
        if chosen is None:
            return None
        before = chosen.flags
        if before.tries > 0:
            disk.update_flags({chosen.index: gpt.FlagChange(tries=before.tries - 1)})
        after = disk.flags(chosen.index)
        offset, _ = disk.byte_range(chosen.index)
    with disk_path.open("rb") as f:
        f.seek(offset)
        block = f.read(4096)
    return BootChoice(chosen.index, chosen.name, before, after, release_version(block))


def usr_flags(disk_path: Path) -> dict[str, gpt.PartitionFlags]:
    """Flags of USR-A and USR-B as the disk holds them now."""
    with gpt.GptDisk.open(disk_path, writable=False) as disk:
        a, b = disk.usr_partitions()
        return {a.name: a.flags, b.name: b.flags}


def is_marked_good(flags: Mapping[str, gpt.PartitionFlags], label: str) -> bool:
    """What update-engine's healthy-boot marking leaves: successful, no tries, above the other slot."""
    own = flags[label]
    others = [f.priority for name, f in flags.items() if name != label]
    return own.successful and own.tries == 0 and all(own.priority > p for p in others)


def flags_text(flags: gpt.PartitionFlags) -> str:
    return f"priority={flags.priority} tries={flags.tries} successful={int(flags.successful)}"


def other_slot(label: str) -> str:
    return "USR-B" if label == "USR-A" else "USR-A"


_EVENT_MEANINGS: Mapping[tuple[int, int], str] = {
    (EventType.UPDATE_DOWNLOAD_STARTED, EventResult.SUCCESS): "download started",
    (EventType.UPDATE_DOWNLOAD_FINISHED, EventResult.SUCCESS): "download finished",
    (EventType.UPDATE_COMPLETE, EventResult.SUCCESS): "update installed",
    (EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT): "up after boot",
    (EventType.UPDATE_COMPLETE, EventResult.ERROR): "update failed",
    (EventType.UPDATE_COMPLETE, EventResult.UPDATE_DEFERRED): "update deferred",
}


@dataclass(frozen=True)
class OmahaEventRecord:
    """One event as the dev server recorded it (``GET /events``)."""

    machine_id: str
    app_version: str
    event_type: int
    event_result: int
    error_code: int | None
    previous_version: str | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> OmahaEventRecord:
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

    def describe(self) -> str:
        """``3/0 update failed, errorcode 44 ROLLBACK_ERROR`` and the like."""
        key = (self.event_type, self.event_result)
        meaning = _EVENT_MEANINGS.get(key)
        if meaning is None:
            try:
                meaning = f"{EventType(key[0]).name.lower()} {EventResult(key[1]).name.lower()}"
            except ValueError:
                meaning = "unknown event"
        text = f"{key[0]}/{key[1]} {meaning}"
        if key == (EventType.UPDATE_COMPLETE, EventResult.SUCCESS_REBOOT):
            previous = self.previous_version or "0.0.0.0"
            text += " (no update before)" if previous == "0.0.0.0" else f" (previous version {previous})"
        if self.error_code is not None:
            text += f", errorcode {self.base_code} {describe_code(self.error_code)}"
        return text


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def span(start: float | None, end: float | None) -> str:
    return seconds(end - start if start is not None and end is not None else None)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    lines = [header, *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines]


# ------------------------------------------------------------------------------------------------------------
# Output


class Console:
    """Time-stamped, node-aligned lines; colour only on a terminal (and not with NO_COLOR set)."""

    _NODE_COLOURS = ("36", "35", "33", "34", "32", "96", "95", "93", "94")

    def __init__(self, stream: TextIO, start: float) -> None:
        self.stream = stream
        self.start = start
        self.colour = stream.isatty() and not os.environ.get("NO_COLOR")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def paint(self, text: str, code: str | None) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour and code else text

    def label_colour(self, label: str) -> str:
        if label.startswith("node-") and label[5:].isdigit():
            return self._NODE_COLOURS[(int(label[5:]) - 1) % len(self._NODE_COLOURS)]
        return NOTE

    def line(self, label: str, text: str, style: str | None = None) -> None:
        head = self.paint(f"{label:<7}", self.label_colour(label))
        print(f"{self.elapsed():6.1f}s  {head} {self.paint(text, style)}", file=self.stream, flush=True)

    def plain(self, text: str = "", style: str | None = None) -> None:
        print(self.paint(text, style), file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Stand-ins: logind on each node's bus, and the network


class RebootingLogind(Login1Manager):
    """The logind stand-in: records ``Reboot``/``PowerOff`` like the tests' one, then has the node go down."""

    def __init__(self, on_call: Callable[[str], None]) -> None:
        super().__init__()
        self._on_call = on_call

    def _record(self, member: str, interactive: bool) -> None:
        super()._record(member, interactive)
        self._on_call(member)


async def start_logind(address: str, manager: RebootingLogind) -> MessageBus:
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    bus.export(LOGIN1_PATH, manager)
    reply = await bus.request_name(LOGIN1_NAME)
    if reply != RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise RuntimeError(f"could not own {LOGIN1_NAME} on {address}: {reply}")
    return bus


class SlowLink:
    """An HTTP hop in front of the dev server that paces answer bodies at ``rate`` bytes/s.

    Requests and answers pass unchanged otherwise: the Host header too, so that the dev server's payload URLs
    point back through the link, and Range requests with their 206 answers.
    """

    REQUEST_HEADERS = ("Host", "Range", "If-Range", "Content-Type", "User-Agent", "Accept")
    ANSWER_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "Content-Encoding", "Accept-Ranges",
                      "Last-Modified", "ETag")  # fmt: skip
    CHUNK = 64 << 10

    def __init__(self, upstream: str, rate: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=timeout)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: request.headers[k] for k in self.REQUEST_HEADERS if k in request.headers}
        body = await request.read()
        async with self._session.request(
            request.method, f"{self.upstream}{request.rel_url}", headers=headers, data=body or None,
            allow_redirects=False,
        ) as upstream:  # fmt: skip
            answer = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name in self.ANSWER_HEADERS:
                if name in upstream.headers:
                    answer.headers[name] = upstream.headers[name]
            await answer.prepare(request)
            async for chunk in upstream.content.iter_chunked(self.CHUNK):
                await answer.write(chunk)
                await asyncio.sleep(len(chunk) / self.rate)
            await answer.write_eof()
            return answer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


# ------------------------------------------------------------------------------------------------------------
# Nodes


class Phase(enum.Enum):
    BOOTING = "booting"  # the demo's first boot, not counted as down
    UP = "up"
    DOWN = "down"  # from logind's Reboot to boot-complete.target of the next boot


class Outcome(enum.Enum):
    UPDATED = "updated"
    ROLLED_BACK = "rolled back"


@dataclass
class BootRecord:
    at: float
    choice: BootChoice
    failed: bool = False
    complete_at: float | None = None
    marked_good_at: float | None = None


@dataclass
class Node:
    """One simulated machine, and what the demo saw of it."""

    index: int
    workdir: Path
    root: NodeRoot
    disk: Path
    bus: PrivateBus
    expected: Outcome
    fail_next_usr_b_boot: bool = False
    phase: Phase = Phase.BOOTING
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    boots: list[BootRecord] = field(default_factory=list)
    reboot_calls: list[float] = field(default_factory=list)
    operation: str | None = None  # update-engine's status; None: not heard from since the boot
    progress_shown: int = 0
    check_started: float | None = None
    installed_at: float | None = None
    lock_taken_at: float | None = None
    lock_released_at: float | None = None
    holding: bool = False
    events: list[OmahaEventRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    buses: list[MessageBus] = field(default_factory=list)
    unit: BootCompleteUnit | None = None

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def machine_id(self) -> str:
        return self.root.machine_id

    @property
    def current_boot(self) -> BootRecord | None:
        return self.boots[-1] if self.boots else None

    @property
    def version(self) -> str:
        boot = self.current_boot
        return OLD_VERSION if boot is None or boot.choice.version is None else boot.choice.version

    def log_path(self, daemon: str) -> Path:
        return self.workdir / f"{daemon}.log"

    def end_state_missing(self) -> list[str]:
        """What this node still lacks to be in its expected end state (empty: it is there)."""
        missing: list[str] = []
        boot = self.current_boot
        updated = self.expected is Outcome.UPDATED
        slot, version = ("USR-B", NEW_VERSION) if updated else ("USR-A", OLD_VERSION)
        if boot is None or boot.failed or (boot.choice.label, boot.choice.version) != (slot, version):
            missing.append(f"running {slot} {version}")
        if not updated and not any(b.failed for b in self.boots):
            missing.append("a failed boot of USR-B")
        if not self.reboot_calls:
            missing.append("a reboot")
        if boot is None or boot.marked_good_at is None or len(self.boots) < 2:
            missing.append(f"{slot} marked good after the reboot")
        if self.lock_taken_at is None:
            missing.append("the reboot lock taken")
        if self.holding or self.lock_released_at is None:
            missing.append("the reboot lock released")
        if updated:
            if not any(e.app_version == NEW_VERSION and e.event_result == EventResult.SUCCESS_REBOOT
                       for e in self.events):  # fmt: skip
                missing.append(f"the post-boot report from {NEW_VERSION}")
        else:
            codes = {e.base_code for e in self.events}
            if ErrorCode.ROLLBACK_ERROR not in codes:
                missing.append("the rollback reported to Omaha (errorcode 44)")
            if ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY not in codes:
                missing.append(f"{NEW_VERSION} refused after the rollback (errorcode 36)")
        return missing


# ------------------------------------------------------------------------------------------------------------
# The semaphore key, followed with locksmithd's own etcd watch in a thread


class SemaphoreWatch:
    """Hands every change of the semaphore key to the event loop."""

    def __init__(
        self, store: EtcdSemaphoreStore, after_revision: int, deliver: Callable[[KeyChange], None]
    ) -> None:
        self._store = store
        self._revision = after_revision
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: KeyWatch | None = None
        self._thread = threading.Thread(target=self._run, name="semaphore-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            watch = self._store.watch(self._revision, idle_timeout=30.0)
            with self._lock:
                self._watch = watch
            if self._stopping.is_set():
                return
            try:
                for change in watch.changes():
                    self._revision = change.revision
                    with contextlib.suppress(RuntimeError):  # the loop is closed: the demo is over
                        self._loop.call_soon_threadsafe(self._deliver, change)
            except Exception as exc:  # a broken stream: watch again from the last revision seen
                if self._stopping.is_set():
                    return
                log.warning("semaphore watch: %s; watching again", exc)
                time.sleep(0.2)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.stop()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------------------
# The fleet


@dataclass(frozen=True)
class DemoOptions:
    scenario: str = "update"
    nodes: int = 3
    timeout: float = DEFAULT_TIMEOUT
    keep: bool = False
    workdir: Path | None = None


class Fleet:
    """Starts everything, follows every node, checks the invariants, stops everything."""

    def __init__(self, options: DemoOptions, console: Console, workdir: Path) -> None:
        self.options = options
        self.out = console
        self.workdir = workdir
        self.nodes: list[Node] = []
        self.by_machine_id: dict[str, Node] = {}
        self.public_key = workdir / "release" / "key.pub.pem"
        self.etcd: EtcdCluster | None = None
        self.store: EtcdSemaphoreStore | None = None
        self.semaphore_watch: SemaphoreWatch | None = None
        self.semaphore_revision = 0
        self.holders: set[str] = set()
        self.devserver: DevServerProcess | None = None
        self.link: SlowLink | None = None
        self.events_seen = 0
        self.violations: list[str] = []
        self.max_down = 0
        self.stopping = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.setup_done_at: float | None = None
        self.finished_at: float | None = None

    # -- helpers ---------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self.out.elapsed()

    def say(self, who: Node | str, text: str, style: str | None = None) -> None:
        self.out.line(who.name if isinstance(who, Node) else who, text, style)

    def spawn(self, coro: Coroutine[Any, Any, None], owner: Node | None = None) -> None:
        """Run ``coro`` in the background; an exception in it is a problem of ``owner`` (or of the fleet)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            log.error("background task failed", exc_info=exc)
            (owner.problems if owner is not None else self.violations).append(f"internal error: {exc!r}")

        task.add_done_callback(done)

    def node_of(self, machine_id: str) -> Node | None:
        return self.by_machine_id.get(machine_id.lower())

    def node_name(self, machine_id: str) -> str:
        node = self.node_of(machine_id)
        return node.name if node is not None else machine_id[:12]

    # -- set-up ----------------------------------------------------------------------------------------------

    async def make_release(self) -> Path:
        """A key pair and the signed payload of a 2.0.0 USR image and kernel, by the project's generator."""
        release = self.workdir / "release"
        keys = await asyncio.to_thread(key_files, release)
        self.public_key = keys.public
        image = release / f"usr-{NEW_VERSION}.img"
        size = USR_MIB * MIB
        header = f"{RELEASE_KEY}={NEW_VERSION}\nCOREOS_RELEASE_BOARD=amd64-usr\n".encode()
        # Random data does not compress: the payload is as big as the image, and its download takes a moment.
        image.write_bytes(header + bytes(4096 - len(header)) + os.urandom(size - 4096))
        kernel = release / "vmlinuz"
        kernel.write_bytes(f"demo kernel {NEW_VERSION}\n".encode() * 4096)
        payload = release / f"update-{NEW_VERSION}.gz"
        key = keys.private.read_bytes()
        await asyncio.to_thread(generate_full_payload, image, payload, key, kernel=kernel)
        self.say("fleet", f"signing key made; payload {NEW_VERSION}: {payload.stat().st_size / MIB:.1f} MiB "
                          f"({USR_MIB} MiB /usr image + kernel), signed")  # fmt: skip
        return payload

    async def start_etcd(self) -> str:
        self.etcd = EtcdCluster(1, self.workdir / "etcd")
        await asyncio.to_thread(self.etcd.start_all)
        endpoint = self.etcd.endpoint(0)
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "locksmithctl"), "-endpoint", endpoint, "set-max", str(SEMAPHORE_MAX),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        text = " ".join(out.decode(errors="replace").split("\n")).strip()
        if proc.returncode != 0:
            raise RuntimeError(f"locksmithctl set-max {SEMAPHORE_MAX} failed: {text}")
        self.say("fleet", f"etcd at {endpoint}; locksmithctl set-max {SEMAPHORE_MAX}: {text}")
        self.store = EtcdSemaphoreStore(EtcdSettings(endpoints=(endpoint,)))
        semaphore, revision = await asyncio.to_thread(self.store.get)
        self.holders, self.semaphore_revision = set(semaphore.holders), revision
        self.semaphore_watch = SemaphoreWatch(self.store, revision, self.on_semaphore_change)
        self.semaphore_watch.start()
        return endpoint

    async def start_devserver(self, payload: Path) -> str:
        """The dev server, and the link the nodes reach it through; returns the nodes' SERVER URL."""
        releases: list[tuple[Path, str, str | None]] = [(payload, NEW_VERSION, None)]
        workdir = self.workdir / "devserver"
        self.devserver = await asyncio.to_thread(start_devserver_process, workdir, releases)
        self.link = SlowLink(f"http://127.0.0.1:{self.devserver.port}", LINK_RATE)
        await self.link.start()
        self.say("fleet", f"Omaha dev server at {self.devserver.url} offering {NEW_VERSION} to every group; "
                          f"the nodes reach it through a {LINK_RATE / MIB:g} MiB/s link at {self.link.url}")
        return f"{self.link.url}/v1/update/"

    async def add_node(self, index: int, server: str, etcd_endpoint: str) -> Node:
        workdir = self.workdir / f"node-{index}"
        root = make_node_root(workdir / "root", version=OLD_VERSION, server=server, group=GROUP)
        root.set_update_conf(
            SERVER=server, GROUP=GROUP, REBOOT_STRATEGY="etcd-lock", LOCKSMITHD_ENDPOINT=etcd_endpoint,
            LOCKSMITHD_BACKOFF_INITIAL="250ms", LOCKSMITHD_BACKOFF_MAX="1s",
        )  # fmt: skip
        root.state_dir.mkdir(parents=True, exist_ok=True)
        disk = await asyncio.to_thread(make_usr_disk, workdir / "disk.img", usr_mib=USR_MIB)
        with gpt.GptDisk.open(disk, writable=False) as table_:
            usr_a, _ = table_.usr_partitions()
            usr_a_offset, _ = table_.byte_range(usr_a.index)
        with disk.open("r+b") as f:
            f.seek(usr_a_offset)
            f.write(f"{RELEASE_KEY}={OLD_VERSION}\n".encode())
        bus = await asyncio.to_thread(start_private_bus, workdir / "dbus", [UPDATE_POLICY])
        rolls_back = self.options.scenario == "rollback" and index == 1
        expected = Outcome.ROLLED_BACK if rolls_back else Outcome.UPDATED
        node = Node(index, workdir, root, disk, bus, expected, fail_next_usr_b_boot=rolls_back)
        self.nodes.append(node)
        self.by_machine_id[node.machine_id.lower()] = node
        logind = RebootingLogind(lambda member: self.on_logind_call(node, member))
        node.buses.append(await start_logind(bus.address, logind))
        systemd_bus, node.unit = await start_systemd_standin(bus.address)
        node.buses.append(systemd_bus)
        node.buses.append(await self.follow_status(node))
        flags = usr_flags(disk)
        a_text, b_text = flags_text(flags["USR-A"]), flags_text(flags["USR-B"])
        disk_text = f"USR-A {OLD_VERSION} ({a_text}), USR-B empty ({b_text})"
        self.say(node, f"machine id {node.machine_id[:8]}…; {disk_text}")
        return node

    async def follow_status(self, node: Node) -> MessageBus:
        """Subscribe to update-engine's StatusUpdate signals on the node's bus."""
        bus = await MessageBus(bus_address=node.bus.address, bus_type=BusType.SYSTEM).connect()

        def handler(message: Message) -> None:
            if (message.message_type is MessageType.SIGNAL and message.interface == INTERFACE
                    and message.member == "StatusUpdate"):  # fmt: skip
                try:
                    snapshot = StatusSnapshot.from_values(message.body)
                except ValueError:
                    return
                self.on_status(node, snapshot)

        bus.add_message_handler(handler)
        rule = f"type='signal',interface='{INTERFACE}',member='StatusUpdate'"
        try:
            await add_match(bus, rule)
        except DBusCallError as exc:
            raise RuntimeError(f"AddMatch on {node.name}'s bus failed: {exc}") from exc
        return bus

    # -- booting and rebooting -------------------------------------------------------------------------------

    async def boot(self, node: Node) -> None:
        """The stand-in bootloader, then the boot: release file, boot id, an empty /run, the daemons."""
        while True:
            choice = await asyncio.to_thread(gptprio_next, node.disk)
            if choice is None:
                node.problems.append("no bootable USR partition")
                self.say(node, "bootloader: no bootable USR partition", BAD)
                return
            record = BootRecord(self.now(), choice)
            node.boots.append(record)
            self.say(node, choice.describe(), NOTE)
            if node.fail_next_usr_b_boot and choice.label == "USR-B":
                node.fail_next_usr_b_boot = False
                record.failed = True
                self.say(node, f"kernel panic: {choice.label} does not come up, no daemon starts", BAD)
                await asyncio.sleep(FAILED_BOOT_TIME)
                self.say(node, "reset by the watchdog: back to the bootloader")
                continue
            if choice.version is None:
                node.problems.append(f"{choice.label} has no release file")
                self.say(node, f"{choice.label} holds no {RELEASE_KEY}: it cannot boot", BAD)
                return
            break
        node.root.set_version(choice.version)
        (node.root.root / "proc/sys/kernel/random/boot_id").write_text(f"{uuid.uuid4()}\n")
        shutil.rmtree(node.root.run_dir, ignore_errors=True)
        node.root.run_dir.mkdir(parents=True)
        assert node.unit is not None
        node.unit.state = "inactive"  # with a start job queued (see BootCompleteUnit.Job): both daemons wait
        node.killed.clear()
        node.operation = None
        await self.start_daemons(node, choice, len(node.boots))
        self.spawn(self.complete_boot(node, record), node)

    async def complete_boot(self, node: Node, record: BootRecord) -> None:
        """boot-complete.target a moment after the daemons start; then wait for the slot to be marked good."""
        await asyncio.sleep(BOOT_COMPLETE_AFTER)
        assert node.unit is not None
        node.unit.state = "active"
        record.complete_at = self.now()
        was_down = node.phase is Phase.DOWN
        node.phase = Phase.UP
        self.say(node, "boot-complete.target reached" + (": the node is back" if was_down else ""))
        label = record.choice.label
        while True:
            flags = await asyncio.to_thread(usr_flags, node.disk)
            if is_marked_good(flags, label):
                record.marked_good_at = self.now()
                if len(node.boots) > 1:
                    self.say(node, f"marked good: {label} {flags_text(flags[label])}", GOOD)
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def start_daemons(self, node: Node, choice: BootChoice, boot_number: int) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LOCKSMITHD_", "REBOOT_", "NOTIFY_SOCKET", "WATCHDOG_", "DBUS_"))}
        env.update(PYTHONUNBUFFERED="1", TZ="UTC")
        root = node.root
        commands = {
            "update_engine": [
                str(VENV_BIN / "update_engine"), "--bus-address", node.bus.address, "--disk", str(node.disk),
                "--booted", choice.label, "--public-key", str(self.public_key),
                "--config-root", str(root.root), "--state-dir", str(root.state_dir),
                "--run-dir", str(root.run_dir), "--kernel-dir", str(root.kernel_dir),
                "--first-check-delay", str(FIRST_CHECK_DELAY), "--boot-complete-poll", str(POLL_INTERVAL),
            ],
            "locksmithd": [
                str(VENV_BIN / "locksmithd"), "--bus-address", node.bus.address,
                "--config-root", str(root.root),
            ],
        }  # fmt: skip
        for name, args in commands.items():
            with node.log_path(name).open("ab") as logf:
                banner = f"--- boot {boot_number}: {choice.label} {choice.version} at {self.now():.1f}s ---\n"
                logf.write(banner.encode())
                logf.flush()
                proc = await asyncio.create_subprocess_exec(
                    *args, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,  # Ctrl-C reaches the demo alone; it stops the daemons itself
                )  # fmt: skip
            node.processes[name] = proc
            self.spawn(self.watch_process(node, name, proc), node)

    async def watch_process(self, node: Node, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if name in node.killed or self.stopping:
            return
        node.problems.append(f"{name} exited with status {code}")
        self.say(node, f"{name} exited by itself with status {code}; the end of its log:", BAD)
        for line in node.log_path(name).read_text(errors="replace").splitlines()[-5:]:
            self.out.plain(f"          {line}", DIM)

    async def kill_daemons(self, node: Node) -> None:
        for name, proc in node.processes.items():
            node.killed.add(name)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in node.processes.values():
            await proc.wait()

    def on_logind_call(self, node: Node, member: str) -> None:
        """logind accepted Reboot (or PowerOff): the node goes down, and no other node may be down now."""
        node.reboot_calls.append(self.now())
        if node.phase is Phase.DOWN:
            self.say(node, f"{member} requested again while the node is going down: ignored", BAD)
            node.problems.append(f"{member} requested twice for one reboot")
            return
        down = [n for n in self.nodes if n.phase is Phase.DOWN]
        if len(down) >= SEMAPHORE_MAX:
            names = ", ".join(n.name for n in down)
            self.violations.append(f"{node.name} went down at {self.now():.1f}s while {names} was down "
                                   f"(max {SEMAPHORE_MAX})")  # fmt: skip
            self.say(node, f"INVARIANT BROKEN: {names} is down too", BAD)
        node.phase = Phase.DOWN
        self.max_down = max(self.max_down, len(down) + 1)
        self.spawn(self.reboot(node, member), node)

    async def reboot(self, node: Node, member: str) -> None:
        # locksmithd wrote the lock before it called logind: show it first even if the watch is a moment late.
        await self.read_semaphore()
        self.say(node, f"reboot requested (logind {member})", NOTE)
        await asyncio.sleep(SHUTDOWN_AFTER_REBOOT_CALL)
        assert node.unit is not None
        node.unit.state = "inactive"
        await self.kill_daemons(node)
        self.say(node, "power cut: update_engine and locksmithd killed", DIM)
        if member == "Reboot":
            await asyncio.sleep(POWER_OFF_TIME)
            await self.boot(node)

    # -- what the daemons do ---------------------------------------------------------------------------------

    def on_status(self, node: Node, snap: StatusSnapshot) -> None:
        op = snap.current_operation
        short = op.removeprefix("UPDATE_STATUS_")
        previous, node.operation = node.operation, op
        if op == UpdateStatus.DOWNLOADING.value:
            percent = int(snap.progress * 100)
            if previous != op:
                node.progress_shown = -PROGRESS_STEP
            # One line per PROGRESS_STEP at most; 95-99 % is skipped so that the last line says 100 %.
            due = percent >= node.progress_shown + PROGRESS_STEP and not 95 <= percent < 100
            if due or (percent == 100 and node.progress_shown < 100):
                node.progress_shown = percent
                done, total = snap.progress * snap.new_size / MIB, snap.new_size / MIB
                self.say(node, f"{short} {percent:3d}% ({done:.1f} of {total:.1f} MiB)")
            return
        if op == previous:
            return
        if previous is None:
            self.say(node, f"update_engine up: {short}", DIM)
        elif op == UpdateStatus.CHECKING_FOR_UPDATE.value:
            if node.check_started is None:
                node.check_started = self.now()
            self.say(node, f"{short} (running {node.version})")
        elif op == UpdateStatus.UPDATE_AVAILABLE.value:
            self.say(node, f"{short}: {snap.new_version}, {snap.new_size / MIB:.1f} MiB")
        elif op == UpdateStatus.VERIFYING.value:
            self.say(node, f"{short} (size, SHA-256, signature, partition hash)")
        elif op == UpdateStatus.UPDATED_NEED_REBOOT.value:
            node.installed_at = node.installed_at or self.now()
            self.say(node, f"{short} {snap.new_version}", GOOD)
            boot = node.current_boot
            target = other_slot(boot.choice.label if boot else "USR-A")
            try:
                self.say(node, f"flags armed: {target} {flags_text(usr_flags(node.disk)[target])}")
            except gpt.GptError as exc:
                self.say(node, f"cannot read the flags: {exc}", BAD)
        elif op == UpdateStatus.IDLE.value and previous == UpdateStatus.CHECKING_FOR_UPDATE.value:
            self.say(node, f"{short}: no update for {node.version}")
        else:
            self.say(node, short, BAD if op == UpdateStatus.REPORTING_ERROR_EVENT.value else None)

    async def read_semaphore(self) -> None:
        assert self.store is not None
        try:
            semaphore, revision = await asyncio.to_thread(self.store.get)
        except Exception as exc:
            log.warning("reading the semaphore: %s", exc)
            return
        self.on_semaphore_change(KeyChange(revision, semaphore.encode().encode()))

    def on_semaphore_change(self, change: KeyChange) -> None:
        """A revision of the semaphore key (from the watch or read directly; each is handled once)."""
        if change.revision <= self.semaphore_revision:
            return
        self.semaphore_revision = change.revision
        semaphore: Semaphore | None = None
        if change.value is not None:
            try:
                semaphore = Semaphore.decode(change.value)
            except SemaphoreError as exc:
                self.violations.append(f"semaphore revision {change.revision} is invalid: {exc}")
                return
        holders = set(semaphore.holders) if semaphore else set()
        maximum = semaphore.max if semaphore else 0
        names = ", ".join(sorted(self.node_name(h) for h in holders)) or "none"
        for holder in sorted(holders - self.holders):
            node = self.node_of(holder)
            if node is not None:
                node.lock_taken_at, node.holding = self.now(), True
            self.say(node or "fleet", f"lock taken (holders: {names}, {len(holders)}/{maximum})", NOTE)
        for holder in sorted(self.holders - holders):
            node = self.node_of(holder)
            if node is not None:
                node.lock_released_at, node.holding = self.now(), False
            self.say(node or "fleet", f"lock released (holders: {names}, {len(holders)}/{maximum})", GOOD)
        if semaphore is not None and len(holders) > semaphore.max:
            self.violations.append(f"semaphore revision {change.revision} has {len(holders)} holders, "
                                   f"max {semaphore.max}")  # fmt: skip
            self.say("fleet", f"INVARIANT BROKEN: {len(holders)} holders, max {semaphore.max}", BAD)
        self.holders = holders

    async def follow_events(self) -> None:
        """Poll the dev server's record of Omaha events; print each new one under its node."""
        assert self.devserver is not None
        url = f"http://127.0.0.1:{self.devserver.port}/events"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        docs = await resp.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.warning("dev server events: %s", exc)
                    docs = None
                if isinstance(docs, list):
                    for doc in docs[self.events_seen :]:
                        self.on_omaha_event(OmahaEventRecord.from_json(doc))
                    self.events_seen = max(self.events_seen, len(docs))
                await asyncio.sleep(POLL_INTERVAL)

    def on_omaha_event(self, event: OmahaEventRecord) -> None:
        node = self.node_of(event.machine_id)
        if node is not None:
            node.events.append(event)
        style = BAD if event.error_code is not None else DIM
        self.say(node or "fleet", f"Omaha event {event.describe()}", style)

    # -- the run ---------------------------------------------------------------------------------------------

    async def run(self) -> int:
        opts = self.options
        what = ("every node updates 1.0.0 → 2.0.0, one reboot at a time" if opts.scenario == "update"
                else "node-1's new /usr fails to boot and rolls back; the other nodes update")  # fmt: skip
        scenario = f"scenario {opts.scenario}: {opts.nodes} nodes, max {SEMAPHORE_MAX} down at once"
        self.say("fleet", f"{scenario}; {what}", NOTE)
        self.say("fleet", f"work dir {self.workdir}", DIM)
        payload = await self.make_release()
        endpoint = await self.start_etcd()
        server = await self.start_devserver(payload)
        self.spawn(self.follow_events())
        for index in range(1, opts.nodes + 1):
            await self.add_node(index, server, endpoint)
        await asyncio.gather(*(self.boot(node) for node in self.nodes))
        self.setup_done_at = self.now()
        while True:
            missing = {node.name: node.end_state_missing() for node in self.nodes}
            problems = [f"{n.name}: {p}" for n in self.nodes for p in n.problems]
            if problems:
                self.say("fleet", "stopping: " + "; ".join(problems), BAD)
                break
            if not any(missing.values()):
                self.say("fleet", "every node reached its end state", GOOD)
                break
            if self.now() > opts.timeout:
                self.say("fleet", f"timed out after {opts.timeout:.0f}s; where each node is:", BAD)
                for node in self.nodes:
                    status = (node.operation or "no status").removeprefix("UPDATE_STATUS_")
                    waiting = ", ".join(missing[node.name]) or "nothing"
                    state = f"{node.phase.value}, {status}, {node.version}"
                    self.say(node, f"{state}; waiting for: {waiting}", BAD)
                break
            await asyncio.sleep(POLL_INTERVAL)
        self.finished_at = self.now()
        return await self.summary()

    # -- the summary -----------------------------------------------------------------------------------------

    def node_rows(self) -> list[list[str]]:
        rows = []
        for node in self.nodes:
            boot = node.current_boot
            booted = boot.choice.label if boot else "-"
            if any(b.failed for b in node.boots):
                booted += " (after a failed boot)"
            reboot_at = node.reboot_calls[0] if node.reboot_calls else None
            healthy_at = boot.marked_good_at if boot and len(node.boots) > 1 else None
            reached = not node.end_state_missing() and not node.problems
            rows.append([
                node.name, f"{OLD_VERSION} → {node.version}", booted, str(len(node.reboot_calls)),
                span(node.check_started, node.installed_at), span(node.installed_at, node.lock_taken_at),
                span(reboot_at, healthy_at), node.expected.value if reached else f"NOT {node.expected.value}",
            ])  # fmt: skip
        return rows

    def phase_line(self) -> str:
        def first(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return min(present) if present else None

        def last(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return max(present) if present else None

        checks = first([n.check_started for n in self.nodes])
        installed = last([n.installed_at for n in self.nodes])
        taken = first([n.lock_taken_at for n in self.nodes])
        released = last([n.lock_released_at for n in self.nodes])
        return " · ".join([
            f"set-up {seconds(self.setup_done_at)}",
            f"first check → last installed {span(checks, installed)}",
            f"rolling reboot (first lock → last release) {span(taken, released)}",
            f"total {seconds(self.finished_at)}",
        ])  # fmt: skip

    async def summary(self) -> int:
        out = self.out
        out.plain()
        out.plain("Summary", NOTE)
        header = ["node", "version", "booted", "reboots", "check→installed", "waiting for lock",
                  "reboot→healthy", "result"]  # fmt: skip
        for line in table(header, self.node_rows()):
            out.plain("  " + line)
        out.plain()
        out.plain("Time per phase: " + self.phase_line())

        out.plain()
        out.plain(f"Semaphore {SEMAPHORE_KEY}, every revision:")
        history = await self.semaphore_history()
        for revision, value in history:
            if value is None:
                out.plain(f"  rev {revision:>4}  deleted")
                continue
            try:
                sem = Semaphore.decode(value)
            except SemaphoreError as exc:
                self.violations.append(f"semaphore revision {revision} is invalid: {exc}")
                out.plain(f"  rev {revision:>4}  invalid: {exc}", BAD)
                continue
            names = ", ".join(sorted(self.node_name(h) for h in sem.holders)) or "-"
            out.plain(f"  rev {revision:>4}  max={sem.max}  holders: {names}")
            if len(sem.holders) > sem.max:
                self.violations.append(f"semaphore revision {revision} has {len(sem.holders)} holders, "
                                       f"max {sem.max}")  # fmt: skip

        out.plain()
        out.plain("Events the Omaha dev server received:")
        for node in self.nodes:
            by_version: dict[str, list[str]] = {}
            for event in node.events:
                by_version.setdefault(event.app_version, []).append(event.describe())
            if not by_version:
                out.plain(f"  {node.name:<7} none")
            for i, (version, texts) in enumerate(by_version.items()):
                out.plain(f"  {node.name if i == 0 else '':<7} from {version}: " + "; ".join(texts))

        failures = [f"{n.name} lacks: {', '.join(m)}" for n in self.nodes if (m := n.end_state_missing())]
        failures += [f"{n.name}: {p}" for n in self.nodes for p in n.problems]
        failures += self.violations
        out.plain()
        if not any("went down" in v for v in self.violations):
            out.plain(f"Never more than {SEMAPHORE_MAX} node down at once (max {SEMAPHORE_MAX}); "
                      f"at most {self.max_down} was.", GOOD)  # fmt: skip
        if history and not any("holders" in v for v in self.violations):
            out.plain(f"No revision of the semaphore had more than {SEMAPHORE_MAX} holder.", GOOD)
        if failures:
            out.plain("FAILED:", BAD)
            for failure in failures:
                out.plain(f"  {failure}", BAD)
            return 1
        out.plain(f"OK: {self.options.scenario} scenario completed in {self.now():.1f}s.", GOOD)
        return 0

    async def semaphore_history(self) -> list[tuple[int, bytes | None]]:
        if self.etcd is None:
            return []
        try:
            return await asyncio.to_thread(self.etcd.key_history, SEMAPHORE_KEY, 10.0)
        except Exception as exc:
            self.violations.append(f"could not read the semaphore's history: {exc}")
            return []

    # -- the end ---------------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop what the demo started: background tasks, daemons, stand-ins, buses, link, dev server, etcd.

        Each step runs even when an earlier one failed.
        """
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        steps: list[tuple[str, Step]] = []
        if self.semaphore_watch is not None:
            steps.append(("semaphore watch", _in_thread(self.semaphore_watch.stop)))
        steps += [(f"{node.name}'s daemons", _bind(stop_daemons, node)) for node in self.nodes]
        for node in self.nodes:
            steps += [(f"{node.name}'s bus clients", _bind(disconnect_all, node.buses)),
                      (f"{node.name}'s bus", _in_thread(node.bus.stop))]  # fmt: skip
        if self.store is not None:
            steps.append(("etcd client", _in_thread(self.store.close)))
        if self.link is not None:
            steps.append(("link", self.link.stop))
        if self.devserver is not None:
            steps.append(("dev server", _in_thread(self.devserver.stop)))
        if self.etcd is not None:
            steps.append(("etcd", _in_thread(self.etcd.stop_all)))
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                log.exception("stopping the %s failed", what)
                self.out.plain(f"could not stop the {what}: {exc}", BAD)


def _in_thread(fn: Callable[[], object]) -> Step:
    async def step() -> None:
        await asyncio.to_thread(fn)

    return step


Step = Callable[[], Coroutine[Any, Any, None]]


def _bind(fn: Callable[[Any], Coroutine[Any, Any, None]], arg: object) -> Step:
    async def step() -> None:
        await fn(arg)

    return step


async def stop_daemons(node: Node) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    for proc in node.processes.values():
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    for proc in node.processes.values():
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def disconnect_all(buses: list[MessageBus]) -> None:
    for bus in buses:
        bus.disconnect()


# ------------------------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo/run",
        description="A simulated fleet on this machine, updated by the real update_engine and locksmithd, "
                    "with a rolling reboot coordinated through a real etcd. Runs as root: only root may own "
                    "the daemons' names on the private buses.",
    )  # fmt: skip
    p.add_argument("--scenario", choices=SCENARIOS, default="update",
                   help="update: every node updates (default); rollback: node-1's new /usr fails to boot")
    p.add_argument("--nodes", type=int, default=3, choices=range(2, 10), metavar="N",
                   help="number of nodes, 2 to 9 (default 3)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"give up after this many seconds (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, disks, etcd data)")
    p.add_argument("--workdir", type=Path, help="where to make the work directory (default: $TMPDIR)")
    return p  # fmt: skip


async def run_demo(options: DemoOptions, console: Console, workdir: Path) -> int:
    fleet = Fleet(options, console, workdir)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        return await fleet.run()
    finally:
        await asyncio.shield(fleet.shutdown())
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = DemoOptions(args.scenario, args.nodes, args.timeout, args.keep, args.workdir)
    if os.geteuid() != 0:
        print("demo: run it as root (only root may own the daemons' names on the private buses)",
              file=sys.stderr)
        return 2
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-", dir=options.workdir))
    logging.basicConfig(filename=workdir / "demo.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    console = Console(sys.stdout, time.monotonic())
    code = 1
    try:
        code = asyncio.run(run_demo(options, console, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.plain("interrupted; everything the demo started is stopped", BAD)
        code = 130
    except Exception as exc:
        log.exception("demo failed")
        console.plain(f"demo failed: {exc}", BAD)
    finally:
        if options.keep or code != 0:
            console.plain(f"work dir kept: {workdir} (daemon logs in node-*/, demo.log)", DIM)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
