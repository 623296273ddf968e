"""The versions-over-time roll-up of the API (``--resolution``): each bucket shows its latest hour."""

from __future__ import annotations

from coreupdate.api import roll_up

DAY = 86400.0


def test_hourly_points_roll_up_to_days_with_the_last_hour_of_each_day() -> None:
    points = [
        {"at": 0.0, "version": "1.0.0", "instances": 10},
        {"at": 3600.0, "version": "1.0.0", "instances": 8},
        {"at": 3600.0, "version": "2.0.0", "instances": 2},
        {"at": DAY + 7200.0, "version": "2.0.0", "instances": 10},
    ]
    assert roll_up(points, 86400) == [
        {"at": 0.0, "version": "1.0.0", "instances": 8},
        {"at": 0.0, "version": "2.0.0", "instances": 2},
        {"at": DAY, "version": "2.0.0", "instances": 10},
    ]
    assert roll_up(points, 3600) == points
    assert roll_up([], 86400) == []
