"""A simulated fleet on one machine, updated by the real daemons: ``python -m demo.fleet`` (``demo/run``).

Real parts: one ``etcd`` member holding the reboot semaphore (``max`` set with ``locksmithctl set-max``), the
update server ``coreupdate`` (SQLite in the work directory) set up by the operator's commands (:mod:`demo.operator`:
a token, a group with a rate limit, the 2.0.0 payload made and signed here with the project's generator, uploaded
and, once every node has checked in, promoted to the group's channel), and per node a GPT disk image with USR-A
(1.0.0) and USR-B, a private system-like ``dbus-daemon`` with the project's D-Bus policy, and the
``update_engine`` and ``locksmithd`` daemons as subprocesses, each node with its own file system root
(update.conf, release file, machine id, state and run directories). ``--server devserver`` puts the Omaha dev
server in coreupdate's place: the release offered to every node at once, no operator.

Simulated, because it cannot run here (stand-ins on the node's bus, or in this process; see :mod:`sim.fleet`):

* **logind** (``org.freedesktop.login1``): accepts ``Reboot(b)``, then reboots the node: both daemons are
  SIGKILLed (a power cut, not a clean stop), the run directory is emptied (a tmpfs) and the node boots again.
* **systemd** (``org.freedesktop.systemd1``): ``GetUnit("boot-complete.target")`` and that unit's
  ``ActiveState`` and ``Job``, which both daemons ask about; the target becomes active a moment after each
  boot.
* **the bootloader**: GRUB's ``gptprio.next`` on the node's disk through the project's GPT code
  (:mod:`sim.standins.bootloader`); the chosen slot's version, read from the first block of the partition,
  becomes the node's release file.
* **the network**: a link that paces downloads, so that the progress of one on loopback can be watched.

The demo prints one line per event, time-stamped from its start (:mod:`demo.story`), the update server's
decisions among them, while the fleet checks that at most ``max`` nodes are down at once (from their logind
``Reboot`` to ``boot-complete.target`` of the next boot) and that no revision of the semaphore key ever has more
than ``max`` holders. It ends with a summary (:mod:`demo.report`) and exit status 0 when every node reached the end
state its scenario (:mod:`demo.scenario`) expects and the update server agrees. With ``--serve`` the fleet and
the server then keep running until Ctrl-C or SIGTERM (:mod:`demo.serve`). This module is the entry point: options,
the run, and stopping everything on the way out (also when interrupted, terminated, or when the reader of its
output goes away: exit status 130, 130 and 141).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from demo.operator import DASHBOARD_USER, Operator
from demo.report import Report
from demo.scenario import (
    CHANNEL,
    DEFAULT_TIMEOUT,
    GROUP,
    GROUP_LABEL,
    LINK_RATE,
    MIB,
    NEW_VERSION,
    OLD_VERSION,
    ROLLOUT_INTERVAL_S,
    SCENARIOS,
    SEMAPHORE_MAX,
    SERVERS,
    TIMING,
    USR_MIB,
    DemoOptions,
    Outcome,
    Release,
    end_state_missing,
    expected_outcome,
    fails_first_boot_of,
    make_release,
)
from demo.serve import serve_until_stopped
from demo.story import BAD, DIM, GOOD, NOTE, Console, Story, flags_text
from sim.disks import usr_flags
from sim.fleet.coreupdate import CoreUpdateOmaha
from sim.fleet.fleet import Fleet
from sim.fleet.omaha import DevServerOmaha, OmahaSide

log = logging.getLogger("demo.fleet")

POLL_INTERVAL = 0.25  # end-state checks
READER_GONE = 141  # the exit status of a writer whose pipe closed (128 + SIGPIPE): the story had no reader left


async def set_up(fleet: Fleet, story: Story, options: DemoOptions, operator: Operator,
                 release: Release) -> dict[str, Outcome]:  # fmt: skip
    """etcd, the Omaha side (on coreupdate: the group and the package), the nodes (told which boot fails),
    booted; returns each node's expected outcome."""
    text = await fleet.start_etcd()
    story.say("fleet", f"etcd at {fleet.etcd_endpoint}; locksmithctl set-max {SEMAPHORE_MAX}: {text}")
    await fleet.start_omaha()
    omaha = fleet.omaha
    if isinstance(omaha, CoreUpdateOmaha):
        operator.tell([Path(omaha.command[0]).name, *omaha.command[1:]], background=True)
        story.say("fleet", omaha.describe())
        assert omaha.token is not None
        operator.use_server(omaha.url, omaha.token)
        await operator.create_group(GROUP, GROUP_LABEL, CHANNEL, options.update_count, ROLLOUT_INTERVAL_S)
        await operator.upload_package(NEW_VERSION, release.payload, release.public_key)
    else:
        story.say("fleet", omaha.describe())
    expected: dict[str, Outcome] = {}
    for index in range(1, options.nodes + 1):
        node = await fleet.add_node(index, version=OLD_VERSION)
        expected[node.name] = expected_outcome(options, index)
        node.fail_next_boot_of = fails_first_boot_of(expected[node.name])
        flags = usr_flags(node.disk)
        disk_text = f"USR-A {OLD_VERSION} ({flags_text(flags['USR-A'])}), USR-B empty ({flags_text(flags['USR-B'])})"
        story.say(node.name, f"machine id {node.machine_id[:8]}…; {disk_text}")
    await fleet.boot_all()
    return expected


