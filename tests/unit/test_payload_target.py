"""The bounded target: every byte a payload writes lies inside the passive partition, or nothing is written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sim.payload import RecordingTarget, key_pair
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.executor import Executor
from update_engine.payload.format import Destination, OperationData, PayloadError
from update_engine.payload.generate import generate_full_payload
from update_engine.payload.sink import PayloadSink
from update_engine.payload.target import OutsidePartition, WriteTarget

B = 4096
BASE = 3 * B + 512  # not block-aligned, as a partition inside a disk image need not be
SIZE = 4 * B
FILL = 0x5A
U64_MAX = 2**64 - 1


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A file with ``SIZE`` bytes of partition at ``BASE`` and ``2 B`` of other data after it."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes([FILL]) * (BASE + SIZE + 2 * B))
    return path


def outside(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:BASE] + data[BASE + SIZE :]


def test_offsets_are_relative_to_the_partition_and_reads_see_the_writes(disk: Path) -> None:
    io = WriteTarget(disk, BASE, SIZE).open()
    before = outside(disk)
    try:
        io.pwrite(b"first", 0)
        io.pwrite(memoryview(b"last byte!"), SIZE - 10)
        buf = bytearray(5)
        io.preadinto(memoryview(buf), 0, ErrorCode.ERROR)
        io.fsync()
    finally:
        io.close()
        io.close()  # harmless
    data = disk.read_bytes()
    assert buf == b"first" and data[BASE : BASE + 5] == b"first"
    assert data[BASE + SIZE - 10 : BASE + SIZE] == b"last byte!"
    assert outside(disk) == before


@pytest.mark.parametrize(
    ("offset", "length"),
    [(SIZE - 9, 10), (SIZE, 1), (-1, 2), (-B, 1), (U64_MAX, 1), (2**63, B), (0, SIZE + 1)],
    ids=["one byte past the end", "at the end", "one byte before", "a block before", "at 2^64-1", "at 2^63",
         "the partition plus one"],
)
def test_a_write_reaching_outside_raises_and_writes_nothing(disk: Path, offset: int, length: int) -> None:
    """Not clamped: the part that would have fitted is not written either."""
    before = disk.read_bytes()
    io = WriteTarget(disk, BASE, SIZE).open()
    try:
        with pytest.raises(OutsidePartition, match=f"refusing to write {length} bytes at byte {offset} of the "
                           f"target {disk}: it holds bytes 0..{SIZE - 1} only") as caught:
            io.pwrite(b"\xff" * length, offset)
        with pytest.raises(OutsidePartition, match="refusing to read"):
            io.preadinto(memoryview(bytearray(length)), offset, ErrorCode.ERROR)
    finally:
        io.close()
    assert caught.value.code == ErrorCode.DOWNLOAD_WRITE_ERROR
    assert disk.read_bytes() == before


def test_a_partition_running_past_the_end_of_the_disk_is_refused_at_open(disk: Path) -> None:
    """An image file would silently grow; a device would fail half-way through the payload."""
    size = disk.stat().st_size
    WriteTarget(disk, BASE, size - BASE).open().close()  # up to the last byte is fine
    for target in (WriteTarget(disk, BASE, size - BASE + 1), WriteTarget(disk, U64_MAX, SIZE)):
        with pytest.raises(PayloadError, match=f"runs past the end of {disk} \\({size} bytes\\)") as caught:
            target.open()
        assert caught.value.code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR
    with pytest.raises(PayloadError, match="invalid write target"):
        WriteTarget(disk, -1, SIZE).open()
    with pytest.raises(PayloadError, match="cannot open the target") as missing:
        WriteTarget(disk.with_name("absent"), 0, SIZE).open()
    assert missing.value.code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR
    assert disk.stat().st_size == size


def test_a_sink_whose_target_runs_past_the_disk_refuses_before_any_write(disk: Path) -> None:
    size = disk.stat().st_size
    with pytest.raises(PayloadError, match="runs past the end"):
        PayloadSink(WriteTarget(disk, BASE, size), public_key_pem=None, expected_size=None, expected_sha256_b64=None)
    assert disk.stat().st_size == size


def test_every_byte_the_sink_writes_to_the_partition_goes_through_the_bounded_target(
    disk: Path, tmp_path: Path
) -> None:
    image = os.urandom(3 * B)
    (tmp_path / "usr.img").write_bytes(image)
    generate_full_payload(tmp_path / "usr.img", tmp_path / "update.gz", key_pair().private_pem, chunk_size=B)
    payload = (tmp_path / "update.gz").read_bytes()
    before = outside(disk)
    target = RecordingTarget(disk, BASE, SIZE)
    sink = PayloadSink(target, public_key_pem=key_pair().public_pem,
                       expected_size=len(payload), expected_sha256_b64=None)
    try:
        sink.write(payload)
        verified = sink.close()
    finally:
        sink.abort()
    assert verified.partition_sha256 == hashlib.sha256(image).digest()
    assert sorted(target.writes) == [(0, B), (B, B), (2 * B, B)]
    assert disk.read_bytes()[BASE : BASE + 3 * B] == image
    assert outside(disk) == before


def test_the_bounded_file_stops_a_write_the_extent_check_let_through(disk: Path) -> None:
    """Were the manifest check given a wrong limit, the partition's own bound still refuses the write."""
    io = WriteTarget(disk, BASE, SIZE).open()
    before = disk.read_bytes()
    try:
        op = pb.InstallOperation(
            type=pb.InstallOperation.REPLACE,
            dst_extents=[pb.Extent(start_block=SIZE // B, num_blocks=1)],  # the block just after the partition
        )
        unchecked = OperationData(0, op, Destination.PARTITION, memoryview(b"\xee" * B))
        with pytest.raises(OutsidePartition, match=f"refusing to write {B} bytes at byte {SIZE}"):
            Executor(io, None, B).execute(unchecked)
    finally:
        io.close()
    assert disk.read_bytes() == before
