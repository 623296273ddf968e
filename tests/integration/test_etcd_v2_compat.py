"""Mixed fleets: nodes still running Flatcar's Go locksmith (etcd v2 keys) and nodes running locksmithd (etcd v3).

etcd runs with ``--enable-v2``. ``OldLocksmith`` stands in for a node running the original: it is written here
from etcd's v2 HTTP API exactly as locksmith's ``lock/etcd.go`` uses it (create with ``prevExist=false``, read
``node.modifiedIndex``, write with ``prevIndex``, compact JSON in the order semaphore, max, holders), with no
code of this project. Without compatibility mode the two kinds of node count in separate stores and together
exceed ``max``; with it, never.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from locksmithd import ctl
from locksmithd.backends import LockBackendError
from locksmithd.backends.etcd.backend import EtcdLockBackend
from locksmithd.backends.etcd_settings import EtcdSettings
from locksmithd.semaphore import key_for_group
from sim.etcd import EtcdCluster
from tests.conftest import require_tool

pytestmark = pytest.mark.integration

SETTLE = 30.0
_groups = iter(range(10**6))


class OldLocksmith:
    """One node running the original locksmith, as far as the semaphore goes (reference §2)."""

    def __init__(self, endpoint: str, group: str, machine_id: str) -> None:
        key = key_for_group(group)  # url.QueryEscape of the group, as locksmith builds the key
        # Go's http client escapes the key's path once more ("%" becomes "%25"; "+" stays, as in any URL path).
        self.url = f"{endpoint}/v2/keys/{urllib.parse.quote(key, safe='/$&+,:;=@')}"
        self.machine_id = machine_id
        self._request("PUT", {"prevExist": "false"}, '{"semaphore":1,"max":1,"holders":null}')

    def _request(self, method: str, query: dict[str, str], value: str | None = None) -> tuple[int, dict[str, object]]:
        data = urllib.parse.urlencode({"value": value}).encode() if value is not None else None
        url = self.url + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self) -> tuple[dict[str, object], int]:
        status, doc = self._request("GET", {})
        assert status == 200, doc
        node = doc["node"]
        assert isinstance(node, dict)
        return json.loads(node["value"]), int(node["modifiedIndex"])

    def _set(self, sem: dict[str, object], index: int) -> None:
        # Go marshals the struct's fields in their order: semaphore, max, holders.
        value = json.dumps(
            {"semaphore": sem["semaphore"], "max": sem["max"], "holders": sem["holders"]}, separators=(",", ":")
        )
        status, doc = self._request("PUT", {"prevIndex": str(index)}, value)
        if status == 412:
            raise RuntimeError(f"{doc['errorCode']}: {doc['message']} ({doc.get('cause')}) [{doc.get('index')}]")
        assert status == 200, doc

    def lock(self) -> None:
        sem, index = self.get()
        holders = list(sem.get("holders") or [])  # type: ignore[call-overload]
        if int(sem["semaphore"]) <= 0:  # type: ignore[call-overload]
            raise RuntimeError(f"semaphore is at {sem['semaphore']}")
        if self.machine_id in holders:
            raise RuntimeError("holder exists")
        bisect.insort(holders, self.machine_id)
        self._set({"semaphore": int(sem["semaphore"]) - 1, "max": sem["max"], "holders": holders}, index)  # type: ignore[call-overload]

    def unlock(self) -> None:
        sem, index = self.get()
        holders = list(sem.get("holders") or [])  # type: ignore[call-overload]
        if self.machine_id not in holders:
            raise RuntimeError("holder does not exist")
        holders.remove(self.machine_id)
        self._set({"semaphore": int(sem["semaphore"]) + 1, "max": sem["max"], "holders": holders}, index)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def etcd_v2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_tool("etcd")
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd-v2"), extra_args=["--enable-v2"]) as cluster:
        yield cluster


@pytest.fixture
def group() -> str:
    return f"mixed-{next(_groups)}"


def settings(cluster: EtcdCluster, group: str, *, compat: bool = True) -> EtcdSettings:
    return EtcdSettings(endpoints=tuple(cluster.endpoints), group=group, v2_compat=compat)


async def test_without_compatibility_a_mixed_fleet_reboots_two_at_once(etcd_v2: EtcdCluster, group: str) -> None:
    """Why the mode exists: locksmith counts in v2, locksmithd in v3, and with max=1 both go."""
    old = OldLocksmith(etcd_v2.endpoints[0], group, "old-node")
    old.lock()
    new = EtcdLockBackend(settings(etcd_v2, group, compat=False))
    await asyncio.wait_for(new.acquire("new-node"), SETTLE)
    assert old.get()[0]["holders"] == ["old-node"]
    await new.close()


async def test_a_mixed_fleet_never_exceeds_max(etcd_v2: EtcdCluster, group: str) -> None:
    old = OldLocksmith(etcd_v2.endpoints[0], group, "old-node")
    old.lock()
    new = EtcdLockBackend(settings(etcd_v2, group))
    task = asyncio.create_task(new.acquire("new-node", version="4000.0.0"))
    await asyncio.sleep(0.5)
    assert not task.done()  # the v2 slot is locksmith's: no v3 slot is taken either
    assert json.loads(etcd_v2.get(key_for_group(group)) or b'{"holders":[]}')["holders"] == []
    old.unlock()
    await asyncio.wait_for(task, SETTLE)
    # locksmith's exact v2 value, and the v3 one.
    _, doc = old._request("GET", {})
    assert json.loads(doc["node"]["value"]) == {"semaphore": 0, "max": 1, "holders": ["new-node"]}  # type: ignore[index]
    assert doc["node"]["value"] == '{"semaphore":0,"max":1,"holders":["new-node"]}'  # type: ignore[index]
    assert etcd_v2.get(key_for_group(group)) == b'{"semaphore":0,"max":1,"holders":["new-node"]}'
    with pytest.raises(RuntimeError, match="semaphore is at 0"):
        old.lock()
    assert await new.release("new-node")
    old.lock()  # released last, and the old node can take it
    assert old.get()[0]["holders"] == ["old-node"]
    await new.close()


async def test_the_v2_key_is_created_as_locksmith_creates_it(etcd_v2: EtcdCluster) -> None:
    """A group with a slash and a space: QueryEscape'd in the key, exactly where locksmith looks."""
    group = f"prod/database {next(_groups)}"
    new = EtcdLockBackend(settings(etcd_v2, group))
    await asyncio.wait_for(new.acquire("new-node"), SETTLE)
    old = OldLocksmith(etcd_v2.endpoints[0], group, "old-node")
    assert "groups/prod%252Fdatabase+" in old.url
    assert old.get()[0] == {"semaphore": 0, "max": 1, "holders": ["new-node"]}
    assert await new.release("new-node")
    await new.close()
    fresh = f"fresh-{next(_groups)}"
    probe = EtcdLockBackend(settings(etcd_v2, fresh))
    assert await probe.release("nobody") is False  # reading creates the key with locksmith's first value
    _, doc = OldLocksmith(etcd_v2.endpoints[0], fresh, "x")._request("GET", {})
    assert doc["node"]["value"] == '{"semaphore":1,"max":1,"holders":null}'  # type: ignore[index]
    await probe.close()


