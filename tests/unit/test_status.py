"""The D-Bus coordinates and status strings every client and locksmithd depend on, and the strict status tuple."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreos_common.status import (
    BUS_NAME,
    INTERFACE,
    OBJECT_PATH,
    STATUS_SIGNATURE,
    StatusSnapshot,
    UpdateStatus,
)


def test_dbus_coordinates_are_the_originals() -> None:
    assert (BUS_NAME, OBJECT_PATH, INTERFACE, STATUS_SIGNATURE) == (
        "com.coreos.update1",
        "/com/coreos/update1",
        "com.coreos.update1.Manager",
        "xdssx",
    )


def test_status_strings_are_exactly_the_eight_published_ones() -> None:
    assert [s.value for s in UpdateStatus] == [
        "UPDATE_STATUS_IDLE",
        "UPDATE_STATUS_CHECKING_FOR_UPDATE",
        "UPDATE_STATUS_UPDATE_AVAILABLE",
        "UPDATE_STATUS_DOWNLOADING",
        "UPDATE_STATUS_VERIFYING",
        "UPDATE_STATUS_FINALIZING",
        "UPDATE_STATUS_UPDATED_NEED_REBOOT",
        "UPDATE_STATUS_REPORTING_ERROR_EVENT",
    ]


def test_a_status_string_from_the_bus_maps_back_to_its_state() -> None:
    assert UpdateStatus("UPDATE_STATUS_UPDATED_NEED_REBOOT") is UpdateStatus.UPDATED_NEED_REBOOT
    with pytest.raises(ValueError, match="UPDATE_STATUS_REBOOTING"):
        UpdateStatus("UPDATE_STATUS_REBOOTING")


def test_fresh_daemon_reports_idle_never_checked_and_version_0_0_0() -> None:
    assert StatusSnapshot().as_tuple() == (0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)


def test_tuple_is_in_getstatus_order() -> None:
    snap = StatusSnapshot(1700000000, 0.5, UpdateStatus.DOWNLOADING.value, "3815.2.0", 461373440)
    assert snap.as_tuple() == (1700000000, 0.5, "UPDATE_STATUS_DOWNLOADING", "3815.2.0", 461373440)


def test_from_values_accepts_a_list_body_as_dbus_delivers_it() -> None:
    snap = StatusSnapshot.from_values([1700000000, 1.0, "UPDATE_STATUS_FINALIZING", "3815.2.0", 10])
    assert snap == StatusSnapshot(1700000000, 1.0, "UPDATE_STATUS_FINALIZING", "3815.2.0", 10)


@pytest.mark.parametrize(
    "body",
    [
        [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0"],  # four fields
        [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0, 0],  # six fields
        "UPDATE_STATUS_IDLE",  # a bare string
        None,
        {"current_operation": "UPDATE_STATUS_IDLE"},
    ],
)
def test_wrong_shape_is_refused_naming_what_came(body: object) -> None:
    with pytest.raises(ValueError, match=r"5 fields \(x d s s x\)") as caught:
        StatusSnapshot.from_values(body)
    assert repr(body) in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        ["0", 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0],  # time as a string (signature s, not x)
        [True, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0],  # a boolean is not an int64
        [0, 1, "UPDATE_STATUS_IDLE", "0.0.0", 0],  # progress must be a double
        [0, 0.0, 6, "0.0.0", 0],
        [0, 0.0, "UPDATE_STATUS_IDLE", b"0.0.0", 0],
        [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", False],
        [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 1.5],
    ],
)
def test_wrong_field_types_are_refused_naming_the_body(body: list[object]) -> None:
    with pytest.raises(ValueError, match=r"must be \(x d s s x\)") as caught:
        StatusSnapshot.from_values(body)
    assert repr(body) in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    t=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    p=st.floats(allow_nan=False),
    op=st.sampled_from([s.value for s in UpdateStatus]),
    ver=st.text(max_size=20),
    size=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_any_well_typed_status_survives_the_round_trip(t: int, p: float, op: str, ver: str, size: int) -> None:
    snap = StatusSnapshot(t, p, op, ver, size)
    assert StatusSnapshot.from_values(snap.as_tuple()) == snap
    assert StatusSnapshot.from_values(list(snap.as_tuple())) == snap


def test_snapshots_are_values_not_shared_state() -> None:
    snap = StatusSnapshot()
    with pytest.raises(AttributeError):
        snap.current_operation = UpdateStatus.DOWNLOADING.value  # type: ignore[misc]
    assert StatusSnapshot() == snap and hash(StatusSnapshot()) == hash(snap)
