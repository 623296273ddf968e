"""The demo's operator: sets up the rollout on ``coreupdate`` with the real commands, printing each one as it runs.

What an operator of a fleet would type: ``coreupdate token create`` for an API token (and, with ``--serve``,
``coreupdate user add`` for a dashboard account), then ``updateservicectl``
with ``UPDATECTL_SERVER`` and ``UPDATECTL_KEY`` set: a group that follows a channel at a limited rate, the signed
payload uploaded as a package (checked against the fleet's public key before it leaves, and again by the server),
and later the package promoted to the channel, which starts the rollout.

Rules: every command runs in the work directory, so the printed line (paths relative to it, ``$APP`` for the
application id, the command's name without the virtualenv's directory) is the command that ran; its output follows,
dimmed. A command that fails (non-zero exit, or no answer within a minute) raises :class:`OperatorError` with its
output, which ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
from collections.abc import Sequence
from pathlib import Path

from demo.story import DIM, Story
from sim.coreupdate import COREOS_APP_ID
from sim.tools import VENV_BIN

COMMAND_TIMEOUT = 60.0
LABEL = "admin"
DASHBOARD_USER = "admin"


class OperatorError(RuntimeError):
    """A command of the operator failed; the message holds its output."""


class Operator:
    """Runs ``coreupdate`` and ``updateservicectl`` in ``workdir`` and tells the story of each command."""

    def __init__(self, story: Story, workdir: Path) -> None:
        self.story = story
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("UPDATECTL_")}

    def shown(self, value: str | Path) -> str:
        """``value`` as the printed command shows it: relative to the work dir, the app id as ``$APP``."""
        text = str(value)
        with contextlib.suppress(ValueError):
            text = str(Path(text).relative_to(self.workdir))
        return "$APP" if text == COREOS_APP_ID else shlex.quote(text)

    def say(self, text: str) -> None:
        self.story.say(LABEL, text)

    def tell(self, argv: Sequence[str | Path], *, background: bool = False) -> None:
        """Print the command line ``argv`` (``&`` when it keeps running)."""
        self.say("$ " + " ".join([str(argv[0]), *(self.shown(a) for a in argv[1:])]) + (" &" if background else ""))

    async def run(self, command: str, *args: str | Path, stdin: str | None = None) -> list[str]:
        """Run ``command args…`` (``stdin``: what it reads, as a person would type it), print it and its output;
        returns the output's lines."""
        self.tell([command, *args])
        proc = await asyncio.create_subprocess_exec(
            str(VENV_BIN / command), *(str(a) for a in args), cwd=self.workdir, env=self.env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(None if stdin is None else stdin.encode()),
                                            COMMAND_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise OperatorError(f"{command} {args[0] if args else ''} gave no answer within "
                                f"{COMMAND_TIMEOUT:.0f} s") from None  # fmt: skip
        lines = out.decode(errors="replace").splitlines()
        if proc.returncode != 0:
            raise OperatorError(f"{command} {' '.join(map(str, args[:2]))} failed with exit status "
                                f"{proc.returncode}: {' '.join(lines)[-600:]}")  # fmt: skip
        return lines

    def show_output(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.story.out.plain(f"{'':17}{line}", DIM)

    async def make_token(self, data_dir: Path) -> str:
        """An API token for the operator, stored (hashed) in the server's database in ``data_dir``."""
        lines = await self.run("coreupdate", "token", "create", "--data-dir", data_dir, "--name", "demo")
        token = lines[-1].strip() if lines else ""
        if not token:
            raise OperatorError("coreupdate token create printed no token")
        return token

    async def add_dashboard_user(self, data_dir: Path, name: str = DASHBOARD_USER) -> str:
        """An admin account for the dashboard, with a fresh password (typed on stdin, as the command reads it);
        returns the password."""
        password = secrets.token_urlsafe(12)
        self.show_output(await self.run("coreupdate", "user", "add", name, "--role", "admin", "--data-dir", data_dir,
                                        stdin=password + "\n"))
        return password

    def use_server(self, url: str, token: str) -> None:
        """``updateservicectl``'s server and key from now on, as an operator would export them."""
        self.env.update(UPDATECTL_SERVER=url, UPDATECTL_KEY=token)
        self.say(f"$ export UPDATECTL_SERVER={url} UPDATECTL_KEY={token} APP={COREOS_APP_ID}")

    async def create_group(self, group: str, label: str, channel: str, update_count: int, interval_s: int) -> None:
        self.show_output(await self.run(
            "updateservicectl", "group", "create", "--app-id", COREOS_APP_ID, "--group-id", group, "--label", label,
            "--channel", channel, "--update-count", str(update_count), "--update-interval", str(interval_s),
        ))  # fmt: skip

    async def upload_package(self, version: str, payload: Path, public_key: Path) -> None:
        self.show_output(await self.run(
            "updateservicectl", "package", "create", "--app-id", COREOS_APP_ID, "--version", version,
            "--file", payload, "--public-key", public_key,
        ))  # fmt: skip

    async def promote(self, channel: str, version: str) -> None:
        self.show_output(await self.run(
            "updateservicectl", "channel", "update", "--app-id", COREOS_APP_ID, "--channel", channel,
            "--version", version,
        ))  # fmt: skip
