"""The dev server's log names the events clients report, not only their numbers."""

from __future__ import annotations

import logging

import pytest

from update_engine import omaha
from update_engine.devserver import DevServer, event_name


def test_events_are_named_by_type_and_result() -> None:
    assert event_name(13, 1) == "UPDATE_DOWNLOAD_STARTED/SUCCESS"
    assert event_name(3, 0) == "UPDATE_COMPLETE/ERROR"
    assert event_name(3, 9) == "UPDATE_COMPLETE/UPDATE_DEFERRED"
    assert event_name(77, 99) == "77/99"


def test_a_reported_event_is_logged_with_its_names(caplog: pytest.LogCaptureFixture) -> None:
    """Before: "Event from m (version 1.0.0): 3/0 errorcode=10 (DOWNLOAD_HASH_MISMATCH)"."""
    app = omaha.RequestApp(app_id="{x}", version="1.0.0", machine_id="m")
    with caplog.at_level(logging.INFO, logger="update-engine-devserver"):
        DevServer([])._record(app, omaha.RequestEvent(3, 0, error_code=10))
    assert ("Event from m (version 1.0.0): 3/0 UPDATE_COMPLETE/ERROR errorcode=10 (DOWNLOAD_HASH_MISMATCH)"
            in caplog.text)
