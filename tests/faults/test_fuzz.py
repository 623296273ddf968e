"""Fuzzing the parsers that read untrusted or hand-edited input: Omaha responses and requests, payloads, GPT
tables, update.conf and reboot windows.

Property: whatever the input, the code either succeeds with a value that keeps the module's guarantees or raises
the module's own error type (OmahaError, PayloadError, GptError, WindowError; the config parser reports problems
instead of raising); nothing else escapes, and no example hangs (a watchdog alarm fails an example that runs for
more than ``HANG_SECONDS``). Inputs start from real artifacts (a generated payload, an sgdisk image, a dev server
answer) and are mutated, so hypothesis gets past the first sanity checks into the deeper rules.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import hashlib
import signal
import struct
import types
import uuid
import zlib
import zoneinfo
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from coreos_common import goduration, identity, updateconf, window
from sim.disks import USR_B_INDEX, make_usr_disk
from sim.payload import Keys, Release, build_release
from tests.faults.figures import record
from tests.faults.support import KIB, MemoryDisk
from update_engine import config, gpt, omaha
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload import verify
from update_engine.payload.executor import Executor
from update_engine.payload.format import (
    ManifestParsed,
    OperationData,
    PayloadError,
    PayloadStreamParser,
    encode_header,
    parse_header,
    parse_manifest,
)
from update_engine.payload.sink import PayloadSink
from update_engine.payload.target import KernelFile, WriteTarget

pytestmark = pytest.mark.faults

HANG_SECONDS = 10
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Hang(Exception):
    """An example ran longer than HANG_SECONDS."""


@contextlib.contextmanager
def no_hang() -> Iterator[None]:
    def alarm(signum: int, frame: types.FrameType | None) -> None:
        raise Hang(f"no result after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Count:
    """Examples run per fuzz target, for the figures table."""

    examples: ClassVar[dict[str, int]] = {}

    @classmethod
    def one(cls, target: str) -> None:
        cls.examples[target] = cls.examples.get(target, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    total = sum(Count.examples.values())
    record("fuzzing (hypothesis)", trials=total, survived=total,
           note=", ".join(f"{name} {n}" for name, n in sorted(Count.examples.items())))


# --- mutations -------------------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, original: bytes, max_edits: int = 6) -> bytes:
    """``original`` with a few flips, insertions, deletions, duplications or a truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "truncate"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("<"), ord("&"), ord('"')]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "duplicate":
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[pos:pos] = data[pos:end]
        else:
            del data[pos:]
    return bytes(data)


# --- Omaha -----------------------------------------------------------------------------------------------------

OFFER_ANSWER = omaha.build_response([
    omaha.AppResponse(
        app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", ping=True, events=1,
        updatecheck=omaha.PayloadOffer(
            version="2.0.0", codebases=("http://127.0.0.1:8000/packages/", "https://mirror.example/p/"),
            package_name="update.gz", size=123456, sha256_b64=base64.b64encode(bytes(32)).decode(),
            sha1_b64=base64.b64encode(bytes(20)).decode(), disable_payload_backoff=True,
        ),
    )
])
NOUPDATE_ANSWER = omaha.build_response([
    omaha.AppResponse(app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", updatecheck=omaha.NOUPDATE, poll_interval=60)
])
REQUEST = omaha.build_update_check(
    omaha.OmahaRequestParams(
        version="1.0.0", app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", track="stable",
        boot_id=str(uuid.UUID(int=1)), machine_id="0" * 32, board="amd64-usr", arch="x86_64",
    ),
    previous_version="0.9.0", rollback_detected=False,
)


def _check_response(body: bytes) -> None:
    with no_hang():
        try:
            parsed = omaha.parse_response(body)
        except omaha.OmahaError as exc:
            assert exc.code in (30, 31, 34) and exc.message
            event(f"refused with {exc.code}")
            return
    event(type(parsed).__name__)
    if isinstance(parsed, omaha.UpdateOffer):
        # What the parser promises the downloader: real http(s) URLs with a host, a size, a 32-byte hash.
        assert parsed.urls and parsed.size > 0 and parsed.version
        assert all(u.split("://", 1)[0] in ("http", "https") for u in parsed.urls)
        assert len(base64.b64decode(parsed.sha256_b64, validate=True)) == 32


@FUZZ
@given(st.one_of(mutated(OFFER_ANSWER, max_edits=2), mutated(NOUPDATE_ANSWER, max_edits=2)))
def test_omaha_response_parser_on_mutated_answers(body: bytes) -> None:
    Count.one("Omaha response (mutated)")
    _check_response(body)


attribute_value = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "18446744073709551616", "1e9", " 12", "http://", "file:///etc/passwd",
                     "https://[::1", "http://h/\x00", "ok", "noupdate", "AAAA", "=" * 44, "\ufffe", "//x/",
                     "http://a b/", "https://h:99999/", "2.0.0\n"]),
)
VALID_ATTRIBUTES = {
    "status": "ok", "codebase": "http://127.0.0.1:8000/packages/", "version": "2.0.0", "name": "update.gz",
    "size": "123456", "sha": base64.b64encode(bytes(32)).decode(),
}


