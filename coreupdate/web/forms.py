"""The group form: HTML form text → the API's JSON values → ``validation.policy_patch``.  Pure.

Rules: this module only *decodes* (a number stays a string when it is not one, so the server's validation names
the problem; durations may be written in seconds or as Go durations such as ``90m``; a ticked box is true, an
absent one false; an empty optional field is null).  Validation is the API's own (``validation.py``), applied
field by field so every wrong field gets its message next to it, then to all fields at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coreos_common.goduration import DurationError, parse_go_duration
from coreupdate import validation
from coreupdate.model import GroupPolicy
from coreupdate.validation import ValidationError

_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)")

# The form's policy fields, in the order the page shows them.
POLICY_FIELDS = ("update_count", "update_interval", "update_timeout", "timezone", "office_hours", "safe_mode",
                 "failure_pause_count", "failure_pause_fraction")
_DURATIONS = ("update_interval", "update_timeout")
_OPTIONAL = ("failure_pause_count", "failure_pause_fraction")


@dataclass
class FormResult:
    """A checked form: the new policy, or the messages by field (and the text the user typed, to show again)."""

    policy: GroupPolicy | None
    errors: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)


def _decode(name: str, text: str) -> tuple[Any, str | None]:
    """(JSON value, decoding error)."""
    text = text.strip()
    if name == "safe_mode":
        return text in ("on", "true", "1"), None
    if name in _OPTIONAL and not text:
        return None, None
    if name in _DURATIONS:
        if _INTEGER.fullmatch(text):
            return int(text), None
        try:
            seconds = parse_go_duration(text).total_seconds()
        except DurationError as exc:
            return None, f"{exc}; write seconds or a duration such as 90m or 1h30m"
        return (int(seconds) if seconds == int(seconds) else seconds), None
    if name in ("update_count", "failure_pause_count"):
        return (int(text) if _INTEGER.fullmatch(text) else text), None
    if name == "failure_pause_fraction":
        return (float(text) if _NUMBER.fullmatch(text) else text), None
    return text, None


def policy_form(base: GroupPolicy, form: Mapping[str, str]) -> FormResult:
    """Apply the posted policy fields to ``base``; every field is validated by ``validation.policy_patch``."""
    values = {name: form.get(name, "") for name in POLICY_FIELDS}
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in POLICY_FIELDS:
        value, problem = _decode(name, values[name])
        if problem is not None:
            errors[name] = problem
            continue
        data[name] = value
    for name, value in data.items():
        single = {name: value}
        if name == "office_hours" and "timezone" in data and "timezone" not in errors:
            single["timezone"] = data["timezone"]  # (timezone comes before office_hours in POLICY_FIELDS' order)
        try:
            validation.policy_patch(base, single)
        except ValidationError as exc:
            errors.setdefault(exc.field, exc.problem)
    if errors:
        return FormResult(None, errors, values)
    return FormResult(validation.policy_patch(base, data), {}, values)


def policy_values(policy: GroupPolicy) -> dict[str, str]:
    """The form's text for a stored policy."""
    return {
        "update_count": str(policy.update_count),
        "update_interval": str(int(policy.update_interval.total_seconds())),
        "update_timeout": str(int(policy.update_timeout.total_seconds())),
        "office_hours": policy.office_hours,
        "timezone": policy.timezone,
        "safe_mode": "on" if policy.safe_mode else "",
        "failure_pause_count": "" if policy.failure_pause_count is None else str(policy.failure_pause_count),
        "failure_pause_fraction": "" if policy.failure_pause_fraction is None else f"{policy.failure_pause_fraction:g}",
    }