async def test_a_failed_v3_wait_gives_the_v2_slot_back(etcd_v2: EtcdCluster, group: str) -> None:
    """The v2 slot is taken first; when the v3 wait then fails (here: a corrupt v3 value), it is released."""
    etcd_v2.put(key_for_group(group), b"{corrupt")
    new = EtcdLockBackend(settings(etcd_v2, group))
    with pytest.raises(LockBackendError, match="corrupt"):
        await asyncio.wait_for(new.acquire("new-node"), SETTLE)
    old = OldLocksmith(etcd_v2.endpoints[0], group, "old-node")
    assert old.get()[0]["holders"] == []
    await new.close()


async def test_without_the_v2_api_the_error_says_how_to_fix_it(tmp_path: Path) -> None:
    require_tool("etcd")
    with EtcdCluster(1, tmp_path / "etcd") as plain:
        new = EtcdLockBackend(settings(plain, "g"))
        with pytest.raises(LockBackendError, match=r"does not serve the v2 API.*--enable-v2"):
            await asyncio.wait_for(new.acquire("new-node"), SETTLE)
        await new.close()


def test_locksmithctl_in_compatibility_mode(
    etcd_v2: EtcdCluster, group: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["-endpoint", etcd_v2.endpoints[0], "-group", group, "-etcd-v2-compat"]
    old = OldLocksmith(etcd_v2.endpoints[0], group, "old-node")
    old.lock()

    def run(*argv: str) -> tuple[int, str, str]:
        code = ctl.main([*base, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    # Locked in v2 by locksmith: the lock is refused, and nothing is left half-taken in v3.
    assert run("lock", "new-node") == (1, "", "Error locking: semaphore is at 0\n")
    code, out, _ = run("status")
    assert code == 0
    assert out.startswith("Available: 1\nMax: 1\n")
    assert out.endswith("The etcd v2 semaphore (locksmith's) differs:\nAvailable: 0\nMax: 1\n\nMACHINE ID\nold-node\n")
    assert json.loads(run("status", "--json")[1])["v2"] == {"semaphore": 0, "max": 1, "holders": ["old-node"]}
    assert run("set-max", "2") == (0, "Old-Max: 1\nMax: 2\n", "")
    assert run("lock", "new-node") == (0, "", "")
    assert old.get()[0] == {"semaphore": 0, "max": 2, "holders": ["new-node", "old-node"]}
    assert run("unlock", "new-node") == (0, "", "")
    assert run("unlock", "new-node") == (1, "", "Error unlocking: holder does not exist\n")
    old.unlock()
    code, out, _ = run("status")
    assert out == "Available: 2\nMax: 2\n"  # the same in both: shown once
