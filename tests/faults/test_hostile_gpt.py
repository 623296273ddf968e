"""Partition tables that lie: USR-B overlapping USR-A or the table itself, past the usable area or the disk, reversed,
near 2^64, entry arrays on top of each other. The running partition must stay untouchable whatever the table says.

Each table starts as an sgdisk image and is edited with :func:`sim.disks.craft_table`, which writes the
CRCs afresh (sgdisk refuses to make such tables; a broken tool or an attacker does not). ``update_engine --once`` is
then offered a real signed payload. Every case must be refused before anything happens: exit 1 with one line naming
the disk, the partition and the problem, error 7 reported to Omaha, not one payload byte downloaded, the whole
image (USR-A included) byte for byte as before, and cgpt's view of the table unchanged. The same refusal is checked
through the daemon on a private bus, a table that changes while the payload is written is not armed, and on random
layouts our validator and cgpt agree on which tables are sound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import MessageType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.bus import PrivateBus
from sim.disks import USR_A_INDEX, USR_B_INDEX, craft_table, make_usr_disk, moved
from sim.node import Node, make_node
from sim.omaha import Offer, OmahaStub
from sim.payload import Keys, Release
from tests.conftest import require_tool
from tests.faults.figures import record
from tests.faults.support import NEW_VERSION, TEST_OMAHA_URL_FLAG
from tests.integration import test_daemon
from tests.integration.test_daemon import call, connect, get_status, make_daemon, subscribe, wait_for_start_up
from update_engine import gpt
from update_engine.errors import ErrorCode

pytestmark = pytest.mark.faults

FAULT_CLASS = "hostile partition table (update_engine --once, daemon; image, USR-A and cgpt checked)"
U64_MAX = 2**64 - 1

# The layout make_usr_disk() gives (8 MiB USR partitions, 512-byte sectors); checked against the image below.
USR_A_RANGE = (6144, 22527)
USR_B_RANGE = (22528, 38911)
FIRST_USABLE, LAST_USABLE = 34, 45022
BACKUP_ENTRIES, BACKUP_HEADER = 45023, 45055


def _header(which: str, **fields: int) -> Callable[[str, gpt.GptHeader], gpt.GptHeader]:
    def edit(copy: str, header: gpt.GptHeader) -> gpt.GptHeader:
        return dataclasses.replace(header, **fields) if copy == which else header

    return edit


# (name, craft_table arguments, what the error must say)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("USR-B overlaps the end of USR-A", {"entries": moved(USR_B_INDEX, first=20000)},
     "partition 4 (USR-B) at LBA 20000..38911 overlaps partition 3 (USR-A) at LBA 6144..22527"),
    ("USR-B inside USR-A", {"entries": moved(USR_B_INDEX, first=8000, last=9000)},
     "partition 4 (USR-B) at LBA 8000..9000 overlaps partition 3 (USR-A) at LBA 6144..22527"),
    ("USR-B is USR-A", {"entries": moved(USR_B_INDEX, first=6144, last=22527)},
     "partition 4 (USR-B) at LBA 6144..22527 overlaps partition 3 (USR-A) at LBA 6144..22527"),
    ("USR-B contains USR-A", {"entries": moved(USR_B_INDEX, first=6144, last=38911)},
     "partition 4 (USR-B) at LBA 6144..38911 overlaps partition 3 (USR-A) at LBA 6144..22527"),
    ("USR-B over the primary header", {"entries": moved(USR_B_INDEX, first=1, last=2047)},
     "partition 4 (USR-B) at LBA 1..2047 lies outside the usable area (LBA 34..45022) and runs into the primary "
     "GPT header at LBA 1 and the primary entry array at LBA 2..33"),
    ("USR-B over the primary entries", {"entries": moved(USR_B_INDEX, first=16, last=2047)},
     "and runs into the primary entry array at LBA 2..33"),
    ("USR-B over the backup entries", {"entries": moved(USR_B_INDEX, first=43008, last=45030)},
     "partition 4 (USR-B) at LBA 43008..45030 lies outside the usable area (LBA 34..45022) and runs into the backup "
     "entry array at LBA 45023..45054"),
    ("USR-B over the backup header", {"entries": moved(USR_B_INDEX, first=43008, last=45055)},
     "and runs into the backup entry array at LBA 45023..45054 and the backup GPT header at LBA 45055"),
    ("USR-B one sector past the last usable LBA", {"entries": moved(USR_B_INDEX, first=43008, last=45023)},
     "partition 4 (USR-B) at LBA 43008..45023 lies outside the usable area (LBA 34..45022)"),
    ("USR-B past the end of the disk", {"entries": moved(USR_B_INDEX, first=43008, last=90000)},
     "and runs into the backup entry array at LBA 45023..45054 and the backup GPT header at LBA 45055 and the end "
     "of the disk (LBA 45055)"),
    ("USR-B ends before it starts", {"entries": moved(USR_B_INDEX, first=38911, last=22528)},
     "partition 4 (USR-B) ends at LBA 22528, before its first LBA 38911"),
    ("USR-B near 2^64", {"entries": moved(USR_B_INDEX, first=U64_MAX - 16383, last=U64_MAX)},
     f"partition 4 (USR-B) at LBA {U64_MAX - 16383}..{U64_MAX} lies outside the usable area"),
    ("USR-B ends at 2^64", {"entries": moved(USR_B_INDEX, last=U64_MAX)},
     f"partition 4 (USR-B) at LBA 22528..{U64_MAX} lies outside the usable area"),
    ("the primary entry array is the backup's",
     {"header": _header("primary", partition_entry_lba=BACKUP_ENTRIES), "copies": ["primary"]},
     "the primary entry array at LBA 45023..45054 overlaps the backup entry array at LBA 45023..45054"),
    ("the backup entry array is the primary's",
     {"header": _header("backup", partition_entry_lba=2), "copies": ["backup"]},
     "the primary entry array at LBA 2..33 overlaps the backup entry array at LBA 2..33"),
    ("the backup header's place is inside the usable area",
     {"header": _header("primary", alternate_lba=FIRST_USABLE), "copies": ["primary"]},
     "the usable area at LBA 34..45022 overlaps the backup GPT header at LBA 34"),
]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def usr_a_sha256(disk: Path) -> str:
    """USR-A's bytes, from the layout the image was made with (cgpt will not say where it is on a refused table)."""
    first, last = USR_A_RANGE
    with disk.open("rb") as f:
        f.seek(first * 512)
        return hashlib.sha256(f.read((last - first + 1) * 512)).hexdigest()


