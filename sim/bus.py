"""A private ``dbus-daemon`` configured like the system bus, for tests, the demo and the benchmarks.

Rules: the configuration mirrors Debian's ``system.conf`` default context (deny own, deny method calls, allow
signals and replies) and then includes the policy files the caller passes, so a policy file is exercised exactly as
it would be on a node; the stand-ins' policy (root may own and call logind's and systemd's names) is included
unless ``stand_ins=False``. The socket directory is world-accessible so a test can also connect as an unprivileged
user. :func:`start_private_bus` returns once the daemon listens (at most 10 s); the :class:`PrivateBus` it returns
is a context manager whose exit stops the daemon (SIGTERM, SIGKILL after 5 s) and removes the socket directory.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sim.tools import find_tool

_SYSTEM_LIKE_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
{includes}
</busconfig>
"""

# Lets root own and call the stand-ins for services that cannot run here (logind, systemd), as their own
# packaged policies would on a real node.
STAND_IN_POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow own="org.freedesktop.systemd1"/>
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
</busconfig>
"""


@dataclass
class PrivateBus:
    """A running private bus; ``address`` is what ``--bus-address`` / DBUS_SYSTEM_BUS_ADDRESS take."""

    address: str
    socket_path: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_private_bus(workdir: Path, policy_files: Sequence[Path] = (), stand_ins: bool = True) -> PrivateBus:
    """Start ``dbus-daemon`` on a socket under ``workdir`` with the given policy files included."""
    daemon = find_tool("dbus-daemon")
    workdir.mkdir(parents=True, exist_ok=True)
    # The socket lives outside pytest's 0700 temp root so that tests can also connect as an unprivileged user.
    sockdir = Path(tempfile.mkdtemp(prefix="private-bus-"))
    os.chmod(sockdir, 0o755)
    socket_path = sockdir / "system_bus_socket"
    files = [Path(p) for p in policy_files]
    if stand_ins:
        stand_in = workdir / "stand-ins.conf"
        stand_in.write_text(STAND_IN_POLICY)
        files.append(stand_in)
    includes = "\n".join(f"  <include>{p.resolve()}</include>" for p in files)
    config = workdir / "bus.conf"
    config.write_text(_SYSTEM_LIKE_CONFIG.format(socket=socket_path, includes=includes))
    proc = subprocess.Popen(
        [daemon, "--nofork", "--nopidfile", f"--config-file={config}", "--print-address"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # dbus-daemon prints its address once it listens; the socket file can appear a moment earlier.
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    line = proc.stdout.readline() if ready else b""
    if not line.strip():
        proc.kill()
        proc.wait(timeout=5)
        err = proc.stderr.read().decode() if proc.stderr else ""
        shutil.rmtree(sockdir, ignore_errors=True)
        raise RuntimeError(f"dbus-daemon did not start listening within 10 s: {err}")
    os.chmod(socket_path, 0o777)
    return PrivateBus(address=f"unix:path={socket_path}", socket_path=socket_path, process=proc)

