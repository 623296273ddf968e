"""The streaming digests: the payload's whole and signed SHA-256 in one pass, whatever the chunking."""

from __future__ import annotations

import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine.payload.digest import TAIL, PartitionDigest, PayloadDigest

DATA = os.urandom(3 * TAIL + 1234)


def _fed(cuts: list[int], data: bytes = DATA) -> PayloadDigest:
    digest = PayloadDigest()
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        digest.update(data[start:cut])
        start = cut
    return digest


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=len(DATA)), max_size=12),
    st.integers(min_value=len(DATA) - TAIL, max_value=len(DATA)),
)
def test_both_digests_under_any_chunking(cuts: list[int], signed_end: int) -> None:
    digests = _fed(cuts).finish(signed_end)
    assert digests.size == len(DATA)
    assert digests.whole == hashlib.sha256(DATA).digest()
    assert digests.signed == hashlib.sha256(DATA[:signed_end]).digest()


def test_no_signed_digest_when_unsigned_or_out_of_reach() -> None:
    assert _fed([]).finish(None).signed is None
    # More than the longest signature blob after the signed end: never a valid payload, never a digest.
    assert _fed([]).finish(len(DATA) - TAIL - 1).signed is None
    assert _fed([]).finish(len(DATA) + 1).signed is None


def test_short_payloads_are_all_tail() -> None:
    data = b"CrAU" + bytes(30)
    digests = _fed([3, 7], data).finish(10)
    assert digests.whole == hashlib.sha256(data).digest()
    assert digests.signed == hashlib.sha256(data[:10]).digest()


def test_partition_digest_hashes_only_the_partition_size() -> None:
    digest = PartitionDigest(5000, None)
    block = os.urandom(4096)
    digest.update(memoryview(block))
    digest.update(memoryview(block))
    assert digest.hashed == 5000
    assert digest.digest() == hashlib.sha256((block + block)[:5000]).digest()
