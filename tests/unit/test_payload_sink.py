"""Applying and verifying payloads: what lands on the target, and the error code for every kind of bad input."""

from __future__ import annotations

import asyncio
import base64
import bz2
import hashlib
import os
import subprocess
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.payload import BSDIFF, HOLE, MOVE, REPLACE, REPLACE_BZ, Op, build_payload, key_pair
from tests.conftest import require_tool
from update_engine.errors import ErrorCode
from update_engine.payload import sink as sink_module
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.executor import Executor
from update_engine.payload.format import OperationData, PayloadError, parse_header, parse_manifest
from update_engine.payload.generate import generate_full_payload
from update_engine.payload.sink import PayloadSink
from update_engine.payload.target import BoundedFile, WriteTarget
from update_engine.payload.verify import VerifiedPayload

B = 4096
MIB = 1024 * 1024
FILL = 0xAA
OFFSET = MIB + 3 * B  # the partition's byte offset inside the disk image: deliberately not MiB-aligned
SLACK = 2 * B  # the target partition is a little larger than the image


@dataclass(frozen=True)
class Generated:
    image: bytes
    kernel: bytes
    payload: bytes
    sha256_b64: str

    @property
    def manifest(self) -> pb.DeltaArchiveManifest:
        header = parse_header(self.payload[:20])
        return parse_manifest(self.payload[20 : header.metadata_size])

    @property
    def metadata_size(self) -> int:
        return parse_header(self.payload[:20]).metadata_size


def _image() -> bytes:
    """Random (REPLACE), text (REPLACE_BZ), mixed, and a last chunk of five blocks."""
    text = b"".join(b"line %d of a very compressible file\n" % i for i in range(40000))[:MIB]
    mixed = os.urandom(MIB // 2) + bytes(MIB // 2)
    return os.urandom(MIB) + text + mixed + os.urandom(5 * B)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    work = tmp_path_factory.mktemp("generated")
    image = _image()
    kernel = os.urandom(9000) + b"k" * 3000
    (work / "usr.img").write_bytes(image)
    (work / "vmlinuz").write_bytes(kernel)
    result = generate_full_payload(
        work / "usr.img", work / "payload.bin", key_pair().private_pem, kernel=work / "vmlinuz"
    )
    payload = (work / "payload.bin").read_bytes()
    assert result.sha256_b64 == _b64(payload)
    return Generated(image, kernel, payload, result.sha256_b64)


def _b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _disk(path: Path, partition_size: int, fill: int = FILL) -> WriteTarget:
    path.write_bytes(bytes([fill]) * (OFFSET + partition_size + MIB))
    return WriteTarget(path, OFFSET, partition_size)


def _apply(
    data: bytes,
    target: WriteTarget | None,
    *,
    key: bytes | None = None,
    expected_size: int | None = -1,
    expected_sha256_b64: str | None = "",
    kernel_path: Path | None = None,
    chunk: int = 65536,
) -> VerifiedPayload:
    """Stream ``data`` into a sink; by default the announced size and hash are those of ``data`` itself."""
    sink = PayloadSink(
        target,
        public_key_pem=key_pair().public_pem if key is None else key,
        expected_size=len(data) if expected_size == -1 else expected_size,
        expected_sha256_b64=_b64(data) if expected_sha256_b64 == "" else expected_sha256_b64,
        kernel_path=kernel_path,
    )
    try:
        for start in range(0, len(data), chunk):
            sink.write(data[start : start + chunk])
        return sink.close()
    finally:
        sink.abort()


def _partition(target: WriteTarget, size: int) -> bytes:
    with open(target.path, "rb") as stream:
        stream.seek(target.offset)
        return stream.read(size)


def _outside_untouched(target: WriteTarget, written: int) -> bool:
    """Everything but [offset, offset+written) still holds the fill byte."""
    data = target.path.read_bytes()
    return data[: target.offset] == bytes([FILL]) * target.offset and data[
        target.offset + written :
    ] == bytes([FILL]) * (len(data) - target.offset - written)


# --- applying --------------------------------------------------------------------------------------------------


def test_full_payload_lands_at_the_offset_and_nowhere_else(generated: Generated, tmp_path: Path) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image) + SLACK)
    kernel_path = tmp_path / "boot" / "vmlinuz-b"
    kernel_path.parent.mkdir()

    result = _apply(generated.payload, target, kernel_path=kernel_path)

    assert _partition(target, len(generated.image)) == generated.image
    assert _outside_untouched(target, len(generated.image))
    assert kernel_path.read_bytes() == generated.kernel
    assert kernel_path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(kernel_path.parent) == ["vmlinuz-b"]
    assert result.signature_verified and result.kernel_written and result.kernel_size == len(generated.kernel)
    assert result.partition_size == len(generated.image)
    assert result.partition_sha256 == hashlib.sha256(generated.image).digest()
    assert result.size == len(generated.payload) and result.sha256_b64 == generated.sha256_b64
    assert result.manifest.operation_counts["REPLACE"] >= 2
    assert result.manifest.operation_counts["REPLACE_BZ"] >= 1


