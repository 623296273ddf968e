"""Method calls on a D-Bus connection, and the message bus's own ``org.freedesktop.DBus`` methods.

Rules: one error rule for every call made through ``call``: a reply of type ERROR raises ``DBusCallError``
carrying the error name and its text; a reply whose signature is not the expected one raises
``DBusCallError`` named ``org.freedesktop.DBus.Error.InvalidSignature``.  Nothing here swallows an error:
the caller decides what an error means for it (a missing service, a refused caller, a retry).  A broken
connection surfaces as whatever dbus-fast raises (``OSError``, ``EOFError``…), also untouched.
"""

from __future__ import annotations

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"

ERROR_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
ERROR_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
ERROR_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
ERROR_INVALID_SIGNATURE = "org.freedesktop.DBus.Error.InvalidSignature"
# Errors meaning "there is no such service on this bus" rather than "the service said no".
NO_SERVICE_ERRORS = frozenset({ERROR_SERVICE_UNKNOWN, ERROR_NAME_HAS_NO_OWNER})


class DBusCallError(Exception):
    """A method call was answered with a D-Bus error; ``name`` is the error name, ``text`` its message."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name
        self.text = text

    @property
    def no_service(self) -> bool:
        """True when nobody owns the destination name (the service is not running on this bus)."""
        return self.name in NO_SERVICE_ERRORS


def error_text(reply: Message) -> str:
    """The human-readable text of an error reply (its first string argument), or an empty string."""
    return reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""


async def call(bus: MessageBus, message: Message, *, signature: str | None = None) -> Message:
    """Send ``message`` and return its reply; DBusCallError on an error reply or an unexpected signature."""
    reply = await bus.call(message)
    if reply is None:  # only for NO_REPLY_EXPECTED messages, which callers here never send
        raise DBusCallError("org.freedesktop.DBus.Error.NoReply", f"{message.member}: no reply")
    if reply.message_type is MessageType.ERROR:
        raise DBusCallError(reply.error_name or "unknown error", error_text(reply))
    if signature is not None and reply.signature != signature:
        raise DBusCallError(
            ERROR_INVALID_SIGNATURE,
            f"{message.member} answered with signature {reply.signature!r}, expected {signature!r}",
        )
    return reply


def bus_method(member: str, signature: str = "", body: list[object] | None = None) -> Message:
    """A call of ``member`` on the message bus itself (``org.freedesktop.DBus``)."""
    return Message(
        destination=DBUS_NAME,
        path=DBUS_PATH,
        interface=DBUS_NAME,
        member=member,
        signature=signature,
        body=body or [],
    )


async def name_has_owner(bus: MessageBus, name: str) -> bool:
    """Whether some connection owns ``name`` now."""
    reply = await call(bus, bus_method("NameHasOwner", "s", [name]), signature="b")
    return bool(reply.body[0])


async def get_name_owner(bus: MessageBus, name: str) -> str | None:
    """The unique name of the connection owning ``name``, or None when nobody owns it."""
    try:
        reply = await call(bus, bus_method("GetNameOwner", "s", [name]), signature="s")
    except DBusCallError as exc:
        if exc.name == ERROR_NAME_HAS_NO_OWNER:
            return None
        raise
    owner = reply.body[0]
    return owner if isinstance(owner, str) and owner else None


async def connection_unix_user(bus: MessageBus, connection: str) -> int:
    """The uid of the process behind ``connection`` (a unique name such as ``:1.42``), as the bus knows it."""
    reply = await call(bus, bus_method("GetConnectionUnixUser", "s", [connection]), signature="u")
    return int(reply.body[0])


async def connection_unix_process_id(bus: MessageBus, connection: str) -> int:
    """The pid of the process behind ``connection``, as the bus knows it."""
    reply = await call(bus, bus_method("GetConnectionUnixProcessID", "s", [connection]), signature="u")
    return int(reply.body[0])


async def describe_connection(bus: MessageBus, connection: str) -> str:
    """``uid 0 pid 1234 (:1.42)`` for log lines about a caller; what cannot be looked up is left out."""
    parts: list[str] = []
    for label, lookup in (("uid", connection_unix_user), ("pid", connection_unix_process_id)):
        try:
            parts.append(f"{label} {await lookup(bus, connection)}")
        except (DBusCallError, OSError, EOFError):
            continue
    parts.append(f"({connection})")
    return " ".join(parts)


async def add_match(bus: MessageBus, rule: str) -> None:
    """Ask the bus to route the signals matching ``rule`` to this connection."""
    await call(bus, bus_method("AddMatch", "s", [rule]))
