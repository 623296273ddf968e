"""The payload format core: header, manifest validation with its error codes, and the incremental parser."""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.payload import BSDIFF, HOLE, MOVE, REPLACE, REPLACE_BZ, Built, Op, build_payload, key_pair
from update_engine.errors import ErrorCode
from update_engine.payload import update_metadata_pb2 as pb
from update_engine.payload.format import (
    MAX_EXTENTS,
    MAX_KERNEL_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_OPERATION_DATA,
    MAX_OPERATIONS,
    Destination,
    HeaderParsed,
    ManifestParsed,
    OperationData,
    PayloadError,
    PayloadEvent,
    PayloadStreamParser,
    SignatureBlob,
    encode_header,
    encode_signatures,
    parse_header,
    parse_manifest,
    parse_signatures,
    summarize_manifest,
    validate_manifest,
)

B = 4096


def _sample() -> Built:
    """Partition of 4 blocks (REPLACE, REPLACE_BZ with a padded tail, MOVE), a 5000-byte kernel, signed."""
    block0 = os.urandom(B)
    block1 = b"\x11" * B + b"tail"
    partition = block0 + block1 + bytes(B - 4) + block0
    kernel = os.urandom(5000)
    return build_payload(
        [
            Op(REPLACE, [(0, 1)], block0),
            Op(REPLACE_BZ, [(1, 2)], bz2.compress(block1)),
            Op(MOVE, [(3, 1)], src=[(0, 1)]),
        ],
        new_partition=partition,
        kernel=kernel,
        kernel_ops=[Op(REPLACE, [(0, 2)], kernel)],
        key=key_pair(),
    )


SAMPLE = _sample()


def _code(exc: pytest.ExceptionInfo[PayloadError]) -> int:
    return exc.value.code


# --- header ----------------------------------------------------------------------------------------------------


def test_header_round_trip() -> None:
    header = parse_header(encode_header(1234))
    assert (header.version, header.manifest_size, header.metadata_size) == (1, 1234, 1254)


def test_bad_magic_is_code_21() -> None:
    with pytest.raises(PayloadError) as exc:
        parse_header(b"CrAX" + encode_header(10)[4:])
    assert _code(exc) == ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC
    assert "magic" in exc.value.message


def test_other_version_is_refused_with_code_21() -> None:
    with pytest.raises(PayloadError) as exc:
        parse_header(struct.pack(">4sQQ", b"CrAU", 2, 10))
    assert _code(exc) == ErrorCode.DOWNLOAD_INVALID_METADATA_MAGIC
    assert "version is 2" in exc.value.message


def test_oversized_manifest_is_code_32() -> None:
    with pytest.raises(PayloadError) as exc:
        parse_header(encode_header(MAX_MANIFEST_SIZE + 1))
    assert _code(exc) == ErrorCode.DOWNLOAD_INVALID_METADATA_SIZE


def test_short_header_is_refused() -> None:
    with pytest.raises(PayloadError):
        parse_header(b"CrAU\0\0")


def test_undecodable_manifest_is_code_23() -> None:
    with pytest.raises(PayloadError) as exc:
        parse_manifest(b"\xff\xff\xff\xff")
    assert _code(exc) == ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR


# --- validation ------------------------------------------------------------------------------------------------


def _manifest(*ops: Op, new_size: int | None = 4 * B) -> pb.DeltaArchiveManifest:
    return build_payload(list(ops), new_partition=bytes(new_size) if new_size is not None else None).manifest


def _validate_code(manifest: pb.DeltaArchiveManifest, partition_size: int | None = 16 * B) -> int:
    with pytest.raises(PayloadError) as exc:
        validate_manifest(manifest, partition_size=partition_size)
    return _code(exc)


def test_valid_manifest_passes() -> None:
    validate_manifest(SAMPLE.manifest, partition_size=4 * B)
    validate_manifest(SAMPLE.manifest, partition_size=None)