def problems_of(fleet: Fleet) -> list[str]:
    return [f"{n.name}: {p}" for n in fleet.nodes for p in n.history.problems]


async def wait_for_check_ins(fleet: Fleet, story: Story, timeout: float) -> bool:
    """Until the update server knows every node (False: a node has a problem, or ``timeout`` has passed)."""
    while True:
        if problems := problems_of(fleet):
            story.say("fleet", "stopping: " + "; ".join(problems), BAD)
            return False
        if all(node.history.server is not None for node in fleet.nodes):
            return True
        if story.out.elapsed() > timeout:
            unknown = ", ".join(n.name for n in fleet.nodes if n.history.server is None)
            story.say("fleet", f"timed out after {timeout:.0f}s: the server never heard from {unknown}", BAD)
            return False
        await asyncio.sleep(POLL_INTERVAL)


async def wait_for_end_states(fleet: Fleet, story: Story, options: DemoOptions, expected: dict[str, Outcome]) -> None:
    """Until every node is where its scenario says it ends (and the server agrees), a node has a problem, or the
    timeout has passed."""
    while True:
        missing = {node.name: end_state_missing(node.history, expected[node.name], on_coreupdate=options.on_coreupdate)
                   for node in fleet.nodes}  # fmt: skip
        if problems := problems_of(fleet):
            story.say("fleet", "stopping: " + "; ".join(problems), BAD)
            return
        if not any(missing.values()):
            agrees = ", and the update server agrees" if options.on_coreupdate else ""
            story.say("fleet", f"every node reached its end state{agrees}", GOOD)
            return
        if story.out.elapsed() > options.timeout:
            story.say("fleet", f"timed out after {options.timeout:.0f}s; where each node is:", BAD)
            for node in fleet.nodes:
                status = (node.history.operation or "no status").removeprefix("UPDATE_STATUS_")
                waiting = ", ".join(missing[node.name]) or "nothing"
                state = f"{node.phase.value}, {status}, {node.history.version}"
                if node.history.server is not None:
                    state += f"; server: {node.history.server.status} on {node.history.server.version}"
                story.say(node.name, f"{state}; waiting for: {waiting}", BAD)
            return
        await asyncio.sleep(POLL_INTERVAL)


