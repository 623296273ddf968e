"""Power cut while the GPT is written: after any prefix of the writes, one copy is valid and is all-old or all-new.

``GptDisk`` does all its disk access through a ``BlockIO``. The tests wrap an in-memory image of the two GPT areas
in :class:`CutPower`, which lets the first K bytes of the write sequence through (the last write partially) and
then raises, as if the power failed. The image is then read by a fresh ``GptDisk`` and, for 512-byte sectors, by
the real ``cgpt``.

Which K are tried. The write sequence is the same whatever K is (the wrapper only decides where it stops), so the
image after a cut at K is the image before the edit plus the first K bytes of one fixed byte stream. Writing a
byte that equals the byte already on disk changes nothing, so the image only changes at the positions where the
stream differs from the disk ("change positions"): every K between two change positions leaves the same image.
The test replays the stream once to find them, then cuts the real edit at every change position (+1), at every
sector boundary, at some odd offsets and at random K, and checks that each image any K can produce was checked.
That covers every K from 0 to the total number of bytes written.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim import disks
from sim.disks import USR_A_INDEX, USR_B_INDEX, make_usr_disk, write_gpt_image
from tests.conftest import require_tool
from tests.faults.figures import record
from tests.faults.support import MemoryDisk
from update_engine import gpt
from update_engine.gpt import GptDisk, GptError, PartitionFlags

pytestmark = pytest.mark.faults

RANDOM_CUTS = 40


class PowerCut(Exception):
    """The simulated power failure: nothing after this point reaches the disk."""


class CutPower:
    """Forwards to ``inner`` until ``budget`` bytes were written, writes the part of the last buffer that fits, then
    raises :class:`PowerCut`. ``budget=None`` never cuts; ``writes`` records every write asked for."""

    def __init__(self, inner: MemoryDisk, budget: int | None) -> None:
        self.inner = inner
        self.budget = budget
        self.written = 0
        self.writes: list[tuple[int, bytes]] = []
        self.fsyncs = 0

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def pwrite(self, data: bytes, offset: int) -> None:
        data = bytes(data)
        self.writes.append((offset, data))
        if self.budget is not None and self.written + len(data) > self.budget:
            room = self.budget - self.written
            if room > 0:
                self.inner.pwrite(data[:room], offset)
            self.written += room
            raise PowerCut(f"power cut after {self.budget} bytes")
        self.inner.pwrite(data, offset)
        self.written += len(data)

    def fsync(self) -> None:
        self.fsyncs += 1

    def size(self) -> int:
        return self.inner.size()

    def logical_sector_size(self) -> int | None:
        return None

    def close(self) -> None:
        pass


Table = tuple[bytes, ...]  # the raw bytes of every entry slot of one copy


@dataclass(frozen=True)
class Reading:
    """What a fresh reader finds on the image."""

    primary: Table | None  # None: that copy is invalid
    backup: Table | None
    used: Table
    flags: dict[int, PartitionFlags]


def read_image(image: MemoryDisk, watched: Sequence[int]) -> Reading:
    disk = GptDisk(image, name="image")  # raises GptError when neither copy is valid
    snap = disk.snapshot

    def table(copy: gpt.CopyState) -> Table | None:
        if copy.problem is not None or copy.entries is None:
            return None
        return tuple(e.raw for e in copy.entries)

    return Reading(
        table(snap.primary), table(snap.backup), tuple(e.raw for e in snap.entries),
        {i: disk.flags(i) for i in watched},
    )


def cgpt_attributes(path: Path, watched: Sequence[int]) -> dict[int, PartitionFlags]:
    """Flags of ``watched`` as cgpt reads them (it exits non-zero when neither copy is valid)."""
    cgpt = require_tool("cgpt")
    out: dict[int, PartitionFlags] = {}
    for index in watched:
        shown = subprocess.run([cgpt, "show", "-i", str(index), "-A", str(path)], capture_output=True, text=True)
        assert shown.returncode == 0, f"cgpt finds no valid GPT: {shown.stderr.strip()}"
        out[index] = PartitionFlags.from_attributes(int(shown.stdout.strip(), 0) << 48)
    return out


@dataclass(frozen=True)
class Scenario:
    """One flag edit of update-engine's cycle on one kind of disk."""

    name: str
    build: Callable[[Path], Path]  # makes the image file, returns its path
    before: dict[int, PartitionFlags]  # flags set (uncut) before the edit under test
    edit: Callable[[GptDisk], object]
    watched: tuple[int, ...]
    sector_size: int = 512
    damage: Callable[[MemoryDisk], None] | None = None  # harm done to the image before the edit

    def __str__(self) -> str:
        return self.name