def test_block_size_other_than_4096_is_refused() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(512)))
    manifest.block_size = 512
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_bsdiff_is_refused_by_name() -> None:
    manifest = _manifest(Op(BSDIFF, [(0, 1)], b"patch", src=[(0, 1)]))
    with pytest.raises(PayloadError) as exc:
        validate_manifest(manifest, partition_size=16 * B)
    assert exc.value.code == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert "BSDIFF operations are not supported" in exc.value.message


def test_data_offset_without_length_is_refused() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)))
    manifest.partition_operations[0].ClearField("data_length")
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_data_without_hash_is_code_38() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B), with_hash=False))
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_HASH_MISSING


def test_truncated_hash_is_code_38() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)))
    manifest.partition_operations[0].data_sha256_hash = b"\x01" * 20
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_HASH_MISSING


def test_operation_without_destination_is_refused() -> None:
    manifest = _manifest(Op(REPLACE, [], bytes(B)))
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_untyped_operation_is_code_23() -> None:
    # protobuf keeps an unknown enum value out of the field, so a required type goes missing.
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)))
    manifest.partition_operations[0].ClearField("type")
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR


@pytest.mark.parametrize(
    ("extent", "partition_blocks"),
    [((15, 2), 16), ((16, 1), 16), ((2**63, 1), 16), ((3, 1), 3)],
)
def test_extent_outside_the_partition_is_code_28(extent: tuple[int, int], partition_blocks: int) -> None:
    manifest = _manifest(Op(REPLACE, [extent], bytes(extent[1] * B)), new_size=None)
    assert _validate_code(manifest, partition_blocks * B) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_extent_bound_defaults_to_the_new_partition_size() -> None:
    manifest = _manifest(Op(REPLACE, [(4, 1)], bytes(B)), new_size=4 * B)
    assert _validate_code(manifest, None) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_sparse_extent_is_not_bounds_checked() -> None:
    validate_manifest(_manifest(Op(REPLACE, [(0, 1), (HOLE, 5)], bytes(6 * B)), new_size=B), partition_size=B)


def test_move_source_outside_the_partition_is_code_28() -> None:
    manifest = _manifest(Op(MOVE, [(0, 1)], src=[(20, 1)]))
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_move_with_unequal_sizes_is_refused() -> None:
    manifest = _manifest(Op(MOVE, [(0, 2)], src=[(4, 1)]))
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_replace_data_must_fill_its_blocks() -> None:
    too_long = _manifest(Op(REPLACE, [(0, 1)], bytes(B + 1)))
    too_short = _manifest(Op(REPLACE, [(0, 2)], bytes(B)))
    assert _validate_code(too_long) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    assert _validate_code(too_short) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_oversized_operation_data_is_refused() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)))
    manifest.partition_operations[0].data_length = MAX_OPERATION_DATA + 1
    assert _validate_code(manifest, None) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_non_contiguous_blobs_are_code_28() -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)), Op(REPLACE, [(1, 1)], bytes(B)))
    manifest.partition_operations[1].data_offset += 1
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_signatures_must_follow_the_last_blob() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    manifest.signatures_offset += 1
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_typed_procedure_without_new_info_is_code_23() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    manifest.procedures[0].ClearField("new_info")
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_MANIFEST_PARSE_ERROR


def test_new_partition_larger_than_target_is_refused() -> None:
    assert _validate_code(SAMPLE.manifest, 3 * B) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_kernel_extent_beyond_kernel_size_is_refused() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    manifest.procedures[0].operations[0].dst_extents[0].num_blocks = 3
    assert _validate_code(manifest) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


# --- bounds on the work a manifest may cause -------------------------------------------------------------------


def _message(exc: pytest.ExceptionInfo[PayloadError]) -> str:
    return exc.value.message


