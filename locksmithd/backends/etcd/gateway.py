"""etcd's v3 JSON gateway as values: what to send, how to read the answers, and the rules of the exchange.

One protocol, two shells. Everything that talks to etcd is written here (and in ``ops``, ``v2``) as a
*procedure*: a generator that yields the HTTP calls it needs (HttpCall), is sent what came back for each
(HttpAnswer, or NoAnswer when nothing usable did), and returns its result. The asyncio shell
(``client.EtcdClient``, for the daemon) and the blocking shell (``sync.SyncEtcdClient``, for locksmithctl,
which must start without asyncio) only carry calls and answers; they make no decision of their own.

Rules of the exchange (GatewaySession):

* Endpoints are tried in the order configured, starting with the one that answered last; only an endpoint that
  gives no usable answer (no connection, a timeout, HTTP 408/500/502/503/504, an answer that is not the
  gateway's JSON) sends the call on to the next. A refusal (any other status) is final: LockBackendError with
  etcd's message. When every endpoint failed, EtcdUnavailable lists each with its reason.
* With a user name, a token from ``auth/authenticate`` goes with every call as ``Authorization``; when etcd
  says the token is no longer valid, the session authenticates again once and repeats the call. A server with
  authentication disabled answers the user name with a refusal that is taken as "no token needed", as
  locksmith did.
* Answers are read up to MAX_ANSWER (above the largest value etcd stores, whose requests are capped at
  1.5 MiB), and every message quoted from an answer is cut to one short line: an endpoint that is not etcd gives
  one line naming it and its HTTP status, never its page.
* Values travel base64-encoded, int64 numbers as strings, and the gateway leaves out every field whose value
  is zero, false or empty: the parsers here read all of that back into KeyValue, RangeResult and TxnResult.

Watch streams, which only the daemon opens, are read by ``watch``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from coreos_common.http1 import HttpError, Response, ResponseTooLarge, describe_limit
from locksmithd.backends import LockBackendError, LockBackendUnavailable
from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoint

API_PREFIX = "/v3/"
# The most of one answer that is read (etcd's largest request is 1.5 MiB; base64 and JSON add a third).
MAX_ANSWER = 4 << 20
# How much of a message from an answer goes into an error.
_QUOTE = 200
# Statuses meaning "this member cannot serve now" (no leader, timeout, too many requests): another one may.
UNAVAILABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class EtcdUnavailable(LockBackendUnavailable):
    """No endpoint answered, or writers kept racing for the key: trying again later may succeed."""


class EtcdRefused(LockBackendError):
    """etcd answered with a refusal (permission, a request it does not know, bad credentials)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # etcd's own words, for callers that tell refusals apart


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request for a shell to send to ``endpoint`` (a base URL) within ``timeout`` seconds."""

    endpoint: str
    method: str
    path: str
    body: bytes | None
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 5.0
    max_answer: int = MAX_ANSWER


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    body: bytes


@dataclass(frozen=True)
class NoAnswer:
    """Nothing usable came back; ``reason`` in a few words (``connection refused``, ``timed out``…)."""

    reason: str


Answer = HttpAnswer | NoAnswer
Procedure = Generator[HttpCall, Answer, T]


def answer_of(response: Response) -> HttpAnswer:
    return HttpAnswer(response.status, response.head.reason, response.body)


def failure_of(exc: HttpError, call: HttpCall) -> NoAnswer:
    """What a shell's HTTP failure means for the exchange: no usable answer, in a few words."""
    if isinstance(exc, ResponseTooLarge):
        return NoAnswer(f"answered with more than {describe_limit(call.max_answer)}")
    return NoAnswer(str(exc))


@dataclass
class EtcdStats:
    """Counters a caller may pass in to see what the client did (benchmarks, tests); never read by it."""

    requests: int = 0
    conflicts: int = 0
    watch_events: int = 0
    semaphore_watches: int = 0
    line_watches: int = 0


# -- values --------------------------------------------------------------------------------------------------


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    return base64.b64decode(text, validate=True)


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (its last byte plus one)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def quote(text: str | bytes) -> str:
    """A message from an answer as one short line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    line = " ".join(text.split())
    return line if len(line) <= _QUOTE else line[:_QUOTE] + "…"


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd returns it; ``value`` is empty for ``keys_only`` reads and delete events."""

    key: str
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class RangeResult:
    kvs: tuple[KeyValue, ...] = ()
    count: int = 0

    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None


@dataclass(frozen=True)
class TxnResult:
    """A transaction's outcome: which branch ran, the store revision after it, and what each operation of that
    branch returned (a RangeResult for reads, None for puts and deletes)."""

    succeeded: bool
    revision: int
    responses: tuple[RangeResult | None, ...] = field(default=())

    def read(self, index: int) -> RangeResult:
        found = self.responses[index] if index < len(self.responses) else None
        if found is None:
            raise GatewayFormatError(f"transaction answer has no read at {index}")
        return found


