"""The reboot semaphore core: locksmith's key paths and JSON, lock transitions and their invariant."""

from __future__ import annotations

import calendar
import datetime
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from locksmithd.semaphore import (
    SEMAPHORE_KEY,
    HolderNotFoundError,
    HolderRecord,
    Semaphore,
    SemaphoreError,
    SemaphoreFullError,
    key_for_group,
)

# -- key paths -----------------------------------------------------------------------------------------------


def test_default_group_uses_locksmith_key() -> None:
    assert key_for_group("") == "coreos.com/updateengine/rebootlock/semaphore" == SEMAPHORE_KEY


@pytest.mark.parametrize(
    ("group", "key"),
    [
        ("prod", "coreos.com/updateengine/rebootlock/groups/prod/semaphore"),
        ("prod/database", "coreos.com/updateengine/rebootlock/groups/prod%2Fdatabase/semaphore"),
        ("web tier", "coreos.com/updateengine/rebootlock/groups/web+tier/semaphore"),
        ("a+b&c=d", "coreos.com/updateengine/rebootlock/groups/a%2Bb%26c%3Dd/semaphore"),
        ("keep-._~", "coreos.com/updateengine/rebootlock/groups/keep-._~/semaphore"),
        ("café", "coreos.com/updateengine/rebootlock/groups/caf%C3%A9/semaphore"),
    ],
)
def test_group_keys_are_query_escaped_like_go(group: str, key: str) -> None:
    assert key_for_group(group) == key


# -- codec ---------------------------------------------------------------------------------------------------


def test_encode_is_compact_in_locksmith_field_order() -> None:
    sem = Semaphore(semaphore=0, max=2, holders=("b", "a"))
    assert sem.encode() == '{"semaphore":0,"max":2,"holders":["a","b"]}'
    assert Semaphore.default().encode() == '{"semaphore":1,"max":1,"holders":[]}'


@pytest.mark.parametrize(
    "raw",
    [
        b'{"semaphore":1,"max":1,"holders":null}',  # what locksmith's Init writes
        b'{"semaphore":1,"max":1}',
        b'{"semaphore":1,"max":1,"holders":[],"owner":"ops","ttl":30}',
        '{"semaphore":1,"max":1,"holders":[]}',
    ],
)
def test_decode_accepts_locksmith_variants(raw: bytes | str) -> None:
    assert Semaphore.decode(raw) == Semaphore.default()


def test_decode_sorts_holders() -> None:
    sem = Semaphore.decode(b'{"semaphore":0,"max":3,"holders":["c","a","b"]}')
    assert sem.holders == ("a", "b", "c")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1,1,[]]", "not a JSON object"),
        (b'{"max":1,"holders":[]}', "no 'semaphore' field"),
        (b'{"semaphore":1,"holders":[]}', "no 'max' field"),
        (b'{"semaphore":"1","max":1}', "'semaphore' must be an integer"),
        (b'{"semaphore":1,"max":1.0}', "'max' must be an integer"),
        (b'{"semaphore":true,"max":1}', "'semaphore' must be an integer"),
        (b'{"semaphore":1,"max":1,"holders":"a"}', "'holders' must be a list"),
        (b'{"semaphore":1,"max":2,"holders":[1]}', "'holders' must be a list"),
        (b'{"semaphore":-1,"max":-1,"holders":[]}', "max is -1"),
        (b'{"semaphore":0,"max":2,"holders":["a","a"]}', "duplicate holders ['a']"),
        (b'{"semaphore":0,"max":1,"holders":[""]}', "empty id"),
        (b'{"semaphore":1,"max":1,"holders":["a"]}', "semaphore is 1 but max 1 minus 1 holder(s) is 0"),
        (b'{"semaphore":5,"max":1,"holders":[]}', "semaphore is 5"),
    ],
)
def test_decode_rejects_corrupt_values_quoting_them(raw: bytes, problem: str) -> None:
    with pytest.raises(SemaphoreError) as info:
        Semaphore.decode(raw)
    message = str(info.value)
    assert problem in message
    assert repr(raw.decode("utf-8", errors="backslashreplace")) in message


def test_decode_quotes_long_values_truncated() -> None:
    raw = b"x" * 5000
    with pytest.raises(SemaphoreError) as info:
        Semaphore.decode(raw)
    message = str(info.value)
    assert len(message) < 400
    assert "xxxx" in message


def test_constructor_refuses_values_breaking_the_invariant() -> None:
    with pytest.raises(SemaphoreError, match="semaphore is 1 but"):
        Semaphore(semaphore=1, max=1, holders=("a",))
    with pytest.raises(SemaphoreError, match="must be integers"):
        Semaphore(semaphore=True, max=1)


# -- transitions ---------------------------------------------------------------------------------------------


def test_lock_takes_a_slot_and_keeps_holders_sorted() -> None:
    sem = Semaphore.default().set_max(3).lock("m2").lock("m1")
    assert sem == Semaphore(semaphore=1, max=3, holders=("m1", "m2"))
    assert sem.encode() == '{"semaphore":1,"max":3,"holders":["m1","m2"]}'


def test_lock_when_full_reports_semaphore_value() -> None:
    sem = Semaphore.default().lock("a")
    with pytest.raises(SemaphoreFullError, match=r"^semaphore is at 0$"):
        sem.lock("b")


def test_lock_by_a_holder_is_idempotent_even_when_full() -> None:
    """locksmith#58: a holder asking again must not be told ``semaphore is at 0``."""
    sem = Semaphore.default().lock("a")
    assert sem.lock("a") is sem
    over = sem.set_max(0)
    assert over.lock("a") is over