def cgpt_view(disk: Path) -> tuple[int, str]:
    """What cgpt says about the whole table (exit code and text): a refused table must look the same after."""
    shown = subprocess.run([require_tool("cgpt"), "show", str(disk)], capture_output=True, text=True)
    return shown.returncode, shown.stdout + shown.stderr


def test_the_cases_are_made_on_the_layout_they_name(tmp_path: Path) -> None:
    with gpt.GptDisk.open(make_usr_disk(tmp_path / "disk.img"), writable=False) as disk:
        header = disk.header
        assert (header.first_usable_lba, header.last_usable_lba) == (FIRST_USABLE, LAST_USABLE)
        assert disk.snapshot.copies_to_write()[1].partition_entry_lba == BACKUP_ENTRIES
        assert header.alternate_lba == BACKUP_HEADER
        a, b = disk.entry(USR_A_INDEX), disk.entry(USR_B_INDEX)
        assert ((a.first_lba, a.last_lba), (b.first_lba, b.last_lba)) == (USR_A_RANGE, USR_B_RANGE)


@pytest.fixture
async def stub(small_release: Release) -> Any:
    server = await OmahaStub(payload=small_release.data).start()
    server.offer = Offer(NEW_VERSION, small_release.size, small_release.sha256_b64)
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.parametrize(("name", "craft", "problem"), CASES, ids=[c[0] for c in CASES])
async def test_update_engine_once_refuses_a_hostile_table_before_touching_anything(
    name: str, craft: dict[str, Any], problem: str, tmp_path: Path, keys: Keys, stub: OmahaStub
) -> None:
    node = make_node(tmp_path, stub.url)
    craft_table(node.disk, **craft)
    image_before, usr_a_before, cgpt_before = sha256_file(node.disk), usr_a_sha256(node.disk), cgpt_view(node.disk)
    proc = await asyncio.create_subprocess_exec(
        *node.once_args(keys), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    stdout, stderr = out.decode(), err.decode()
    failures = [e for e in stub.events if e[:2] == (3, 0)]
    code = (failures[-1][2] or 0) & ~TEST_OMAHA_URL_FLAG if failures else None
    untouched = sha256_file(node.disk) == image_before and stub.bytes_sent == 0
    record(FAULT_CLASS, trials=1, refused=int(proc.returncode == 1 and code == 7), survived=int(untouched))

    assert proc.returncode == 1, stdout + stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"update failed: error 7 INSTALL_DEVICE_OPEN_ERROR: the partition table of {node.disk} is invalid, "
        "refusing to use it: "
    ), stderr
    assert problem in last_line, last_line
    assert "Traceback" not in stderr and stdout == ""
    assert code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR, stub.events
    assert stub.bytes_sent == 0, "the payload was downloaded although the table was refused"
    assert sha256_file(node.disk) == image_before, "the disk image changed"
    assert usr_a_sha256(node.disk) == usr_a_before
    assert cgpt_view(node.disk) == cgpt_before
    assert not node.reboot_marker.exists() and not (node.root.kernel_dir / "vmlinuz-b").exists()


