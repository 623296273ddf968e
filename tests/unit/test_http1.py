"""The pure HTTP/1.1 client codec: framing, bounds, keep-alive rules, proxies from the environment."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coreos_common.http1 import (
    BodyPiece,
    EndOfMessage,
    HttpProtocolError,
    HttpUnreachable,
    Origin,
    RequestBodyError,
    ResponseHead,
    ResponseParser,
    ResponseTooLarge,
    StreamedBody,
    checked_pieces,
    describe_limit,
    encode_request,
    prepare_request,
    proxy_for,
    split_url,
)

ORIGIN = Origin("http", "127.0.0.1", 2379)


def parse(data: bytes, *, method: str = "POST", max_body: int | None = None, eof: bool = False) -> tuple[
    ResponseHead | None, bytes, EndOfMessage | None
]:
    parser = ResponseParser(method=method, max_body=max_body)
    events = parser.feed(data)
    if eof:
        events += parser.feed_eof()
    head = next((e for e in events if isinstance(e, ResponseHead)), None)
    body = b"".join(e.data for e in events if isinstance(e, BodyPiece))
    end = next((e for e in events if isinstance(e, EndOfMessage)), None)
    return head, body, end


def test_request_bytes() -> None:
    assert encode_request("POST", "/v3/kv/range", ORIGIN, [("Content-Type", "application/json")], b"{}") == (
        b"POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1:2379\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert encode_request("GET", "/", Origin("http", "::1", 80)).startswith(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n")


def test_a_streamed_body_announces_its_length_and_is_sent_after_the_head() -> None:
    body = StreamedBody(6, lambda: [b"abc", b"def"])
    head = encode_request("PUT", "/payload", ORIGIN, [], body)
    assert head.endswith(b"Content-Length: 6\r\n\r\n")
    prepared = prepare_request("PUT", "http://127.0.0.1:8080/payload", [], body, {})
    assert prepared.message.endswith(b"\r\n\r\n") and prepared.stream is body
    assert b"".join(checked_pieces(body)) == b"abcdef"
    assert b"".join(checked_pieces(body)) == b"abcdef"  # each call starts again from the beginning


def _unreadable() -> list[bytes]:
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        (lambda: [b"abc", b"defg"], "grew past its announced 6 bytes"),
        (lambda: [b"abc"], "ended after 3 of its announced 6 bytes"),
        (_unreadable, "cannot read the request body: Permission denied"),
    ],
)
def test_a_streamed_body_must_have_its_announced_length(pieces: Any, message: str) -> None:
    with pytest.raises(RequestBodyError, match=message):
        list(checked_pieces(StreamedBody(6, pieces)))


@pytest.mark.parametrize("header", [("X", "a\r\nInjected: yes"), ("Bad:Name", "v"), ("", "v")])
def test_header_values_cannot_add_headers(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="invalid HTTP header"):
        encode_request("GET", "/", ORIGIN, [header])


def test_content_length_body_and_keep_alive() -> None:
    head, body, end = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert head is not None and head.status == 200 and head.header("CONTENT-length") == "5"
    assert body == b"hello" and end == EndOfMessage(reusable=True)
    _, _, end = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert end == EndOfMessage(reusable=False)
    _, _, end = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert end == EndOfMessage(reusable=False)


def test_chunked_body_with_extensions_and_trailers() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\n"
    _, body, end = parse(data)
    assert body == b"hello!" and end == EndOfMessage(reusable=True)


def test_close_delimited_body_ends_with_the_connection() -> None:
    _, body, end = parse(b"HTTP/1.1 200 OK\r\n\r\nall of it", eof=True)
    assert body == b"all of it" and end == EndOfMessage(reusable=False)


def test_no_body_for_head_204_and_interim_answers() -> None:
    _, body, end = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method="HEAD")
    assert (body, end) == (b"", EndOfMessage(reusable=True))
    _, _, end = parse(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert end is not None
    head, body, _ = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert head is not None and head.status == 200 and body == b"ok"


@given(st.binary(max_size=3000), st.lists(st.integers(min_value=1, max_value=50), max_size=200))
def test_any_split_of_a_chunked_response_gives_the_same_body(payload: bytes, cuts: list[int]) -> None:
    chunks = [payload[i : i + 700] for i in range(0, len(payload), 700)]
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks
    ) + b"0\r\n\r\n"
    parser = ResponseParser()
    events = []
    position = 0
    for cut in cuts:
        events += parser.feed(data[position : position + cut])
        position += cut
    events += parser.feed(data[position:])
    assert b"".join(e.data for e in events if isinstance(e, BodyPiece)) == payload
    assert parser.done


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * ((1 << 20) + 1),
    ],
    ids=["announced", "chunk", "close-delimited"],
)
def test_bodies_beyond_the_limit_are_refused_before_they_are_kept(data: bytes) -> None:
    with pytest.raises(ResponseTooLarge, match="more than 1 MiB"):
        parse(data, max_body=1 << 20)


def test_an_endless_head_is_refused() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ResponseTooLarge, match="head longer than 64 KiB"):
        for _ in range(100):
            parser.feed(b"X-Filler: " + b"y" * 1000 + b"\r\n")


@pytest.mark.parametrize(
    "data",
    [b"<html>\r\n\r\n", b"HTTP/1.1 2OO OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
)
def test_answers_that_are_not_http(data: bytes) -> None:
    with pytest.raises(HttpProtocolError):
        parse(data)


def test_truncated_responses_are_connection_failures() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpUnreachable, match="middle of the response body"):
        parser.feed_eof()


def test_describe_limit() -> None:
    assert (describe_limit(1 << 20), describe_limit(65536), describe_limit(100)) == ("1 MiB", "64 KiB", "100 bytes")


def test_split_url() -> None:
    assert split_url("https://[::1]/a?b=c") == (Origin("https", "::1", 443), "/a?b=c")
    assert split_url("http://h:81") == (Origin("http", "h", 81), "/")
    for bad in ("ftp://h/", "http:///x", "http://h:99999/"):
        with pytest.raises(ValueError):
            split_url(bad)


def test_proxies_from_the_environment() -> None:
    remote = Origin("https", "etcd.example.com", 2379)
    env = {"https_proxy": "http://user:p%40ss@proxy:3128", "HTTPS_PROXY": "http://ignored:1", "no_proxy": ""}
    proxy = proxy_for(remote, env)
    assert proxy is not None and proxy.origin == Origin("http", "proxy", 3128)
    assert proxy.authorization == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert proxy_for(Origin("http", "etcd.example.com", 2379), env) is None  # http has its own variable
    assert proxy_for(remote, {**env, "no_proxy": "other.org,.example.com"}) is None
    assert proxy_for(remote, {**env, "no_proxy": "*"}) is None
    assert proxy_for(Origin("https", "127.0.0.1", 2379), env) is None  # loopback never
    assert proxy_for(remote, {"HTTPS_PROXY": "proxy:8080"}) == proxy_for(remote, {"https_proxy": "http://proxy:8080"})
    with pytest.raises(ValueError, match="only http:// proxies"):
        proxy_for(remote, {"https_proxy": "socks5://proxy:1080"})


def test_requests_through_a_proxy_name_the_absolute_url() -> None:
    env = {"http_proxy": "http://u:p@proxy:3128"}
    prepared = prepare_request("GET", "http://fleetlock.example.com/v1/x", [], None, env)
    assert prepared.proxy is not None
    assert prepared.message.startswith(b"GET http://fleetlock.example.com:80/v1/x HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in prepared.message
    tunnelled = prepare_request("GET", "https://fleetlock.example.com/v1/x", [], None, {"https_proxy": "proxy:1"})
    assert tunnelled.message.startswith(b"GET /v1/x HTTP/1.1\r\n") and b"Proxy-Auth" not in tunnelled.message
