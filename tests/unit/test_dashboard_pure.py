"""The dashboard's pure pieces: rollout phases and one-line policies, the group form's decoding (validated by
the API's own rules), SVG charts with escaped text, and the sign-in rate limiter with a fake clock."""

from __future__ import annotations

from datetime import timedelta

from coreupdate.model import GroupPolicy, InstanceStatus, RolloutOutcome
from coreupdate.policy import RolloutView
from coreupdate.web import charts, forms, present
from coreupdate.web.ratelimit import FailureLimiter


def test_rollout_phases_in_their_order() -> None:
    p = present.Progress
    state = present.rollout_state
    open_rollout = RolloutView("2", granted=1)
    assert state(paused=True, pause_reason="", channel="s", version="2", rollout=open_rollout,
                 progress=p(1, 2)).phase == "paused"
    assert state(paused=False, pause_reason="", channel="s", version=None, rollout=None,
                 progress=p(0, 2)).detail == "channel s offers no package"
    assert state(paused=False, pause_reason="", channel="s", version="2", rollout=open_rollout,
                 progress=p(2, 2)).phase == present.RolloutPhase.COMPLETE
    # Everyone on the version without a grant: no rollout, so nothing completed (the activity log says none).
    nothing_granted = state(paused=False, pause_reason="", channel="s", version="2", rollout=None, progress=p(2, 2))
    assert nothing_granted.phase == present.RolloutPhase.IDLE
    assert nothing_granted.detail == "every instance seen in the last day runs 2, none needed a grant"
    assert state(paused=False, pause_reason="", channel="s", version="2", rollout=None, progress=p(0, 2)).phase == \
        present.RolloutPhase.IDLE
    assert state(paused=False, pause_reason="", channel="s", version="2", rollout=open_rollout,
                 progress=p(1, 2)).phase == present.RolloutPhase.IN_PROGRESS
    # A completed rollout stays complete, as in the activity log, when a newcomer on another version shows up.
    completed = RolloutView("2", granted=2, outcome=RolloutOutcome.COMPLETED)
    later = state(paused=False, pause_reason="", channel="s", version="2", rollout=completed, progress=p(2, 3))
    assert later.phase == present.RolloutPhase.COMPLETE
    assert later.detail == "completed; 1 instance(s) seen in the last day do not run 2"
    assert present.rollout_view({"granted": 2, "outcome": "completed"}, "2") == completed
    assert p(1, 3).text == "1 of 3 (33 %)" and p(0, 0).percent == 0


def test_the_policy_reads_as_one_line() -> None:
    policy = GroupPolicy(update_count=1, update_interval=timedelta(minutes=90), office_hours="Mon-Fri 09:00 8h",
                         timezone="Europe/Berlin", safe_mode=True, failure_pause_count=3)
    assert present.policy_summary(policy) == ("1 every 90 min, office hours Mon-Fri 09:00 8h Europe/Berlin, safe mode, "
                                              "pause after 3 failure(s), timeout 60 min")
    assert present.policy_summary(GroupPolicy()).startswith("no rate limit")


def test_the_form_decodes_text_and_names_every_wrong_field() -> None:
    base = GroupPolicy()
    good = forms.policy_form(base, {"update_count": "2", "update_interval": "1h30m", "update_timeout": "600",
                                    "office_hours": "", "timezone": "UTC", "safe_mode": "on",
                                    "failure_pause_count": "", "failure_pause_fraction": "0.5"})
    assert good.errors == {} and good.policy is not None
    assert (good.policy.update_count, good.policy.update_interval, good.policy.update_timeout) == (
        2, timedelta(minutes=90), timedelta(minutes=10))
    assert good.policy.safe_mode and good.policy.failure_pause_fraction == 0.5
    assert good.policy.failure_pause_count is None
    bad = forms.policy_form(base, {"update_count": "0", "update_interval": "soon", "update_timeout": "1h",
                                   "office_hours": "Xyz 09:00 1h", "timezone": "Mars/Olympus",
                                   "failure_pause_fraction": "2"})
    assert bad.policy is None
    assert set(bad.errors) == {"update_count", "update_interval", "timezone", "office_hours",
                               "failure_pause_fraction"}
    assert "write seconds or a duration" in bad.errors["update_interval"]
    assert bad.values["update_interval"] == "soon"
    assert forms.policy_form(base, forms.policy_values(good.policy)).policy == good.policy


def test_charts_escape_text_stack_versions_and_fold_old_ones() -> None:
    points = [charts.TimePoint(3600.0 * i, {f"1.{v}.0": v + 1 for v in range(10)}) for i in range(3)]
    points.append(charts.TimePoint(4 * 3600.0, {"<script>": 1}))
    series = charts.fold_versions(points)
    assert series.versions[0] == charts.OLDER and len(series.versions) == charts.MAX_VERSIONS + 1
    assert series.points[0].versions[charts.OLDER] == 1 + 2 + 3 + 4  # 1.0.0-1.3.0 summed
    svg = str(charts.versions_chart(series))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.count('<g class="bar"') == 4 and 'role="img"' in svg
    assert "1970-01-01 02:00:00 UTC: 1.9.0 10" in svg and ">01-01 02:00<" in svg  # a span of hours: dates
    seconds = [charts.TimePoint(10.0 * i, {"1.0.0": i}) for i in range(4)]
    short = str(charts.versions_chart(charts.fold_versions(seconds)))
    assert ">00:00:30<" in short  # a span of seconds: seconds
    status = str(charts.status_chart({InstanceStatus.COMPLETE: 3, InstanceStatus.ERROR: 1}, present.STATUS_ORDER))
    assert status.index("Complete") < status.index("Error") and "Instances by status: Complete 3, Error 1" in status
    assert "No check-ins" in str(charts.versions_chart(charts.fold_versions([])))
    assert charts.ordered_versions(["1.10.0", "1.9.0", "1.9.0"]) == ["1.9.0", "1.10.0"]


def test_the_limiter_refuses_past_the_count_and_forgets_with_time() -> None:
    now = [1000.0]
    limiter = FailureLimiter(3, 60.0, lambda: now[0], max_keys=2)
    for _ in range(3):
        assert limiter.retry_after("u") == 0
        limiter.failed("u")
        now[0] += 1
    assert limiter.retry_after("u") == 57.0  # the first failure leaves the window at 1060
    now[0] = 1060.5
    assert limiter.retry_after("u") == 0
    limiter.failed("u")
    limiter.succeeded("u")
    assert limiter.retry_after("u") == 0
    for key in ("a", "b", "c"):
        for _ in range(3):
            limiter.failed(key)
    assert limiter.retry_after("a") == 0 and limiter.retry_after("c") > 0  # at most two keys remembered
