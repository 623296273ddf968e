"""The sans-IO rules of the payload download and of every transfer: URL checks, redirect targets, the low-speed
limit, Content-Range."""

from __future__ import annotations

import pytest

from update_engine.errors import ErrorCode
from update_engine.http import RateWatch, TransferTooSlow, WrongRange, check_content_range
from update_engine.http_rules import HttpError, check_url, host_of, redirect_target


def test_rate_watch_lets_a_fast_transfer_through() -> None:
    rate = RateWatch(window=90.0, min_rate=10.0, started=0.0)
    for second in range(1, 1000):
        rate.feed(1 << 20, float(second))


def test_rate_watch_abandons_a_drip_that_never_stalls() -> None:
    rate = RateWatch(window=90.0, min_rate=10.0, started=0.0)
    rate.feed(5000, 1.0)  # a generous start fills the first window
    rate.feed(1, 90.5)  # window closed with 5001 bytes: fine, a new one starts
    with pytest.raises(TransferTooSlow, match=r"slower than 10 B/s: \d+ bytes in 9\d\.\d s"):
        for tick in range(1, 200):
            rate.feed(1, 90.5 + tick * 0.5)  # 2 B/s: a byte long before any read timeout


def test_rate_watch_judges_only_whole_windows() -> None:
    rate = RateWatch(window=10.0, min_rate=10.0, started=0.0)
    rate.feed(0, 9.9)  # nothing yet, but the window is not over
    rate.feed(100, 10.0)  # exactly 10 B/s over the window is enough
    with pytest.raises(TransferTooSlow):
        rate.feed(99, 20.0)


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "example.com/x"])
def test_check_url_refuses_non_http_urls(url: str) -> None:
    with pytest.raises(HttpError, match=r"payload URL .* is not an http") as info:
        check_url(url, what="payload URL")
    assert info.value.code == ErrorCode.OMAHA_RESPONSE_INVALID


def test_redirect_target_resolves_relative_locations() -> None:
    assert redirect_target("http://a.example/x/y", "z") == "http://a.example/x/z"
    assert redirect_target("https://a.example/x", "https://b.example/p") == "https://b.example/p"


@pytest.mark.parametrize(
    ("current", "location", "problem"),
    [
        ("https://a.example/x", "http://a.example/x", "downgrades"),
        ("http://a.example/x", "file:///etc/shadow", "non-http"),
        ("http://a.example/x", "gopher://a.example/", "non-http"),
        ("http://a.example/x", None, "no Location"),
    ],
)
def test_redirect_target_refuses_unsafe_redirects(current: str, location: str | None, problem: str) -> None:
    with pytest.raises(HttpError, match=problem) as info:
        redirect_target(current, location)
    assert info.value.code == ErrorCode.DOWNLOAD_TRANSFER_ERROR


def test_host_of_never_shows_credentials_or_path() -> None:
    assert host_of("https://user:secret@update.example:8443/v1/update?token=x") == "update.example:8443"


def test_content_range_must_start_where_the_range_asked() -> None:
    check_content_range("bytes 1000-4999/5000", offset=1000, expected_size=5000, host="h")
    check_content_range("bytes 1000-4999/*", offset=1000, expected_size=5000, host="h")
    for header in ("bytes 0-3999/5000", "bytes 1001-4999/5000", None, "", "bytes=1000-4999/5000", "1000-4999"):
        with pytest.raises(WrongRange) as info:
            check_content_range(header, offset=1000, expected_size=5000, host="h")
        assert info.value.status == 206


def test_content_range_of_another_size_is_a_size_mismatch() -> None:
    with pytest.raises(HttpError) as info:
        check_content_range("bytes 1000-5999/6000", offset=1000, expected_size=5000, host="h")
    assert info.value.code == ErrorCode.DOWNLOAD_SIZE_MISMATCH
