"""A simulated node on disk: the files update-engine and locksmithd read under one root, and the node's boot disk.

:func:`make_node_root` lays out what a real node has under ``/``: ``etc/machine-id``, the kernel's boot id at
``proc/sys/kernel/random/boot_id``, the release file ``usr/share/coreos/release``, ``etc/coreos/update.conf``,
and the kernel directory; the state directory (``var/lib/update_engine``) and ``run`` are where the daemons put
theirs. The daemons are pointed at it with ``--config-root``, ``--state-dir``, ``--run-dir`` and
``--kernel-dir``. :class:`Node` adds a GPT image (:mod:`sim.disks`) on which USR-A is the running partition.

Rules: a root is a plain directory the caller owns and removes; nothing here starts a process. What a reboot
changes for the daemons is a new boot id (:meth:`NodeRoot.new_boot`) and an empty ``run`` (the caller's job, as it
decides when the node is down).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from sim.disks import make_usr_disk
from sim.payload import Keys
from sim.tools import VENV_BIN
from update_engine.engine.options import EngineOptions
from update_engine.http_rules import HttpLimits

OLD_VERSION = "1.0.0"
DEFAULT_APPID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"


@dataclass
class NodeRoot:
    """The files update-engine reads on a node, under one directory."""

    root: Path
    machine_id: str

    @property
    def state_dir(self) -> Path:
        return self.root / "var/lib/update_engine"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def kernel_dir(self) -> Path:
        return self.root / "boot/flatcar"

    @property
    def boot_id_path(self) -> Path:
        return self.root / "proc/sys/kernel/random/boot_id"

    def set_update_conf(self, **values: str) -> None:
        conf = self.root / "etc/coreos/update.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def set_version(self, version: str) -> None:
        release = self.root / "usr/share/coreos/release"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text(
            f"COREOS_RELEASE_VERSION={version}\nCOREOS_RELEASE_BOARD=amd64-usr\n"
            f"COREOS_RELEASE_APPID={DEFAULT_APPID}\n"
        )

    def new_boot(self) -> None:
        """What a reboot changes for the update-engine: a new kernel boot id (the caller empties /run)."""
        self.boot_id_path.write_text(str(uuid.uuid4()) + "\n")

    def prefs(self, key: str) -> str | None:
        path = self.state_dir / "prefs" / key
        return path.read_text() if path.exists() else None


def make_node_root(root: Path, *, version: str = OLD_VERSION, server: str | None = None,
                   group: str = "stable") -> NodeRoot:
    """A node root with a fresh machine id and boot id, running ``version``, asking ``server`` for ``group``."""
    machine_id = uuid.uuid4().hex
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text(machine_id + "\n")
    node = NodeRoot(root, machine_id)
    node.boot_id_path.parent.mkdir(parents=True, exist_ok=True)
    node.new_boot()
    node.set_version(version)
    conf = {"GROUP": group}
    if server:
        conf["SERVER"] = server
    node.set_update_conf(**conf)
    node.kernel_dir.mkdir(parents=True, exist_ok=True)
    return node


def update_engine_args(root: NodeRoot, disk: Path, booted: str, public_key: Path | None, *extra: str) -> list[str]:
    """The ``update_engine`` command line for a node: its disk, booted slot, key and every path under its root."""
    args = [
        str(VENV_BIN / "update_engine"), "--disk", str(disk), "--booted", booted,
        "--state-dir", str(root.state_dir), "--run-dir", str(root.run_dir),
        "--config-root", str(root.root), "--kernel-dir", str(root.kernel_dir),
    ]  # fmt: skip
    if public_key is not None:
        args += ["--public-key", str(public_key)]
    return [*args, *extra]


@dataclass(frozen=True)
class Node:
    """A node root and its boot disk; USR-A is running."""

    root: NodeRoot
    disk: Path

    def options(self, keys: Keys, server: str, http: HttpLimits | None = None) -> EngineOptions:
        """What the in-process attempter needs to update this node from ``server``."""
        return EngineOptions(
            config_root=self.root.root, state_dir=self.root.state_dir, run_dir=self.root.run_dir, disk=self.disk,
            booted="USR-A", server=server, public_key=keys.public, kernel_dir=self.root.kernel_dir,
            http=http or HttpLimits(resume_delay=0.05),
        )

    def once_args(self, keys: Keys, *extra: str) -> list[str]:
        """``update_engine --once`` for this node (the server comes from update.conf)."""
        return update_engine_args(self.root, self.disk, "USR-A", keys.public, "--once", "--resume-delay", "0.05",
                                  *extra)

    @property
    def reboot_marker(self) -> Path:
        return self.root.run_dir / "update_engine_autoupdate_completed"


def make_node(directory: Path, server: str, *, usr_mib: int = 8) -> Node:
    """A node running :data:`OLD_VERSION` from USR-A of a fresh image, asking ``server`` for updates."""
    root = make_node_root(directory / "root", version=OLD_VERSION, server=server)
    disk = make_usr_disk(directory / "disk.img", usr_mib=usr_mib)
    return Node(root, disk)
