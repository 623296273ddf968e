"""update.conf / release / oem-release parsing, the first-file-wins lookup, settings and identity files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine.config import (
    DEFAULT_APP_ID,
    DEFAULT_SERVER,
    MAX_CONFIG_FILE_BYTES,
    UPDATE_CONF_FILES,
    ConfigError,
    ConfigIssue,
    MergedConfig,
    OemRelease,
    ParsedFile,
    UpdateSettings,
    diff_settings,
    load_oem_release,
    load_update_conf,
    merge_first_wins,
    parse_key_values,
    read_boot_id,
    read_machine_id,
    settings_from_config,
)
from update_engine.errors import ErrorCode


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


def test_flatcar_only_node(tmp_path: Path) -> None:
    write(tmp_path, "etc/flatcar/update.conf", "GROUP=beta\nSERVER=\n")
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\nSERVER=https://public/\n")
    write(
        tmp_path,
        "usr/share/flatcar/release",
        "FLATCAR_RELEASE_VERSION=3815.2.5\nFLATCAR_RELEASE_BOARD=arm64-usr\nFLATCAR_RELEASE_APPID={abc}\n",
    )
    s = settings_from_config(load_update_conf(tmp_path, reported=set()))
    assert s.group == "beta"
    assert s.server == ""  # an empty override is an empty server, not the default
    assert (s.version, s.board, s.app_id) == ("3815.2.5", "arm64-usr", "{abc}")


def test_coreos_only_node(tmp_path: Path) -> None:
    write(tmp_path, "etc/coreos/update.conf", "GROUP=alpha\nREBOOT_STRATEGY=off\n")
    write(
        tmp_path, "usr/share/coreos/update.conf", "GROUP=stable\nSERVER=https://coreos.example/v1/update/\n"
    )
    write(
        tmp_path,
        "usr/share/coreos/release",
        "COREOS_RELEASE_VERSION=1688.5.3\nCOREOS_RELEASE_BOARD=amd64-usr\n",
    )
    s = settings_from_config(load_update_conf(tmp_path, reported=set()))
    assert (s.group, s.server, s.version) == ("alpha", "https://coreos.example/v1/update/", "1688.5.3")
    assert s.app_id == DEFAULT_APP_ID


def test_release_name_pair_follows_first_file_wins(tmp_path: Path) -> None:
    # An override file naming the Flatcar spelling beats a later file naming the CoreOS one.
    write(tmp_path, "etc/flatcar/update.conf", "FLATCAR_RELEASE_VERSION=2.0.0\n")
    write(tmp_path, "usr/share/coreos/release", "COREOS_RELEASE_VERSION=1.0.0\n")
    assert settings_from_config(load_update_conf(tmp_path, reported=set())).version == "2.0.0"
    # Within one file the CoreOS spelling wins.
    write(
        tmp_path, "etc/flatcar/update.conf", "FLATCAR_RELEASE_VERSION=2.0.0\nCOREOS_RELEASE_VERSION=3.0.0\n"
    )
    assert settings_from_config(load_update_conf(tmp_path, reported=set())).version == "3.0.0"


def test_defaults_when_nothing_is_configured(tmp_path: Path) -> None:
    s = settings_from_config(load_update_conf(tmp_path, reported=set()))
    assert s == UpdateSettings()
    assert s.server == DEFAULT_SERVER == "https://public.update.flatcar-linux.net/v1/update/"
    assert (s.group, s.app_id, s.version, s.board) == (
        "stable",
        "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}",
        "0.0.0",
        "amd64-usr",
    )
    assert not s.updates_disabled and not s.custom_server


def test_all_settings_and_disabled_server() -> None:
    cfg = merge_first_wins(
        [
            ParsedFile(
                "f",
                {
                    "SERVER": "disabled",
                    "MACHINE_ALIAS": "db-3",
                    "DOWNLOAD_USER": "u",
                    "DOWNLOAD_PASSWORD": "p",
                    "PCR_POLICY_SERVER": "https://pcr/",
                },
            )
        ]
    )
    s = settings_from_config(cfg)
    assert s.updates_disabled and s.custom_server
    assert (s.machine_alias, s.download_user, s.download_password, s.pcr_policy_server) == (
        "db-3",
        "u",
        "p",
        "https://pcr/",
    )
    assert "hunter2" not in repr(UpdateSettings(download_password="hunter2"))


def test_diff_settings() -> None:
    old = UpdateSettings(group="stable", download_password="old-secret")
    new = UpdateSettings(group="beta", server="https://omaha.example/", download_password="new-secret")
    assert diff_settings(old, new) == [
        f"SERVER changed from {DEFAULT_SERVER} to https://omaha.example/",
        "GROUP changed from stable to beta",
        "DOWNLOAD_PASSWORD changed",
    ]
    assert diff_settings(new, new) == []
    assert diff_settings(UpdateSettings(machine_alias="a"), UpdateSettings()) == [
        "MACHINE_ALIAS changed from a to (empty)"
    ]


# -- file handling -------------------------------------------------------------------------------------------


def test_issues_are_logged_once_with_file_and_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "etc/flatcar/update.conf", "GROUP=beta\nSERVER = https://x/\n")
    reported: set[ConfigIssue] = set()
    with caplog.at_level(logging.WARNING, logger="update_engine.config"):
        cfg = load_update_conf(tmp_path, reported=reported)
        load_update_conf(tmp_path, reported=reported)
    assert cfg.values == {"GROUP": "beta"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{path}:2:" in warnings[0]


def test_oversized_file_is_ignored_with_an_issue(tmp_path: Path) -> None:
    write(tmp_path, "etc/flatcar/update.conf", "GROUP=huge\n" + "#" * MAX_CONFIG_FILE_BYTES)
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values["GROUP"] == "stable"
    assert any(
        "larger than" in i.message and i.source.endswith("etc/flatcar/update.conf") for i in cfg.issues
    )


def test_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    text = "GROUP=beta\n"
    write(tmp_path, "etc/flatcar/update.conf", text + "#" * (MAX_CONFIG_FILE_BYTES - len(text)))
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values["GROUP"] == "beta" and cfg.issues == []


def test_unreadable_and_odd_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "etc/coreos/update.conf").mkdir(parents=True)  # a directory where a file should be
    fifo = tmp_path / "etc/flatcar/update.conf"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # must not block the reader
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values == {"GROUP": "stable"}
    sources = {issue.source for issue in cfg.issues}
    assert str(fifo) in sources
    assert str(tmp_path / "etc/coreos/update.conf") in sources


def test_unopenable_file_is_an_issue(tmp_path: Path) -> None:
    # etc/flatcar is a file, so etc/flatcar/update.conf cannot be opened (works as root, unlike chmod 0).
    write(tmp_path, "etc/flatcar", "GROUP=not-a-directory\n")
    write(tmp_path, "usr/share/flatcar/update.conf", "GROUP=stable\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values == {"GROUP": "stable"}
    (issue,) = cfg.issues
    assert issue.source == str(tmp_path / "etc/flatcar/update.conf")
    assert "cannot open" in issue.message and "ignored" in issue.message


def test_invalid_utf8_is_replaced_and_reported(tmp_path: Path) -> None:
    write(tmp_path, "etc/flatcar/update.conf", b"GROUP=be\xfft\nSERVER=https://x/\n")
    cfg = load_update_conf(tmp_path, reported=set())
    assert cfg.values == {"GROUP": "be\ufffdt", "SERVER": "https://x/"}
    assert any("UTF-8" in i.message for i in cfg.issues)


def test_merged_config_first_of() -> None:
    cfg = MergedConfig(values={"A": "1", "B": "2"}, sources={"A": "x", "B": "y"}, ranks={"A": 1, "B": 0})
    assert cfg.first_of("A", "B") == "2"
    assert cfg.first_of("C") is None


# -- oem-release and identity --------------------------------------------------------------------------------


def test_oem_release(tmp_path: Path) -> None:
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("", "")
    write(tmp_path, "usr/share/oem/oem-release", 'ID=azure\nVERSION_ID="2.9.1.1"\nNAME="Microsoft Azure"\n')
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("azure", "2.9.1.1")
    write(tmp_path, "etc/oem-release", "ID=custom\n")
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("custom", "2.9.1.1")


def test_machine_id(tmp_path: Path) -> None:
    write(tmp_path, "etc/machine-id", "0123456789abcdef0123456789ABCDEF\n")
    assert read_machine_id(tmp_path) == "0123456789abcdef0123456789ABCDEF"


@pytest.mark.parametrize(
    "content", ["", "uninitialized\n", "0123456789abcdef", "g" * 32, "{" + "a" * 32 + "}"]
)
def test_bad_machine_id_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "etc/machine-id", content)
    with pytest.raises(ConfigError) as info:
        read_machine_id(tmp_path)
    assert str(path) in info.value.message and "32 hexadecimal" in info.value.message
    assert info.value.code == ErrorCode.OMAHA_REQUEST_ERROR


def test_missing_machine_id_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="machine-id"):
        read_machine_id(tmp_path)


def test_boot_id(tmp_path: Path) -> None:
    write(tmp_path, "proc/sys/kernel/random/boot_id", "6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b\n")
    assert read_boot_id(tmp_path) == "6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"
    write(tmp_path, "proc/sys/kernel/random/boot_id", "not-a-uuid\n")
    with pytest.raises(ConfigError, match="not a UUID"):
        read_boot_id(tmp_path)


def test_real_boot_id_if_available() -> None:
    if not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no /proc")
    assert len(read_boot_id(Path("/"))) == 36
