"""Where things are: the repository, the commands of the running virtualenv, and external tools.

Rules: a tool that is not installed raises :class:`MissingTool` naming the Debian package to install; nothing
here installs anything. ``VENV_BIN`` is the ``bin`` directory of the interpreter running the harness, which is
where ``pip install -e .`` put the project's commands (``update_engine``, ``locksmithd``, …).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
UPDATE_ENGINE_POLICY = REPO / "units" / "com.coreos.update1.conf"

# The Debian package that brings each external tool the harness runs.
_PACKAGES = {
    "dbus-daemon": "dbus-daemon",
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "sgdisk": "gdisk",
    "cgpt": "cgpt",
    "openssl": "openssl",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}


class MissingTool(RuntimeError):
    """An external tool the harness needs is not installed."""

    def __init__(self, name: str) -> None:
        package = _PACKAGES.get(name, name)
        super().__init__(f"{name} is not installed (apt-get install {package}; .ci/run installs it)")
        self.name = name


def find_tool(name: str) -> str:
    """The path of ``name`` on PATH or in the system directories root's PATH has; :class:`MissingTool` if absent."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/usr/local/bin")
    if path is None:
        raise MissingTool(name)
    return path
