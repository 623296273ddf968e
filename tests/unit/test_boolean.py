"""Booleans: one rule (the originals' words, any case), the same in update_engine_client, locksmithctl,
updateservicectl and locksmithd's settings."""

from __future__ import annotations

import pytest

from coreos_common.boolean import parse_bool
from coreupdate import ctl as updateservicectl
from locksmithd import ctl
from locksmithd.config import FLAGS, SettingsError, resolve_settings
from update_engine import client

TRUE = ["1", "t", "T", "true", "True", "TRUE", "y", "Y", "yes", "Yes", "YES", "tRuE"]
FALSE = ["0", "f", "F", "false", "False", "FALSE", "n", "N", "no", "No", "NO", "fAlSe"]
NEITHER = ["", "on", "off", "2", "truth", "nope", " true", "true ", "enabled", "ja"]


def in_update_engine_client(word: str) -> bool | None:
    try:
        return client.parse_args([f"-json={word}"]).json
    except client.UsageError:
        return None


def in_locksmithctl(word: str) -> bool | None:
    try:
        given, _ = ctl.parse_flags([f"-debug={word}"], ctl.GLOBAL_FLAGS, interspersed=False)
    except ctl.UsageError:
        return None
    return {"true": True, "false": False}[given["debug"]]


def in_updateservicectl(word: str) -> bool | None:
    argv = ["group", "update", "--app-id", "x", "--group-id", "g", f"--safe-mode={word}"]
    try:
        value = updateservicectl._parser().parse_args(argv).safe_mode
    except SystemExit:  # argparse's usage error
        return None
    assert isinstance(value, bool)
    return value


def in_locksmithd(word: str) -> bool | None:
    flags: dict[str, str | None] = dict.fromkeys(flag.name for flag in FLAGS)
    flags["accept-any-sender"] = word
    try:
        return resolve_settings(flags, {}, {}).accept_any_sender
    except SettingsError:
        return None


def in_shared_rule(word: str) -> bool | None:
    try:
        return parse_bool(word)
    except ValueError:
        return None


PARSERS = [in_shared_rule, in_update_engine_client, in_locksmithctl, in_updateservicectl]


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize(("words", "expected"), [(TRUE, True), (FALSE, False), (NEITHER, None)])
def test_every_program_reads_a_boolean_the_same_way(
    parser: object, words: list[str], expected: bool | None
) -> None:
    assert callable(parser)
    assert {word: parser(word) for word in words} == dict.fromkeys(words, expected)


def test_locksmithd_settings_follow_the_same_rule_after_trimming_spaces_as_its_other_settings() -> None:
    assert {word: in_locksmithd(f" {word} ") for word in TRUE} == dict.fromkeys(TRUE, True)
    assert {word: in_locksmithd(word) for word in FALSE} == dict.fromkeys(FALSE, False)
    refused = [word for word in NEITHER if word.strip()]
    assert {word: in_locksmithd(word) for word in refused} == dict.fromkeys(refused) | {" true": True, "true ": True}
    empty = {"LOCKSMITHD_ACCEPT_ANY_SENDER": ""}  # not set, as locksmithd reads every empty variable
    assert resolve_settings(dict.fromkeys(flag.name for flag in FLAGS), empty, {}).accept_any_sender is False


def test_the_error_names_the_text() -> None:
    with pytest.raises(ValueError, match="'on' is not a boolean"):
        parse_bool("on")
