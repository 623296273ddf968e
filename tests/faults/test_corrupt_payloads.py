"""Corrupt payloads: every region of a real signed payload, bit flips, truncations, extensions, the wrong key, no
signature, and Omaha announcing another size or hash. Every one is refused with the code for what is wrong.

Most trials feed ``PayloadSink`` directly (in-process, a few ms each) in two settings:

* **source** — the Omaha answer describes the bytes served (size and SHA-256 agree with the corrupt file), as when
  the payload was damaged or tampered with before it was published: only the payload's own structure, operation
  hashes and signature stand between it and the disk;
* **transit** — the Omaha answer describes the original payload, as when the bytes were damaged on the way.

The expected codes follow the check order of the reference: errors found while streaming (magic 21, manifest
23/28/32/38, operation hash 29) end the attempt at once; then at the end: size 11, SHA-256 10, new partition
info 12, signature blob present 17, signature valid 18. A few corrupt payloads then go through
``update_engine --once`` to show the GPT flags and the running partition stay as they were.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.disks import disk_facts
from sim.node import make_node
from sim.omaha import Offer, OmahaStub
from sim.payload import Keys, Release, sha256_b64
from tests.faults.figures import record
from tests.faults.support import NEW_VERSION, TEST_OMAHA_URL_FLAG, assert_nothing_armed
from update_engine.errors import ErrorCode, describe
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import (
    HEADER_SIZE,
    PayloadError,
    encode_header,
    encode_signatures,
    flatten_operations,
    parse_header,
    parse_manifest,
    parse_signatures,
)
from update_engine.payload.generate import generate_full_payload
from update_engine.payload.sink import PayloadSink
from update_engine.payload.target import WriteTarget

pytestmark = pytest.mark.faults

C = ErrorCode
WRITE_CHUNK = 64 * 1024
OP_BLOB_SAMPLES = 14  # random bytes flipped per operation blob, besides its first and last byte


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    end: int

    @property
    def kind(self) -> str:
        return self.name.split(" ")[0]


def regions_of(data: bytes) -> list[Region]:
    """Header fields, manifest, each operation's blob and the signature blob, in file order, covering the file."""
    header = parse_header(data)
    manifest = parse_manifest(data[HEADER_SIZE : header.metadata_size])
    base = header.metadata_size
    out = [
        Region("magic", 0, 4), Region("version", 4, 12), Region("manifest-size", 12, 20),
        Region("manifest", 20, base),
    ]
    for planned in flatten_operations(manifest):
        start = base + planned.data_offset
        out.append(Region(f"blob {planned.index} ({planned.destination.value})", start, start + planned.data_length))
    start = base + manifest.signatures_offset
    out.append(Region("signature", start, start + manifest.signatures_size))
    assert [r.start for r in out[1:]] == [r.end for r in out[:-1]] and out[-1].end == len(data)
    return out