def test_a_block_is_written_at_most_once() -> None:
    for dsts in ([(0, 2)], [(1, 1)]), ([(0, 1), (3, 1)], [(2, 2)]), ([(2, 2)], [(0, 3)]):
        manifest = _manifest(*(Op(REPLACE, dst, bytes(sum(n for _, n in dst) * B)) for dst in dsts))
        with pytest.raises(PayloadError) as exc:
            validate_manifest(manifest, partition_size=16 * B)
        assert _code(exc) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR and "both write block" in _message(exc)
    # Holes are not writes, and neighbours do not overlap.
    validate_manifest(
        _manifest(Op(REPLACE, [(0, 1), (HOLE, 1)], bytes(2 * B)), Op(REPLACE, [(1, 1), (HOLE, 1)], bytes(2 * B))),
        partition_size=16 * B,
    )


def test_kernel_blocks_are_written_at_most_once_too() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    extents = manifest.procedures[0].operations[0].dst_extents
    del extents[:]
    extents.extend([pb.Extent(start_block=0, num_blocks=1)] * 2)  # two blocks' worth of data, block 0 twice
    with pytest.raises(PayloadError, match="both write block 0 of the kernel"):
        validate_manifest(manifest, partition_size=16 * B)


@pytest.mark.parametrize("size", [0, B - 1, 3 * B + 1])
def test_the_new_partition_is_a_positive_whole_number_of_blocks(size: int) -> None:
    manifest = _manifest(Op(REPLACE, [(0, 1)], bytes(B)))
    manifest.new_partition_info.size = size
    with pytest.raises(PayloadError, match=f"new partition size {size} is not"):
        validate_manifest(manifest, partition_size=16 * B)


def test_writes_stay_inside_what_the_partition_hash_covers() -> None:
    """The target has room for 16 blocks, but the hash covers 4: the fifth may not be written."""
    assert _validate_code(_manifest(Op(REPLACE, [(4, 1)], bytes(B))), 16 * B) == (
        ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR
    )


def test_operation_and_extent_counts_are_bounded() -> None:
    manifest = _manifest(*(Op(REPLACE_BZ, [(i, 1)], b"x") for i in range(4)), new_size=None)
    template = manifest.partition_operations[0]
    del manifest.partition_operations[:]
    manifest.partition_operations.extend([template] * (MAX_OPERATIONS + 1))
    with pytest.raises(PayloadError, match=f"{MAX_OPERATIONS + 1} operations, more than the limit"):
        validate_manifest(manifest, partition_size=None)
    wide = _manifest(Op(REPLACE_BZ, [(0, 1)], b"x"), new_size=None)
    wide.partition_operations[0].dst_extents.extend([pb.Extent(start_block=HOLE, num_blocks=1)] * MAX_EXTENTS)
    with pytest.raises(PayloadError, match=f"{MAX_EXTENTS + 1} extents, more than the limit"):
        validate_manifest(wide, partition_size=None)


def test_the_kernel_is_bounded_by_a_limit_and_by_its_directory() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    validate_manifest(manifest, partition_size=4 * B, kernel_room=2 * B)  # 5000 bytes: two blocks
    with pytest.raises(PayloadError) as exc:
        validate_manifest(manifest, partition_size=4 * B, kernel_room=2 * B - 1)
    assert _code(exc) == ErrorCode.DOWNLOAD_WRITE_ERROR and "free some space" in _message(exc)
    manifest.procedures[0].new_info.size = MAX_KERNEL_SIZE + 1
    with pytest.raises(PayloadError) as exc:
        validate_manifest(manifest, partition_size=4 * B)
    assert _code(exc) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR and "more than the limit" in _message(exc)


