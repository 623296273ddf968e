"""``update-payload``: generate, verify, describe payloads and make signing keys.

Exit status: 0 on success, 1 on any error (the message, and for payload errors the Omaha code and its name, go
to stderr), 2 on a usage error, 141 when the reader of its output went away.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from coreos_common import logs
from coreos_common.cli import EXIT_BROKEN_PIPE, discard_stdout
from update_engine.errors import ErrorCode, UpdateEngineError
from update_engine.payload.files import verify_payload_file
from update_engine.payload.format import (
    HEADER_SIZE,
    MAX_SIGNATURES_SIZE,
    ManifestSummary,
    PayloadError,
    parse_header,
    parse_manifest,
    parse_signatures,
    summarize_manifest,
)
from update_engine.payload.generate import CHUNK_SIZE, generate_full_payload, make_key_pair
from update_engine.payload.verify import VerifiedPayload

PROG = "update-payload"
_READ_CHUNK = 1024 * 1024


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _CliError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


class _CliError(Exception):
    """A plain error for the user (bad file, missing key), without an Omaha code."""


def _b64(digest: bytes | None) -> str | None:
    return base64.b64encode(digest).decode("ascii") if digest is not None else None


def _hex(digest: bytes | None) -> str | None:
    return digest.hex() if digest is not None else None


def _summary_json(summary: ManifestSummary) -> dict[str, Any]:
    return {
        "block_size": summary.block_size,
        "operations": dict(summary.operation_counts),
        "partition_operations": summary.partition_operations,
        "noop_operations": summary.noop_operations,
        "partition": {"size": summary.new_partition_size, "sha256": _hex(summary.new_partition_sha256)},
        "procedures": [
            {"type": p.type, "operations": p.operations, "size": p.new_size, "sha256": _hex(p.new_sha256)}
            for p in summary.procedures
        ],
        "signatures_offset": summary.signatures_offset,
        "signatures_size": summary.signatures_size,
    }


def _summary_lines(summary: ManifestSummary) -> list[str]:
    counts = " ".join(f"{name}={count}" for name, count in sorted(summary.operation_counts.items())) or "none"
    lines = [
        f"block size: {summary.block_size}",
        f"operations: {counts} (partition {summary.partition_operations}, noop {summary.noop_operations})",
    ]
    if summary.new_partition_size is not None:
        lines.append(
            f"partition: {summary.new_partition_size} bytes, sha256 {_hex(summary.new_partition_sha256)}"
        )
    else:
        lines.append("partition: no new_partition_info")
    kernel = summary.kernel
    if kernel is not None:
        lines.append(
            f"kernel: {kernel.new_size} bytes, sha256 {_hex(kernel.new_sha256)}, operations: {kernel.operations}"
        )
    else:
        lines.append("kernel: none")
    for proc in summary.procedures:
        if proc.type != "KERNEL":
            lines.append(f"procedure {proc.type or 'untyped'}: operations: {proc.operations}")
    return lines


class _ProgressLine:
    """"generating: 300.0/1024.0 MiB (29 %)" rewritten in place on a terminal, once per percent."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._shown = -1

    def __call__(self, done: int, total: int) -> None:
        percent = done * 100 // max(total, 1)
        if percent == self._shown:
            return
        self._shown = percent
        self._stream.write(f"\rgenerating: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({percent} %)")
        self._stream.flush()

    def end(self) -> None:
        if self._shown >= 0:
            self._stream.write("\n")
            self._stream.flush()


def _size(text: str) -> int:
    """A byte count: a number, optionally followed by K or M (KiB, MiB)."""
    match = re.fullmatch(r"(\d+)\s*(?:([KkMm])(?:i?[Bb])?)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or a number with K or M)")
    return int(match[1]) << {None: 0, "k": 10, "m": 20}[match[2] and match[2].lower()]


def _cmd_generate(args: argparse.Namespace) -> int:
    key = _read_key(args.private_key, "private key")
    progress = _ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    try:
        result = generate_full_payload(
            args.image, args.output, key, kernel=args.kernel, chunk_size=args.op_size, on_progress=progress
        )
    finally:
        if progress is not None:
            progress.end()
    if args.json:
        print(json.dumps({"path": str(result.path), "size": result.size, "sha256": result.sha256_b64}))
    else:
        print(f"payload: {result.path}")
        print(f"size: {result.size}")
        print(f"sha256: {result.sha256_b64}")
    return 0


