"""update-engine's settings from the merged update.conf/release keys, their changes, and the OEM release."""

from __future__ import annotations

from pathlib import Path

from coreos_common.updateconf import ParsedFile, load_update_conf, merge_first_wins
from tests.unit.test_updateconf import write
from update_engine.config import (
    DEFAULT_APP_ID,
    DEFAULT_SERVER,
    NodeFacts,
    OemRelease,
    UpdateSettings,
    describe_setup,
    diff_settings,
    load_oem_release,
    settings_from_config,
)


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
    assert (s.machine_alias, s.download_user, s.download_password) == ("db-3", "u", "p")
    assert "hunter2" not in repr(UpdateSettings(download_password="hunter2"))
    # PCR_POLICY_SERVER is read by nothing: the set-up report says so instead of pretending.
    report = describe_setup(s, cfg, NodeFacts(update_conf_found=True, public_key=Path("/k")), program="ue")
    assert report.warnings[-1] == (
        "PCR_POLICY_SERVER in f is not supported and ignored: no TPM PCR policies are shipped with updates, so "
        "there is nothing to send"
    )


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


def test_a_release_key_is_named_as_the_release_file_spells_it(tmp_path: Path) -> None:
    """Before, a change of COREOS_RELEASE_VERSION was logged as "FLATCAR_RELEASE_VERSION changed"."""
    write(tmp_path, "usr/share/coreos/release", "COREOS_RELEASE_VERSION=1.0.0\n")
    old = settings_from_config(load_update_conf(tmp_path, reported=set()))
    write(tmp_path, "usr/share/coreos/release", "COREOS_RELEASE_VERSION=2.0.0\n")
    new = settings_from_config(load_update_conf(tmp_path, reported=set()))
    assert diff_settings(old, new) == ["COREOS_RELEASE_VERSION changed from 1.0.0 to 2.0.0"]
    assert new.origin("version") == f"COREOS_RELEASE_VERSION in {tmp_path / 'usr/share/coreos/release'}"
    assert new.origin("group") == "default"
    assert new.with_server_flag("http://x/").origin("server") == "--server"


def test_setup_report_names_what_is_used_and_warns_about_what_is_missing(tmp_path: Path) -> None:
    cfg = load_update_conf(tmp_path, reported=set())
    settings = settings_from_config(cfg)
    facts = NodeFacts(update_conf_found=False, public_key=Path("/usr/share/update_engine/key.pem"),
                      public_key_problem="/usr/share/update_engine/key.pem: No such file or directory",
                      identity_problem="/etc/machine-id: No such file or directory")
    report = describe_setup(settings, cfg, facts, program="update-engine 9.9")
    assert report.line == (
        f"update-engine 9.9: server {DEFAULT_SERVER} (default), group stable (default), running version 0.0.0 "
        f"(default), board amd64-usr (default), app id {DEFAULT_APP_ID} (default), payload key "
        "/usr/share/update_engine/key.pem (missing)"
    )
    assert [w.split(":")[0] for w in report.warnings] == [
        "No payload signing key",
        "No update.conf (/etc/coreos/update.conf, /etc/flatcar/update.conf, /usr/share/coreos/update.conf, "
        "/usr/share/flatcar/update.conf)",
        "No release file names COREOS_RELEASE_VERSION or FLATCAR_RELEASE_VERSION (/usr/share/coreos/release, "
        "/usr/share/flatcar/release)",
        "Cannot read this node's identity (/etc/machine-id",
    ]
    assert "refused (error 18)" in report.warnings[0]

    write(tmp_path, "etc/coreos/update.conf", "SERVER=\n")
    write(tmp_path, "usr/share/coreos/release", "COREOS_RELEASE_VERSION=1.0.0\n")
    cfg = load_update_conf(tmp_path, reported=set())
    fine = NodeFacts(update_conf_found=True, public_key=Path("/k"))
    report = describe_setup(settings_from_config(cfg), cfg, fine, program="ue")
    assert len(report.warnings) == 1 and report.warnings[0].startswith(
        f"SERVER is empty (SERVER in {tmp_path / 'etc/coreos/update.conf'}): no update check can be sent"
    )


# -- oem-release --------------------------------------------------------------------------------------------


def test_oem_release(tmp_path: Path) -> None:
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("", "")
    write(tmp_path, "usr/share/oem/oem-release", 'ID=azure\nVERSION_ID="2.9.1.1"\nNAME="Microsoft Azure"\n')
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("azure", "2.9.1.1")
    write(tmp_path, "etc/oem-release", "ID=custom\n")
    assert load_oem_release(tmp_path, reported=set()) == OemRelease("custom", "2.9.1.1")
