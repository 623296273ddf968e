"""The ``update-payload`` command line."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sim.payload import key_pair
from update_engine.payload.cli import main
from update_engine.payload.format import MAX_OPERATIONS, parse_header, parse_manifest

B = 4096
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    private.write_bytes(key_pair().private_pem)
    public.write_bytes(key_pair().public_pem)
    return private, public


@pytest.fixture
def payload(tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    (tmp_path / "usr.img").write_bytes(os.urandom(300 * B) + bytes(100 * B))
    (tmp_path / "vmlinuz").write_bytes(os.urandom(7000))
    out = tmp_path / "payload.bin"
    code = main(
        ["generate", "--image", str(tmp_path / "usr.img"), "--kernel", str(tmp_path / "vmlinuz"),
         "--private-key", str(keys[0]), "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    return out


def test_generate_prints_size_and_sha256(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "usr.img").write_bytes(os.urandom(4 * B))
    out = tmp_path / "p.bin"
    assert (
        main(
            ["generate", "--image", str(tmp_path / "usr.img"), "--private-key", str(keys[0]), "-o", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"size: {out.stat().st_size}" in printed
    assert f"sha256: {base64.b64encode(hashlib.sha256(out.read_bytes()).digest()).decode()}" in printed


def test_verify_good_payload(
    payload: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(payload), "--public-key", str(keys[1])]) == 0
    assert capsys.readouterr().out.strip() == "verified"
    assert main(["verify", str(payload), "--public-key", str(keys[1]), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["verified"] is True and facts["size"] == payload.stat().st_size
    assert facts["partition"]["size"] == 400 * B


def test_verify_with_the_wrong_key_fails_with_the_code_name(
    payload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pub.pem"
    other.write_bytes(key_pair("other").public_pem)
    assert main(["verify", str(payload), "--public-key", str(other)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR" in captured.err and "error 18" in captured.err


def test_verify_tampered_payload(
    payload: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 1
    payload.write_bytes(bytes(data))
    assert main(["verify", str(payload), "--public-key", str(keys[1])]) == 1
    assert "DOWNLOAD_OPERATION_HASH_MISMATCH" in capsys.readouterr().err


def test_verify_missing_files(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(tmp_path / "absent.bin"), "--public-key", str(keys[1])]) == 1
    assert "absent.bin" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "absent.bin"), "--public-key", str(tmp_path / "nokey")]) == 1
    assert "public key" in capsys.readouterr().err


def test_show_text(payload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(payload)]) == 0
    out = capsys.readouterr().out
    assert "version: 1" in out
    assert "block size: 4096" in out
    assert "REPLACE=" in out and "REPLACE_BZ=1" in out
    assert f"partition: {400 * B} bytes" in out
    assert "kernel: 7000 bytes" in out
    assert "signatures: version 2 (256 bytes)" in out
    assert f"size: {payload.stat().st_size}" in out


def test_show_json(payload: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(payload), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["version"] == 1 and facts["block_size"] == 4096
    assert facts["operations"]["REPLACE_BZ"] == 1
    assert facts["signatures"] == [{"version": 2, "length": 256}]
    assert facts["procedures"][0]["type"] == "KERNEL" and facts["procedures"][0]["size"] == 7000
    assert facts["size"] == payload.stat().st_size
    assert facts["manifest_size"] > 0 and len(facts["sha256"]) == 44


def test_show_refuses_a_non_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_bytes(b"hello world, not a payload")
    assert main(["show", str(tmp_path / "x")]) == 1
    assert "DOWNLOAD_INVALID_METADATA_MAGIC" in capsys.readouterr().err


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    assert main(["keygen", "--private-key", str(private), "--public-key", str(public)]) == 0
    assert private.stat().st_mode & 0o777 == 0o600 and public.exists()
    capsys.readouterr()
    assert main(["keygen", "--private-key", str(private), "--public-key", str(tmp_path / "k2.pub")]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "error 1" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["verify"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_installed_script(payload: Path, keys: tuple[Path, Path]) -> None:
    script = Path(sys.executable).parent / "update-payload"
    if not script.exists():
        found = shutil.which("update-payload")
        assert found is not None, "the update-payload console script is not installed"
        script = Path(found)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [str(script), "verify", str(payload), "--public-key", str(keys[1])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout.strip()) == (0, "verified"), run.stderr
    run = subprocess.run(
        [str(script), "show", str(payload), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0 and json.loads(run.stdout)["version"] == 1


def _generate(tmp_path: Path, keys: tuple[Path, Path], *extra: str) -> int:
    return main(["generate", "--image", str(tmp_path / "usr.img"), "--private-key", str(keys[0]),
                 "-o", str(tmp_path / "out.bin"), *extra])


def test_the_operation_size_is_a_choice(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "usr.img").write_bytes(os.urandom(40 * B))
    assert _generate(tmp_path, keys, "--op-size", "16K") == 0
    data = (tmp_path / "out.bin").read_bytes()
    header = parse_header(data[:20])
    ops = parse_manifest(data[20 : header.metadata_size]).partition_operations
    assert [sum(e.num_blocks for e in op.dst_extents) for op in ops] == [4] * 10
    capsys.readouterr()
    for size, words in (("5000", "multiple of block size 4096"), ("16M", "more than update clients accept"),
                        ("1.5M", "not a size")):
        assert _generate(tmp_path, keys, "--op-size", size) != 0
        assert words in capsys.readouterr().err


def test_too_many_operations_for_the_clients_is_refused(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with open(tmp_path / "usr.img", "wb") as image:
        image.truncate((MAX_OPERATIONS + 1) * B)  # sparse
    assert _generate(tmp_path, keys, "--op-size", "4K") == 1
    assert "choose a larger operation size" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists()


def _generate_with_stderr_on(tmp_path: Path, keys: tuple[Path, Path], stderr: int) -> None:
    script = Path(sys.executable).parent / "update-payload"
    subprocess.run(
        [str(script), "generate", "--image", str(tmp_path / "usr.img"), "--private-key", str(keys[0]),
         "-o", str(tmp_path / "out.bin"), "--op-size", "64K"],
        stdout=subprocess.DEVNULL, stderr=stderr, timeout=120, check=True,
    )


def test_progress_is_shown_on_a_terminal_only(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "usr.img").write_bytes(os.urandom(64 * B) + bytes(64 * B))
    leader, follower = pty.openpty()
    try:
        _generate_with_stderr_on(tmp_path, keys, follower)
        os.close(follower)
        shown = b""
        while True:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and everything was read
                break
            if not piece:
                break
            shown += piece
    finally:
        os.close(leader)
    assert b"\rgenerating: 0.5/0.5 MiB (100 %)" in shown and b"(50 %)" in shown and shown.endswith(b"\r\n")
    with open(tmp_path / "stderr.txt", "wb") as file:
        _generate_with_stderr_on(tmp_path, keys, file.fileno())
    assert (tmp_path / "stderr.txt").read_bytes() == b""


def test_a_reader_that_went_away_gets_no_traceback(payload: Path) -> None:
    """``update-payload show PAYLOAD | head -0``: exit 141, as a shell reports SIGPIPE, and nothing on stderr."""
    script = Path(sys.executable).parent / "update-payload"
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "wb") as closed_pipe:
        run = subprocess.run([str(script), "show", str(payload)], stdout=closed_pipe, stderr=subprocess.PIPE,
                             timeout=60, check=False)
    assert (run.returncode, run.stderr) == (141, b"")