@pytest.mark.parametrize("chunk", [999, 3 * MIB])
def test_any_write_size_gives_the_same_partition(generated: Generated, tmp_path: Path, chunk: int) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image) + SLACK)
    _apply(generated.payload, target, chunk=chunk)
    assert _partition(target, len(generated.image)) == generated.image


def test_one_byte_at_a_time(tmp_path: Path) -> None:
    image = os.urandom(B) + b"x" * (2 * B)
    built = build_payload(
        [Op(REPLACE, [(0, 1)], image[:B]), Op(REPLACE_BZ, [(1, 2)], bz2.compress(image[B:]))],
        new_partition=image,
        key=key_pair(),
    )
    target = _disk(tmp_path / "disk.img", 3 * B)
    _apply(built.data, target, chunk=1)
    assert _partition(target, 3 * B) == image



def test_operations_finishing_out_of_order_are_hashed_in_partition_order(
    generated: Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers, and the first operation ends only after the second: the partition, and its hash taken from
    what was written, are still right."""
    monkeypatch.setattr(sink_module, "usable_cpus", lambda: 2)
    second_done = threading.Event()
    workers_seen: set[str] = set()
    real = Executor.execute

    def execute(self: Executor, event: OperationData, on_data: Callable[[memoryview], None] | None = None) -> None:
        workers_seen.add(threading.current_thread().name)
        if event.op_index == 0:
            assert second_done.wait(30), "operation 1 never ran beside operation 0"
        real(self, event, on_data)
        if event.op_index == 1:
            second_done.set()

    monkeypatch.setattr(Executor, "execute", execute)
    target = _disk(tmp_path / "disk.img", len(generated.image))
    result = _apply(generated.payload, target)
    assert result.partition_sha256 == hashlib.sha256(generated.image).digest()
    assert _partition(target, len(generated.image)) == generated.image
    assert workers_seen == {"payload-worker-0", "payload-worker-1"}

@pytest.mark.parametrize("pools", [1, 2])
def test_operations_as_large_as_the_buffer_pool_do_not_stall_the_pipeline(tmp_path: Path, pools: int) -> None:
    """Uncompressed operations of ``POOL_BYTES`` each (``update-payload generate --op-size 2M`` on random data),
    or larger than the pool and the window: each blob's buffer goes back only once its bytes are hashed, and the
    next blob waits for it. The hash thread must give it back even when it then has to wait for that very next
    operation."""
    size = 4 * sink_module.POOL_BYTES
    image = os.urandom(size)
    (tmp_path / "usr.img").write_bytes(image)
    generate_full_payload(
        tmp_path / "usr.img", tmp_path / "payload.bin", key_pair().private_pem,
        chunk_size=pools * sink_module.POOL_BYTES,
    )
    payload = (tmp_path / "payload.bin").read_bytes()
    target = _disk(tmp_path / "disk.img", size)
    result: list[VerifiedPayload] = []
    applying = threading.Thread(target=lambda: result.append(_apply(payload, target)), daemon=True)
    applying.start()
    applying.join(60)
    assert not applying.is_alive(), "the payload's apply stalled"
    assert _partition(target, size) == image and result


def test_kernel_is_skipped_without_a_kernel_path(generated: Generated, tmp_path: Path) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image))
    result = _apply(generated.payload, target)
    assert not result.kernel_written and result.kernel_size is None
    assert _partition(target, len(generated.image)) == generated.image


def test_move_copies_blocks_already_written(tmp_path: Path) -> None:
    first = os.urandom(2 * B)
    last = b"z" * B
    built = build_payload(
        [
            Op(REPLACE, [(0, 2)], first),
            Op(MOVE, [(3, 1), (2, 1)], src=[(0, 2)]),
            Op(REPLACE_BZ, [(4, 1)], bz2.compress(last)),
        ],
        new_partition=first + first[B:] + first[:B] + last,
        key=key_pair(),
    )
    target = _disk(tmp_path / "disk.img", 5 * B)
    result = _apply(built.data, target)
    assert _partition(target, 5 * B) == first + first[B:] + first[:B] + last
    assert result.manifest.operation_counts == {"REPLACE": 1, "MOVE": 1, "REPLACE_BZ": 1}
    assert _outside_untouched(target, 5 * B)


def test_sparse_extents_are_skipped(tmp_path: Path) -> None:
    data = os.urandom(3 * B)
    expected = data[:B] + bytes([FILL]) * B + data[2 * B :]
    built = build_payload(
        [Op(REPLACE, [(0, 1), (HOLE, 1), (2, 1)], data)], new_partition=expected, key=key_pair()
    )
    target = _disk(tmp_path / "disk.img", 3 * B)
    _apply(built.data, target)
    assert _partition(target, 3 * B) == expected


def test_last_partial_block_is_zero_padded(tmp_path: Path) -> None:
    raw = os.urandom(B + 100)
    short = b"q" * 100
    expected = raw + bytes(B - 100) + short + bytes(B - 100)
    built = build_payload(
        [Op(REPLACE, [(0, 2)], raw), Op(REPLACE_BZ, [(2, 1)], bz2.compress(short))],
        new_partition=expected,
        key=key_pair(),
    )
    target = _disk(tmp_path / "disk.img", 3 * B)
    _apply(built.data, target)
    assert _partition(target, 3 * B) == expected


def test_untyped_procedure_is_consumed_not_applied(generated: Generated, tmp_path: Path) -> None:
    kernel = os.urandom(B)

    def untype(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.procedures[0].ClearField("type")

    built = build_payload(
        [Op(REPLACE, [(0, 1)], generated.image[:B])],
        new_partition=generated.image[:B],
        kernel=kernel,
        kernel_ops=[Op(REPLACE, [(0, 1)], kernel)],
        key=key_pair(),
        edit_manifest=untype,
    )
    target = _disk(tmp_path / "disk.img", B)
    kernel_path = tmp_path / "vmlinuz-b"
    result = _apply(built.data, target, kernel_path=kernel_path)
    assert not result.kernel_written and not kernel_path.exists()


# --- bad input: each with its code -----------------------------------------------------------------------------


def _flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def _failure(data: bytes, tmp_path: Path, partition_size: int, **kwargs: object) -> PayloadError:
    target = _disk(tmp_path / "disk.img", partition_size)
    kernel_path = tmp_path / "boot" / "vmlinuz-b"
    kernel_path.parent.mkdir(exist_ok=True)
    with pytest.raises(PayloadError) as exc:
        _apply(data, target, kernel_path=kernel_path, **kwargs)  # type: ignore[arg-type]
    # Nothing is installed and no temporary file is left behind, whatever failed.
    assert os.listdir(kernel_path.parent) == []
    return exc.value


def test_wrong_key_is_code_18(generated: Generated, tmp_path: Path) -> None:
    error = _failure(generated.payload, tmp_path, len(generated.image), key=key_pair("other").public_pem)
    assert error.code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR


def test_no_public_key_is_refused(generated: Generated, tmp_path: Path) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(target, public_key_pem=None, expected_size=None, expected_sha256_b64=None)
    sink.write(generated.payload)
    with pytest.raises(PayloadError) as exc:
        sink.close()
    assert exc.value.code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
    assert "no public key" in exc.value.message


def test_unsigned_payload_is_code_17(tmp_path: Path) -> None:
    built = build_payload([Op(REPLACE, [(0, 1)], bytes(B))], new_partition=bytes(B))
    assert _failure(built.data, tmp_path, B).code == ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED


def test_signature_of_another_version_is_code_18(tmp_path: Path) -> None:
    built = build_payload(
        [Op(REPLACE, [(0, 1)], bytes(B))], new_partition=bytes(B), key=key_pair(), signature_version=1
    )
    error = _failure(built.data, tmp_path, B)
    assert error.code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
    assert "version 2" in error.message


@pytest.mark.parametrize(
    ("pos", "mask", "code"),
    [
        (0, 0x01, ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC),  # magic
        (11, 0x02, ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC),  # version 1 -> 3
        (12, 0x80, ErrorCode.DOWNLOAD_INVALID_METADATA_SIZE),  # manifest size becomes huge
    ],
)
def test_flipped_header_byte(generated: Generated, tmp_path: Path, pos: int, mask: int, code: int) -> None:
    assert _failure(_flip(generated.payload, pos, mask), tmp_path, len(generated.image)).code == code


def test_flipped_manifest_byte_breaks_the_signature(generated: Generated, tmp_path: Path) -> None:
    """The manifest's own partition hash is altered: everything streams, the signature catches it."""
    pos = generated.payload.index(generated.manifest.new_partition_info.hash)
    data = _flip(generated.payload, pos + 5)
    assert (
        _failure(data, tmp_path, len(generated.image)).code
        == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
    )


def test_flipped_byte_in_each_blob_is_code_29(generated: Generated, tmp_path: Path) -> None:
    manifest = generated.manifest
    ops = list(manifest.partition_operations) + list(manifest.procedures[0].operations)
    for index, op in enumerate(ops):
        pos = generated.metadata_size + op.data_offset + op.data_length // 2
        work = tmp_path / str(index)
        work.mkdir()
        error = _failure(_flip(generated.payload, pos), work, len(generated.image))
        assert error.code == ErrorCode.DOWNLOAD_OPERATION_HASH_MISMATCH, index
        assert f"operation {index}" in error.message


def test_flipped_signature_byte_is_code_18(generated: Generated, tmp_path: Path) -> None:
    data = _flip(generated.payload, len(generated.payload) - 7)
    assert (
        _failure(data, tmp_path, len(generated.image)).code
        == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
    )


def test_truncated_payload(generated: Generated, tmp_path: Path) -> None:
    cut = generated.payload[:-100]
    size = len(generated.image)
    assert (
        _failure(cut, tmp_path, size, expected_size=len(generated.payload)).code
        == ErrorCode.DOWNLOAD_SIZE_MISMATCH
    )
    mid = generated.payload[: len(generated.payload) // 2]
    error = _failure(mid, tmp_path, size, expected_size=None, expected_sha256_b64=None)
    assert error.code == ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED
    assert "operation" in error.message


def test_extended_payload_is_code_11(generated: Generated, tmp_path: Path) -> None:
    longer = generated.payload + b"\0"
    size = len(generated.image)
    assert _failure(longer, tmp_path, size).code == ErrorCode.DOWNLOAD_SIZE_MISMATCH
    error = _failure(longer, tmp_path, size, expected_size=len(generated.payload))
    assert error.code == ErrorCode.DOWNLOAD_SIZE_MISMATCH


def test_wrong_expected_size_is_code_11(generated: Generated, tmp_path: Path) -> None:
    size = len(generated.image)
    for announced in (len(generated.payload) - 1, len(generated.payload) + 1):
        assert (
            _failure(generated.payload, tmp_path, size, expected_size=announced).code
            == ErrorCode.DOWNLOAD_SIZE_MISMATCH
        )


def test_wrong_expected_sha256_is_code_10(generated: Generated, tmp_path: Path) -> None:
    wrong = _b64(b"something else")
    error = _failure(generated.payload, tmp_path, len(generated.image), expected_sha256_b64=wrong)
    assert error.code == ErrorCode.DOWNLOAD_HASH_MISMATCH
    # The comparison is of the exact base64 string Omaha sent.
    unpadded = generated.sha256_b64.rstrip("=")
    error = _failure(generated.payload, tmp_path, len(generated.image), expected_sha256_b64=unpadded)
    assert error.code == ErrorCode.DOWNLOAD_HASH_MISMATCH


def test_checks_run_in_order_size_before_hash_before_signature(generated: Generated, tmp_path: Path) -> None:
    bad_sig = _flip(generated.payload, len(generated.payload) - 7)
    size = len(generated.image)
    other = _b64(b"x")
    assert _failure(bad_sig, tmp_path, size, expected_size=1, expected_sha256_b64=other).code == 11
    assert _failure(bad_sig, tmp_path, size, expected_sha256_b64=other).code == 10


def test_partition_smaller_than_the_image_is_code_28(generated: Generated, tmp_path: Path) -> None:
    error = _failure(generated.payload, tmp_path, len(generated.image) - B)
    assert error.code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert _outside_untouched(WriteTarget(tmp_path / "disk.img", OFFSET, 0), 0)


def test_extent_outside_the_partition_is_code_28(tmp_path: Path) -> None:
    built = build_payload(
        [Op(REPLACE, [(0, 1)], bytes(B)), Op(REPLACE, [(2, 1)], bytes(B))],
        new_partition=bytes(2 * B),
        key=key_pair(),
    )
    error = _failure(built.data, tmp_path, 2 * B)
    assert error.code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert "crosses the end" in error.message


def test_bsdiff_is_refused(tmp_path: Path) -> None:
    built = build_payload(
        [Op(BSDIFF, [(0, 1)], b"BSDIFF40", src=[(0, 1)])], new_partition=bytes(B), key=key_pair()
    )
    error = _failure(built.data, tmp_path, B)
    assert error.code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert "BSDIFF operations are not supported" in error.message


@pytest.mark.parametrize(
    "blob",
    [
        bz2.compress(bytes(10 * MIB)),  # a bomb: far more output than one block
        bz2.compress(bytes(B)) + b"junk",  # bytes after the stream
        bz2.compress(bytes(B))[:-10],  # truncated stream
        b"not bzip2 at all",
    ],
    ids=["bomb", "trailing", "truncated", "garbage"],
)
def test_bad_bzip2_data_is_code_28(tmp_path: Path, blob: bytes) -> None:
    built = build_payload([Op(REPLACE_BZ, [(0, 1)], blob)], new_partition=bytes(B), key=key_pair())
    assert _failure(built.data, tmp_path, B).code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_bzip2_output_too_short_for_its_blocks_is_code_28(tmp_path: Path) -> None:
    built = build_payload(
        [Op(REPLACE_BZ, [(0, 2)], bz2.compress(bytes(B)))], new_partition=bytes(2 * B), key=key_pair()
    )
    assert _failure(built.data, tmp_path, 2 * B).code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_partition_hash_mismatch_is_code_15(tmp_path: Path) -> None:
    def lie(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.new_partition_info.hash = hashlib.sha256(b"another image").digest()

    built = build_payload(
        [Op(REPLACE, [(0, 1)], os.urandom(B))], new_partition=bytes(B), key=key_pair(), edit_manifest=lie
    )
    assert _failure(built.data, tmp_path, B).code == ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR


def test_kernel_hash_mismatch_is_code_16(tmp_path: Path) -> None:
    kernel = os.urandom(5000)

    def lie(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.procedures[0].new_info.hash = hashlib.sha256(b"another kernel").digest()

    built = build_payload(
        [Op(REPLACE, [(0, 1)], bytes(B))],
        new_partition=bytes(B),
        kernel=kernel,
        kernel_ops=[Op(REPLACE, [(0, 2)], kernel)],
        key=key_pair(),
        edit_manifest=lie,
    )
    assert _failure(built.data, tmp_path, B).code == ErrorCode.NEW_KERNEL_VERIFICATION_ERROR


def test_missing_new_partition_info_is_code_12(tmp_path: Path) -> None:
    built = build_payload([Op(REPLACE, [(0, 1)], bytes(B))], new_partition=None, key=key_pair())
    assert _failure(built.data, tmp_path, B).code == ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR


def test_worker_error_surfaces_from_write_and_stops_the_sink(generated: Generated, tmp_path: Path) -> None:
    first = generated.manifest.partition_operations[0]
    data = _flip(generated.payload, generated.metadata_size + first.data_offset)
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(
        target, public_key_pem=key_pair().public_pem, expected_size=None, expected_sha256_b64=None
    )
    written = 0
    with pytest.raises(PayloadError) as exc:
        for start in range(0, len(data), 65536):
            sink.write(data[start : start + 65536])
            written += 65536
        sink.close()
    assert exc.value.code == ErrorCode.DOWNLOAD_OPERATION_HASH_MISMATCH
    # Nothing of the bad operation reached the disk.
    assert _outside_untouched(target, 0)
    with pytest.raises(PayloadError):
        sink.write(b"more")
    sink.abort()


def test_abort_mid_stream_releases_everything(generated: Generated, tmp_path: Path) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image))
    kernel_path = tmp_path / "vmlinuz-b"
    sink = PayloadSink(
        target,
        public_key_pem=key_pair().public_pem,
        expected_size=None,
        expected_sha256_b64=None,
        kernel_path=kernel_path,
    )
    sink.write(generated.payload[: len(generated.payload) - 1000])
    sink.abort()
    sink.abort()
    assert os.listdir(tmp_path) == ["disk.img"]
    with pytest.raises(PayloadError):
        sink.close()


def test_close_waits_for_the_writes_however_slow_the_disk(
    generated: Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slower than any fixed patience: close() judges the payload only once every write is done. (A
    thread outliving a join time-out used to turn a good payload into "payload has no signature blob".)"""
    released = threading.Event()
    real_pwrite = BoundedFile.pwrite

    def slow_pwrite(file: BoundedFile, data: bytes | bytearray | memoryview, offset: int) -> None:
        assert released.wait(30), "test never released the writes"
        real_pwrite(file, data, offset)

    real_join = threading.Thread.join

    def impatient_join(thread: threading.Thread, timeout: float | None = None) -> None:
        real_join(thread, None if timeout is None else min(timeout, 0.2))

    monkeypatch.setattr(BoundedFile, "pwrite", slow_pwrite)
    monkeypatch.setattr(threading.Thread, "join", impatient_join)
    monkeypatch.setattr(sink_module, "QUEUE_BYTES", 2 * len(generated.payload))  # all of it queued at once
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(
        target,
        public_key_pem=key_pair().public_pem,
        expected_size=len(generated.payload),
        expected_sha256_b64=generated.sha256_b64,
    )
    sink.write(generated.payload)
    release = threading.Timer(1.0, released.set)
    release.start()
    try:
        result = sink.close()
    finally:
        release.cancel()
        released.set()
        sink.abort()
    assert result.signature_verified and result.partition_size == len(generated.image)
    assert _partition(target, len(generated.image)) == generated.image


def test_missing_target_is_code_7(tmp_path: Path) -> None:
    with pytest.raises(PayloadError) as exc:
        PayloadSink(
            WriteTarget(tmp_path / "absent", 0, B),
            public_key_pem=None,
            expected_size=None,
            expected_sha256_b64=None,
        )
    assert exc.value.code == ErrorCode.INSTALL_DEVICE_OPEN_ERROR


# --- the signature, cross-checked with openssl -----------------------------------------------------------------


def test_signature_blob_layout_and_openssl_accepts_it(generated: Generated, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    manifest = generated.manifest
    signed_end = generated.metadata_size + manifest.signatures_offset
    blob = generated.payload[signed_end:]
    assert len(blob) == manifest.signatures_size == 264
    assert blob[:8] == bytes.fromhex("0a85020802128002")
    (tmp_path / "signed.bin").write_bytes(generated.payload[:signed_end])
    (tmp_path / "sig.bin").write_bytes(blob[8:])

    def openssl_verify(public_pem: bytes) -> subprocess.CompletedProcess[str]:
        (tmp_path / "pub.pem").write_bytes(public_pem)
        return subprocess.run(
            [openssl, "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.bin", "signed.bin"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
        )

    run = openssl_verify(key_pair().public_pem)
    assert run.returncode == 0 and "Verified OK" in run.stdout, run.stdout + run.stderr
    assert openssl_verify(key_pair("other").public_pem).returncode != 0


# --- feeding from an event loop ----------------------------------------------------------------------------------


async def _apply_async(sink: PayloadSink, data: bytes, chunk: int) -> VerifiedPayload:
    try:
        for start in range(0, len(data), chunk):
            await sink.write_async(data[start : start + chunk])
        return await asyncio.to_thread(sink.close)
    finally:
        sink.abort()


def _payload_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("payload-") and t.is_alive()]


@pytest.mark.parametrize("chunk", [1000, 65536, 262144, 3 * MIB])
async def test_write_async_gives_the_same_partition(generated: Generated, tmp_path: Path, chunk: int) -> None:
    target = _disk(tmp_path / "disk.img", len(generated.image) + SLACK)
    sink = PayloadSink(
        target,
        public_key_pem=key_pair().public_pem,
        expected_size=len(generated.payload),
        expected_sha256_b64=generated.sha256_b64,
    )
    result = await _apply_async(sink, generated.payload, chunk)
    assert result.sha256_b64 == generated.sha256_b64
    assert _partition(target, len(generated.image)) == generated.image
    assert _outside_untouched(target, len(generated.image))


class _StalledWrites:
    """Holds every write to the target until released: the pipeline fills up behind it.

    The pipeline's bounds are cut so that, stalled, it holds one operation and a chunk or two: far less than
    the test payload, so a writer always ends up waiting for room, however late the test looks at it. With the
    real bounds (megabytes) the whole payload fits, and a slow test would find the writer already done.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.reached = threading.Event()
        real = BoundedFile.pwrite

        def stalled(file: BoundedFile, data: bytes | bytearray | memoryview, offset: int) -> None:
            self.reached.set()
            assert self.release.wait(30), "test never released the stalled writes"
            real(file, data, offset)

        monkeypatch.setattr(BoundedFile, "pwrite", stalled)
        monkeypatch.setattr(sink_module, "QUEUE_BYTES", 64 * 1024)
        monkeypatch.setattr(sink_module, "WINDOW_BYTES", 1)  # one operation at a time
        monkeypatch.setattr(sink_module, "POOL_BYTES", 1)  # one blob at a time


async def test_a_full_pipeline_does_not_block_the_event_loop(
    generated: Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall = _StalledWrites(monkeypatch)
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(
        target, public_key_pem=key_pair().public_pem, expected_size=None, expected_sha256_b64=None
    )
    writer = asyncio.create_task(_apply_async(sink, generated.payload, 65536))
    ticks = 0
    while ticks < 200 and not writer.done():
        await asyncio.sleep(0.001)
        ticks += 1
    # The writer waits for room while other coroutines (D-Bus, timers) keep running.
    assert stall.reached.is_set() and not writer.done() and ticks == 200
    stall.release.set()
    result = await asyncio.wait_for(writer, 60)
    assert _partition(target, len(generated.image)) == generated.image
    assert result.partition_size == len(generated.image)


async def test_failure_wakes_a_writer_waiting_for_room(
    generated: Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink_module, "QUEUE_BYTES", 64 * 1024)
    first = generated.manifest.partition_operations[0]
    data = _flip(generated.payload, generated.metadata_size + first.data_offset)
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(
        target, public_key_pem=key_pair().public_pem, expected_size=None, expected_sha256_b64=None
    )
    with pytest.raises(PayloadError) as exc:
        await asyncio.wait_for(_apply_async(sink, data, 65536), 60)
    assert exc.value.code == ErrorCode.DOWNLOAD_OPERATION_HASH_MISMATCH
    assert _outside_untouched(target, 0)
    assert _payload_threads() == []


async def test_cancelled_writer_then_abort_leaves_no_thread_and_no_kernel_file(
    generated: Generated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall = _StalledWrites(monkeypatch)
    target = _disk(tmp_path / "disk.img", len(generated.image))
    sink = PayloadSink(
        target,
        public_key_pem=key_pair().public_pem,
        expected_size=None,
        expected_sha256_b64=None,
        kernel_path=tmp_path / "vmlinuz-b",
    )

    async def feed() -> None:
        for start in range(0, len(generated.payload), 65536):
            await sink.write_async(generated.payload[start : start + 65536])

    writer = asyncio.create_task(feed())
    assert await asyncio.to_thread(stall.reached.wait, 30)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    stall.release.set()
    sink.abort()
    assert _payload_threads() == []
    assert os.listdir(tmp_path) == ["disk.img"]
    with pytest.raises(PayloadError):
        await sink.write_async(b"more")


# --- memory ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_stays_flat_for_a_32_mib_payload(tmp_path: Path) -> None:
    image = os.urandom(24 * MIB) + bytes(8 * MIB)
    (tmp_path / "usr.img").write_bytes(image)
    generate_full_payload(tmp_path / "usr.img", tmp_path / "payload.bin", key_pair().private_pem)
    del image
    target = _disk(tmp_path / "disk.img", 32 * MIB)
    size = (tmp_path / "payload.bin").stat().st_size
    public_key = key_pair().public_pem

    tracemalloc.start()
    try:
        sink = PayloadSink(target, public_key_pem=public_key, expected_size=size, expected_sha256_b64=None)
        with open(tmp_path / "payload.bin", "rb", buffering=0) as stream:
            while chunk := stream.read(65536):
                sink.write(chunk)
        result = sink.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.partition_size == 32 * MIB
    assert peak < 16 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"