def _usr_disk(path: Path) -> Path:
    return make_usr_disk(path, usr_mib=1)


def _usr_disk_4k(path: Path) -> Path:
    return make_usr_disk(path, usr_mib=1, sector_size=4096)


def _usr_b_in_second_entry_sector(path: Path) -> Path:
    """USR-A in slot 3 and USR-B in slot 5: their entries lie in different 512-byte sectors of the array."""
    layout = [
        dataclasses.replace(p, index=5) if p.name == "USR-B" else p for p in disks.usr_layout(1) if p.index != 9
    ]
    with path.open("wb") as f:
        f.truncate((2 + sum(p.size_mib for p in layout)) * disks.MIB)
    write_gpt_image(path, layout, sector_size=512)
    return path


def _damage_primary_header(image: MemoryDisk) -> None:
    # A stray write hit the primary header (inside the CRC-covered 92 bytes): the backup is the only good copy.
    image.pwrite(b"\xa5\x5a", 512 + 40)


def _damage_backup_entries(image: MemoryDisk) -> None:
    # A stray write hit the backup entry array: the primary is the only good copy.
    image.pwrite(b"\xa5\x5a", image.size() - 33 * 512 + 300)


FRESH = {USR_A_INDEX: disks.FRESH_USR_A_FLAGS, USR_B_INDEX: disks.FRESH_USR_B_FLAGS}
ARMED = {USR_A_INDEX: PartitionFlags(1, 0, True), USR_B_INDEX: PartitionFlags(2, 1, False)}
AB = (USR_A_INDEX, USR_B_INDEX)

SCENARIOS = [
    Scenario("arm USR-B after an update", _usr_disk, FRESH, lambda d: d.arm_for_next_boot(USR_B_INDEX), AB),
    Scenario(
        "arm USR-B, renumbering USR-A from 15 to 1", _usr_disk,
        {USR_A_INDEX: PartitionFlags(15, 0, True), USR_B_INDEX: PartitionFlags()},
        lambda d: d.arm_for_next_boot(USR_B_INDEX), AB,
    ),
    Scenario("mark USR-B good after its boot", _usr_disk, ARMED, lambda d: d.mark_good(USR_B_INDEX), AB),
    Scenario("disarm USR-B (ResetStatus)", _usr_disk, ARMED, lambda d: d.disarm(USR_B_INDEX), AB),
    Scenario(
        "arm USR-B on 4096-byte sectors", _usr_disk_4k, FRESH, lambda d: d.arm_for_next_boot(USR_B_INDEX), AB,
        sector_size=4096,
    ),
    Scenario(
        "arm USR-B in another entry sector than USR-A", _usr_b_in_second_entry_sector,
        {USR_A_INDEX: PartitionFlags(15, 0, True), 5: PartitionFlags()},
        lambda d: d.arm_for_next_boot(5), (USR_A_INDEX, 5),
    ),
    Scenario(
        "arm USR-B while the backup entries are damaged", _usr_disk, FRESH,
        lambda d: d.arm_for_next_boot(USR_B_INDEX), AB, damage=_damage_backup_entries,
    ),
    Scenario(
        "arm USR-B while the primary header is damaged", _usr_disk, FRESH,
        lambda d: d.arm_for_next_boot(USR_B_INDEX), AB, damage=_damage_primary_header,
    ),
]


def _change_positions(before: MemoryDisk, writes: Sequence[tuple[int, bytes]]) -> list[int]:
    """Indices into the concatenated write stream of the bytes that differ from what the disk held then."""
    image = before.clone()
    changes: list[int] = []
    base = 0
    for offset, data in writes:
        current = image.pread(len(data), offset)
        changes.extend(base + i for i in range(len(data)) if data[i] != current[i])
        image.pwrite(data, offset)
        base += len(data)
    return changes


