"""``update_engine``: the daemon (default) or one foreground check-and-apply cycle (``--once``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from coreos_common import logs
from coreos_common.cli import discard_stdout
from coreos_common.logs import escape_control
from coreos_common.updateconf import SettingsFileError
from update_engine import __version__
from update_engine.config import startup_refusal
from update_engine.engine.attempter import EngineOptions, UpdateAttempter, describe_outcome
from update_engine.http_rules import HttpLimits

log = logging.getLogger("update_engine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="update_engine",
        description="Check an Omaha server, apply signed payloads to the passive USR partition, arm the GPT flags.",
    )
    p.add_argument("--version", action="version", version=f"update_engine {__version__}")
    p.add_argument("--once", action="store_true", help="one check-and-apply cycle in the foreground, then exit")
    p.add_argument("--server", help="Omaha server URL (default: SERVER from update.conf)")
    p.add_argument("--disk", type=Path, help="whole disk or image file holding USR-A/USR-B (default: detected)")
    p.add_argument("--booted", choices=["USR-A", "USR-B", "usr-a", "usr-b"],
                   help="the running USR partition (default: detected from /proc/cmdline)")
    p.add_argument("--public-key", type=Path,
                   help="payload signing key, PEM (default /usr/share/update_engine/update-payload-key.pub.pem)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/update_engine"),
                   help="state directory (default /var/lib/update_engine)")
    p.add_argument("--run-dir", type=Path, default=Path("/run"),
                   help="where the reboot-pending marker lives (default /run)")
    p.add_argument("--config-root", type=Path, default=Path("/"),
                   help="prefix for every system file read: /etc, /usr/share, /proc/cmdline, machine and boot id")
    p.add_argument("--kernel-dir", type=Path, help="where vmlinuz-a/-b are written (default /boot/flatcar)")
    p.add_argument("--postinstall-hook", type=Path,
                   help="executable run after the payload is verified: HOOK DISK TARGET-LABEL")
    p.add_argument("--bus-address", help="D-Bus address (default: the system bus)")
    p.add_argument("--resume-delay", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--stall-timeout", type=float, default=90.0, help=argparse.SUPPRESS)
    p.add_argument("--check-interval", type=int, default=3600,
                   help="seconds between update checks, fuzzed by ±1/12 (default 3600)")
    p.add_argument("--first-check-delay", type=int, default=420,
                   help="seconds from start to the first check, ±5 min (default 420)")
    p.add_argument("--healthy-boot-delay", type=float, default=45.0,
                   help="without boot-complete.target: seconds up before the running partition is marked good "
                        "(default 45)")
    p.add_argument("--boot-complete-poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--healthy-boot-dir", type=Path,
                   help="hooks that must all pass before the running partition is marked good "
                        "(default /etc/update_engine/healthy-boot.d under --config-root)")
    p.add_argument("--healthy-hook-timeout", type=float, default=300.0,
                   help="seconds each healthy-boot hook may run (default 300)")
    p.add_argument("--healthy-hook-retry", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--metrics-socket",
                   help="Unix socket serving Prometheus metrics (default metrics.promsock in --run-dir; none: off)")
    p.add_argument("--metrics-textfile", type=Path,
                   help="also write the metrics to this .prom file, for node_exporter's textfile collector")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        config_root=args.config_root,
        state_dir=args.state_dir,
        run_dir=args.run_dir,
        disk=args.disk,
        booted=args.booted.upper() if args.booted else None,
        server=args.server,
        public_key=args.public_key,
        kernel_dir=args.kernel_dir,
        postinstall_hook=args.postinstall_hook,
        http=HttpLimits(resume_delay=args.resume_delay, stall_timeout=args.stall_timeout),
    )


async def run_once(options: EngineOptions) -> int:
    attempter = UpdateAttempter(options)
    try:
        attempter.load_settings()
    except SettingsFileError as exc:
        log.error("%s", startup_refusal(exc))
        return 1
    attempter.log_setup()
    if attempter.restore_reboot_pending():
        _say("UPDATE_STATUS_UPDATED_NEED_REBOOT (an update is already installed; reboot to apply it)")
        return 0
    outcome = await attempter.check_and_update(interactive=True)
    if outcome.error_code is not None:
        print(f"update failed: {escape_control(describe_outcome(outcome))}", file=sys.stderr)
        return 1
    snap = attempter.snapshot()
    _say(snap.current_operation if snap.new_version == "0.0.0" else f"{snap.current_operation} {snap.new_version}")
    return 0


def _say(line: str) -> None:
    """The result on stdout; a reader that went away does not change the exit status (the work is done)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        discard_stdout()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup("update_engine", verbose=args.verbose)
    options = options_from_args(args)
    if args.once:
        return asyncio.run(run_once(options))
    from coreos_common.backoff import BackoffPolicy
    from update_engine.healthy_boot import DEFAULT_HOOK_DIR
    from update_engine.metrics import METRICS_SOCKET_NAME
    from update_engine.scheduler import InvalidSchedule, ScheduleConfig
    from update_engine.service import DaemonOutputs, DaemonTiming, run_daemon

    try:
        schedule = ScheduleConfig.for_check_interval(args.check_interval, args.first_check_delay)
    except InvalidSchedule as exc:
        print(f"update_engine: {exc}", file=sys.stderr)
        return 2
    timing = DaemonTiming(
        schedule=schedule, healthy_boot_delay=args.healthy_boot_delay, boot_complete_poll=args.boot_complete_poll,
        healthy_hook_timeout=args.healthy_hook_timeout,
        healthy_hook_retry=BackoffPolicy(args.healthy_hook_retry, max(args.healthy_hook_retry, 300.0)),
    )
    socket = Path(args.metrics_socket) if args.metrics_socket else options.run_dir / METRICS_SOCKET_NAME
    outputs = DaemonOutputs(
        metrics_socket=None if args.metrics_socket in ("none", "") else socket,
        metrics_textfile=args.metrics_textfile,
        healthy_boot_dir=args.healthy_boot_dir or options.config_root / DEFAULT_HOOK_DIR,
    )
    return asyncio.run(run_daemon(options, bus_address=args.bus_address, timing=timing, outputs=outputs))


if __name__ == "__main__":
    sys.exit(main())