def _verified_json(result: VerifiedPayload) -> dict[str, Any]:
    return {
        "verified": True,
        "size": result.size,
        "sha256": result.sha256_b64,
        "partition": {"size": result.partition_size, "sha256": result.partition_sha256.hex()},
        "manifest": _summary_json(result.manifest),
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    key = _read_key(args.public_key, "public key")
    try:
        result = verify_payload_file(args.payload, key)
    except OSError as exc:
        raise _CliError(f"cannot read {args.payload}: {exc.strerror or exc}") from exc
    if args.json:
        print(json.dumps(_verified_json(result)))
    else:
        print("verified")
    return 0


def _describe(path: Path) -> dict[str, Any]:
    """Facts about a payload file, read without applying or verifying it."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(HEADER_SIZE)
            header = parse_header(head)
            manifest_bytes = stream.read(header.manifest_size)
            if len(manifest_bytes) != header.manifest_size:
                raise PayloadError(
                    ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR,
                    f"payload ends inside its manifest ({len(manifest_bytes)} of {header.manifest_size} bytes)",
                )
            manifest = parse_manifest(manifest_bytes)
            summary = summarize_manifest(manifest)
            signatures: list[dict[str, Any]] | str | None = None
            if summary.signatures_size is not None and summary.signatures_size > MAX_SIGNATURES_SIZE:
                signatures = f"invalid (the manifest says {summary.signatures_size} bytes)"
            elif summary.signatures_offset is not None and summary.signatures_size is not None:
                stream.seek(header.metadata_size + summary.signatures_offset)
                blob = stream.read(summary.signatures_size)
                if len(blob) != summary.signatures_size:
                    signatures = "missing (payload is truncated)"
                else:
                    try:
                        signatures = [
                            {"version": version, "length": len(data)}
                            for version, data in parse_signatures(blob)
                        ]
                    except PayloadError as exc:
                        signatures = f"undecodable ({exc.message})"
            stream.seek(0)
            digest = hashlib.sha256()
            size = 0
            while chunk := stream.read(_READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise _CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return {
        "version": header.version,
        "manifest_size": header.manifest_size,
        "summary": summary,
        "signatures": signatures,
        "size": size,
        "sha256": base64.b64encode(digest.digest()).decode("ascii"),
    }


def _cmd_show(args: argparse.Namespace) -> int:
    facts = _describe(args.payload)
    summary: ManifestSummary = facts["summary"]
    if args.json:
        out = {key: value for key, value in facts.items() if key != "summary"}
        out.update(_summary_json(summary))
        print(json.dumps(out, indent=2))
        return 0
    signatures = facts["signatures"]
    if signatures is None:
        sig_text = "none"
    elif isinstance(signatures, str):
        sig_text = signatures
    else:
        sig_text = ", ".join(f"version {s['version']} ({s['length']} bytes)" for s in signatures) or "empty"
    lines = [
        f"version: {facts['version']}",
        f"manifest size: {facts['manifest_size']}",
        *_summary_lines(summary),
        f"signatures: {sig_text}",
        f"size: {facts['size']}",
        f"sha256: {facts['sha256']}",
    ]
    print("\n".join(lines))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    make_key_pair(args.private_key, args.public_key)
    print(f"private key: {args.private_key}")
    print(f"public key: {args.public_key}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Generate, verify and describe CrAU update payloads."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="build and sign a full payload from a /usr image")
    gen.add_argument(
        "--image", type=Path, required=True, help="the /usr partition image (whole 4 KiB blocks)"
    )
    gen.add_argument("--kernel", type=Path, help="a kernel image to ship with the update")
    gen.add_argument("--private-key", type=Path, required=True, help="RSA private key, PEM")
    gen.add_argument("-o", "--output", type=Path, required=True, help="where to write the payload")
    gen.add_argument(
        "--op-size", type=_size, default=CHUNK_SIZE, metavar="SIZE",
        help="bytes of image per operation, a multiple of 4096 (default 1M, as Flatcar's generator; up to 8M)",
    )
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.set_defaults(handler=_cmd_generate)

    ver = sub.add_parser("verify", help="check a payload's structure, hashes and signature")
    ver.add_argument("payload", type=Path)
    ver.add_argument("--public-key", type=Path, required=True, help="RSA public key, PEM")
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    ver.set_defaults(handler=_cmd_verify)

    show = sub.add_parser("show", help="describe a payload without verifying it")
    show.add_argument("payload", type=Path)
    show.add_argument("--json", action="store_true", help="print the description as JSON")
    show.set_defaults(handler=_cmd_show)

    keygen = sub.add_parser("keygen", help="create an RSA-2048 signing key pair")
    keygen.add_argument("--private-key", type=Path, required=True, help="private key to create (mode 0600)")
    keygen.add_argument("--public-key", type=Path, required=True, help="public key to create")
    keygen.set_defaults(handler=_cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help, 2 on a usage error
        return exc.code if isinstance(exc.code, int) else 2
    logs.setup(PROG, verbose=args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        discard_stdout()
        return EXIT_BROKEN_PIPE
    except UpdateEngineError as exc:
        # Payload problems carry an Omaha code worth showing; tool errors (code ERROR) are just a message.
        text = exc.message if exc.code == ErrorCode.ERROR else str(exc)
        print(f"{PROG}: {text}", file=sys.stderr)
        return 1
    except _CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
