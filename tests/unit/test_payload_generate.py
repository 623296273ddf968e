"""Generating full payloads and signing keys."""

from __future__ import annotations

import bz2
import hashlib
import os
import stat
from pathlib import Path

import pytest

from sim.payload import key_pair
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.files import verify_payload_file
from update_engine.payload.format import (
    SPARSE_HOLE,
    PayloadError,
    parse_header,
    parse_manifest,
    parse_signatures,
    validate_manifest,
)
from update_engine.payload.generate import _encode_chunk, generate_full_payload, make_key_pair
from update_engine.payload.sink import PayloadSink
from update_engine.payload.target import WriteTarget

B = 4096
MIB = 1024 * 1024


def _read(path: Path) -> tuple[bytes, pb.DeltaArchiveManifest, int]:
    data = path.read_bytes()
    header = parse_header(data[:20])
    return data, parse_manifest(data[20 : header.metadata_size]), header.metadata_size


def test_generated_payload_structure(tmp_path: Path) -> None:
    image = (
        os.urandom(MIB) + b"compressible " * (MIB // 13) + bytes(MIB - (MIB // 13) * 13) + os.urandom(3 * B)
    )
    kernel = os.urandom(10_000)
    (tmp_path / "usr.img").write_bytes(image)
    (tmp_path / "vmlinuz").write_bytes(kernel)
    result = generate_full_payload(
        tmp_path / "usr.img", tmp_path / "out.bin", key_pair().private_pem, kernel=tmp_path / "vmlinuz"
    )
    data, manifest, metadata_size = _read(tmp_path / "out.bin")
    assert result.size == len(data) and result.partition_size == len(image)
    validate_manifest(manifest, partition_size=len(image))

    ops = list(manifest.partition_operations)
    assert [op.type for op in ops] == [
        pb.InstallOperation.REPLACE,
        pb.InstallOperation.REPLACE_BZ,
        pb.InstallOperation.REPLACE,
    ]
    assert [(e.start_block, e.num_blocks) for op in ops for e in op.dst_extents] == [
        (0, 256),
        (256, 256),
        (512, 3),
    ]
    for op in ops:
        blob = data[metadata_size + op.data_offset : metadata_size + op.data_offset + op.data_length]
        assert hashlib.sha256(blob).digest() == op.data_sha256_hash
    assert (
        bz2.decompress(data[metadata_size + ops[1].data_offset :][: ops[1].data_length])
        == image[MIB : 2 * MIB]
    )
    assert manifest.new_partition_info.size == len(image)
    assert manifest.new_partition_info.hash == hashlib.sha256(image).digest()

    (kernel_proc,) = manifest.procedures
    assert kernel_proc.type == pb.InstallProcedure.KERNEL
    assert (
        kernel_proc.new_info.size == len(kernel)
        and kernel_proc.new_info.hash == hashlib.sha256(kernel).digest()
    )
    assert [(e.start_block, e.num_blocks) for e in kernel_proc.operations[0].dst_extents] == [(0, 3)]

    # Signature blob last, described by the manifest, and the noop operation pointing at it for old clients.
    assert manifest.signatures_size == 264
    assert metadata_size + manifest.signatures_offset + manifest.signatures_size == len(data)
    (noop,) = manifest.noop_operations
    assert (noop.data_offset, noop.data_length) == (manifest.signatures_offset, 264)
    assert [(e.start_block, e.num_blocks) for e in noop.dst_extents] == [(SPARSE_HOLE, 1)]
    signatures = parse_signatures(data[-264:])
    assert [(version, len(sig)) for version, sig in signatures] == [(2, 256)]
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "usr.img", "vmlinuz"]  # no temporary files left


@pytest.mark.parametrize(
    "chunk",
    [
        os.urandom(MIB),
        bytes(range(256)) * 4096,  # flat byte histogram, yet trivially compressible
        os.urandom(4096) * 256,  # one random block repeated: only long-range matching sees it
        (os.urandom(64 * 1024) + bytes(4096)) * 15 + os.urandom(1024 * 1024 - 15 * 69632),
        b"text " * 1000 + os.urandom(MIB - 5000),
        os.urandom(8000),
    ],
    ids=["random", "counter", "repeated-block", "random-with-zero-blocks", "mostly-random", "small-random"],
)
def test_replace_bz_is_chosen_whenever_bzip2_is_smaller(chunk: bytes) -> None:
    op_type, blob, blob_hash = _encode_chunk(chunk)
    compressed = bz2.compress(chunk, 9)
    if len(compressed) < len(chunk):
        assert op_type == pb.InstallOperation.REPLACE_BZ and bz2.decompress(blob) == chunk
    else:
        assert op_type == pb.InstallOperation.REPLACE and blob == chunk
    assert hashlib.sha256(blob).digest() == blob_hash


@pytest.mark.parametrize("size", [0, B - 1, 3 * B + 1])
def test_image_must_be_whole_blocks(tmp_path: Path, size: int) -> None:
    (tmp_path / "usr.img").write_bytes(bytes(size))
    with pytest.raises(PayloadError) as exc:
        generate_full_payload(tmp_path / "usr.img", tmp_path / "out.bin", key_pair().private_pem)
    assert "whole number of 4096-byte blocks" in exc.value.message
    assert not (tmp_path / "out.bin").exists()


def test_missing_image_and_bad_key_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PayloadError, match="cannot read the image"):
        generate_full_payload(tmp_path / "absent.img", tmp_path / "out.bin", key_pair().private_pem)
    (tmp_path / "usr.img").write_bytes(bytes(B))
    with pytest.raises(PayloadError, match="private key"):
        generate_full_payload(tmp_path / "usr.img", tmp_path / "out.bin", key_pair().public_pem)


def test_other_block_size_makes_a_payload_clients_refuse(tmp_path: Path) -> None:
    (tmp_path / "usr.img").write_bytes(os.urandom(8 * 512))
    generate_full_payload(tmp_path / "usr.img", tmp_path / "out.bin", key_pair().private_pem, block_size=512)
    with pytest.raises(PayloadError) as exc:
        verify_payload_file(tmp_path / "out.bin", key_pair().public_pem)
    assert exc.value.code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert "block size is 512" in exc.value.message


def test_key_pair_files(tmp_path: Path) -> None:
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    make_key_pair(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    (tmp_path / "usr.img").write_bytes(os.urandom(2 * B))
    generate_full_payload(tmp_path / "usr.img", tmp_path / "out.bin", private.read_bytes())
    target = tmp_path / "disk.img"
    target.write_bytes(bytes(2 * B))
    data = (tmp_path / "out.bin").read_bytes()
    sink = PayloadSink(
        WriteTarget(target, 0, 2 * B),
        public_key_pem=public.read_bytes(),
        expected_size=len(data),
        expected_sha256_b64=None,
    )
    sink.write(data)
    assert sink.close().signature_verified
    assert target.read_bytes() == (tmp_path / "usr.img").read_bytes()
    with pytest.raises(PayloadError, match="already exists"):
        make_key_pair(private, tmp_path / "other.pub.pem")
    assert not (tmp_path / "other.pub.pem").exists()
