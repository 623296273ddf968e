"""Payload files at rest: verifying one without applying it (the signature before anything is written) and the
checks an update server runs on payloads it stores."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from sim.payload import MOVE, REPLACE, Op, build_payload, key_pair
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload import verify
from update_engine.payload.executor import Executor
from update_engine.payload.files import check_payload_file, payload_digests, verify_payload_file
from update_engine.payload.format import PayloadError
from update_engine.payload.generate import generate_full_payload
from update_engine.payload.target import BoundedFile

B = 4096


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, Path]:
    work = tmp_path_factory.mktemp("generated")
    image = os.urandom(B * 40) + b"text " * 40000 + bytes(B * 3 - (200000 % B))
    image = image[: len(image) // B * B]
    (work / "usr.img").write_bytes(image)
    (work / "vmlinuz").write_bytes(os.urandom(9000))
    generate_full_payload(
        work / "usr.img", work / "payload.bin", key_pair().private_pem, kernel=work / "vmlinuz", chunk_size=16 * B
    )
    return image, (work / "vmlinuz").read_bytes(), work / "payload.bin"


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    return path


def test_verify_payload_file(generated: tuple[bytes, bytes, Path]) -> None:
    image, _, path = generated
    result = verify_payload_file(path, key_pair().public_pem)
    assert result.partition_sha256 == hashlib.sha256(image).digest() and result.partition_size == len(image)
    assert result.signature_verified and not result.kernel_written
    assert result.sha256_b64 == payload_digests(path).sha256_b64 and result.size == path.stat().st_size


def test_verify_payload_file_runs_non_sequential_operations_in_scratch(tmp_path: Path) -> None:
    first = os.urandom(B)
    built = build_payload(
        [Op(REPLACE, [(1, 1)], first), Op(MOVE, [(0, 1)], src=[(1, 1)])], new_partition=first + first, key=key_pair()
    )
    assert verify_payload_file(_write(tmp_path, built.data), key_pair().public_pem).partition_sha256 == (
        hashlib.sha256(first * 2).digest()
    )
    bad = build_payload(
        [Op(REPLACE, [(1, 1)], first), Op(MOVE, [(0, 1)], src=[(1, 1)])], new_partition=bytes(2 * B), key=key_pair()
    )
    with pytest.raises(PayloadError) as exc:
        verify_payload_file(_write(tmp_path, bad.data), key_pair().public_pem)
    assert exc.value.code == ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR


def test_the_signature_is_checked_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload signed by another key is refused before a scratch file exists or an operation runs."""
    first = os.urandom(B)
    built = build_payload(
        [Op(REPLACE, [(1, 1)], first), Op(MOVE, [(0, 1)], src=[(1, 1)])], new_partition=first + first, key=key_pair()
    )
    touched: list[str] = []
    real_scratch, real_execute = BoundedFile.scratch, Executor.execute

    def scratch(size: int) -> BoundedFile:
        touched.append("scratch")
        return real_scratch(size)

    def execute(self: Executor, *args: Any, **kwargs: Any) -> None:
        touched.append("execute")
        real_execute(self, *args, **kwargs)

    monkeypatch.setattr(BoundedFile, "scratch", scratch)
    monkeypatch.setattr(Executor, "execute", execute)
    with pytest.raises(PayloadError) as exc:
        verify_payload_file(_write(tmp_path, built.data), key_pair("other").public_pem)
    assert exc.value.code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR
    assert touched == []
    verify_payload_file(_write(tmp_path, built.data), key_pair().public_pem)
    assert "scratch" in touched and "execute" in touched


def test_no_key_no_verification(generated: tuple[bytes, bytes, Path]) -> None:
    with pytest.raises(PayloadError) as exc:
        verify_payload_file(generated[2], None)
    assert exc.value.code == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR


def test_the_kernel_hash_is_checked_too(tmp_path: Path) -> None:
    kernel = os.urandom(5000)

    def lie(manifest: pb.DeltaArchiveManifest) -> None:
        manifest.procedures[0].new_info.hash = hashlib.sha256(b"another kernel").digest()

    built = build_payload(
        [Op(REPLACE, [(0, 1)], bytes(B))], new_partition=bytes(B), kernel=kernel,
        kernel_ops=[Op(REPLACE, [(0, 2)], kernel)], key=key_pair(), edit_manifest=lie,
    )
    with pytest.raises(PayloadError) as exc:
        verify_payload_file(_write(tmp_path, built.data), key_pair().public_pem)
    assert exc.value.code == ErrorCode.NEW_KERNEL_VERIFICATION_ERROR


def test_a_file_that_changes_between_the_passes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, generated: tuple[bytes, bytes, Path]
) -> None:
    """The signature covers the first pass's manifest; the second pass may not run another one."""
    path = _write(tmp_path, generated[2].read_bytes())
    other = build_payload([Op(REPLACE, [(0, 1)], os.urandom(B))], new_partition=None, key=key_pair())
    real = verify.check_stream

    def swap_after_checking(*args: object, **kwargs: object) -> pb.InstallInfo:
        info = real(*args, **kwargs)  # type: ignore[arg-type]
        path.write_bytes(other.data)
        return info

    monkeypatch.setattr(verify, "check_stream", swap_after_checking)
    with pytest.raises(PayloadError, match="changed while being verified"):
        verify_payload_file(path, key_pair().public_pem)


def test_an_update_server_without_a_key_checks_everything_but_the_signature(tmp_path: Path) -> None:
    image = os.urandom(2 * B)
    unsigned = build_payload([Op(REPLACE, [(0, 2)], image)], new_partition=image)
    result = check_payload_file(_write(tmp_path, unsigned.data))
    assert not result.signature_verified and result.partition_sha256 == hashlib.sha256(image).digest()
    lying = build_payload([Op(REPLACE, [(0, 2)], image)], new_partition=bytes(2 * B))
    with pytest.raises(PayloadError) as exc:
        check_payload_file(_write(tmp_path, lying.data))
    assert exc.value.code == ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR
    with pytest.raises(PayloadError) as exc:
        check_payload_file(_write(tmp_path, unsigned.data[:-1]))
    assert exc.value.code in (ErrorCode.DOWNLOAD_SIZE_MISMATCH, ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR)