async def run_demo(options: DemoOptions, console: Console, workdir: Path) -> int:
    """The whole run: release, fleet, the wait, the summary; everything started is stopped on the way out."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    console.on_reader_gone = main_task.cancel
    story = Story(console, options.rollout_text())
    operator = Operator(story, workdir)
    fleet: Fleet | None = None
    sign_in = ("", "")  # the dashboard's account, made when serving
    try:
        story.say("fleet", options.describe(), NOTE)
        story.say("fleet", f"work dir {workdir} (the commands below run there)", DIM)
        (workdir / "release").mkdir(parents=True)
        release = await make_release(workdir / "release")
        story.say("fleet", f"signing key made; payload {NEW_VERSION}: {release.size / MIB:.1f} MiB "
                           f"({USR_MIB} MiB /usr image + kernel), signed")  # fmt: skip
        omaha: OmahaSide
        if options.on_coreupdate:
            data_dir = workdir / "coreupdate"
            omaha = CoreUpdateOmaha(data_dir, await operator.make_token(data_dir), release.public_key, LINK_RATE)
            if options.serve:
                sign_in = (DASHBOARD_USER, await operator.add_dashboard_user(data_dir))
        else:
            omaha = DevServerOmaha([(release.payload, NEW_VERSION)], LINK_RATE)
        fleet = Fleet(workdir, omaha, release.public_key, story, console.elapsed, semaphore_max=SEMAPHORE_MAX,
                      group=GROUP if options.on_coreupdate else CHANNEL, usr_mib=USR_MIB, timing=TIMING)  # fmt: skip
        story.fleet = fleet
        expected = await set_up(fleet, story, options, operator, release)
        setup_done_at = console.elapsed()
        promoted_at: float | None = None
        if not options.on_coreupdate or await wait_for_check_ins(fleet, story, options.timeout):
            if options.on_coreupdate:
                await operator.promote(CHANNEL, NEW_VERSION)
                promoted_at = console.elapsed()
            await wait_for_end_states(fleet, story, options, expected)
        story.quiet = True  # the nodes keep running (checking every few seconds): their lines would cut the tables
        report = Report(console, fleet, options, expected, setup_done_at, promoted_at, console.elapsed())
        code = await report.print()
        if options.serve and isinstance(omaha, CoreUpdateOmaha):
            await serve_until_stopped(omaha, console, main_task.cancel, sign_in)
        return code
    finally:
        if fleet is not None:
            for failure in await asyncio.shield(fleet.shutdown()):
                console.plain(failure, BAD)
        loop.remove_signal_handler(signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo/run",
        description="A simulated fleet on this machine, updated by the real update_engine and locksmithd, "
                    "with a rolling reboot coordinated through a real etcd. Runs as root: only root may own "
                    "the daemons' names on the private buses.",
    )  # fmt: skip
    p.add_argument("--scenario", choices=SCENARIOS, default="update",
                   help="update: every node updates (default); rollback: node-1's new /usr fails to boot")
    p.add_argument("--nodes", type=int, default=3, choices=range(2, 10), metavar="N",
                   help="number of nodes, 2 to 9 (default 3)")
    p.add_argument("--server", choices=SERVERS, default="coreupdate",
                   help="coreupdate: the update server, with a rate-limited rollout (default); devserver: the Omaha "
                        "dev server, the release offered to every node at once")
    p.add_argument("--serve", action="store_true",
                   help="after the rolling update, keep the fleet and coreupdate running (its URL and API token are "
                        "printed) until Ctrl-C or SIGTERM")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"give up after this many seconds (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, disks, etcd data)")
    p.add_argument("--workdir", type=Path, help="where to make the work directory (default: $TMPDIR)")
    return p  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve and args.server != "coreupdate":
        parser.error("--serve keeps coreupdate running: it needs --server coreupdate")
    options = DemoOptions(args.scenario, args.nodes, args.timeout, args.keep, args.workdir, args.server, args.serve)
    if os.geteuid() != 0:
        print("demo: run it as root (only root may own the daemons' names on the private buses)",
              file=sys.stderr)
        return 2
    if options.workdir is not None:
        options.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-demo-", dir=options.workdir))
    logging.basicConfig(filename=workdir / "demo.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")  # fmt: skip
    console = Console(sys.stdout, time.monotonic())
    code = 1
    try:
        code = asyncio.run(run_demo(options, console, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.plain("interrupted; everything the demo started is stopped", BAD)
        code = READER_GONE if console.reader_gone else 130
    except Exception as exc:
        log.exception("demo failed")
        console.plain(f"demo failed: {exc}", BAD)
    finally:
        if options.keep or code != 0:
            console.plain(f"work dir kept: {workdir} (daemon logs in node-*/, demo.log)", DIM)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
