"""Both HTTP/1.1 shells (asyncio and blocking) against a scripted server on 127.0.0.1: keep-alive, a server
that drops idle connections, streamed chunks, bounded bodies, time limits, refused connections, proxies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coreos_common.http1 import HttpUnreachable, RequestBodyError, ResponseTooLarge, StreamedBody
from coreos_common.http_async import HttpClient
from coreos_common.http_sync import SyncHttpClient, file_body
from sim.ports import free_port
from sim.tls import make_server_tls

pytestmark = pytest.mark.integration


class Scripted(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        self.stop_endless = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(socketserver.BaseRequestHandler):
    server: Scripted

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a client going away mid-request is not the server's failure
            self._serve()

    def _serve(self) -> None:
        self.server.connections += 1
        sock: socket.socket = self.request
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            request_line = head.split(b"\r\n")[0].decode()
            lines = head.split(b"\r\n")
            length = next((int(h.split(b":")[1]) for h in lines if h.lower().startswith(b"content-length")), 0)
            if request_line.split(" ")[1] == "/refuse-early":  # answers before reading the body, then closes
                sock.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 8\r\nConnection: close\r\n\r\nno token")
                return
            while len(buffer) < length:
                buffer += sock.recv(65536)
            body, buffer = buffer[:length], buffer[length:]
            path = request_line.split(" ")[1]
            if path.startswith("http://"):  # absolute form, as a proxy forwards it
                path = "/" + path.split("/", 3)[3]
            if not self.answer(sock, path, body):
                return

    def answer(self, sock: socket.socket, path: str, body: bytes) -> bool:
        """Answer one request; False ends the connection."""
        if path == "/echo":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return True
        if path == "/digest":  # what arrived, in a few bytes: its length and SHA-256
            answer = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            return True
        if path == "/drop-after":  # says keep-alive, then closes: a server dropping idle connections
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return False
        if path == "/stream":
            with contextlib.suppress(OSError):  # a client may stop reading half-way
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for word in (b"one", b"two", b"three"):
                    sock.sendall(b"%x\r\n%s\r\n" % (len(word), word))
                    time.sleep(0.05)
                sock.sendall(b"0\r\n\r\n")
            return True
        if path == "/endless":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            with contextlib.suppress(OSError):
                while not self.server.stop_endless.is_set():
                    sock.sendall(b"10000\r\n" + b"x" * 65536 + b"\r\n")
            return False
        if path == "/silent":
            self.server.stop_endless.wait(30)
            return False
        sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True


@pytest.fixture
def server() -> Iterator[Scripted]:
    srv = Scripted()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop_endless.set()
        srv.shutdown()
        srv.server_close()


async def test_async_keep_alive_and_a_dropped_idle_connection(server: Scripted) -> None:
    client = HttpClient()
    try:
        for i in range(3):
            answer = await client.request("POST", f"{server.url}/echo", body=b"n%d" % i)
            assert (answer.status, answer.body) == (200, b"n%d" % i)
        assert server.connections == 1
        assert (await client.request("GET", f"{server.url}/drop-after")).body == b"ok"
        # The pooled connection is closed by now; the request goes out again on a new one.
        assert (await client.request("POST", f"{server.url}/echo", body=b"again")).body == b"again"
        assert server.connections == 2
    finally:
        await client.close()


def test_sync_keep_alive_and_a_dropped_idle_connection(server: Scripted) -> None:
    client = SyncHttpClient()
    try:
        assert client.request("POST", f"{server.url}/echo", body=b"a").body == b"a"
        assert client.request("POST", f"{server.url}/echo", body=b"b").body == b"b"
        assert server.connections == 1
        assert client.request("GET", f"{server.url}/drop-after").body == b"ok"
        assert client.request("POST", f"{server.url}/echo", body=b"c").body == b"c"
        assert server.connections == 2
    finally:
        client.close()


def test_sync_streams_a_file_body_and_sends_it_again_on_a_new_connection(server: Scripted, tmp_path: Path) -> None:
    data = os.urandom(3 << 20) + b"tail"
    path = tmp_path / "upload"
    path.write_bytes(b"skipped" + data)
    client = SyncHttpClient()
    try:
        with path.open("rb") as file:
            file.seek(len(b"skipped"))  # the body is the rest of the file, from where it stands
            body = file_body(file, piece_size=65536)
            expected = b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
            assert client.request("PUT", f"{server.url}/digest", body=body).body == expected
            # An idle connection the server has dropped: the request goes out again, the body from its start.
            assert client.request("GET", f"{server.url}/drop-after").body == b"ok"
            assert client.request("PUT", f"{server.url}/digest", body=body).body == expected
        assert server.connections == 2
        # A body shorter than announced (a file truncated meanwhile) is an error, not a request cut short.
        short = StreamedBody(10, lambda: [b"12345"])
        with pytest.raises(RequestBodyError, match="ended after 5 of its announced 10 bytes"):
            client.request("PUT", f"{server.url}/digest", body=short)
    finally:
        client.close()


def test_sync_returns_the_answer_of_a_server_that_stops_reading_the_body(server: Scripted) -> None:
    """A server refusing an upload (no token, too large) answers after the head and closes: that answer, not
    "connection reset", is what the caller gets, however much of the body was left to send."""
    body = StreamedBody(256 << 20, lambda: (bytes(1 << 20) for _ in range(256)))
    client = SyncHttpClient()
    try:
        answer = client.request("PUT", f"{server.url}/refuse-early", body=body, timeout=30)
        assert (answer.status, answer.body) == (401, b"no token")
    finally:
        client.close()


async def test_async_stream_hands_over_pieces_as_they_arrive(server: Scripted) -> None:
    client = HttpClient()
    try:
        async with client.stream("GET", f"{server.url}/stream") as stream:
            assert stream.head.status == 200
            pieces = []
            while (piece := await stream.read(timeout=10)) is not None:
                pieces.append(piece)
        assert b"".join(pieces) == b"onetwothree" and len(pieces) >= 2
    finally:
        await client.close()


async def test_bodies_are_bounded(server: Scripted) -> None:
    client = HttpClient()
    try:
        with pytest.raises(ResponseTooLarge, match="more than 1 MiB"):
            await client.request("GET", f"{server.url}/endless")
        assert (await client.request("POST", f"{server.url}/echo", body=b"still fine")).body == b"still fine"
    finally:
        await client.close()
    sync = SyncHttpClient()
    try:
        with pytest.raises(ResponseTooLarge, match="more than 64 KiB"):
            sync.request("GET", f"{server.url}/endless", max_body=65536)
    finally:
        sync.close()


async def test_time_limits_and_refused_connections(server: Scripted) -> None:
    client = HttpClient()
    try:
        with pytest.raises(HttpUnreachable, match="timed out"):
            await client.request("GET", f"{server.url}/silent", timeout=0.3)
        with pytest.raises(HttpUnreachable, match="connection refused"):
            await client.request("GET", f"http://127.0.0.1:{free_port()}/")
        async with client.stream("GET", f"{server.url}/stream") as stream:
            with pytest.raises(TimeoutError):
                while True:
                    await stream.read(timeout=0.001)
    finally:
        await client.close()
    sync = SyncHttpClient()
    with pytest.raises(HttpUnreachable, match="timed out"):
        sync.request("GET", f"{server.url}/silent", timeout=0.3)
    with pytest.raises(HttpUnreachable, match="connection refused"):
        sync.request("GET", f"http://127.0.0.1:{free_port()}/")


class Proxy(socketserver.ThreadingTCPServer):
    """A forward proxy that relays absolute-form requests and opens CONNECT tunnels, sending every host name to
    127.0.0.1 (so the clients can be given names that only the proxy knows); records the request lines."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.asked: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(socketserver.BaseRequestHandler):
    server: Proxy

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                return
            head += data
        request_line = head.split(b"\r\n")[0].decode()
        self.server.asked.append(request_line)
        method, target, _ = request_line.split(" ")
        authority = target if method == "CONNECT" else target.split("/")[2]
        upstream = socket.create_connection(("127.0.0.1", int(authority.rsplit(":", 1)[1])))
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            head = head.split(b"\r\n\r\n", 1)[1]
        if head:
            upstream.sendall(head)
        with upstream:
            while True:
                readable, _, _ = select.select([client, upstream], [], [], 10)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    srv = Proxy()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