async def test_a_partition_moved_while_its_payload_is_written_is_not_armed(
    tmp_path: Path, keys: Keys, small_release: Release
) -> None:
    """The table is sound at the check and sound after it, but USR-B is somewhere else when the payload is done:
    what was written is not what would boot, so nothing is armed."""
    stub = await OmahaStub(payload=small_release.data, throttle=4096).start()
    try:
        stub.offer = Offer(NEW_VERSION, small_release.size, small_release.sha256_b64)
        node = make_node(tmp_path, stub.url)
        usr_a_before = usr_a_sha256(node.disk)
        half = small_release.size // 2

        def move_usr_b(sent: int) -> None:
            if sent >= half and stub.on_sent is not None:
                stub.on_sent = None
                craft_table(node.disk, entries=moved(USR_B_INDEX, first=USR_B_RANGE[0] + 2048))

        stub.on_sent = move_usr_b
        proc = await asyncio.create_subprocess_exec(
            *node.once_args(keys), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        stderr = err.decode()
        armed = subprocess.run([require_tool("cgpt"), "show", "-i", "4", "-P", str(node.disk)],
                               capture_output=True, text=True, check=True).stdout.strip()
        record(FAULT_CLASS, trials=1, refused=int(proc.returncode == 1),
               survived=int(armed == "0" and usr_a_sha256(node.disk) == usr_a_before))
        assert stub.on_sent is None, "the table was not changed during the download"
        assert proc.returncode == 1, stderr
        assert "partition 4 of" in stderr and "changed while the payload was written" in stderr
        assert "error 7 INSTALL_DEVICE_OPEN_ERROR" in stderr.strip().splitlines()[-1]
        assert armed == "0"
        assert usr_a_sha256(node.disk) == usr_a_before
        assert not node.reboot_marker.exists()
    finally:
        await stub.stop()


bus = test_daemon.bus  # a private bus with the product's D-Bus policy


async def test_the_daemon_refuses_reports_and_keeps_running(
    tmp_path: Path, keys: Keys, stub: OmahaStub, bus: PrivateBus
) -> None:
    """AttemptUpdate, Rollback and the healthy-boot marking on a table where USR-B overlaps USR-A: each refused
    with the table named, the failure reported to Omaha, the daemon still serving, the image unchanged."""
    node: Node = make_node(tmp_path, stub.url)
    craft_table(node.disk, entries=moved(USR_B_INDEX, first=20000))
    image_before = sha256_file(node.disk)
    daemon = make_daemon(tmp_path, node.root, node.disk, bus, keys, healthy_delay=0.5)
    client = await connect(bus)
    announced = await subscribe(client)
    daemon.start()
    try:
        await wait_for_start_up(client, daemon, announced)
        recorder = await subscribe(client)
        await call(client, "AttemptUpdate")
        await recorder.wait_for("REPORTING_ERROR_EVENT")
        await recorder.wait_for("IDLE")
        assert recorder.statuses() == ["CHECKING_FOR_UPDATE", "UPDATE_AVAILABLE", "REPORTING_ERROR_EVENT", "IDLE"]
        codes = [(e[2] or 0) & ~TEST_OMAHA_URL_FLAG for e in stub.events if e[:2] == (3, 0)]
        assert codes == [ErrorCode.INSTALL_DEVICE_OPEN_ERROR]
        assert stub.bytes_sent == 0

        reply = await call(client, "Rollback")
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "com.coreos.update1.Error.RollbackRefused"
        assert f"the partition table of {node.disk} is invalid" in str(reply.body[0])
        assert "Traceback" not in str(reply.body[0])

        deadline = asyncio.get_running_loop().time() + 30
        while "Could not mark the running partition good" not in daemon.log():
            assert asyncio.get_running_loop().time() < deadline, daemon.log()
            await asyncio.sleep(0.1)
        assert (await get_status(client))[2] == "UPDATE_STATUS_IDLE"
        assert daemon.process is not None and daemon.process.poll() is None
        log = daemon.log()
        refused = log.count("partition 4 (USR-B) at LBA 20000..38911 overlaps partition 3 (USR-A)")
        record(FAULT_CLASS, trials=3, refused=min(refused, 3),
               survived=3 * int(sha256_file(node.disk) == image_before))
        assert refused >= 3, log  # the attempt, the rollback and the healthy-boot marking each say why
        assert "Traceback" not in log
        assert sha256_file(node.disk) == image_before
    finally:
        daemon.stop()
        client.disconnect()


# --- our validator against cgpt on random layouts -----------------------------------------------------------------

# LBAs where the rules change, and anything at all.
_EDGES = [0, 1, 2, 33, FIRST_USABLE, 35, *USR_A_RANGE, *USR_B_RANGE, LAST_USABLE, BACKUP_ENTRIES, BACKUP_HEADER,
          BACKUP_HEADER + 1, 2**63, U64_MAX - 1, U64_MAX]
lba = st.one_of(st.sampled_from(_EDGES), st.integers(0, BACKUP_HEADER + 10), st.integers(0, U64_MAX))
USED = (1, 2, 3, 4, 6, 9)


@st.composite
def layouts(draw: st.DrawFn) -> dict[int, tuple[int | None, int | None, bool]]:
    """For some used partitions: a new first LBA, last LBA (None keeps it), and whether it takes USR-A's GUID."""
    changed = draw(st.lists(st.sampled_from(USED), min_size=1, max_size=3, unique=True))
    return {
        index: (draw(st.none() | lba), draw(st.none() | lba), draw(st.booleans()) and index != USR_A_INDEX
                and draw(st.integers(0, 9)) == 0)
        for index in changed
    }


@pytest.fixture(scope="module")
def layout_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[gpt.GptEntry]]:
    path = make_usr_disk(tmp_path_factory.mktemp("layouts") / "disk.img", usr_mib=8)
    with gpt.GptDisk.open(path, writable=False) as disk:
        return path, list(disk.snapshot.entries)