@FUZZ
@given(broken=st.lists(st.sampled_from(sorted(VALID_ATTRIBUTES)), max_size=2, unique=True), data=st.data())
def test_omaha_response_parser_on_adversarial_attributes(broken: list[str], data: st.DataObject) -> None:
    """A valid answer with one or two attributes replaced by hostile values."""
    Count.one("Omaha response (attributes)")
    v = dict(VALID_ATTRIBUTES)
    for name in broken:
        v[name] = data.draw(attribute_value, label=name)
    e = omaha.xml_escape
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><response protocol="3.0"><app appid="x" status="ok">'
        f'<updatecheck status="{e(v["status"])}"><urls><url codebase="{e(v["codebase"])}"/></urls>'
        f'<manifest version="{e(v["version"])}"><packages><package name="{e(v["name"])}" size="{e(v["size"])}"/>'
        f'</packages><actions><action event="postinstall" sha256="{e(v["sha"])}"/></actions></manifest>'
        f"</updatecheck></app></response>"
    ).encode("utf-8", "surrogatepass")
    _check_response(body)


@FUZZ
@given(st.one_of(st.binary(max_size=3000), mutated(REQUEST)))
def test_omaha_request_parser_on_hostile_requests(body: bytes) -> None:
    """The dev server parses what any client sends it."""
    Count.one("Omaha request")
    with no_hang():
        try:
            omaha.parse_request(body)
        except omaha.OmahaError as exc:
            assert exc.code in (2, 30, 31)


# --- payloads --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_release(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Release:
    """A small real payload: 16 KiB of image in 4 KiB operations, a kernel, a signature."""
    return build_release(tmp_path_factory.mktemp("fuzz-release"), keys, image_size=16 * KIB, chunk_size=4 * KIB,
                         kernel_size=3000, seed=1)