def test_blobs_lie_within_the_announced_payload_size() -> None:
    size = len(SAMPLE.data)
    metadata = SAMPLE.metadata_size
    validate_manifest(SAMPLE.manifest, partition_size=4 * B, metadata_size=metadata, payload_size=size)
    # Operation data past the announced end: cut short of its signature.
    data_end = SAMPLE.blob_ranges[-1][1]
    with pytest.raises(PayloadError) as exc:
        validate_manifest(SAMPLE.manifest, partition_size=4 * B, metadata_size=metadata, payload_size=data_end - 1)
    assert _code(exc) == ErrorCode.SIGNED_DELTA_PAYLOAD_EXPECTED
    # Bytes announced after the signature blob.
    with pytest.raises(PayloadError) as exc:
        validate_manifest(SAMPLE.manifest, partition_size=4 * B, metadata_size=metadata, payload_size=size + 1)
    assert _code(exc) == ErrorCode.DOWNLOAD_SIZE_MISMATCH
    # A signature blob that would end past the announced size costs no write: the end of the stream judges it.
    validate_manifest(SAMPLE.manifest, partition_size=4 * B, metadata_size=metadata, payload_size=size - 1)


def test_noop_operations_are_ignored() -> None:
    manifest = pb.DeltaArchiveManifest()
    manifest.CopyFrom(SAMPLE.manifest)
    manifest.noop_operations.add(type=BSDIFF, data_offset=999, data_length=1)
    validate_manifest(manifest, partition_size=4 * B)


def test_summary_counts_operations_by_type() -> None:
    summary = summarize_manifest(SAMPLE.manifest)
    assert summary.operation_counts == {"REPLACE": 2, "REPLACE_BZ": 1, "MOVE": 1}
    assert summary.partition_operations == 3
    assert summary.kernel is not None and summary.kernel.new_size == 5000
    assert summary.new_partition_size == 4 * B


# --- signatures ------------------------------------------------------------------------------------------------


def test_signatures_round_trip() -> None:
    assert parse_signatures(encode_signatures([(1, b"a"), (2, b"bc")])) == [(1, b"a"), (2, b"bc")]


def test_undecodable_signatures_are_code_18() -> None:
    with pytest.raises(PayloadError) as exc:
        parse_signatures(b"\x0a\xff\xff\xff\xff\xff")
    assert _code(exc) == ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR


# --- stream parser ---------------------------------------------------------------------------------------------


def _events(data: bytes, cuts: list[int], partition_size: int | None = None) -> list[PayloadEvent]:
    parser = PayloadStreamParser(partition_size=partition_size)
    events: list[PayloadEvent] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events.extend(parser.feed(data[start:cut]))
        start = cut
    assert parser.done
    return events


def _normalized(events: list[PayloadEvent]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, OperationData):
            out.append(("op", event.op_index, event.destination, bytes(event.blob)))
        elif isinstance(event, ManifestParsed):
            out.append(("manifest", event.manifest.SerializeToString()))
        elif isinstance(event, HeaderParsed):
            out.append(("header", event.header))
        else:
            out.append(("signature", event.data))
    return out


def test_parser_events_in_one_chunk() -> None:
    events = _events(SAMPLE.data, [])
    kinds = [type(e) for e in events]
    assert kinds == [
        HeaderParsed,
        ManifestParsed,
        OperationData,
        OperationData,
        OperationData,
        OperationData,
        SignatureBlob,
    ]
    ops = [e for e in events if isinstance(e, OperationData)]
    assert [op.destination for op in ops] == [Destination.PARTITION] * 3 + [Destination.KERNEL]
    assert bytes(ops[2].blob) == b""  # MOVE carries no data
    start, end = SAMPLE.blob_ranges[1]
    assert bytes(ops[1].blob) == SAMPLE.data[start:end]
    assert SAMPLE.signature_range is not None
    sig = events[-1]
    assert isinstance(sig, SignatureBlob) and sig.data == SAMPLE.data[slice(*SAMPLE.signature_range)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE.data)), max_size=40))
def test_parser_gives_the_same_events_under_any_chunking(cuts: list[int]) -> None:
    assert _normalized(_events(SAMPLE.data, cuts)) == _normalized(_events(SAMPLE.data, []))