# Allowed codes per region kind; "source" and "transit" as in the module docstring.
FLIP_CODES: dict[str, dict[str, set[int]]] = {
    "magic": {"source": {C.DOWNLOAD_INVALID_METADATA_MAGIC}, "transit": {C.DOWNLOAD_INVALID_METADATA_MAGIC}},
    "version": {"source": {C.DOWNLOAD_INVALID_METADATA_MAGIC}, "transit": {C.DOWNLOAD_INVALID_METADATA_MAGIC}},
    "manifest-size": {
        # Too large (32), a different manifest (23, 28), or the file ends inside the manifest it announces (12; in
        # transit the whole-file hash is checked first: 10).
        "source": {C.DOWNLOAD_INVALID_METADATA_SIZE, C.DOWNLOAD_MANIFEST_PARSE_ERROR,
                   C.DOWNLOAD_OPERATION_EXECUTION_ERROR, C.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR},
        "transit": {C.DOWNLOAD_INVALID_METADATA_SIZE, C.DOWNLOAD_MANIFEST_PARSE_ERROR,
                    C.DOWNLOAD_OPERATION_EXECUTION_ERROR, C.DOWNLOAD_HASH_MISMATCH},
    },
    "manifest": {
        # Does not decode (23), breaks a rule (28, 38, 32), changes an operation's hash (29), the signature size
        # (11, 17) or drops new_partition_info (12); anything else only the signature (18) or hash (10) can tell.
        "source": {C.DOWNLOAD_MANIFEST_PARSE_ERROR, C.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                   C.DOWNLOAD_OPERATION_HASH_MISSING, C.DOWNLOAD_INVALID_METADATA_SIZE,
                   C.DOWNLOAD_OPERATION_HASH_MISMATCH, C.DOWNLOAD_SIZE_MISMATCH, C.SIGNED_DELTA_PAYLOAD_EXPECTED,
                   C.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR, C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR},
        "transit": {C.DOWNLOAD_MANIFEST_PARSE_ERROR, C.DOWNLOAD_OPERATION_EXECUTION_ERROR,
                    C.DOWNLOAD_OPERATION_HASH_MISSING, C.DOWNLOAD_INVALID_METADATA_SIZE,
                    C.DOWNLOAD_OPERATION_HASH_MISMATCH, C.DOWNLOAD_SIZE_MISMATCH, C.DOWNLOAD_HASH_MISMATCH},
    },
    "blob": {"source": {C.DOWNLOAD_OPERATION_HASH_MISMATCH}, "transit": {C.DOWNLOAD_OPERATION_HASH_MISMATCH}},
    "signature": {"source": {C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR}, "transit": {C.DOWNLOAD_HASH_MISMATCH}},
}


def truncation_codes(region: Region, setting: str) -> set[int]:
    if setting == "transit":
        return {C.DOWNLOAD_SIZE_MISMATCH}
    if region.kind in ("magic", "version", "manifest-size", "manifest"):
        return {C.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR}  # no complete manifest
    return {C.SIGNED_DELTA_PAYLOAD_EXPECTED}  # the signature blob never arrived


@dataclass
class Bench:
    """Runs payload bytes through a PayloadSink onto a scratch partition and says how it ended."""

    workdir: Path
    public_key: bytes
    partition_size: int = 1 << 20

    def __post_init__(self) -> None:
        self.target = self.workdir / "partition.img"
        self.target.write_bytes(bytes(self.partition_size))
        self.kernel = self.workdir / "vmlinuz-b"

    def run(self, data: bytes, *, size: int, sha: str) -> int | None:
        """The error code, or None when the payload was accepted (its kernel is then removed again)."""
        self.kernel.unlink(missing_ok=True)
        sink = PayloadSink(
            WriteTarget(self.target, 0, self.partition_size), public_key_pem=self.public_key, expected_size=size,
            expected_sha256_b64=sha, kernel_path=self.kernel,
        )
        try:
            for pos in range(0, len(data), WRITE_CHUNK):
                sink.write(data[pos : pos + WRITE_CHUNK])
            sink.close()
        except PayloadError as exc:
            sink.abort()
            assert not self.kernel.exists(), "a refused payload installed its kernel"
            return exc.code
        assert self.kernel.exists()
        self.kernel.unlink()
        return None


@dataclass
class Tally:
    """Trials per region and setting, and the codes seen, for the failure message and the figures."""

    trials: int = 0
    refused: int = 0
    wrong: list[str] | None = None
    codes: Counter[int] | None = None

    def add(self, what: str, got: int | None, allowed: set[int]) -> None:
        self.trials += 1
        self.codes = self.codes or Counter()
        self.codes[got if got is not None else 0] += 1
        if got is not None and got in allowed:
            self.refused += 1
        else:
            self.wrong = [*(self.wrong or []), f"{what}: got {got} ({describe(got or 0)}), allowed {sorted(allowed)}"]


