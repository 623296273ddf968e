"""Where the engine finds everything on a node: paths, limits and the command line's overrides.

Every system path sits under ``config_root`` so tests and the demo run the real code against a temporary root.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from update_engine.http_rules import HttpLimits

DEFAULT_PUBLIC_KEY = Path("usr/share/update_engine/update-payload-key.pub.pem")
REBOOT_MARKER_NAME = "update_engine_autoupdate_completed"


@dataclass(frozen=True)
class EngineOptions:
    """Where everything is; every system path sits under ``config_root`` so tests run against a temp root."""

    config_root: Path = Path("/")
    state_dir: Path = Path("/var/lib/update_engine")
    run_dir: Path = Path("/run")
    disk: Path | None = None
    booted: str | None = None
    server: str | None = None
    public_key: Path | None = None
    kernel_dir: Path | None = None
    postinstall_hook: Path | None = None
    arch: str = field(default_factory=platform.machine)
    http: HttpLimits = field(default_factory=HttpLimits)

    @property
    def reboot_marker(self) -> Path:
        return self.run_dir / REBOOT_MARKER_NAME

    @property
    def prefs_dir(self) -> Path:
        return self.state_dir / "prefs"

    @property
    def public_key_path(self) -> Path:
        return self.public_key if self.public_key is not None else self.config_root / DEFAULT_PUBLIC_KEY

    def resolved_kernel_dir(self) -> Path:
        if self.kernel_dir is not None:
            return self.kernel_dir
        for name in ("boot/flatcar", "boot/coreos"):
            candidate = self.config_root / name
            if candidate.is_dir():
                return candidate
        return self.config_root / "boot/flatcar"