Agreement = {"examples": 0, "refused by both": 0, "agreed": 0}


@pytest.fixture(scope="module", autouse=True)
def _agreement_figures() -> Iterator[None]:
    yield
    if Agreement["examples"]:
        record("GPT layouts judged by our validator and by cgpt (hypothesis)", trials=Agreement["examples"],
               refused=Agreement["refused by both"], survived=Agreement["agreed"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(layout=layouts())
def test_our_validator_and_cgpt_agree_on_random_layouts(
    layout_disk: tuple[Path, list[gpt.GptEntry]], layout: dict[int, tuple[int | None, int | None, bool]]
) -> None:
    path, fresh = layout_disk

    def edit(slots: list[gpt.GptEntry]) -> list[gpt.GptEntry]:
        out = list(fresh)  # every example starts from the sgdisk layout, in both copies
        for index, (first, last, twin) in layout.items():
            entry = out[index - 1]
            out[index - 1] = dataclasses.replace(
                entry,
                first_lba=entry.first_lba if first is None else first,
                last_lba=entry.last_lba if last is None else last,
                unique_guid=gpt.USR_A_GUID if twin else entry.unique_guid,
            )
        return out

    craft_table(path, entries=edit)
    try:
        with gpt.GptDisk.open(path, writable=False):
            ours = "sound"
    except gpt.GptTableInvalid as exc:
        ours = f"refused: {exc.problems[0]}"
    theirs, said = cgpt_view(path)
    Agreement["examples"] += 1
    Agreement["refused by both"] += int(ours.startswith("refused") and theirs != 0)
    agreed = (ours == "sound") == (theirs == 0)
    Agreement["agreed"] += int(agreed)
    assert agreed, f"ours: {ours}; cgpt exit {theirs}: {said.strip()[-300:]}"
    if theirs != 0:
        assert "GPT_ERROR_INVALID_ENTRIES" in said