async def test_http_proxy_from_the_environment(server: Scripted, proxy: Proxy) -> None:
    """A name only the proxy resolves: the answer can only have come through it. Loopback goes direct."""
    port = server.server_address[1]
    named = f"http://etcd.test:{port}/echo"
    env = {"http_proxy": proxy.url}
    client = HttpClient(environ=env)
    try:
        assert (await client.request("POST", named, body=b"via proxy")).body == b"via proxy"
        assert proxy.asked == [f"POST http://etcd.test:{port}/echo HTTP/1.1"]
        assert (await client.request("POST", f"{server.url}/echo", body=b"direct")).body == b"direct"
        assert len(proxy.asked) == 1
    finally:
        await client.close()
    sync = SyncHttpClient(environ=env)
    try:
        assert sync.request("POST", named, body=b"sync via proxy").body == b"sync via proxy"
        assert len(proxy.asked) == 2
    finally:
        sync.close()
    refusing = HttpClient(environ={"http_proxy": f"http://127.0.0.1:{free_port()}"})
    try:
        with pytest.raises(HttpUnreachable, match=r"connection refused \(through proxy"):
            await refusing.request("GET", named)
    finally:
        await refusing.close()


class TlsScripted(Scripted):
    """The scripted server over TLS (a certificate from sim.tls's throw-away CA)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address


async def test_https_through_a_proxy_tunnel(proxy: Proxy, tmp_path: Path) -> None:
    """An https origin behind ``https_proxy``: a CONNECT tunnel, then TLS with the origin itself."""
    tls = make_server_tls(tmp_path / "pki")
    server = TlsScripted(tls.server_context())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def trusting() -> ssl.SSLContext:
        # The certificate names 127.0.0.1 and the request names etcd.test (only the proxy knows it).
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.check_hostname = False
        return context

    url = f"https://etcd.test:{server.server_address[1]}/echo"
    env = {"https_proxy": proxy.url}
    try:
        client = HttpClient(environ=env, ssl_context=trusting)
        try:
            assert (await client.request("POST", url, body=b"tunnelled")).body == b"tunnelled"
            assert (await client.request("POST", url, body=b"again")).body == b"again"  # the tunnel is kept
        finally:
            await client.close()
        sync = SyncHttpClient(environ=env, ssl_context=trusting)
        try:
            assert sync.request("POST", url, body=b"sync tunnelled").body == b"sync tunnelled"
        finally:
            sync.close()
        assert proxy.asked == [f"CONNECT etcd.test:{server.server_address[1]} HTTP/1.1"] * 2
    finally:
        server.shutdown()
        server.server_close()
