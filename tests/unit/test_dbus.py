"""The message bus's own calls and the one error rule of ``coreos_common.dbus.call``, on a real private bus."""

from __future__ import annotations

import os

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from coreos_common.dbus import (
    DBusCallError,
    add_match,
    bus_method,
    call,
    connection_unix_process_id,
    connection_unix_user,
    describe_connection,
    get_name_owner,
    name_has_owner,
)


async def test_owner_of_a_name_and_of_nobody(bus_client: MessageBus) -> None:
    assert await get_name_owner(bus_client, "com.example.Nobody") is None
    assert not await name_has_owner(bus_client, "com.example.Nobody")
    await bus_client.request_name("org.freedesktop.login1")
    assert await get_name_owner(bus_client, "org.freedesktop.login1") == bus_client.unique_name
    assert await name_has_owner(bus_client, "org.freedesktop.login1")


async def test_uid_of_a_connection(bus_client: MessageBus) -> None:
    assert bus_client.unique_name is not None
    assert await connection_unix_user(bus_client, bus_client.unique_name) == os.geteuid()


async def test_pid_of_a_connection_and_a_callers_description(bus_client: MessageBus) -> None:
    assert bus_client.unique_name is not None
    assert await connection_unix_process_id(bus_client, bus_client.unique_name) == os.getpid()
    assert await describe_connection(bus_client, bus_client.unique_name) == (
        f"uid {os.geteuid()} pid {os.getpid()} ({bus_client.unique_name})"
    )
    # A caller gone before it could be looked up is still named by its bus name.
    assert await describe_connection(bus_client, ":1.999999") == "(:1.999999)"


async def test_an_error_reply_raises_with_its_name_and_text(bus_client: MessageBus) -> None:
    with pytest.raises(DBusCallError) as info:
        await call(bus_client, Message(destination="com.example.Nobody", path="/", interface="x.y", member="Z"))
    assert info.value.name == "org.freedesktop.DBus.Error.ServiceUnknown" and info.value.no_service
    assert info.value.text and str(info.value).startswith("org.freedesktop.DBus.Error.ServiceUnknown: ")
    with pytest.raises(DBusCallError) as info:
        await connection_unix_user(bus_client, ":1.9999")
    assert info.value.name == "org.freedesktop.DBus.Error.NameHasNoOwner"
    with pytest.raises(DBusCallError, match="MatchRuleInvalid"):
        await add_match(bus_client, "type='nonsense'")


async def test_a_reply_of_the_wrong_type_is_an_error(bus_client: MessageBus) -> None:
    with pytest.raises(DBusCallError) as info:
        await call(bus_client, bus_method("GetId"), signature="u")
    assert info.value.name == "org.freedesktop.DBus.Error.InvalidSignature"
    assert "GetId answered with signature 's', expected 'u'" in str(info.value)