def _flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def _flip_positions(region: Region, rng: random.Random) -> Iterator[tuple[int, int]]:
    """Every bit of the header fields, one random bit of every manifest and signature byte, and the first, last
    and some random bytes of each operation blob."""
    if region.kind in ("magic", "version", "manifest-size"):
        for position in range(region.start, region.end):
            for bit in range(8):
                yield position, bit
    elif region.kind in ("manifest", "signature"):
        for position in range(region.start, region.end):
            yield position, rng.randrange(8)
    else:
        picks = {region.start, region.end - 1}
        picks |= {rng.randrange(region.start, region.end) for _ in range(OP_BLOB_SAMPLES)}
        for position in sorted(picks):
            yield position, rng.randrange(8)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Bench:
    return Bench(tmp_path_factory.mktemp("bench"), keys.public.read_bytes())


@pytest.mark.parametrize("setting", ["source", "transit"])
def test_bit_flips_in_every_region_are_refused(setting: str, bench: Bench, small_release: Release) -> None:
    data = small_release.data
    assert bench.run(data, size=len(data), sha=small_release.sha256_b64) is None  # the intact payload applies
    _assert_realistic(data)
    rng = random.Random(f"flips-{setting}")
    tallies: dict[str, Tally] = {}
    for region in regions_of(data):
        allowed = {int(c) for c in FLIP_CODES[region.kind][setting]}
        tally = tallies.setdefault(region.kind, Tally())
        for position, bit in _flip_positions(region, rng):
            bad = _flip(data, position, bit)
            if setting == "source":
                got = bench.run(bad, size=len(bad), sha=sha256_b64(bad))
            else:
                got = bench.run(bad, size=len(data), sha=small_release.sha256_b64)
            tally.add(f"{region.name} byte {position} bit {bit}", got, allowed)
    _report(f"bit flips ({setting})", tallies)


@pytest.mark.parametrize("setting", ["source", "transit"])
def test_truncations_in_every_region_are_refused(setting: str, bench: Bench, small_release: Release) -> None:
    data = small_release.data
    rng = random.Random(f"cuts-{setting}")
    tallies: dict[str, Tally] = {}
    for region in regions_of(data):
        cuts = {region.start, region.start + 1, region.end - 1} | {
            rng.randrange(region.start, region.end) for _ in range(4)
        }
        tally = tallies.setdefault(region.kind, Tally())
        for cut in sorted(c for c in cuts if c > 0):
            short = data[:cut]
            if setting == "source":
                got = bench.run(short, size=len(short), sha=sha256_b64(short))
            else:
                got = bench.run(short, size=len(data), sha=small_release.sha256_b64)
            tally.add(f"cut at {cut} (in {region.name})", got, truncation_codes(region, setting))
    _report(f"truncations ({setting})", tallies)


@pytest.mark.parametrize("setting", ["source", "transit"])
def test_extensions_are_refused(setting: str, bench: Bench, small_release: Release) -> None:
    data = small_release.data
    signature = regions_of(data)[-1]
    tails = {
        "one zero byte": b"\0", "one KiB": bytes(range(256)) * 4, "a second signature blob":
        data[signature.start :], "a second payload": data,
    }
    tally = Tally()
    for name, tail in tails.items():
        long = data + tail
        if setting == "source":
            got = bench.run(long, size=len(long), sha=sha256_b64(long))
        else:
            got = bench.run(long, size=len(data), sha=small_release.sha256_b64)
        tally.add(f"extended by {name}", got, {int(C.DOWNLOAD_SIZE_MISMATCH)})
    _report(f"extensions ({setting})", {"trailing": tally})


def unsigned(data: bytes) -> bytes:
    """The same payload without signature: no signature fields, no signature pseudo-operation, no blob."""
    header = parse_header(data)
    manifest = parse_manifest(data[HEADER_SIZE : header.metadata_size])
    blobs = data[header.metadata_size : header.metadata_size + manifest.signatures_offset]
    manifest.ClearField("signatures_offset")
    manifest.ClearField("signatures_size")
    manifest.ClearField("noop_operations")
    body = manifest.SerializeToString()
    return encode_header(len(body)) + body + blobs


