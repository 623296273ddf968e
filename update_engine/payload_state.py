"""Attempts at one offered payload: which URL the next download uses, and how long a failing payload waits.

Sans-IO: the attempter loads a :class:`PayloadState` from the prefs, applies these functions, and stores the
result. The rules are the original's (reference update-engine §4):

* the state belongs to one Omaha response, named by its response signature (URLs, size, hash and flags as
  text); a response with another signature starts from scratch;
* each attempt downloads from one URL. Errors that say the payload or the URL is bad move the next attempt to
  the next URL; transient errors (transfer, HTTP, generic) are counted against the URL and move on after
  ``MaxFailureCountPerUrl`` of them;
* every verified download and every pass through the whole URL list is an *attempt* at the payload: after
  the n-th, the payload is not tried again for min(2^(n-1), 16) days, give or take six hours (so that a fleet
  does not come back at once), unless the response sets ``DisablePayloadBackoff`` or is a delta.

Where this differs from the original: an interactive check (``update_engine_client -check_for_update`` or
``update_engine --once``, someone asking now) is never deferred, and ResetStatus forgets the attempts.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from update_engine.errors import (
    FLAG_DEV_MODE,
    FLAG_RESUMED,
    FLAG_TEST_IMAGE,
    FLAG_TEST_OMAHA_URL,
    ErrorCode,
)
from update_engine.omaha import UpdateOffer

DAY = 24 * 3600
MAX_BACKOFF_DAYS = 16
# FuzzInt(0, 720 minutes): the expiry moves by up to six hours either way.
BACKOFF_FUZZ_MINUTES = 720

_E = ErrorCode
# The payload or the URL is bad: the next attempt uses the next URL.
NEXT_URL_CODES = frozenset(
    {
        _E.DOWNLOAD_HASH_MISMATCH,
        _E.DOWNLOAD_SIZE_MISMATCH,
        _E.DOWNLOAD_PAYLOAD_VERIFICATION_ERROR,
        _E.SIGNED_DELTA_PAYLOAD_EXPECTED,
        _E.DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR,
        *(code for code in ErrorCode if 21 <= code <= 29),
        _E.DOWNLOAD_INVALID_METADATA_SIZE,
        _E.DOWNLOAD_INVALID_METADATA_SIGNATURE,
        _E.DOWNLOAD_OPERATION_HASH_MISSING,
        _E.DOWNLOAD_METADATA_SIGNATURE_MISSING,
    }
)
# Perhaps transient: counted against the URL (HTTP failures, 2000 + status, count as 37).
COUNTED_CODES = frozenset(
    {
        _E.ERROR,
        _E.DOWNLOAD_TRANSFER_ERROR,
        _E.DOWNLOAD_WRITE_ERROR,
        _E.DOWNLOAD_STATE_INITIALIZATION_ERROR,
        _E.OMAHA_ERROR_IN_HTTP_RESPONSE,
    }
)
_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL


@dataclass(frozen=True)
class PayloadState:
    """What the prefs remember about the offered payload; the defaults are "nothing tried yet"."""

    response_signature: str = ""
    attempt_number: int = 0
    url_index: int = 0
    url_failure_count: int = 0
    backoff_expiry: int = 0  # Unix seconds; 0: none


def response_signature(offer: UpdateOffer) -> str:
    """The text that names a response, in the original's format (pref ``current-response-signature``)."""
    lines = [f"NumURLs = {len(offer.urls)}"]
    lines += [f"Url{i} = {url}" for i, url in enumerate(offer.urls)]
    lines += [
        f"Payload Size = {offer.size}",
        f"Payload Sha256 Hash = {offer.sha256_b64}",
        f"Is Delta Payload = {int(offer.is_delta)}",
        f"Max Failure Count Per Url = {offer.max_failure_count_per_url}",
        f"Disable Payload Backoff = {int(offer.disable_payload_backoff)}",
    ]
    return "".join(line + "\n" for line in lines)


def for_offer(state: PayloadState, offer: UpdateOffer) -> PayloadState:
    """The state to use for ``offer``: ``state`` if it is about the same response, else a fresh one."""
    signature = response_signature(offer)
    if state.response_signature != signature:
        return PayloadState(response_signature=signature)
    if not 0 <= state.url_index < len(offer.urls):
        return dataclasses.replace(state, url_index=0, url_failure_count=0)
    return state


def deferred_until(state: PayloadState, offer: UpdateOffer, now: float, *, interactive: bool) -> int | None:
    """When an attempt at ``offer`` may start, if not now."""
    if interactive or offer.disable_payload_backoff or offer.is_delta:
        return None
    return state.backoff_expiry if state.backoff_expiry > now else None


def backoff_fuzz() -> int:
    """A random shift of the expiry, in seconds (FuzzInt(0, 720) minutes)."""
    half = BACKOFF_FUZZ_MINUTES // 2
    return random.randint(-half, BACKOFF_FUZZ_MINUTES - half) * 60


def after_download(state: PayloadState, now: float, fuzz: int) -> PayloadState:
    """A download completed and verified (whatever happens to the update next): one more attempt at it."""
    return _count_attempt(state, now, fuzz)


def after_failure(state: PayloadState, code: int, offer: UpdateOffer, now: float, fuzz: int) -> PayloadState:
    """An attempt ended with ``code`` (flag bits allowed): move to the next URL, or count the failure."""
    base = code & ~_FLAGS
    if ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE <= base < ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE + 1000:
        base = ErrorCode.OMAHA_ERROR_IN_HTTP_RESPONSE
    if base in NEXT_URL_CODES:
        return _next_url(state, offer, now, fuzz)
    if base in COUNTED_CODES:
        count = state.url_failure_count + 1
        if count >= offer.max_failure_count_per_url:
            return _next_url(state, offer, now, fuzz)
        return dataclasses.replace(state, url_failure_count=count)
    return state


def _next_url(state: PayloadState, offer: UpdateOffer, now: float, fuzz: int) -> PayloadState:
    index = state.url_index + 1
    if index < len(offer.urls):
        return dataclasses.replace(state, url_index=index, url_failure_count=0)
    return _count_attempt(dataclasses.replace(state, url_index=0, url_failure_count=0), now, fuzz)


def _count_attempt(state: PayloadState, now: float, fuzz: int) -> PayloadState:
    number = state.attempt_number + 1
    days = min(2 ** min(number - 1, 8), MAX_BACKOFF_DAYS)
    return dataclasses.replace(state, attempt_number=number, backoff_expiry=int(now) + days * DAY + fuzz)
