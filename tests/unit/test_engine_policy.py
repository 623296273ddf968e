"""The engine's pure decisions: what a check reports about the last install, and which offers are refused."""

from __future__ import annotations

import pytest

from update_engine import omaha
from update_engine.engine.policy import (
    CheckReport,
    LastInstall,
    OfferRefused,
    failure_event_code,
    report_for_check,
    vet_offer,
)
from update_engine.errors import FLAG_RESUMED, FLAG_TEST_OMAHA_URL, ErrorCode
from update_engine.payload_state import PayloadState, response_signature

OFFER = omaha.UpdateOffer("2.0.0", ("https://cdn.example/update.gz",), 1000, "A" * 43 + "=")
NOW = 1_700_000_000


@pytest.mark.parametrize(
    ("previous", "installed_boot", "expected"),
    [
        (None, None, CheckReport(LastInstall.NONE, "0.0.0.0")),  # a fresh node
        ("", "boot-1", CheckReport(LastInstall.NONE, "")),  # reported already
        ("0.9.0", "boot-1", CheckReport(LastInstall.BOOTED, "0.9.0")),  # the update runs now
        ("1.0.0", "boot-1", CheckReport(LastInstall.ROLLED_BACK, "1.0.0")),  # still the old version, another boot
        ("1.0.0", "boot-2", CheckReport(LastInstall.UNFINISHED, "")),  # same boot: a crash before the marker
    ],
)
def test_the_check_reports_the_last_install(previous: str | None, installed_boot: str | None,
                                            expected: CheckReport) -> None:
    assert report_for_check(previous, "1.0.0", installed_boot, "boot-2") == expected


def vet(offer: omaha.UpdateOffer = OFFER, **overrides: object) -> None:
    values: dict[str, object] = {
        "server": "https://updates.example/v1/update/", "url": offer.urls[0], "running_version": "1.0.0",
        "failed_boot_version": None, "state": PayloadState(), "now": NOW, "interactive": False,
    }
    values.update(overrides)
    vet_offer(offer, **values)  # type: ignore[arg-type]


def test_an_ordinary_offer_passes() -> None:
    vet()


def test_an_https_server_may_not_send_the_payload_over_http() -> None:
    with pytest.raises(OfferRefused, match="refusing the downgrade") as refused:
        vet(url="http://cdn.example/update.gz")
    assert refused.value.code == ErrorCode.OMAHA_RESPONSE_INVALID


def test_a_version_that_failed_to_boot_is_not_installed_again() -> None:
    with pytest.raises(OfferRefused, match="failed to boot") as refused:
        vet(failed_boot_version="2.0.0")
    assert refused.value.code == ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY
    vet(failed_boot_version="1.5.0")


def test_a_backed_off_payload_waits_unless_someone_asked() -> None:
    state = PayloadState(response_signature(OFFER), attempt_number=1, backoff_expiry=NOW + 3600)
    with pytest.raises(OfferRefused, match="wait until 2023-11-14 23:13:20 UTC") as refused:
        vet(state=state)
    assert refused.value.code == ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF
    vet(state=state, interactive=True)
    vet(state=state, now=NOW + 3601)


def test_the_failure_event_carries_the_originals_flags() -> None:
    assert failure_event_code(10, custom_server=False, resumed=False) == 10
    assert failure_event_code(10, custom_server=True, resumed=True) == 10 | FLAG_TEST_OMAHA_URL | FLAG_RESUMED
