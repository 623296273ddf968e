"""Omaha action codes as servers and dashboards read them, their names in logs, and the error they travel in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine.errors import (
    DEFERRED_CODES,
    FLAG_DEV_MODE,
    FLAG_RESUMED,
    FLAG_TEST_IMAGE,
    FLAG_TEST_OMAHA_URL,
    ErrorCode,
    UpdateEngineError,
    describe,
    http_error_code,
)

ALL_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL


@pytest.mark.parametrize(
    ("code", "wire"),
    [
        (ErrorCode.SUCCESS, 0),
        (ErrorCode.ERROR, 1),
        (ErrorCode.OMAHA_REQUEST_ERROR, 2),
        (ErrorCode.POSTINSTALL_RUNNER_ERROR, 5),
        (ErrorCode.DOWNLOAD_TRANSFER_ERROR, 9),
        (ErrorCode.DOWNLOAD_HASH_MISMATCH, 10),
        (ErrorCode.DOWNLOAD_SIZE_MISMATCH, 11),
        (ErrorCode.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR, 12),
        (ErrorCode.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR, 18),
        (ErrorCode.POSTINSTALL_BOOTED_FROM_FIRMWARE_B, 19),
        (ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, 31),
        (ErrorCode.OMAHA_RESPONSE_INVALID, 34),
        (ErrorCode.OMAHA_UPDATE_IGNORED_PER_POLICY, 35),
        (ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY, 36),
        (ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF, 40),
        (ErrorCode.ROLLBACK_ERROR, 44),
        (ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE, 2000),
    ],
)
def test_codes_keep_the_numbers_omaha_servers_expect(code: ErrorCode, wire: int) -> None:
    assert int(code) == wire


def test_codes_0_to_44_are_all_defined_without_gaps() -> None:
    assert sorted(int(c) for c in ErrorCode if c < 2000) == list(range(45))


def test_flags_are_the_top_bits_of_the_errorcode() -> None:
    assert (FLAG_DEV_MODE, FLAG_RESUMED, FLAG_TEST_IMAGE, FLAG_TEST_OMAHA_URL) == (1 << 31, 1 << 30, 1 << 29, 1 << 28)


def test_only_policy_and_backoff_codes_are_reported_as_deferred() -> None:
    assert {int(c) for c in DEFERRED_CODES} == {35, 36, 40}


@pytest.mark.parametrize(
    ("status", "code"),
    [(None, 2000), (200, 2200), (404, 2404), (500, 2500), (503, 2503), (999, 2999), (1000, 2999), (65535, 2999)],
)
def test_http_failure_code_is_2000_plus_the_status_capped_at_999(status: int | None, code: int) -> None:
    assert http_error_code(status) == code


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (10, "DOWNLOAD_HASH_MISMATCH"),
        (0, "SUCCESS"),
        (2000, "OMAHA_REQUEST_HTTP_RESPONSE_BASE"),
        (2503, "HTTP_503"),
        (2404 | FLAG_TEST_OMAHA_URL, "HTTP_404"),
        (12 | FLAG_RESUMED | FLAG_TEST_OMAHA_URL, "DOWNLOAD_PAYLOAD_VERIFICATION_ERROR"),
        (99, "UNKNOWN_99"),
        (1999, "UNKNOWN_1999"),
        (100 | FLAG_DEV_MODE, "UNKNOWN_100"),
    ],
)
def test_describe_names_a_code_as_the_log_shows_it(code: int, name: str) -> None:
    assert describe(code) == name


@settings(max_examples=200, deadline=None)
@given(base=st.integers(min_value=0, max_value=(1 << 28) - 1), flags=st.integers(min_value=0, max_value=15))
def test_flags_never_change_the_name_of_a_code(base: int, flags: int) -> None:
    name = describe(base | (flags << 28))
    assert name == describe(base)
    assert name.isupper() or name.startswith(("HTTP_", "UNKNOWN_"))


def test_error_message_names_the_problem_and_the_code() -> None:
    exc = UpdateEngineError(ErrorCode.DOWNLOAD_HASH_MISMATCH, "payload SHA-256 abc= does not match def=")
    assert str(exc) == "payload SHA-256 abc= does not match def= (error 10 DOWNLOAD_HASH_MISMATCH)"
    assert exc.message == "payload SHA-256 abc= does not match def="
    assert exc.code == 10 and type(exc.code) is int


def test_error_with_an_http_code_reads_as_the_http_status() -> None:
    exc = UpdateEngineError(http_error_code(503), "Omaha server answered 503")
    assert exc.code == 2503
    assert str(exc).endswith("(error 2503 HTTP_503)")


def test_error_is_an_exception_callers_can_catch() -> None:
    with pytest.raises(UpdateEngineError) as caught:
        raise UpdateEngineError(34, "response has no <app>")
    assert caught.value.code == ErrorCode.OMAHA_RESPONSE_INVALID
    assert "response has no <app>" in str(caught.value)