@FUZZ
@given(data=st.data(), chunk_sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=8))
def test_payload_stream_parser_on_mutated_payloads(
    fuzz_release: Release, data: st.DataObject, chunk_sizes: list[int]
) -> None:
    """Mutated real payloads, cut into chunks of any size."""
    Count.one("payload stream parser")
    payload = data.draw(mutated(fuzz_release.data, max_edits=3))
    with no_hang():
        parser = PayloadStreamParser(partition_size=16 * KIB)
        pos = 0
        try:
            for size in chunk_sizes * (len(payload) // sum(chunk_sizes) + 1):
                parser.feed(payload[pos : pos + size])
                pos += size
                if pos >= len(payload):
                    break
        except PayloadError as exc:
            assert exc.code > 0 and exc.message
            event(f"refused with {exc.code}")
            return
        event("parsed to the end" if parser.done else "waiting for more bytes")


@FEW
@given(data=st.data())
def test_payload_verifier_never_accepts_a_mutated_payload(
    fuzz_release: Release, keys: Keys, data: st.DataObject
) -> None:
    """The verifier (no target): only PayloadError comes out, and a changed payload never verifies."""
    Count.one("payload verifier")
    payload = data.draw(mutated(fuzz_release.data, max_edits=3))
    assume(payload != fuzz_release.data)
    with no_hang():
        sink = PayloadSink(None, public_key_pem=keys.public.read_bytes(), expected_size=None, expected_sha256_b64=None)
        try:
            for pos in range(0, len(payload), 1000):
                sink.write(payload[pos : pos + 1000])
            sink.close()
        except PayloadError as exc:
            sink.abort()
            event(f"refused with {exc.code}")
            return
    raise AssertionError("a mutated payload verified")


PARTITION = 16 * KIB
BLOCK = 4096


@st.composite
def payload_specs(draw: st.DrawFn) -> bytes:
    """A payload for a 16 KiB partition: plausible operations (REPLACE, REPLACE_BZ, MOVE, holes, a kernel), each
    blob with its true hash, then zero to three hostile edits of the manifest's fields."""
    manifest = pb.DeltaArchiveManifest(block_size=BLOCK)
    blobs: list[bytes] = []
    offset = 0
    image = bytearray(PARTITION)

    def add_op(target: Any, op_type: int, dst: list[tuple[int, int]], payload: bytes | None,
               src: Sequence[tuple[int, int]] = ()) -> None:
        nonlocal offset
        op = target.add(type=op_type)
        op.dst_extents.extend(pb.Extent(start_block=b, num_blocks=n) for b, n in dst)
        op.src_extents.extend(pb.Extent(start_block=b, num_blocks=n) for b, n in src)
        if payload is not None:
            op.data_offset, op.data_length = offset, len(payload)
            op.data_sha256_hash = hashlib.sha256(payload).digest()
            blobs.append(payload)
            offset += len(payload)

    block = 0
    while block < PARTITION // BLOCK:
        count = draw(st.integers(1, PARTITION // BLOCK - block))
        length = draw(st.integers((count - 1) * BLOCK + 1, count * BLOCK))
        pattern = draw(st.binary(min_size=1, max_size=32))
        content = (pattern * (length // len(pattern) + 1))[:length]
        kind = draw(st.sampled_from(["REPLACE", "REPLACE_BZ", "MOVE", "hole"]))
        if kind == "MOVE" and block > 0:
            add_op(manifest.partition_operations, pb.InstallOperation.MOVE, [(block, 1)], None, [(0, 1)])
            image[block * BLOCK : (block + 1) * BLOCK] = image[:BLOCK]
            count = 1
        elif kind == "REPLACE_BZ":
            add_op(manifest.partition_operations, pb.InstallOperation.REPLACE_BZ, [(block, count)],
                   bz2.compress(content.ljust(count * BLOCK, b"\0")))
            image[block * BLOCK : (block + count) * BLOCK] = content.ljust(count * BLOCK, b"\0")
        else:
            dst = [(block, count)] if kind == "REPLACE" else [(block, 1), (2**64 - 1, 1), (block + 1, count - 1)]
            if kind == "hole" and count < 2:
                dst = [(block, count)]
            add_op(manifest.partition_operations, pb.InstallOperation.REPLACE, dst, content)
            image[block * BLOCK : block * BLOCK + len(content)] = content
        block += count
    manifest.new_partition_info.size = PARTITION
    manifest.new_partition_info.hash = hashlib.sha256(image).digest()
    if draw(st.booleans()):
        kernel = draw(st.binary(min_size=1, max_size=5000))
        proc = manifest.procedures.add(type=pb.InstallProcedure.KERNEL)
        proc.new_info.size, proc.new_info.hash = len(kernel), hashlib.sha256(kernel).digest()
        add_op(proc.operations, pb.InstallOperation.REPLACE, [(0, -(-len(kernel) // BLOCK))], kernel)
    manifest.signatures_offset, manifest.signatures_size = offset, 8
    tail = b"\x0a\x06\x08\x02\x12\x02ok"  # a Signatures message; only its structure matters here

    ops = list(manifest.partition_operations)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(ops))
        edit = draw(st.sampled_from(["type", "offset", "length", "hash", "dst", "src", "block_size", "npi",
                                     "signatures", "procedure"]))
        big = st.integers(0, 2**64 - 1) | st.integers(0, 40)
        if edit == "type":
            op.type = draw(st.sampled_from([0, 1, 2, 3]))  # type: ignore[assignment]
        elif edit == "offset":
            op.data_offset = draw(st.integers(0, 2**32 - 1) | st.integers(0, 40000))
        elif edit == "length":
            op.data_length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 40000))
        elif edit == "hash":
            op.data_sha256_hash = draw(st.binary(max_size=40))
        elif edit == "dst":
            op.dst_extents.add(start_block=draw(big), num_blocks=draw(big))
        elif edit == "src":
            op.src_extents.add(start_block=draw(big), num_blocks=draw(big))
        elif edit == "block_size":
            manifest.block_size = draw(st.sampled_from([0, 512, 8192, 2**31]))
        elif edit == "npi":
            manifest.new_partition_info.size = draw(big)
        elif edit == "signatures":
            manifest.signatures_offset, manifest.signatures_size = draw(big), draw(big)
        else:
            manifest.procedures.add(type=draw(st.sampled_from([0, 1])))
    body = manifest.SerializeToString()
    return encode_header(len(body)) + body + b"".join(blobs) + tail


@FUZZ
@given(payload_specs())
def test_payload_apply_on_generated_payloads(scratch: Path, data: bytes) -> None:
    """Hand-built payloads with hostile manifests, unsigned, run by the parser and the executor themselves on a
    scratch partition (the signature is the sink's check, not theirs): PayloadError or a partition that hashes as
    the manifest says, never another exception, never a write past the partition."""
    Count.one("payload apply")
    target = scratch / "partition.img"
    target.write_bytes(b"\xee" * (PARTITION + BLOCK))  # one guard block after the partition
    kernel_path = scratch / "vmlinuz-b"
    with no_hang():
        partition = WriteTarget(target, 0, PARTITION).open()
        kernel: KernelFile | None = None
        try:
            parser = PayloadStreamParser(partition_size=PARTITION)
            executor: Executor | None = None
            for item in parser.feed(data):
                if isinstance(item, ManifestParsed):
                    proc = next((p for p in item.manifest.procedures if p.type == pb.InstallProcedure.KERNEL), None)
                    if proc is not None and proc.HasField("new_info"):
                        kernel = KernelFile(kernel_path, proc.new_info.size, -(-proc.new_info.size // BLOCK) * BLOCK)
                    executor = Executor(partition, kernel.file if kernel else None, item.manifest.block_size)
                elif isinstance(item, OperationData):
                    assert executor is not None
                    executor.execute(item)
            assert parser.manifest is not None and parser.done
            npi = parser.manifest.new_partition_info
            verify.check_partition(partition.sha256(npi.size, ErrorCode.NEW_ROOTFS_VERIFICATION_ERROR), npi.size, npi)
        except PayloadError as exc:
            event(f"refused with {exc.code}")
        else:
            event("applied and verified")
            assert npi.size == PARTITION
        finally:
            partition.close()
            if kernel is not None:
                kernel.discard()
    assert not list(scratch.glob(".vmlinuz-b.*")), "a kernel file was left behind"
    assert target.read_bytes()[PARTITION:] == b"\xee" * BLOCK, "a write went past the partition"


@FUZZ
@given(st.binary(max_size=64))
def test_payload_header_and_manifest_decoders(data: bytes) -> None:
    Count.one("payload header/manifest")
    with no_hang():
        for decode in (parse_header, parse_manifest):
            with contextlib.suppress(PayloadError):
                decode(data)


# --- GPT -------------------------------------------------------------------------------------------------------

HEADER_FIELDS = struct.Struct("<8sIIIIQQQQ16sQIII")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def gpt_image(tmp_path_factory: pytest.TempPathFactory) -> MemoryDisk:
    return MemoryDisk.from_file(make_usr_disk(tmp_path_factory.mktemp("gpt") / "disk.img", usr_mib=1))


HEADER_FIELD_NAMES = ("signature", "revision", "size", "crc", "reserved", "my", "alt", "first", "last", "guid",
                      "entries", "num", "esize", "ecrc")


def _rewrite_header(image: MemoryDisk, offset: int, fields: dict[str, int]) -> None:
    """Change header fields at ``offset`` and give it a correct CRC again, so the geometry rules are reached."""
    sector = bytearray(image.pread(512, offset))
    values = list(HEADER_FIELDS.unpack_from(sector))
    for name, value in fields.items():
        values[HEADER_FIELD_NAMES.index(name)] = value
    values[3] = 0
    sector[:92] = HEADER_FIELDS.pack(*values)
    covered = sector[: min(values[2], 512)]
    sector[16:20] = struct.pack("<I", zlib.crc32(covered) & 0xFFFFFFFF)
    image.pwrite(bytes(sector), offset)


u64 = st.one_of(st.integers(0, 40), st.integers(16000, 16400), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.integers(0, 256), st.sampled_from([128, 256, 512, 4096, 2**20, 2**31]), st.integers(0, 2**32 - 1))


ENTRY_ARRAY = slice(1024, 1024 + 128 * 128)  # the primary entry array of the 512-byte-sector image


@FUZZ
@given(
    which=st.sampled_from(["primary", "backup", "both"]),
    fields=st.fixed_dictionaries({}, optional={
        "my": u64, "alt": u64, "first": u64, "last": u64, "entries": u64, "num": u32, "esize": u32,
        "size": st.integers(0, 600), "revision": st.sampled_from([0, 0x00010000, 0x00020000, 0xFFFFFFFF]),
    }),
    entry_edits=st.lists(st.tuples(st.integers(0, 128 * 128 - 1), st.binary(min_size=1, max_size=16)), max_size=4),
    entries_crc_fixed=st.booleans(),
)
def test_gpt_reader_and_writer_on_hostile_tables(
    gpt_image: MemoryDisk, which: str, fields: dict[str, int], entry_edits: list[tuple[int, bytes]],
    entries_crc_fixed: bool,
) -> None:
    """Headers with plausible but wrong geometry (CRC made valid again) and edited entries (CRC fixed or not):
    GptError, or a table that can be armed and then reads back clean."""
    Count.one("GPT table")
    image = gpt_image.clone()
    for offset, raw in entry_edits:
        image.pwrite(raw[: 128 * 128 - offset], ENTRY_ARRAY.start + offset)
    if entries_crc_fixed and entry_edits and which != "primary":
        fields = {**fields, "ecrc": zlib.crc32(image.pread(128 * 128, ENTRY_ARRAY.start)) & 0xFFFFFFFF}
    offsets = {"primary": [512], "backup": [image.size() - 512], "both": [512, image.size() - 512]}[which]
    if entries_crc_fixed and entry_edits and which == "primary":
        fields = {**fields, "ecrc": zlib.crc32(image.pread(128 * 128, ENTRY_ARRAY.start)) & 0xFFFFFFFF}
    for offset in offsets:
        _rewrite_header(image, offset, fields)
    with no_hang():
        try:
            disk = gpt.GptDisk(image, name="fuzzed")
        except gpt.GptError:
            event("no valid copy")
            return
        try:
            disk.arm_for_next_boot(USR_B_INDEX)
        except gpt.GptError:
            event("opened, write refused")
            return
        event(f"written from the {disk.snapshot.source} copy")
        # A write that went through leaves a table that reads back clean with the new flags.
        again = gpt.GptDisk(image, name="fuzzed")
        assert again.snapshot.clean and again.flags(USR_B_INDEX).tries == 1


@FUZZ
@given(st.binary(min_size=0, max_size=700))
def test_gpt_header_decoder(data: bytes) -> None:
    Count.one("GPT header")
    with no_hang(), contextlib.suppress(gpt.GptError):
        gpt.parse_header(data)


# --- update.conf -----------------------------------------------------------------------------------------------

conf_line = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["SERVER", "GROUP", "export GROUP", " GROUP", "1X", "",
                                                         "DOWNLOAD_PASSWORD", "COREOS_RELEASE_VERSION"]),
              st.text(max_size=40)),
)


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(updateconf.UPDATE_CONF_FILES[:4]),
        st.one_of(st.lists(conf_line, max_size=10).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
                  st.binary(max_size=300)),
        max_size=4,
    ),
)
def test_update_conf_loader_on_hostile_files(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> None:
    """Any content at any update.conf path: settings come out, problems are reported, nothing raises."""
    Count.one("update.conf")
    root = tmp_path_factory.mktemp("conf")
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with no_hang():
        merged = updateconf.load_update_conf(root, reported=set())
        settings_ = config.settings_from_config(merged)
    assert isinstance(settings_.server, str) and isinstance(settings_.group, str)
    for issue in merged.issues:
        assert "DOWNLOAD_PASSWORD=" not in str(issue)


@FUZZ
@given(st.binary(max_size=100))
def test_identity_files(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    Count.one("machine-id/boot_id")
    root = tmp_path_factory.mktemp("id")
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_bytes(content)
    with no_hang(), contextlib.suppress(identity.IdentityError):
        value = identity.read_machine_id(root)
        assert len(value) == 32


# --- reboot windows --------------------------------------------------------------------------------------------

DAYS = ["Sun", "mon", "TUE", "wed", "Thu", "fri", "sat", "sunday", "Xyz", ""]
valid_start = st.builds(
    lambda d, h, m: f"{d} {h}:{m:02d}".strip(), st.sampled_from(["", "Sun", "mon", "TUE", "wed", "Thu", "fri", "sat"]),
    st.integers(0, 23), st.integers(0, 59),
)
window_start = st.one_of(
    valid_start, valid_start,
    st.text(max_size=20),
    st.builds(lambda d, h, m: f"{d} {h}:{m}".strip(), st.sampled_from(DAYS), st.integers(-1, 30).map(str),
              st.sampled_from(["00", "5", "59", "60", "7x", "030"])),
)
valid_length = st.builds(lambda n, u: f"{n}{u}", st.integers(0, 200), st.sampled_from(["h", "m", "s", "m30s"]))
window_length = st.one_of(
    valid_length, valid_length,
    st.text(max_size=20),
    st.builds(lambda n, u: f"{n}{u}", st.sampled_from(["1", "1.5", ".5", "0", "-1", "99999999999999999999", "1e3"]),
              st.sampled_from(["h", "m", "s", "ms", "us", "µs", "ns", "d", "", "h30m"])),
)
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "Pacific/Chatham"]


@FUZZ
@given(start=window_start, length=window_length, zone=st.sampled_from(ZONES),
       moment=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)))
def test_reboot_window_parsing_and_evaluation(start: str, length: str, zone: str, moment: datetime) -> None:
    """Bad settings are WindowError; a good window answers for any instant in any zone, DST days included."""
    Count.one("reboot window")
    with no_hang():
        try:
            parsed = window.parse_reboot_window(start, length)
        except window.WindowError:
            event("refused")
            return
        if parsed is None:
            return
        event("valid window")
        windows = window.WindowList((parsed,), zoneinfo.ZoneInfo(zone))
        now = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
        inside = windows.contains(now)
        opening = windows.next_opening(now)
    assert opening is not None
    opens, closes = opening
    assert opens >= now.astimezone(UTC) and closes >= opens
    period = window.DAILY_PERIOD if parsed.days is None else window.WEEKLY_PERIOD
    assert opens - now <= period + timedelta(hours=3)
    assert windows.contains(opens)
    assert inside in (True, False)


@FUZZ
@given(st.text(max_size=30))
def test_go_duration_parser(text: str) -> None:
    Count.one("Go duration")
    with no_hang(), contextlib.suppress(goduration.DurationError):
        parsed = goduration.parse_go_duration(text)
        assert goduration.parse_go_duration(goduration.format_go_duration(parsed)) == parsed