class GatewayFormatError(ValueError):
    """An answer that is JSON but not what the gateway sends."""


def as_int(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise GatewayFormatError(f"expected an integer, got {quote(repr(value))}")
    try:
        return int(value)
    except ValueError:
        raise GatewayFormatError(f"expected an integer, got {quote(repr(value))}") from None


def parse_kv(doc: object) -> KeyValue:
    if not isinstance(doc, dict):
        raise GatewayFormatError("a key-value is not an object")
    try:
        key = unb64(doc.get("key", "")).decode()
        value = unb64(doc.get("value", ""))
    except (ValueError, UnicodeDecodeError):
        raise GatewayFormatError("a key or value is not base64") from None
    return KeyValue(
        key=key,
        value=value,
        create_revision=as_int(doc.get("create_revision")),
        mod_revision=as_int(doc.get("mod_revision")),
        version=as_int(doc.get("version")),
        lease=as_int(doc.get("lease")),
    )


def parse_range(doc: object) -> RangeResult:
    if not isinstance(doc, dict):
        raise GatewayFormatError("a range answer is not an object")
    kvs = doc.get("kvs") or []
    if not isinstance(kvs, list):
        raise GatewayFormatError("'kvs' is not a list")
    return RangeResult(tuple(parse_kv(kv) for kv in kvs), as_int(doc.get("count")))


def header_revision(doc: dict[str, Any]) -> int:
    header = doc.get("header") or {}
    if not isinstance(header, dict):
        raise GatewayFormatError("'header' is not an object")
    return as_int(header.get("revision"))


def parse_txn(doc: dict[str, Any]) -> TxnResult:
    responses = doc.get("responses") or []
    if not isinstance(responses, list):
        raise GatewayFormatError("'responses' is not a list")
    parsed: list[RangeResult | None] = []
    for response in responses:
        if not isinstance(response, dict):
            raise GatewayFormatError("a transaction response is not an object")
        found = response.get("response_range")
        parsed.append(parse_range(found) if found is not None else None)
    return TxnResult(bool(doc.get("succeeded", False)), header_revision(doc), tuple(parsed))


# -- requests ------------------------------------------------------------------------------------------------


def range_request(
    key: str,
    *,
    prefix: bool = False,
    keys_only: bool = False,
    count_only: bool = False,
    limit: int = 0,
    newest_first: bool | None = None,
    max_create_revision: int = 0,
) -> dict[str, Any]:
    """A range read of ``key`` (or every key under it, with ``prefix``); ``newest_first`` sorts by creation
    (True: descending, False: ascending)."""
    query: dict[str, Any] = {"key": b64(key)}
    if prefix:
        query["range_end"] = b64(prefix_end(key))
    if keys_only:
        query["keys_only"] = True
    if count_only:
        query["count_only"] = True
    if limit:
        query["limit"] = limit
    if newest_first is not None:
        query["sort_order"] = "DESCEND" if newest_first else "ASCEND"
        query["sort_target"] = "CREATE"
    if max_create_revision:
        query["max_create_revision"] = max_create_revision
    return query


def read_op(key: str, **kw: Any) -> dict[str, Any]:
    return {"request_range": range_request(key, **kw)}


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = lease
    return {"request_put": put}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def version_is(key: str, version: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "VERSION", "result": "EQUAL", "version": version}


def mod_revision_is(key: str, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def txn_request(
    compare: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]], failure: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    return {"compare": list(compare), "success": list(success), "failure": list(failure)}


# -- the exchange ----------------------------------------------------------------------------------------------


class EndpointDown(Exception):
    """This endpoint gave no usable answer; another one may."""


class _TokenRejected(Exception):
    pass


class _Refusal(Exception):
    """etcd refused the call; the message is etcd's (one short line)."""


def _error_text(answer: HttpAnswer) -> str:
    """etcd's message from an error answer, or the HTTP status when the body is not the gateway's JSON."""
    try:
        doc = json.loads(answer.body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        message = doc.get("message") or doc.get("error")
        if isinstance(message, str) and message:
            return quote(message)
    return f"HTTP {answer.status} {answer.reason}".strip() + " (not an etcd v3 JSON gateway answer)"


def decode_answer(answer: Answer, path: str) -> dict[str, Any]:
    """The JSON object of a 200 answer; raises EndpointDown, _TokenRejected or _Refusal."""
    if isinstance(answer, NoAnswer):
        raise EndpointDown(answer.reason)
    if answer.status == 200:
        try:
            doc = json.loads(answer.body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise EndpointDown(f"answered {path} with something that is not etcd's JSON (HTTP 200 {answer.reason})")
        return doc
    message = _error_text(answer)
    if answer.status in UNAVAILABLE_STATUSES:
        raise EndpointDown(f"HTTP {answer.status}: {message}")
    if answer.status == 401 and "auth token" in message:
        raise _TokenRejected(message)
    raise _Refusal(message)


class GatewaySession:
    """The exchange's state for one client: the endpoints, which one answered last, and tokens."""

    def __init__(self, settings: EtcdSettings, stats: EtcdStats | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.endpoints = [parse_endpoint(url).url.rstrip("/") for url in settings.endpoints]
        self.current = 0
        self.stats = stats if stats is not None else EtcdStats()
        self._tokens: dict[int, str] = {}
        self._no_auth: set[int] = set()
        # Whether any call was answered yet: a command tells "cannot reach etcd" from later failures by it.
        self.contacted = False
        # Cleared once etcd refuses the holder records (no permission on their prefix): slots are then taken
        # and released without them.
        self.holder_records = True

    @property
    def current_endpoint(self) -> str:
        return self.endpoints[self.current]

    def order(self) -> list[int]:
        """Endpoint indices to try, the one that answered last first."""
        count = len(self.endpoints)
        return [(self.current + step) % count for step in range(count)]

    def answered(self, index: int) -> bool:
        """Remember ``index`` as the endpoint to try first; True when that changed."""
        changed = index != self.current
        self.current = index
        self.contacted = True
        return changed

    def headers(self, index: int) -> tuple[tuple[str, str], ...]:
        token = self._tokens.get(index)
        base = (("Content-Type", "application/json"),)
        return (*base, ("Authorization", token)) if token else base

    def http_call(self, index: int, path: str, body: dict[str, Any], timeout: float | None = None) -> HttpCall:
        self.stats.requests += 1
        return HttpCall(
            endpoint=self.endpoints[index],
            method="POST",
            path=API_PREFIX + path,
            body=json.dumps(body, separators=(",", ":")).encode(),
            headers=self.headers(index),
            timeout=self.settings.request_timeout if timeout is None else timeout,
        )

    def authenticate(self, index: int, timeout: float | None = None) -> Procedure[None]:
        """Get a token from endpoint ``index`` unless it has one (or needs none)."""
        if self.settings.username is None or index in self._tokens or index in self._no_auth:
            return
        body = {"name": self.settings.username, "password": self.settings.password or ""}
        answer = yield self.http_call(index, "auth/authenticate", body, timeout)
        try:
            doc = decode_answer(answer, "auth/authenticate")
        except _Refusal as exc:
            reason = str(exc)
            if "authentication is not enabled" in reason:
                self._no_auth.add(index)  # a user name against a server without auth works, as with locksmith
                return
            raise EtcdRefused(
                f"etcd at {self.endpoints[index]} refused user {self.settings.username!r}: {reason}", reason
            ) from None
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise EndpointDown("auth/authenticate answered without a token")
        self._tokens[index] = token

    def _call_at(self, index: int, path: str, body: dict[str, Any], timeout: float | None) -> Procedure[dict[str, Any]]:
        for attempt in range(2):
            yield from self.authenticate(index, timeout)
            answer = yield self.http_call(index, path, body, timeout)
            try:
                return decode_answer(answer, path)
            except _Refusal as exc:
                reason = str(exc)
                raise EtcdRefused(f"etcd at {self.endpoints[index]} refused {path}: {reason}", reason) from None
            except _TokenRejected as exc:
                if attempt:
                    raise EtcdRefused(f"etcd at {self.endpoints[index]} rejects our token: {exc}", str(exc)) from None
                self._tokens.pop(index, None)  # expired: authenticate again, once
        raise AssertionError("unreachable")

    def call(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Procedure[dict[str, Any]]:
        """One gateway call (``kv/range``, ``kv/txn``, ``lease/grant``…) with failover; its JSON answer."""
        failures: list[str] = []
        for index in self.order():
            try:
                doc = yield from self._call_at(index, path, body, timeout)
            except EndpointDown as exc:
                failures.append(f"{self.endpoints[index]}: {exc}")
                continue
            self.answered(index)
            return doc
        raise EtcdUnavailable(f"no etcd endpoint answered ({'; '.join(failures)})")


    def stream_call(self, index: int, path: str, body: dict[str, Any]) -> Procedure[HttpCall]:
        """The call that opens a stream (a watch) at endpoint ``index``, authenticated first if needed; the
        shell sends it as a stream and passes a non-200 head to ``check_stream_answer``."""
        yield from self.authenticate(index)
        return self.http_call(index, path, body)

    def check_stream_answer(self, index: int, path: str, answer: HttpAnswer) -> None:
        """Raise for a stream that did not open: EndpointDown (try the next endpoint) or EtcdRefused."""
        try:
            decode_answer(answer, path)
        except _TokenRejected as exc:
            self._tokens.pop(index, None)  # the next attempt authenticates again
            raise EndpointDown(str(exc)) from None
        except _Refusal as exc:
            raise EtcdRefused(f"etcd at {self.endpoints[index]} refused {path}: {exc}", str(exc)) from None
