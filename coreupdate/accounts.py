"""The dashboard's accounts: roles, user names, and passwords hashed with scrypt.  Pure (no I/O, no clock).

Rules:

* a password hash is self-describing text ``scrypt$N$r$p$SALT$HASH`` (salt and hash in unpadded base64), so
  the cost can be raised later without invalidating existing accounts: ``needs_rehash`` says when a stored hash
  is weaker than today's parameters, and the sign-in rehashes it;
* today's cost is N=2^15, r=8, p=1 (32 MiB of memory, tens of milliseconds per attempt): memory-hard, so a
  stolen database costs an attacker memory as well as time per guess;
* verification takes the parameters from the stored text and compares in constant time; a malformed stored
  hash never matches (and never raises);
* ``viewer`` may read every page; ``admin`` may also change groups, channels and packages.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
# Stored parameters above these are refused rather than computed (a crafted row must not exhaust memory).
_MAX_N = 2**20
_MAX_RP = 64

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class Role(enum.StrEnum):
    """What a signed-in user may do."""

    VIEWER = "viewer"  # read every page
    ADMIN = "admin"  # also change groups, channels and packages

    @property
    def can_change(self) -> bool:
        return self is Role.ADMIN


class AccountError(ValueError):
    """A user name, role or password that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: Role


def user_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise AccountError(f"user name {value!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return value


def role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise AccountError(f"role {value!r}: use admin or viewer") from None


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"the password is too short: use at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"the password is too long: at most {MAX_PASSWORD_CHARS} characters")
    return password


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n * p + (1 << 24),
                          dklen=HASH_BYTES)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """The stored text for ``password`` (a fresh random salt unless one is given)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt" or not all(x.isdigit() for x in parts[1:4]):
        return None
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or n > _MAX_N or not 0 < r <= _MAX_RP or not 0 < p <= _MAX_RP:
        return None
    try:
        return n, r, p, _unb64(parts[4]), _unb64(parts[5])
    except (binascii.Error, ValueError):
        return None


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` produces ``stored`` (with the parameters written in it)."""
    parsed = _parse(stored)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    return hmac.compare_digest(_scrypt(password, salt, n, r, p)[: len(expected)], expected)


def needs_rehash(stored: str) -> bool:
    parsed = _parse(stored)
    return parsed is None or parsed[:3] != (SCRYPT_N, SCRYPT_R, SCRYPT_P)


@functools.cache
def dummy_hash() -> str:
    """A hash of nothing anyone can type: checked when the user does not exist, so an unknown name costs as
    much time as a wrong password (no user enumeration by timing)."""
    return hash_password("\x00unusable\x00", salt=b"\x00" * SALT_BYTES)
