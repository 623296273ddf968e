"""The work a payload can cause before it is trusted is bounded: manifests that ask for too much are refused
before a single byte reaches the partition or the kernel directory.

The signature and the Omaha hash are only known once the whole payload has streamed through, so everything else
a manifest says is checked when it arrives. Each payload here is built by hand with the protobuf module (our
generator makes none of them) and signed with the test key, so what refuses it is the bound, not the signature:
too many operations or extents, a block written twice, writes past what the partition hash covers, a partition
hash over nothing, operation data past the size Omaha announced, an oversized manifest, blob or kernel, a kernel
larger than the room its directory has, a payload without a signature. Every write goes through the bounded
target, which records it here: the check is that there was none.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.payload import REPLACE, REPLACE_BZ, Op, RecordingTarget, build_payload, key_pair
from tests.faults.figures import record
from update_engine.errors import ErrorCode, describe
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import (
    MAX_EXTENTS,
    MAX_KERNEL_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_OPERATION_DATA,
    MAX_OPERATIONS,
    PayloadError,
)
from update_engine.payload.sink import PayloadSink

pytestmark = pytest.mark.faults

B = 4096
MIB = 1024 * 1024
C = ErrorCode
FIGURES = "payload bounds (refused before any write)"
ZERO_BLOCK_BZ = bz2.compress(bytes(B))


def zeros_digest(blocks: int) -> bytes:
    digest = hashlib.sha256()
    chunk = bytes(MIB)
    remaining = blocks * B
    while remaining:
        digest.update(chunk[: min(MIB, remaining)])
        remaining -= min(MIB, remaining)
    return digest.digest()


def zero_partition(blocks: int) -> Callable[[pb.DeltaArchiveManifest], None]:
    """new_partition_info of ``blocks`` zero blocks, without holding them in memory."""

    def edit(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.new_partition_info.size = blocks * B
        manifest.new_partition_info.hash = zeros_digest(blocks)

    return edit


@dataclass(frozen=True)
class Case:
    name: str
    code: int
    words: str
    build: Callable[[], bytes]
    partition_blocks: int = 4
    announce: Callable[[bytes], int] = len
    small_kernel_dir: bool = False

    def __str__(self) -> str:
        return self.name


def too_many_operations() -> bytes:
    count = MAX_OPERATIONS + 1
    return build_payload(
        [Op(REPLACE_BZ, [(block, 1)], ZERO_BLOCK_BZ) for block in range(count)], new_partition=None,
        key=key_pair(), edit_manifest=zero_partition(count),
    ).data


def too_many_extents() -> bytes:
    ops = MAX_EXTENTS // 3 + 1  # three one-block extents each: under the operation limit, over the extent limit
    blob = bz2.compress(bytes(3 * B))
    return build_payload(
        [Op(REPLACE_BZ, [(3 * i, 1), (3 * i + 1, 1), (3 * i + 2, 1)], blob) for i in range(ops)],
        new_partition=None, key=key_pair(), edit_manifest=zero_partition(3 * ops),
    ).data


def block_written_twice() -> bytes:
    first, second = os.urandom(B), os.urandom(B)
    return build_payload(
        [Op(REPLACE, [(0, 2)], first + first), Op(REPLACE, [(1, 1)], second)], new_partition=first + second,
        key=key_pair(),
    ).data


def write_past_the_partition_hash() -> bytes:
    block = os.urandom(B)
    return build_payload([Op(REPLACE, [(0, 2)], block + os.urandom(B))], new_partition=block, key=key_pair()).data


def partition_hash_over_nothing() -> bytes:
    def empty(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.new_partition_info.size = 0
        manifest.new_partition_info.hash = hashlib.sha256(b"").digest()

    return build_payload([Op(REPLACE, [(0, 2)], os.urandom(2 * B))], new_partition=None, key=key_pair(),
                         edit_manifest=empty).data


def data_past_the_announced_size() -> bytes:
    """Three blocks of operation data, served (and announced by Omaha) cut after the first."""
    data = [os.urandom(B) for _ in range(3)]
    built = build_payload([Op(REPLACE, [(i, 1)], blob) for i, blob in enumerate(data)], new_partition=b"".join(data),
                          key=key_pair())
    return built.data[: built.blob_ranges[0][1]]


def oversized_manifest() -> bytes:
    def pad(manifest: pb.DeltaArchiveManifest) -> None:
        # noop_operations are never applied; here they only make the manifest larger than any real one.
        filler = pb.InstallOperation(type=pb.InstallOperation.REPLACE, data_sha256_hash=bytes(32),
                                     dst_extents=[pb.Extent(start_block=2**64 - 1, num_blocks=1)])
        manifest.noop_operations.extend([filler] * (MAX_MANIFEST_SIZE // filler.ByteSize() + 1))

    block = os.urandom(B)
    return build_payload([Op(REPLACE, [(0, 1)], block)], new_partition=block, key=key_pair(), edit_manifest=pad).data


def oversized_blob() -> bytes:
    blocks = MAX_OPERATION_DATA // B + 1
    return build_payload([Op(REPLACE, [(0, blocks)], bytes(blocks * B))], new_partition=None, key=key_pair(),
                         edit_manifest=zero_partition(blocks)).data


def kernel(size: int) -> Callable[[], bytes]:
    def build() -> bytes:
        head = os.urandom(B)

        def claim(manifest: pb.DeltaArchiveManifest) -> None:
            manifest.procedures[0].new_info.size = size

        return build_payload([Op(REPLACE, [(0, 1)], bytes(B))], new_partition=bytes(B), kernel=head,
                             kernel_ops=[Op(REPLACE, [(0, 1)], head)], key=key_pair(), edit_manifest=claim).data

    return build


def unsigned() -> bytes:
    block = os.urandom(B)
    return build_payload([Op(REPLACE, [(0, 1)], block)], new_partition=block).data


CASES = [
    Case("more operations than the limit", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "operations, more than",
         too_many_operations, partition_blocks=MAX_OPERATIONS + 1),
    Case("more extents than the limit", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "extents, more than",
         too_many_extents, partition_blocks=3 * (MAX_EXTENTS // 3 + 1)),
    Case("a block written twice", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "both write block 1", block_written_twice),
    Case("writes past what the partition hash covers", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "crosses the end",
         write_past_the_partition_hash),
    Case("a partition hash over 0 bytes", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "new partition size 0",
         partition_hash_over_nothing),
    Case("operation data past the announced size", C.SIGNED_DELTA_PAYLOAD_EXPECTED, "past the .* bytes announced",
         data_past_the_announced_size),
    Case("a manifest larger than the limit", C.DOWNLOAD_INVALID_METADATA_SIZE, "exceeds the limit",
         oversized_manifest),
    Case("an operation blob larger than the limit", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "exceeds the limit",
         oversized_blob, partition_blocks=MAX_OPERATION_DATA // B + 1),
    Case("a kernel larger than the limit", C.DOWNLOAD_OPERATION_EXECUTION_ERROR, "kernel is .* more than the limit",
         kernel(MAX_KERNEL_SIZE + 1)),
    Case("a kernel larger than its directory's free space", C.DOWNLOAD_WRITE_ERROR, "free some space",
         kernel(2 * MIB), small_kernel_dir=True),
    Case("no signature", C.SIGNED_DELTA_PAYLOAD_EXPECTED, "names no signature", unsigned),
]


@pytest.fixture
def small_kernel_dir(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a kernel directory with little room left, as a small /boot gets."""
    mount = tmp_path / "boot"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_manifest_asking_too_much_is_refused_before_any_write(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = case.build()
    disk = tmp_path / "partition.img"
    with open(disk, "wb") as stream:
        stream.truncate(case.partition_blocks * B)  # sparse: the large cases cost no disk
    kernel_dir = request.getfixturevalue("small_kernel_dir") if case.small_kernel_dir else tmp_path / "kernel"
    kernel_dir.mkdir(exist_ok=True)
    target = RecordingTarget(disk, 0, case.partition_blocks * B)
    sink = PayloadSink(target, public_key_pem=key_pair().public_pem, expected_size=case.announce(data),
                       expected_sha256_b64=None, kernel_path=kernel_dir / "vmlinuz-b")
    code: int | None = None
    message = ""
    try:
        for start in range(0, len(data), 256 * 1024):
            sink.write(data[start : start + 256 * 1024])
        sink.close()
    except PayloadError as exc:
        code, message = exc.code, exc.message
    finally:
        sink.abort()
    untouched = not target.writes and not any(kernel_dir.iterdir())
    record(FIGURES, trials=1, refused=int(code == case.code), survived=int(untouched))
    assert code == case.code, f"{case.name}: got {code} ({describe(code or 0)}): {message}"
    assert re.search(case.words, message), message
    assert target.writes == [], f"{case.name}: {len(target.writes)} writes before the refusal"
    assert not any(kernel_dir.iterdir()), "a kernel file was created"