def signature_version_1(data: bytes) -> bytes:
    """The same signature bytes labelled version 1 (this client checks only version 2)."""
    signature = regions_of(data)[-1]
    entries = parse_signatures(data[signature.start :])
    relabelled = encode_signatures([(1, sig) for _, sig in entries])
    assert len(relabelled) == signature.end - signature.start
    return data[: signature.start] + relabelled


def two_signatures_first_forged(data: bytes) -> bytes:
    """A forged version-2 signature in front of the real one: only the first version-2 entry counts."""
    region = regions_of(data)[-1]
    entries = parse_signatures(data[region.start :])
    forged = bytes(len(entries[0][1]))
    blob = encode_signatures([(2, forged), *entries])
    header = parse_header(data)
    manifest = parse_manifest(data[HEADER_SIZE : header.metadata_size])
    manifest.signatures_size = len(blob)
    manifest.noop_operations[0].data_length = len(blob)
    body = manifest.SerializeToString()
    blobs = data[header.metadata_size : header.metadata_size + manifest.signatures_offset]
    return encode_header(len(body)) + body + blobs + blob


@pytest.fixture(scope="module")
def foreign_payload(tmp_path_factory: pytest.TempPathFactory, small_release: Release, other_keys: Keys) -> bytes:
    """The same image and kernel, signed by a key the node does not trust."""
    out = tmp_path_factory.mktemp("foreign") / "update.gz"
    generate_full_payload(
        small_release.image, out, other_keys.private.read_bytes(), kernel=small_release.kernel, chunk_size=64 * 1024
    )
    return out.read_bytes()


WHOLE_FILE_CASES: list[tuple[str, Callable[[bytes, bytes], tuple[bytes, int, str | None]], int]] = [
    ("signed by another key", lambda d, f: (f, len(f), None), C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR),
    ("unsigned", lambda d, f: (unsigned(d), len(unsigned(d)), None), C.SIGNED_DELTA_PAYLOAD_EXPECTED),
    ("signature labelled version 1", lambda d, f: (signature_version_1(d), len(d), None),
     C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR),
    ("forged signature before the real one", lambda d, f: (two_signatures_first_forged(d), -1, None),
     C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR),
    ("Omaha size one byte more", lambda d, f: (d, len(d) + 1, "same"), C.DOWNLOAD_SIZE_MISMATCH),
    ("Omaha size one byte less", lambda d, f: (d, len(d) - 1, "same"), C.DOWNLOAD_SIZE_MISMATCH),
    ("Omaha size doubled", lambda d, f: (d, 2 * len(d), "same"), C.DOWNLOAD_SIZE_MISMATCH),
    ("Omaha SHA-256 of another file", lambda d, f: (d, len(d), sha256_b64(f)), C.DOWNLOAD_HASH_MISMATCH),
    ("Omaha SHA-256 of an empty file", lambda d, f: (d, len(d), sha256_b64(b"")), C.DOWNLOAD_HASH_MISMATCH),
]


@pytest.mark.parametrize(("name", "make", "code"), WHOLE_FILE_CASES, ids=[c[0] for c in WHOLE_FILE_CASES])
def test_whole_payload_faults_are_refused(
    name: str, make: Callable[[bytes, bytes], tuple[bytes, int, str | None]], code: int, bench: Bench,
    small_release: Release, foreign_payload: bytes,
) -> None:
    data, size, sha = make(small_release.data, foreign_payload)
    size = len(data) if size < 0 else size
    announced = sha256_b64(data) if sha is None else small_release.sha256_b64 if sha == "same" else sha
    got = bench.run(data, size=size, sha=announced)
    tally = Tally()
    tally.add(name, got, {int(code)})
    _report("whole-payload faults", {name: tally})