def test_unlock_frees_the_slot() -> None:
    sem = Semaphore.default().lock("a").unlock("a")
    assert sem == Semaphore.default()


def test_unlock_of_non_holder_fails_with_locksmith_text() -> None:
    with pytest.raises(HolderNotFoundError, match=r"^holder does not exist$"):
        Semaphore.default().unlock("a")


def test_unlock_if_held_leaves_value_unchanged_for_non_holder() -> None:
    sem = Semaphore.default().lock("a")
    assert sem.unlock_if_held("b") is sem
    assert sem.unlock_if_held("a") == Semaphore.default()


def test_set_max_keeps_holders_and_moves_semaphore() -> None:
    sem = Semaphore.default().lock("a")
    raised = sem.set_max(4)
    assert (raised.semaphore, raised.max, raised.holders) == (3, 4, ("a",))


def test_set_max_below_holder_count_oversubscribes_until_releases() -> None:
    sem = Semaphore.default().set_max(3).lock("a").lock("b").lock("c").set_max(1)
    assert (sem.semaphore, sem.max) == (-2, 1)
    with pytest.raises(SemaphoreFullError, match="semaphore is at -2"):
        sem.lock("d")
    sem = sem.unlock("a").unlock("b")
    assert sem.semaphore == 0
    with pytest.raises(SemaphoreFullError):
        sem.lock("d")
    assert sem.unlock("c").lock("d").holders == ("d",)


@pytest.mark.parametrize("bad", [-1, -10, 2**63])
def test_set_max_outside_locksmiths_int64_is_refused(bad: int) -> None:
    with pytest.raises(SemaphoreError, match="max must be between 0 and 9223372036854775807"):
        Semaphore.default().set_max(bad)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 100_000 + b"]" * 100_000, b'{"semaphore":1,"max":1,"holders":[],"pad":"' + b"x" * (1 << 20) + b'"}',
     b'{"semaphore":9223372036854775808,"max":9223372036854775808}'],
    ids=["nested", "huge", "beyond-int64"],
)
def test_every_undecodable_value_is_a_semaphore_error(raw: bytes) -> None:
    """json.loads gives up on deep nesting with RecursionError; huge values are refused before parsing."""
    with pytest.raises(SemaphoreError) as info:
        Semaphore.decode(raw)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("bad", ["", None])
def test_empty_ids_are_refused(bad: str) -> None:
    with pytest.raises(SemaphoreError, match="non-empty"):
        Semaphore.default().lock(bad)
    with pytest.raises(SemaphoreError, match="non-empty"):
        Semaphore.default().unlock(bad)


def test_describe_for_log_lines() -> None:
    assert Semaphore.default().lock("a").describe() == "semaphore is at 0 (max 1, holders: a)"
    assert Semaphore.default().describe() == "semaphore is at 1 (max 1, holders: none)"


# -- properties ----------------------------------------------------------------------------------------------

_ids = st.sampled_from(["a", "b", "c", "d", "e", "f"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("lock"), _ids),
        st.tuples(st.just("unlock"), _ids),
        st.tuples(st.just("set_max"), st.integers(min_value=-2, max_value=6)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_any_sequence_keeps_the_invariant_and_round_trips(ops: list[tuple[str, object]]) -> None:
    sem = Semaphore.default()
    for op, arg in ops:
        before = sem
        try:
            if op == "lock":
                assert isinstance(arg, str)
                sem = sem.lock(arg)
                assert arg in sem.holders
                if arg not in before.holders:
                    assert before.semaphore > 0  # only a free slot is ever handed out
            elif op == "unlock":
                assert isinstance(arg, str)
                sem = sem.unlock(arg)
                assert arg not in sem.holders
            else:
                assert isinstance(arg, int)
                sem = sem.set_max(arg)
        except SemaphoreError:
            assert sem is before  # a refused transition changes nothing
        assert sem.semaphore == sem.max - len(sem.holders)
        assert sem.max >= 0
        assert list(sem.holders) == sorted(set(sem.holders))
        assert Semaphore.decode(sem.encode()) == sem
        doc = json.loads(sem.encode())
        assert list(doc) == ["semaphore", "max", "holders"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_decode_never_fails_with_anything_but_semaphore_error(raw: bytes) -> None:
    try:
        sem = Semaphore.decode(raw)
    except SemaphoreError:
        return
    assert sem.semaphore == sem.max - len(sem.holders)


@given(st.datetimes(min_value=datetime.datetime(1970, 1, 1), max_value=datetime.datetime(9999, 12, 31)))
def test_holder_record_ages_read_back_the_time_written(moment: datetime.datetime) -> None:
    """The record's time goes out as ISO 8601 UTC and comes back to the same second (read without the
    time-parsing modules, by arithmetic)."""
    epoch = calendar.timegm(moment.timetuple())
    record = HolderRecord.at(epoch)
    assert record.since == moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert record.age(epoch + 90) == 90


@pytest.mark.parametrize(
    "since", ["", "yesterday", "2024-13-01T00:00:00Z", "2024-01-01 00:00:00Z", "2024-01-01T25:00:00Z"]
)
def test_a_record_time_that_does_not_parse_has_no_age(since: str) -> None:
    assert HolderRecord(since).age(1e9) is None
    assert HolderRecord.decode(b'{"since": 5}') is None and HolderRecord.decode(b"[" * 10_000) is None
