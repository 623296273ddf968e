"""The dashboard's users and sessions in the database: synchronous calls, one transaction each.

Rules: passwords arrive here already hashed (``coreupdate.accounts``); a session is a random cookie value of
which only the SHA-256 is stored, with its own random CSRF token and an absolute expiry, so a stolen database
does not yield usable cookies.  Deleting a user or changing a password ends that user's sessions.  Several
servers sharing one PostgreSQL see the same sessions.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from coreupdate.accounts import Role, User
from coreupdate.storage.schema import users, web_sessions
from coreupdate.storage.store import Conflict, NotFound

Clock = Callable[[], float]


@dataclass(frozen=True)
class UserRecord:
    user: User
    password_hash: str
    created_at: float
    password_changed_at: float


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, and the token its forms must carry."""

    user: User
    csrf_token: str
    expires_at: float


def session_key(cookie_value: str) -> str:
    return hashlib.sha256(cookie_value.encode("utf-8")).hexdigest()


class AccountStore:
    def __init__(self, engine: Engine, *, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock

    # -- users -------------------------------------------------------------------------------------------

    def add_user(self, name: str, role: Role, password_hash: str) -> User:
        now = self.clock()
        with self.engine.begin() as conn:
            if conn.execute(sa.select(users.c.id).where(users.c.name == name)).first():
                raise Conflict(f"user {name} already exists")
            result = conn.execute(sa.insert(users).values(
                name=name, role=str(role), password_hash=password_hash, created_at=now, password_changed_at=now,
            ))
            key = result.inserted_primary_key
        return User(int(key[0]) if key else 0, name, role)

    def list_users(self) -> list[UserRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(users).order_by(users.c.name)).all()
        return [UserRecord(User(r.id, r.name, Role(r.role)), r.password_hash, r.created_at, r.password_changed_at)
                for r in rows]

    def find_user(self, name: str) -> UserRecord | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(users).where(users.c.name == name)).first()
        if r is None:
            return None
        return UserRecord(User(r.id, r.name, Role(r.role)), r.password_hash, r.created_at, r.password_changed_at)

    def delete_user(self, name: str) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(users.c.id).where(users.c.name == name)).first()
            if row is None:
                raise NotFound(f"no user {name}")
            conn.execute(sa.delete(web_sessions).where(web_sessions.c.user_id == row.id))
            conn.execute(sa.delete(users).where(users.c.id == row.id))

    def set_password(self, name: str, password_hash: str, *, end_sessions: bool = True) -> None:
        """Store a new hash; ``end_sessions``: sign the user out everywhere (a password change, not a rehash)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(users.c.id).where(users.c.name == name)).first()
            if row is None:
                raise NotFound(f"no user {name}")
            conn.execute(sa.update(users).where(users.c.id == row.id).values(
                password_hash=password_hash, password_changed_at=self.clock()))
            if end_sessions:
                conn.execute(sa.delete(web_sessions).where(web_sessions.c.user_id == row.id))

    # -- sessions ----------------------------------------------------------------------------------------

    def create_session(self, user: User, lifetime_s: float) -> tuple[str, Session]:
        """A new session: (cookie value, session)."""
        cookie = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(user, secrets.token_urlsafe(32), now + lifetime_s)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(web_sessions).values(
                token_sha256=session_key(cookie), user_id=user.id, csrf_token=session.csrf_token, created_at=now,
                expires_at=session.expires_at,
            ))
        return cookie, session

    def session(self, cookie: str) -> Session | None:
        """The live session of a cookie value, or None (unknown, expired, or its user deleted)."""
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(web_sessions.c.csrf_token, web_sessions.c.expires_at, users.c.id, users.c.name,
                          users.c.role)
                .select_from(web_sessions.join(users, users.c.id == web_sessions.c.user_id))
                .where(web_sessions.c.token_sha256 == session_key(cookie))
            ).first()
        if r is None or r.expires_at <= self.clock():
            return None
        return Session(User(r.id, r.name, Role(r.role)), r.csrf_token, r.expires_at)

    def end_session(self, cookie: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(web_sessions).where(web_sessions.c.token_sha256 == session_key(cookie)))
