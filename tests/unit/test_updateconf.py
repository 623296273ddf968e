"""update.conf lookup and parsing: the literal KEY=value parser, the first-file-wins merge and file handling."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreos_common.updateconf import (
    MAX_CONFIG_FILE_BYTES,
    UPDATE_CONF_FILES,
    ConfigIssue,
    MergedConfig,
    ParsedFile,
    SettingsFileError,
    load_update_conf,
    merge_first_wins,
    parse_key_values,
)


def write(root: Path, relative: str, text: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# -- the parser ----------------------------------------------------------------------------------------------


def test_values_are_literal_and_quotes_are_stripped_once() -> None:
    text = (
        "GROUP=beta\n"
        'SERVER="https://omaha.example/v1/update/"\n'
        "MACHINE_ALIAS='web 1'\n"
        "A= spaced \n"
        'B=""quoted twice""\n'
        "C=\"mismatched'\n"
        'D="\n'
        "E=x=y=z\n"
        "F=\n"
        "G=''\n"
    )
    parsed = parse_key_values(text, "update.conf")
    assert parsed.values == {
        "GROUP": "beta",
        "SERVER": "https://omaha.example/v1/update/",
        "MACHINE_ALIAS": "web 1",
        "A": " spaced ",
        "B": '"quoted twice"',
        "C": "\"mismatched'",
        "D": '"',
        "E": "x=y=z",
        "F": "",
        "G": "",
    }
    assert parsed.issues == []


def test_crlf_comments_blank_lines_and_last_duplicate() -> None:
    text = "# comment\r\n   # indented comment\n\n   \t\nGROUP=alpha\r\nGROUP=beta\r\nSERVER=x\r\r\n"
    parsed = parse_key_values(text, "f")
    assert parsed.values == {"GROUP": "beta", "SERVER": "x\r"}
    assert parsed.issues == []


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("GROUP beta", ["no '='"]),
        ("=beta", ["starts with '='"]),
        ("GROUP = beta", ["'GROUP '", "no spaces", "GROUP=value"]),
        ("  GROUP=beta", ["no spaces", "GROUP=value"]),
        ("export GROUP=beta", ["export"]),
        ("1GROUP=beta", ["'1GROUP'", "not starting with a digit"]),
        ("GR-OUP=beta", ["'GR-OUP'"]),
        ("GRÜPPE=beta", ["'GRÜPPE'"]),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line(line: str, words: list[str]) -> None:
    parsed = parse_key_values(f"SERVER=a\n{line}\nGROUP=stable\n", "/etc/flatcar/update.conf")
    assert parsed.values == {"SERVER": "a", "GROUP": "stable"}
    (issue,) = parsed.issues
    assert (issue.source, issue.line) == ("/etc/flatcar/update.conf", 2)
    assert str(issue).startswith("/etc/flatcar/update.conf:2: ")
    for word in words:
        assert word in issue.message


def test_issue_never_repeats_a_value() -> None:
    parsed = parse_key_values("DOWNLOAD_PASSWORD = hunter2\n", "f")
    assert "hunter2" not in str(parsed.issues[0])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parser_never_raises(text: str) -> None:
    parsed = parse_key_values(text, "f")
    for issue in parsed.issues:
        assert 1 <= issue.line <= text.count("\n") + 1
    for key in parsed.values:
        assert key.isascii() and "=" not in key


keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
values = st.text(st.characters(exclude_characters="\n"), max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_round_trip_of_simple_values(pairs: dict[str, str]) -> None:
    text = "".join(f'{key}="{value}"\n' for key, value in pairs.items())
    parsed = parse_key_values(text, "f")
    assert parsed.values == pairs
    assert parsed.issues == []


# -- merge and lookup order ----------------------------------------------------------------------------------


def test_merge_first_file_with_key_wins_even_if_empty() -> None:
    merged = merge_first_wins(
        [
            ParsedFile("override", {"SERVER": ""}),
            ParsedFile(
                "defaults", {"SERVER": "https://x/", "GROUP": "beta"}, [ConfigIssue("defaults", 3, "m")]
            ),
        ]
    )
    assert merged.values == {"SERVER": "", "GROUP": "beta"}
    assert merged.sources == {"SERVER": "override", "GROUP": "defaults"}
    assert merged.issues == [ConfigIssue("defaults", 3, "m")]


def test_lookup_order_constant() -> None:
    assert UPDATE_CONF_FILES == (
        "etc/coreos/update.conf",
        "etc/flatcar/update.conf",
        "usr/share/coreos/update.conf",
        "usr/share/flatcar/update.conf",
        "usr/share/coreos/release",
        "usr/share/flatcar/release",
    )


def test_each_file_of_the_lookup_order_beats_the_ones_after_it(tmp_path: Path) -> None:
    for rank, relative in enumerate(UPDATE_CONF_FILES):
        # Every file defines K; file i also defines Ki, so each later file can only win its own key.
        write(tmp_path, relative, f"K={rank}\nK{rank}=from-{rank}\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values["K"] == "0"
    assert cfg.sources["K"] == str(tmp_path / "etc/coreos/update.conf")
    for rank in range(len(UPDATE_CONF_FILES)):
        assert cfg.values[f"K{rank}"] == f"from-{rank}"
    (tmp_path / "etc/coreos/update.conf").unlink()
    assert load_update_conf(tmp_path, reported=set()).values["K"] == "1"


# -- file handling -------------------------------------------------------------------------------------------


def test_issues_are_logged_once_with_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "etc/flatcar/update.conf", "GROUP=beta\nSERVER = https://x/\n")
    reported: set[ConfigIssue] = set()
    with caplog.at_level(logging.WARNING, logger="coreos_common.updateconf"):
        cfg = load_update_conf(tmp_path, reported=reported)
        load_update_conf(tmp_path, reported=reported)
    assert cfg.values == {"GROUP": "beta"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{path}:2:" in warnings[0]


def test_oversized_file_stops_the_read_instead_of_being_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, "etc/flatcar/update.conf", "SERVER=disabled\n" + "#" * MAX_CONFIG_FILE_BYTES)
    write(tmp_path, "usr/share/flatcar/update.conf", "SERVER=https://public/\n")
    with pytest.raises(SettingsFileError) as info:
        load_update_conf(tmp_path, reported=set())
    (issue,) = info.value.issues
    assert issue.source == str(path) and issue.message.startswith(f"is larger than {MAX_CONFIG_FILE_BYTES} bytes")


def test_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    text = "GROUP=beta\n"
    write(tmp_path, "etc/flatcar/update.conf", text + "#" * (MAX_CONFIG_FILE_BYTES - len(text)))
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values["GROUP"] == "beta" and cfg.issues == []


def test_every_unreadable_file_is_named_and_none_blocks_the_reader(tmp_path: Path) -> None:
    (tmp_path / "etc/coreos/update.conf").mkdir(parents=True)  # a directory where a file should be
    fifo = tmp_path / "etc/flatcar/update.conf"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # must not block the reader
    write(tmp_path, "usr/share/coreos", "a file where a directory should be\n")
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\n")
    with pytest.raises(SettingsFileError) as info:
        load_update_conf(tmp_path, reported=set())
    assert [str(issue) for issue in info.value.issues] == [
        f"{tmp_path}/etc/coreos/update.conf: is a directory, not a regular file",
        f"{tmp_path}/etc/flatcar/update.conf: is a FIFO, not a regular file",
        f"{tmp_path}/usr/share/coreos/update.conf: cannot be opened: Not a directory",
        f"{tmp_path}/usr/share/coreos/release: cannot be opened: Not a directory",
    ]


def test_missing_files_are_fine(tmp_path: Path) -> None:
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\n")
    assert load_update_conf(tmp_path, reported=set()).values == {"GROUP": "stable"}


def test_invalid_utf8_is_replaced_and_reported(tmp_path: Path) -> None:
    write(tmp_path, "etc/flatcar/update.conf", b"GROUP=be\xfft\nSERVER=https://x/\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values == {"GROUP": "be\ufffdt", "SERVER": "https://x/"}
    assert any("UTF-8" in i.message for i in cfg.issues)


def test_merged_config_first_of() -> None:
    cfg = MergedConfig(values={"A": "1", "B": "2"}, sources={"A": "x", "B": "y"}, ranks={"A": 1, "B": 0})
    assert cfg.first_of("A", "B") == "2"
    assert cfg.first_of("C") is None
