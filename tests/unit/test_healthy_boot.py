"""healthy-boot.d: the operator's hooks must all pass before the running partition is marked good. A real private
dbus-daemon (no systemd on it: the 45 s rule, shrunk to 0), a GPT image made by sgdisk, real hook executables."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from coreos_common.backoff import BackoffPolicy
from sim.disks import cgpt_flags, make_usr_disk
from sim.node import NodeRoot, make_node_root
from tests.conftest import require_tool
from tests.unit.test_hooks import write_hook
from update_engine.engine.attempter import EngineOptions, UpdateAttempter
from update_engine.healthy_boot import BOOT_MARKED_NAME, mark_boot_healthy
from update_engine.service import DaemonTiming

USR_A = 3
WAIT = 20.0  # bound on any single wait; passing runs take a fraction of it
FAST = DaemonTiming(healthy_boot_delay=0.0, boot_complete_poll=0.05, healthy_hook_timeout=2.0,
                    healthy_hook_retry=BackoffPolicy(0.05, 0.2))


@pytest.fixture
def node(tmp_path: Path) -> NodeRoot:
    return make_node_root(tmp_path / "root", version="3815.2.5")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    require_tool("cgpt")
    return make_usr_disk(tmp_path / "disk.img")


def attempter_for(node: NodeRoot, disk: Path) -> UpdateAttempter:
    attempter = UpdateAttempter(EngineOptions(config_root=node.root, state_dir=node.state_dir, run_dir=node.run_dir,
                                              disk=disk, booted="USR-A"))
    attempter.load_settings()
    return attempter


def marked(node: NodeRoot, disk: Path) -> bool:
    return (node.run_dir / BOOT_MARKED_NAME).exists() and cgpt_flags(disk, USR_A)[1:] == (0, 1)


async def test_every_hook_passes_with_its_context_and_the_boot_is_marked(
    tmp_path: Path, node: NodeRoot, disk: Path, bus_client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = tmp_path / "healthy-boot.d"
    seen = tmp_path / "seen"
    write_hook(hooks, "10-context", f"env | grep ^UPDATE_ENGINE_HOOK | sort > {seen}")
    write_hook(hooks, "20-ok", "echo all is well")
    with caplog.at_level(logging.INFO):
        await asyncio.wait_for(mark_boot_healthy(attempter_for(node, disk), bus_client, FAST, hook_dir=hooks), WAIT)
    assert seen.read_text().splitlines() == [
        "UPDATE_ENGINE_HOOK=healthy-boot",
        "UPDATE_ENGINE_HOOK_BOOTED_SLOT=USR-A",
        f"UPDATE_ENGINE_HOOK_MACHINE_ID={node.machine_id}",
        "UPDATE_ENGINE_HOOK_VERSION=3815.2.5",
    ]
    assert marked(node, disk)
    assert f"2 hook(s) passed in {hooks}): USR-A marked good" in caplog.text
    assert "[20-ok] all is well" in caplog.text


async def test_a_failing_hook_is_retried_with_its_output_logged_and_nothing_is_marked_before_it_passes(
    tmp_path: Path, node: NodeRoot, disk: Path, bus_client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = tmp_path / "healthy-boot.d"
    tries = tmp_path / "tries"
    # Fails twice, saying why, then passes.
    write_hook(hooks, "50-kubelet", f'echo x >> {tries}; [ "$(wc -l < {tries})" -ge 3 ] || '
                                    '{ echo "kubelet not ready yet"; exit 1; }')
    samples: list[tuple[int, bool]] = []  # (runs of the hook so far, marked?)
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(mark_boot_healthy(attempter_for(node, disk), bus_client, FAST, hook_dir=hooks))
        async with asyncio.timeout(WAIT):
            while not task.done():
                runs = tries.read_text().count("x") if tries.exists() else 0
                samples.append((runs, marked(node, disk)))
                await asyncio.sleep(0.01)
        await task
    assert tries.read_text().count("x") == 3
    assert marked(node, disk)
    assert not [sample for sample in samples if sample[0] < 3 and sample[1]], "marked before the hook passed"
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Healthy-boot check")]
    assert len(failures) == 2 and all(r.levelno == logging.WARNING for r in caplog.records
                                      if r.getMessage().startswith("Healthy-boot check"))
    assert failures[0].startswith(f"Healthy-boot check 1 failed: hook {hooks / '50-kubelet'} failed (exit status 1)"
                                  "; last output: kubelet not ready yet; the running partition is not marked good yet")


async def test_a_world_writable_hook_is_refused_by_name_until_it_is_fixed(
    tmp_path: Path, node: NodeRoot, disk: Path, bus_client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = tmp_path / "healthy-boot.d"
    bad = write_hook(hooks, "10-anyone-writes-me", "true", mode=0o777)
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(mark_boot_healthy(attempter_for(node, disk), bus_client, FAST, hook_dir=hooks))
        async with asyncio.timeout(WAIT):
            while "Healthy-boot check 2 failed" not in caplog.text:
                await asyncio.sleep(0.01)
        assert not marked(node, disk)
        bad.chmod(0o755)
        await asyncio.wait_for(task, WAIT)
    assert f"{bad} is writable by group or others (mode 0777)" in caplog.text
    assert marked(node, disk)


async def test_a_hanging_hook_is_killed_and_retried_and_a_disabled_one_skipped(
    tmp_path: Path, node: NodeRoot, disk: Path, bus_client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = tmp_path / "healthy-boot.d"
    tries = tmp_path / "tries"
    write_hook(hooks, "10-hangs-once", f'[ -e {tries} ] || {{ touch {tries}; sleep 600; }}')
    write_hook(hooks, "20-disabled", "exit 1", mode=0o644)
    with caplog.at_level(logging.INFO):
        await asyncio.wait_for(mark_boot_healthy(attempter_for(node, disk), bus_client, FAST, hook_dir=hooks), WAIT)
    assert f"hook {hooks / '10-hangs-once'} timed out (after 2 s)" in caplog.text
    assert f"Hook {hooks / '20-disabled'} is not executable (chmod +x to enable it); skipped" in caplog.text
    assert marked(node, disk)


async def test_no_hook_directory_means_the_original_rule_alone(
    tmp_path: Path, node: NodeRoot, disk: Path, bus_client: MessageBus, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        await asyncio.wait_for(
            mark_boot_healthy(attempter_for(node, disk), bus_client, FAST, hook_dir=tmp_path / "nothing-here"), WAIT
        )
    assert marked(node, disk)
    assert f"no hooks in {tmp_path / 'nothing-here'}): USR-A marked good" in caplog.text
