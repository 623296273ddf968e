"""etcd settings as locksmithd reads them: endpoint lists, and each setting that cannot work named at start-up.

No etcd here: the settings module must not need the etcd client either (a node whose strategy does not use
etcd never loads it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd_settings import EtcdSettings, parse_endpoint


def test_settings_accept_comma_separated_endpoints() -> None:
    s = EtcdSettings(endpoints=" http://a:1 ,https://b:2,, ")  # type: ignore[arg-type]
    assert s.endpoints == ("http://a:1", "https://b:2")
    assert EtcdSettings().endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:4001")  # locksmith's


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"endpoints": ("ftp://127.0.0.1:2379",)}, "must start with http:// or https://"),
        ({"endpoints": ("http://127.0.0.1:2379/v2",)}, "no path"),
        ({"endpoints": ("http://:2379",)}, "has no host"),
        ({"endpoints": ("http://127.0.0.1:99999",)}, "not a valid URL"),
        ({"endpoints": ()}, "no etcd endpoint"),
        ({"cert_file": "/etc/hostname"}, "cert file given without a key file"),
        ({"key_file": "/etc/hostname"}, "key file given without a cert file"),
        ({"ca_file": "/nonexistent/ca.pem"}, "cannot read etcd CA file /nonexistent/ca.pem"),
        ({"password": "secret"}, "password given without a user name"),
    ],
)
def test_settings_validation_names_the_problem(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(LockBackendError, match=problem.replace("(", r"\(")):
        EtcdSettings(**kwargs).validate()  # type: ignore[arg-type]


def test_empty_strings_mean_not_given() -> None:
    s = EtcdSettings(ca_file="", cert_file="", key_file="", username="", password="")
    s.validate()
    assert (s.ca_file, s.cert_file, s.username) == (None, None, None)


def test_an_endpoint_without_a_port_uses_its_schemes() -> None:
    assert parse_endpoint("https://etcd.example").port == 443
    assert parse_endpoint("http://etcd.example/").port == 80
    assert parse_endpoint("http://[::1]:2379").host == "::1"


def test_reading_the_settings_does_not_load_the_etcd_client() -> None:
    code = (
        "import sys, locksmithd.config, locksmithd.daemon; "
        "print(sorted(m for m in ('requests', 'etcd3gw', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
