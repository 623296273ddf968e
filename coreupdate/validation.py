"""Validation of what operators and nodes send: ids, names, versions, policy fields.  Pure.

Every error is a ``ValidationError`` whose message names the field and the problem, so the API can return it
as is (400) and the CLI can print it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from coreupdate.model import GroupPolicy
from update_engine.omaha import version_less

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_APP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_LABEL = 200
MAX_INTERVAL_SECONDS = 366 * 86400


class ValidationError(ValueError):
    """Input that cannot be used; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def canonical_app_id(value: object, field: str = "app_id") -> str:
    """``{E96281A6-…}`` and ``e96281a6-…`` are the same application: lower case, braces stripped."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    return _canonical_app_id(value, field)


@functools.lru_cache(maxsize=1024)
def _canonical_app_id(value: str, field: str) -> str:
    text = value.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    text = text.lower()
    if not _APP_ID_RE.fullmatch(text):
        raise ValidationError(field, f"{value!r} is not an application id (letters, digits, '.', '_', '-')")
    return text


def name(value: object, field: str) -> str:
    """A channel name or group id: 1-64 of letters, digits, ``.``, ``_``, ``-``, starting alphanumeric."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationError(field, f"{value!r} is not a name (1-64 letters, digits, '.', '_', '-')")
    return value


def label(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > MAX_LABEL or any(ord(ch) < 0x20 for ch in value):
        raise ValidationError(field, f"must be at most {MAX_LABEL} printable characters")
    return value


def version(value: object, field: str = "version") -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string")
    try:
        version_less(value, value)
    except ValueError as exc:
        raise ValidationError(field, str(exc)) from None
    return value


def file_name(value: object, field: str = "file_name") -> str:
    if not isinstance(value, str) or not _FILE_NAME_RE.fullmatch(value):
        raise ValidationError(field, f"{value!r} is not a file name (letters, digits, '.', '_', '-')")
    return value


def url(value: object, field: str = "url") -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValidationError(field, f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(ch.isspace() for ch in value):
        raise ValidationError(field, f"{value!r} is not an http(s) URL with a host")
    return value


def hash_b64(value: object, field: str, digest_size: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ValidationError(field, f"{value!r} is not base64") from None
    if len(raw) != digest_size:
        raise ValidationError(field, f"decodes to {len(raw)} bytes, expected {digest_size}")
    return value


def positive_int(value: object, field: str, *, maximum: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise ValidationError(field, f"{value!r} is not an integer between 1 and {maximum}")
    return value


def boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, f"{value!r} is not true or false")
    return value


def timezone(value: object, field: str = "timezone") -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be an IANA time zone name such as Europe/Berlin")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(field, f"{value!r} is not a known IANA time zone") from None
    return value


def office_hours(value: object, zone: str, field: str = "office_hours") -> str:
    """A window list (``"Mon-Fri 09:00 8h; Sat 10:00 2h"``), or empty for always."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string such as 'Mon-Fri 09:00 8h'")
    if not value.strip():
        return ""
    from coreupdate.office_hours import parse_office_hours

    try:
        parse_office_hours(value, zone)
    except ValueError as exc:
        raise ValidationError(field, str(exc)) from None
    return value.strip()


_POLICY_FIELDS = (
    "updates_paused",
    "update_count",
    "update_interval",
    "update_timeout",
    "safe_mode",
    "office_hours",
    "timezone",
    "failure_pause_count",
    "failure_pause_fraction",
)


def policy_patch(base: GroupPolicy, data: Mapping[str, Any]) -> GroupPolicy:
    """``base`` with the policy fields present in ``data`` (JSON values; intervals in seconds) applied."""
    changes: dict[str, Any] = {}
    if "updates_paused" in data:
        changes["updates_paused"] = boolean(data["updates_paused"], "updates_paused")
    if "update_count" in data:
        changes["update_count"] = positive_int(data["update_count"], "update_count")
    for key in ("update_interval", "update_timeout"):
        if key in data:
            seconds = positive_int(data[key], key, maximum=MAX_INTERVAL_SECONDS)
            changes[key] = timedelta(seconds=seconds)
    if "safe_mode" in data:
        changes["safe_mode"] = boolean(data["safe_mode"], "safe_mode")
    zone = base.timezone
    if "timezone" in data:
        zone = changes["timezone"] = timezone(data["timezone"])
    if "office_hours" in data:
        changes["office_hours"] = office_hours(data["office_hours"], zone)
    elif "timezone" in data and base.office_hours:
        office_hours(base.office_hours, zone)
    if "failure_pause_count" in data:
        value = data["failure_pause_count"]
        changes["failure_pause_count"] = None if value is None else positive_int(value, "failure_pause_count")
    if "failure_pause_fraction" in data:
        value = data["failure_pause_fraction"]
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= 1
        ):
            raise ValidationError("failure_pause_fraction", f"{value!r} is not a number in (0, 1]")
        changes["failure_pause_fraction"] = None if value is None else float(value)
    return replace(base, **changes)


def policy_fields() -> tuple[str, ...]:
    return _POLICY_FIELDS
