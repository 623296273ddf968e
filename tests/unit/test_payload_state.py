"""Attempts at an offered payload: the response signature, URL failover, and the backoff a failing payload gets."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from update_engine import payload_state as ps
from update_engine.errors import FLAG_RESUMED, FLAG_TEST_OMAHA_URL, ErrorCode
from update_engine.omaha import UpdateOffer

NOW = 1_800_000_000
DAY = 24 * 3600
ONE_URL = UpdateOffer(
    version="2.0.0", urls=("https://u.example/a/update.gz",), size=1234, sha256_b64="c2hh", max_failure_count_per_url=3
)
TWO_URLS = dataclasses.replace(ONE_URL, urls=("https://u.example/a/update.gz", "https://mirror.example/update.gz"))


def fresh(offer: UpdateOffer) -> ps.PayloadState:
    return ps.for_offer(ps.PayloadState(), offer)


def test_signature_is_the_originals_text() -> None:
    assert ps.response_signature(TWO_URLS) == (
        "NumURLs = 2\n"
        "Url0 = https://u.example/a/update.gz\n"
        "Url1 = https://mirror.example/update.gz\n"
        "Payload Size = 1234\n"
        "Payload Sha256 Hash = c2hh\n"
        "Is Delta Payload = 0\n"
        "Max Failure Count Per Url = 3\n"
        "Disable Payload Backoff = 0\n"
    )


def test_the_same_response_keeps_its_attempts_and_another_starts_again() -> None:
    tried = ps.after_download(fresh(ONE_URL), NOW, 0)
    assert ps.for_offer(tried, ONE_URL) == tried
    other = dataclasses.replace(ONE_URL, sha256_b64="b3RoZXI=")
    assert ps.for_offer(tried, other) == ps.PayloadState(response_signature=ps.response_signature(other))


def test_a_url_index_beyond_the_list_starts_from_the_first_url() -> None:
    state = dataclasses.replace(fresh(ONE_URL), url_index=4, url_failure_count=2)
    assert ps.for_offer(state, ONE_URL).url_index == 0
    assert ps.for_offer(state, ONE_URL).url_failure_count == 0


def test_each_completed_download_doubles_the_wait_up_to_sixteen_days() -> None:
    state = fresh(ONE_URL)
    waits = []
    for _ in range(7):
        state = ps.after_download(state, NOW, 0)
        waits.append((state.backoff_expiry - NOW) // DAY)
    assert waits == [1, 2, 4, 8, 16, 16, 16]
    assert state.attempt_number == 7


def test_the_fuzz_moves_the_expiry_by_at_most_six_hours() -> None:
    fuzzes = {ps.backoff_fuzz() for _ in range(2000)}
    assert min(fuzzes) >= -6 * 3600 and max(fuzzes) <= 6 * 3600
    assert all(f % 60 == 0 for f in fuzzes)
    assert len(fuzzes) > 100  # really random: a fleet does not come back at the same minute
    assert ps.after_download(fresh(ONE_URL), NOW, -3600).backoff_expiry == NOW + DAY - 3600


def test_a_scheduled_check_is_deferred_until_the_expiry_and_no_longer() -> None:
    state = ps.after_download(fresh(ONE_URL), NOW, 0)
    assert ps.deferred_until(state, ONE_URL, NOW + 10, interactive=False) == NOW + DAY
    assert ps.deferred_until(state, ONE_URL, NOW + DAY, interactive=False) is None
    assert ps.deferred_until(fresh(ONE_URL), ONE_URL, NOW, interactive=False) is None


def test_interactive_checks_delta_payloads_and_disabled_backoff_are_never_deferred() -> None:
    state = ps.after_download(fresh(ONE_URL), NOW, 0)
    assert ps.deferred_until(state, ONE_URL, NOW, interactive=True) is None
    for offer in (
        dataclasses.replace(ONE_URL, disable_payload_backoff=True),
        dataclasses.replace(ONE_URL, is_delta=True),
    ):
        tried = ps.after_download(fresh(offer), NOW, 0)
        assert tried.attempt_number == 1  # counted all the same
        assert ps.deferred_until(tried, offer, NOW, interactive=False) is None


def test_a_bad_payload_moves_to_the_next_url_then_counts_an_attempt_when_the_list_wraps() -> None:
    state = fresh(TWO_URLS)
    state = ps.after_failure(state, ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR, TWO_URLS, NOW, 0)
    assert (state.url_index, state.attempt_number, state.backoff_expiry) == (1, 0, 0)
    state = ps.after_failure(state, ErrorCode.DOWNLOAD_HASH_MISMATCH, TWO_URLS, NOW, 0)
    assert (state.url_index, state.attempt_number, state.backoff_expiry) == (0, 1, NOW + DAY)


def test_transient_failures_are_counted_against_the_url_up_to_the_offers_maximum() -> None:
    state = fresh(TWO_URLS)
    codes = [ErrorCode.DOWNLOAD_TRANSFER_ERROR, 2503 | FLAG_RESUMED, ErrorCode.ERROR | FLAG_TEST_OMAHA_URL]
    seen = []
    for code in codes:
        state = ps.after_failure(state, code, TWO_URLS, NOW, 0)
        seen.append((state.url_index, state.url_failure_count))
    assert seen == [(0, 1), (0, 2), (1, 0)]  # MaxFailureCountPerUrl is 3 in this offer
    assert state.attempt_number == 0


def test_failures_that_say_nothing_about_the_payload_change_nothing() -> None:
    state = fresh(ONE_URL)
    for code in (
        ErrorCode.INSTALL_DEVICE_OPEN_ERROR,
        ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY,
        ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF,
        ErrorCode.POSTINSTALL_RUNNER_ERROR,
    ):
        assert ps.after_failure(state, code, ONE_URL, NOW, 0) == state


@given(
    codes=st.lists(st.sampled_from([*ErrorCode, 2404, 2500]), max_size=40),
    downloads=st.lists(st.booleans(), max_size=40),
)
def test_attempts_only_grow_and_the_url_stays_in_the_list(codes: list[int], downloads: list[bool]) -> None:
    state = fresh(TWO_URLS)
    for code, downloaded in zip(codes, downloads, strict=False):
        before = state
        if downloaded:
            state = ps.after_download(state, NOW, 0)
        state = ps.after_failure(state, code, TWO_URLS, NOW, 0)
        assert state.attempt_number >= before.attempt_number
        assert 0 <= state.url_index < len(TWO_URLS.urls)
        assert state.url_failure_count < TWO_URLS.max_failure_count_per_url
        if state.attempt_number:
            assert state.backoff_expiry >= NOW + DAY
        assert state.response_signature == before.response_signature
