"""etcd v3 watch streams as values: the request that opens one and a decoder of its messages; no I/O.

Rules: a watch stream is one JSON object per line; each message is parsed into a WatchMessage (events, or a
cancellation, with the compacted revision when history is gone). A line longer than the decoder's bound is a
GatewayFormatError, never an unbounded buffer. The asyncio shell (``client.KeyWatch``) reads the stream and
feeds this decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from locksmithd.backends.etcd.gateway import MAX_ANSWER, GatewayFormatError, KeyValue, as_int, b64, parse_kv, quote


def watch_request(key: str, start_revision: int, *, deletes_only: bool = False) -> dict[str, Any]:
    """A watch of ``key`` from ``start_revision`` on; ``deletes_only`` asks etcd not to send puts."""
    request: dict[str, Any] = {"key": b64(key), "start_revision": start_revision}
    if deletes_only:
        request["filters"] = ["NOPUT"]
    return {"create_request": request}


@dataclass(frozen=True)
class WatchEvent:
    """A change of the key: its new value, or ``deleted`` (``kv`` then has only the key and revision)."""

    kv: KeyValue
    deleted: bool


@dataclass(frozen=True)
class WatchMessage:
    """One message of a watch stream. ``canceled`` ends the watch; with ``compact_revision`` the history it
    asked for is gone (read the key again and watch from there)."""

    events: tuple[WatchEvent, ...] = ()
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""


def parse_watch_message(doc: object) -> WatchMessage:
    if not isinstance(doc, dict):
        raise GatewayFormatError("a watch message is not an object")
    if "result" not in doc:
        error = doc.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        raise GatewayFormatError(f"the watch failed: {quote(str(message or doc))}")
    result = doc.get("result") or {}
    if not isinstance(result, dict):
        raise GatewayFormatError("a watch result is not an object")
    events = []
    for event in result.get("events") or []:
        if not isinstance(event, dict):
            raise GatewayFormatError("a watch event is not an object")
        events.append(WatchEvent(parse_kv(event.get("kv") or {}), event.get("type") == "DELETE"))
    return WatchMessage(
        events=tuple(events),
        canceled=bool(result.get("canceled", False)),
        compact_revision=as_int(result.get("compact_revision")),
        cancel_reason=quote(str(result.get("cancel_reason") or "")),
    )


class WatchDecoder:
    """Splits a watch stream (one JSON object per line) into WatchMessages; a line longer than
    ``max_message`` is a GatewayFormatError, never an unbounded buffer."""

    def __init__(self, max_message: int = MAX_ANSWER) -> None:
        self._buffer = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[WatchMessage]:
        self._buffer += data
        messages = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if not line:
                continue
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                raise GatewayFormatError(f"the watch stream sent something that is not JSON: {quote(line)}") from None
            messages.append(parse_watch_message(doc))
        if len(self._buffer) > self._max:
            raise GatewayFormatError("a watch message longer than 4 MiB")
        return messages
