"""Action exit codes reported to Omaha, and the one exception type that carries them.

The numbers are a wire format: Omaha servers (Nebraska, go-omaha) and fleet dashboards interpret them, so they
keep the values of the original update_engine's action codes.  The engine's refusals of D-Bus requests live with
the engine (``update_engine.engine.errors``).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Why an update attempt ended; sent as ``errorcode`` in a 3/0 Omaha event."""

    SUCCESS = 0
    ERROR = 1
    OMAHA_REQUEST_ERROR = 2
    OMAHA_RESPONSE_HANDLER_ERROR = 3
    FILESYSTEM_COPIER_ERROR = 4
    POSTINSTALL_RUNNER_ERROR = 5
    SET_BOOTABLE_FLAG_ERROR = 6
    INSTALL_DEVICE_OPEN_ERROR = 7
    KERNEL_DEVICE_OPEN_ERROR = 8
    DOWNLOAD_TRANSFER_ERROR = 9
    DOWNLOAD_HASH_MISMATCH = 10
    DOWNLOAD_SIZE_MISMATCH = 11
    DOWNLOAD_PAYLOAD_VERIFICATION_ERROR = 12
    DOWNLOAD_APPLIED_UPDATE_VERIFICATION_ERROR = 13
    DOWNLOAD_WRITE_ERROR = 14
    NEW_ROOTFS_VERIFICATION_ERROR = 15
    NEW_KERNEL_VERIFICATION_ERROR = 16
    SIGNED_DELTA_PAYLOAD_EXPECTED = 17
    DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR = 18
    POSTINSTALL_BOOTED_FROM_FIRMWARE_B = 19
    DOWNLOAD_STATE_INITIALIZATION_ERROR = 20
    DOWNLOAD_INVALID_METADATA_MAGIC = 21
    DOWNLOAD_SIGNATURE_MISSING_IN_MANIFEST = 22
    DOWNLOAD_MANIFEST_PARSE_ERROR = 23
    DOWNLOAD_METADATA_SIGNATURE_ERROR = 24
    DOWNLOAD_METADATA_SIGNATURE_VERIFICATION_ERROR = 25
    DOWNLOAD_METADATA_SIGNATURE_MISMATCH = 26
    DOWNLOAD_OPERATION_HASH_VERIFICATION_ERROR = 27
    DOWNLOAD_OPERATION_EXECUTION_ERROR = 28
    DOWNLOAD_OPERATION_HASH_MISMATCH = 29
    OMAHA_REQUEST_EMPTY_RESPONSE = 30
    OMAHA_REQUEST_XML_PARSE_ERROR = 31
    DOWNLOAD_INVALID_METADATA_SIZE = 32
    DOWNLOAD_INVALID_METADATA_SIGNATURE = 33
    OMAHA_RESPONSE_INVALID = 34
    OMAHA_UPDATE_IGNORED_PER_POLICY = 35
    OMAHA_UPDATE_DEFERRED_PER_POLICY = 36
    OMAHA_ERROR_IN_HTTP_RESPONSE = 37
    DOWNLOAD_OPERATION_HASH_MISSING = 38
    DOWNLOAD_METADATA_SIGNATURE_MISSING = 39
    OMAHA_UPDATE_DEFERRED_FOR_BACKOFF = 40
    POSTINSTALL_POWERWASH_ERROR = 41
    NEW_PCR_POLICY_VERIFICATION_ERROR = 42
    NEW_PCR_POLICY_HTTP_ERROR = 43
    ROLLBACK_ERROR = 44
    OMAHA_REQUEST_HTTP_RESPONSE_BASE = 2000


# Bits OR'd into the error code of a 3/0 event (reference update-engine §3).
FLAG_DEV_MODE = 1 << 31
FLAG_RESUMED = 1 << 30
FLAG_TEST_IMAGE = 1 << 29
FLAG_TEST_OMAHA_URL = 1 << 28

# Codes whose failure event carries result 9 (UpdateDeferred) rather than 0 (Error).
DEFERRED_CODES = frozenset(
    {
        ErrorCode.OMAHA_UPDATE_IGNORED_PER_POLICY,
        ErrorCode.OMAHA_UPDATE_DEFERRED_PER_POLICY,
        ErrorCode.OMAHA_UPDATE_DEFERRED_FOR_BACKOFF,
    }
)


def http_error_code(status: int | None) -> int:
    """Omaha HTTP failure code: 2000 + status (statuses ≥ 1000 fold to 999; no response at all is 2000)."""
    if status is None:
        return int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE)
    return int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE) + min(status, 999)


def describe(code: int) -> str:
    """Human name of a code (flags stripped), e.g. ``DOWNLOAD_HASH_MISMATCH`` or ``HTTP_503``."""
    base = code & ~(FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL)
    if base > int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE):
        return f"HTTP_{base - int(ErrorCode.OMAHA_REQUEST_HTTP_RESPONSE_BASE)}"
    try:
        return ErrorCode(base).name
    except ValueError:
        return f"UNKNOWN_{base}"


class UpdateEngineError(Exception):
    """A failure that ends an update attempt; ``code`` is what Omaha is told, the message what the log says."""

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (error {self.code} {describe(self.code)})"