def _assert_realistic(data: bytes) -> None:
    """The matrix runs over a generated payload with bzip2 and raw operations, a kernel and a signature."""
    kinds = Counter(r.kind for r in regions_of(data))
    assert kinds["blob"] >= 5 and kinds["signature"] == 1 and kinds["manifest"] == 1
    header = parse_header(data)
    manifest = parse_manifest(data[HEADER_SIZE : header.metadata_size])
    assert {op.type for op in manifest.partition_operations} == {
        pb.InstallOperation.REPLACE, pb.InstallOperation.REPLACE_BZ
    }
    assert [p.type for p in manifest.procedures] == [pb.InstallProcedure.KERNEL]


def _report(what: str, tallies: dict[str, Tally]) -> None:
    trials = sum(t.trials for t in tallies.values())
    refused = sum(t.refused for t in tallies.values())
    record("corrupt payload (PayloadSink)", trials=trials, refused=refused, survived=refused)
    wrong = [line for t in tallies.values() for line in t.wrong or []]
    seen = {kind: dict(t.codes or {}) for kind, t in tallies.items()}
    assert not wrong, f"{what}: {len(wrong)} of {trials} not refused as expected: {wrong[:10]}; codes {seen}"


# --- end to end: update_engine --once, flags untouched ---------------------------------------------------------


E2E_CASES: list[tuple[str, Callable[[bytes, bytes], tuple[bytes, Offer | None]], int]] = [
    ("magic flipped", lambda d, f: (_flip(d, 1, 3), None), C.DOWNLOAD_INVALID_METADATA_MAGIC),
    ("manifest byte flipped", lambda d, f: (_flip(d, 40, 0), None), -1),
    ("operation blob flipped", lambda d, f: (_flip(d, len(d) // 2, 5), None), C.DOWNLOAD_OPERATION_HASH_MISMATCH),
    ("signature flipped", lambda d, f: (_flip(d, len(d) - 7, 2), None), C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR),
    ("truncated in the last operation", lambda d, f: (d[: len(d) - 400], None), C.SIGNED_DELTA_PAYLOAD_EXPECTED),
    ("extended", lambda d, f: (d + b"\0" * 10, None), C.DOWNLOAD_SIZE_MISMATCH),
    ("signed by another key", lambda d, f: (f, None), C.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR),
    ("unsigned", lambda d, f: (unsigned(d), None), C.SIGNED_DELTA_PAYLOAD_EXPECTED),
    ("Omaha SHA-256 disagrees", lambda d, f: (d, Offer(NEW_VERSION, len(d), sha256_b64(f))), C.DOWNLOAD_HASH_MISMATCH),
]


@pytest.mark.parametrize(("name", "make", "code"), E2E_CASES, ids=[c[0] for c in E2E_CASES])
async def test_update_engine_refuses_corrupt_payload_end_to_end(
    name: str, make: Callable[[bytes, bytes], tuple[bytes, Offer | None]], code: int, tmp_path: Path, keys: Keys,
    small_release: Release, foreign_payload: bytes,
) -> None:
    served, offer = make(small_release.data, foreign_payload)
    stub = await OmahaStub(payload=served).start()
    try:
        stub.offer = offer or Offer(NEW_VERSION, len(served), sha256_b64(served))
        node = make_node(tmp_path, stub.url)
        before = disk_facts(node.disk)
        proc = await asyncio.create_subprocess_exec(
            *node.once_args(keys), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        result = subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())
        failures = [e for e in stub.events if e[:2] == (3, 0)]
        got = (failures[-1][2] or 0) & ~TEST_OMAHA_URL_FLAG if failures else None
        record("corrupt payload (update_engine --once)", trials=1, refused=int(result.returncode != 0),
               survived=int(disk_facts(node.disk).usr_a_flags == before.usr_a_flags))
        assert result.returncode == 1, result.stdout + result.stderr
        if code >= 0:
            assert got == code and f"error {code} {describe(code)}" in result.stderr, result.stderr
        else:
            assert got in FLIP_CODES["manifest"]["source"], result.stderr
        assert_nothing_armed(node, before)
        assert node.root.prefs("previous-version") in (None, "")
    finally:
        await stub.stop()