def _cut(before: MemoryDisk, edit: Callable[[GptDisk], object], k: int) -> tuple[MemoryDisk, bool]:
    """Run ``edit`` through the real GptDisk with the power failing after ``k`` bytes; (image, was it cut)."""
    image = before.clone()
    io = CutPower(image, k)
    disk = GptDisk(io, name="image")
    try:
        edit(disk)
    except PowerCut:
        return image, True
    return image, False


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_power_cut_at_every_byte_leaves_one_valid_copy_old_or_new(scenario: Scenario, tmp_path: Path) -> None:
    path = scenario.build(tmp_path / "disk.img")
    before = MemoryDisk.from_file(path)
    GptDisk(before, name="image").update_flags(dict(scenario.before.items()))
    if scenario.damage is not None:
        scenario.damage(before)
    old = read_image(before, scenario.watched)

    # The uncut edit: the write sequence, and the table every valid copy must hold afterwards.
    after = before.clone()
    recorder = CutPower(after, None)
    scenario.edit(GptDisk(recorder, name="image"))
    new = read_image(after, scenario.watched)
    assert new.primary == new.backup == new.used, "an uncut edit leaves two equal, valid copies"
    assert old.used != new.used
    total = recorder.written
    changes = _change_positions(before, recorder.writes)
    # Representative K for each image a cut can produce: no changed byte written, then 1, 2, … of them.
    points = {0, total, *(c + 1 for c in changes)}
    extra = set(range(0, total + 1, scenario.sector_size)) | {1, 91, 92, 93, 511, 513, total - 1}
    rng = random.Random(f"{scenario.name}")
    extra |= {rng.randrange(total + 1) for _ in range(RANDOM_CUTS)}

    checked: dict[str, str] = {}  # image digest → "old" / "new"
    outcome_by_k: dict[int, str] = {}
    cgpt_runs = 0
    for k in sorted(points):
        image, was_cut = _cut(before, scenario.edit, k)
        assert was_cut == (k < total)
        try:
            reading = read_image(image, scenario.watched)
        except GptError as exc:
            raise AssertionError(f"cut after {k} of {total} bytes: no valid GPT copy left ({exc})") from None
        for which, table in (("primary", reading.primary), ("backup", reading.backup)):
            assert table in (None, old.used, new.used), f"cut after {k} bytes: the {which} copy mixes old and new"
        assert reading.used in (old.used, new.used)
        outcome = "old" if reading.used == old.used else "new"
        assert reading.flags == (old.flags if outcome == "old" else new.flags)
        if scenario.sector_size == 512:
            image.write_file(tmp_path / "cut.img")
            assert cgpt_attributes(tmp_path / "cut.img", scenario.watched) == reading.flags, (
                f"cut after {k} bytes: cgpt and GptDisk disagree"
            )
            cgpt_runs += 1
        # The next edit (the next run of update-engine) completes and leaves two good copies.
        repaired = image.clone()
        scenario.edit(GptDisk(repaired, name="image"))
        again = read_image(repaired, scenario.watched)
        assert again.primary == again.backup == new.used
        checked[image.digest()] = outcome
        outcome_by_k[k] = outcome

    # Any other K leaves one of the images already checked (see the module docstring); confirm it on a sample.
    for k in sorted(extra - points):
        digest = _cut(before, scenario.edit, k)[0].digest()
        assert digest in checked, f"cut after {k} bytes left an image no representative K produced"
        outcome_by_k[k] = checked[digest]
    ordered = [outcome_by_k[k] for k in sorted(outcome_by_k)]
    switch = ordered.index("new")
    assert set(ordered[:switch]) == {"old"} and set(ordered[switch:]) == {"new"}, "readers see old, then new, once"

    record(
        "GPT power cut", trials=len(outcome_by_k), survived=len(outcome_by_k),
        note=f"{scenario.name}: {total} bytes written, {len(points)} distinct images, "
        f"{len(outcome_by_k)} cuts, {cgpt_runs} cgpt cross-checks",
    )


def test_cut_wrapper_really_cuts(tmp_path: Path) -> None:
    """The wrapper stops mid-buffer: a cut inside the first write leaves exactly the prefix on the image."""
    before = MemoryDisk.from_file(_usr_disk(tmp_path / "disk.img"))
    image = before.clone()
    io = CutPower(image, 10)
    with pytest.raises(PowerCut):
        GptDisk(io, name="image").arm_for_next_boot(USR_B_INDEX)
    offset, data = io.writes[0]
    assert image.pread(10, offset) == data[:10]
    assert image.pread(len(data) - 10, offset + 10) == before.pread(len(data) - 10, offset + 10)

