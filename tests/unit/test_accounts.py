"""Dashboard accounts: scrypt hashes that describe themselves, constant-time checks, names and roles."""

from __future__ import annotations

import pytest

from coreupdate import accounts
from coreupdate.accounts import AccountError, Role


def test_a_hash_verifies_its_password_only_and_carries_its_parameters() -> None:
    stored = accounts.hash_password("correct horse battery", n=2**10, r=8, p=1)
    kind, n, r, p, salt, digest = stored.split("$")
    assert (kind, n, r, p) == ("scrypt", "1024", "8", "1") and salt and digest
    assert accounts.verify_password("correct horse battery", stored)
    assert not accounts.verify_password("correct horse batterY", stored)
    assert accounts.hash_password("correct horse battery", n=2**10) != stored  # a fresh salt each time
    assert accounts.needs_rehash(stored)  # weaker than today's parameters
    assert not accounts.needs_rehash(accounts.hash_password("x" * 8))


@pytest.mark.parametrize("stored", [
    "", "scrypt$1024$8$1$c2FsdA", "bcrypt$1024$8$1$c2FsdA$ZGln", "scrypt$1000$8$1$c2FsdA$ZGln",
    "scrypt$1024$8$1$!!!$ZGln", f"scrypt${2**30}$8$1$c2FsdA$ZGln", "scrypt$1024$0$1$c2FsdA$ZGln",
])
def test_a_malformed_or_hostile_stored_hash_never_matches(stored: str) -> None:
    assert not accounts.verify_password("anything", stored)
    assert accounts.needs_rehash(stored)


def test_names_roles_and_passwords_are_checked() -> None:
    assert accounts.user_name("ops.alice@example") == "ops.alice@example"
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(AccountError, match="user name"):
            accounts.user_name(bad)
    assert accounts.role("viewer") is Role.VIEWER and Role.ADMIN.can_change and not Role.VIEWER.can_change
    with pytest.raises(AccountError, match="use admin or viewer"):
        accounts.role("root")
    with pytest.raises(AccountError, match="at least 8"):
        accounts.check_new_password("short")
    assert accounts.verify_password("\x00unusable\x00", accounts.dummy_hash())