def test_parser_byte_by_byte() -> None:
    assert _normalized(_events(SAMPLE.data, list(range(len(SAMPLE.data))))) == _normalized(
        _events(SAMPLE.data, [])
    )


def test_parser_checks_each_blob_hash_code_29() -> None:
    start, _ = SAMPLE.blob_ranges[1]
    data = bytearray(SAMPLE.data)
    data[start + 3] ^= 0x40
    parser = PayloadStreamParser()
    with pytest.raises(PayloadError) as exc:
        parser.feed(bytes(data))
    assert _code(exc) == ErrorCode.DOWNLOAD_OPERATION_HASH_MISMATCH
    assert "operation 1" in exc.value.message


def test_parser_refuses_bytes_after_the_signature() -> None:
    parser = PayloadStreamParser()
    parser.feed(SAMPLE.data)
    with pytest.raises(PayloadError) as exc:
        parser.feed(b"\0")
    assert _code(exc) == ErrorCode.DOWNLOAD_SIZE_MISMATCH


def test_parser_of_unsigned_payload_ends_after_last_operation() -> None:
    built = build_payload([Op(REPLACE, [(0, 1)], bytes(B))], new_partition=bytes(B))
    parser = PayloadStreamParser()
    events = parser.feed(built.data)
    assert parser.done and not any(isinstance(e, SignatureBlob) for e in events)
    with pytest.raises(PayloadError):
        parser.feed(b"x")


def test_parser_validates_against_the_partition_size() -> None:
    with pytest.raises(PayloadError) as exc:
        PayloadStreamParser(partition_size=2 * B).feed(SAMPLE.data)
    assert _code(exc) == ErrorCode.DOWNLOAD_OPERATION_EXECUTION_ERROR


def test_parser_reports_where_a_truncated_payload_ends() -> None:
    parser = PayloadStreamParser()
    parser.feed(SAMPLE.data[: SAMPLE.blob_ranges[1][0] + 5])
    assert not parser.done
    assert "operation 1" in parser.describe_position()


def test_parser_accepts_bytearray_and_memoryview_chunks() -> None:
    parser = PayloadStreamParser()
    half = len(SAMPLE.data) // 2
    events = parser.feed(bytearray(SAMPLE.data[:half])) + parser.feed(memoryview(SAMPLE.data)[half:])
    assert parser.done
    assert _normalized(events) == _normalized(_events(SAMPLE.data, []))


def test_manifest_of_size_zero_parses_as_empty() -> None:
    parser = PayloadStreamParser()
    events = parser.feed(encode_header(0))
    assert parser.done
    assert [type(e) for e in events] == [HeaderParsed, ManifestParsed]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_payload_errors(data: bytes) -> None:
    with contextlib.suppress(PayloadError):
        PayloadStreamParser().feed(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(SAMPLE.data) - 1), st.integers(1, 255)), max_size=4
    ),
    st.integers(min_value=0, max_value=len(SAMPLE.data) + 10),
    st.binary(max_size=8),
)
def test_mutated_payloads_raise_only_payload_errors(
    flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    data = bytearray(SAMPLE.data)
    for pos, mask in flips:
        data[pos] ^= mask
    data = data[:cut] + tail
    parser = PayloadStreamParser(partition_size=4 * B)
    try:
        for start in range(0, len(data), 777):
            parser.feed(bytes(data[start : start + 777]))
    except PayloadError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=20), st.binary(min_size=1, max_size=64))
def test_manifest_with_random_content_raises_only_payload_errors(skip: int, garbage: bytes) -> None:
    """Random protobuf-ish manifests must fail cleanly, whatever field they happen to set."""
    manifest = SAMPLE.manifest.SerializeToString()
    mutated = manifest[:skip] + garbage + manifest[skip:]
    parser = PayloadStreamParser(partition_size=4 * B)
    with contextlib.suppress(PayloadError):
        parser.feed(encode_header(len(mutated)) + mutated + hashlib.sha256(mutated).digest())
