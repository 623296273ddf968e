"""The v3 gateway exchange with scripted answers: endpoint failover, tokens, refusals, formats, watch messages."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from locksmithd.backends.etcd import ops
from locksmithd.backends.etcd.gateway import (
    Answer,
    EtcdRefused,
    EtcdUnavailable,
    GatewayFormatError,
    GatewaySession,
    HttpAnswer,
    HttpCall,
    NoAnswer,
    Procedure,
    b64,
)
from locksmithd.backends.etcd.watch import WatchDecoder
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import Semaphore

A, B = "http://127.0.0.1:2379", "http://127.0.0.1:4001"


def ok(doc: object) -> HttpAnswer:
    return HttpAnswer(200, "OK", json.dumps(doc).encode())


def run(procedure: Procedure[object], answer: Callable[[HttpCall], Answer]) -> tuple[object, list[HttpCall]]:
    calls: list[HttpCall] = []
    try:
        call = next(procedure)
        while True:
            calls.append(call)
            call = procedure.send(answer(call))
    except StopIteration as done:
        return done.value, calls


def test_a_dead_endpoint_sends_the_call_on_and_the_answering_one_is_kept() -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A, B)))

    def answer(call: HttpCall) -> Answer:
        return NoAnswer("connection refused") if call.endpoint == A else ok({"kvs": []})

    result, calls = run(session.call("kv/range", {}), answer)
    assert result == {"kvs": []} and [c.endpoint for c in calls] == [A, B]
    assert calls[0].path == "/v3/kv/range" and ("Content-Type", "application/json") in calls[0].headers
    _, calls = run(session.call("kv/range", {}), answer)
    assert [c.endpoint for c in calls] == [B]  # the one that answered goes first now


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (HttpAnswer(503, "Service Unavailable", b'{"error":"etcdserver: no leader","code":14}'), "no leader"),
        (HttpAnswer(200, "OK", b"<html>hello</html>"), "not etcd's JSON"),
        (HttpAnswer(200, "OK", b"[" * 100_000), "not etcd's JSON"),
        (NoAnswer("timed out"), "timed out"),
    ],
)
def test_answers_that_are_no_answer(answer: Answer, reason: str) -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A, B)))
    with pytest.raises(EtcdUnavailable, match=reason) as info:
        run(session.call("kv/range", {}), lambda call: answer)
    assert A in str(info.value) and B in str(info.value)


def test_a_page_that_is_not_etcd_is_one_line_with_the_status() -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A,)))
    page = HttpAnswer(404, "Not Found", b"<html>\n<body>\n" + b"<p>nothing here</p>\n" * 500)
    with pytest.raises(EtcdRefused) as info:
        run(session.call("kv/range", {}), lambda call: page)
    message = str(info.value)
    assert message == f"etcd at {A} refused kv/range: HTTP 404 Not Found (not an etcd v3 JSON gateway answer)"


def test_an_expired_token_is_renewed_once() -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A,), username="node", password="pw"))
    tokens = iter(["t1", "t2"])
    seen: list[tuple[str, str | None]] = []

    def answer(call: HttpCall) -> Answer:
        token = dict(call.headers).get("Authorization")
        seen.append((call.path, token))
        if call.path.endswith("auth/authenticate"):
            assert json.loads(call.body or b"") == {"name": "node", "password": "pw"}
            return ok({"token": next(tokens)})
        if token == "t1":
            return HttpAnswer(401, "Unauthorized", b'{"error":"etcdserver: invalid auth token","code":16}')
        return ok({"count": "1"})

    result, _ = run(session.call("kv/range", {}), answer)
    assert result == {"count": "1"}
    assert seen == [
        ("/v3/auth/authenticate", None), ("/v3/kv/range", "t1"), ("/v3/auth/authenticate", None),
        ("/v3/kv/range", "t2"),
    ]  # fmt: skip


def test_a_user_name_against_etcd_without_authentication_works() -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A,), username="node"))

    def answer(call: HttpCall) -> Answer:
        if call.path.endswith("auth/authenticate"):
            return HttpAnswer(400, "Bad Request", b'{"error":"etcdserver: authentication is not enabled"}')
        return ok({})

    _, calls = run(session.call("kv/range", {}), answer)
    _, again = run(session.call("kv/range", {}), answer)
    assert [c.path for c in calls + again] == ["/v3/auth/authenticate", "/v3/kv/range", "/v3/kv/range"]


def test_a_lost_race_answers_with_the_value_stored_and_counts_a_conflict() -> None:
    session = GatewaySession(EtcdSettings(endpoints=(A,)))
    keys = ops.SemaphoreKeys.for_group("")
    winner = Semaphore(0, 1, ("other",)).encode()
    record = ops.HolderRecord("2024-01-01T00:00:00Z", "host", "", "1.2.3")

    def answer(call: HttpCall) -> Answer:
        body = json.loads(call.body or b"")
        assert body["compare"] == [{"key": b64(keys.semaphore), "target": "MOD", "result": "EQUAL", "mod_revision": 5}]
        put, side_key = body["success"]
        assert Semaphore.decode(base64.b64decode(put["request_put"]["value"])).holders == ("me",)
        assert side_key["request_put"]["key"] == b64(keys.holder_key("me"))
        assert ops.HolderRecord.decode(base64.b64decode(side_key["request_put"]["value"])) == record
        kv = {"key": b64(keys.semaphore), "value": b64(winner), "mod_revision": "6"}
        return ok({"header": {"revision": "6"}, "responses": [{"response_range": {"kvs": [kv]}}]})

    start = ops.Snapshot(Semaphore.default(), 5)
    attempt, calls = run(ops.try_take(session, keys, "me", start, record=record), answer)
    assert attempt == ops.Attempt(False, ops.Snapshot(Semaphore.decode(winner), 6))
    assert len(calls) == 1 and session.stats.conflicts == 1


def test_watch_messages_are_split_and_bounded() -> None:
    decoder = WatchDecoder(max_message=1000)
    created = b'{"result":{"header":{"revision":"3"},"created":true}}\n'
    event = {"result": {"events": [{"kv": {"key": b64("k"), "value": b64("v"), "mod_revision": "4"}}]}}
    line = json.dumps(event).encode() + b"\n"
    messages = decoder.feed(created + line[:10]) + decoder.feed(line[10:])
    assert [len(m.events) for m in messages] == [0, 1]
    assert messages[1].events[0].kv.value == b"v" and messages[1].events[0].kv.mod_revision == 4
    with pytest.raises(GatewayFormatError, match="longer than"):
        decoder.feed(b"x" * 2000)
    cancelled = WatchDecoder().feed(b'{"result":{"canceled":true,"compact_revision":"9"}}\n')
    assert cancelled[0].canceled and cancelled[0].compact_revision == 9
