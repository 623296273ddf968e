"""A group's office hours: its window list in its time zone (the arithmetic is the shared window module's)."""

from __future__ import annotations

from coreos_common.window import WindowError, WindowList, parse_window_list


def parse_office_hours(text: str, zone: str) -> WindowList | None:
    """The windows of ``text`` in ``zone``; None for an empty text (always open).  Raises ValueError."""
    if not text.strip():
        return None
    try:
        return parse_window_list(text, zone)
    except WindowError as exc:
        raise ValueError(str(exc)) from None
