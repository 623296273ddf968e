"""Prometheus metrics of the node daemons: a small registry, the text exposition format, a Unix socket, a textfile.

Rules of this file:

* The registry and :func:`render` are pure: families are declared once (name, type, help, label names), the
  daemon sets values, and rendering turns a snapshot into text format 0.0.4. The format is written here by hand
  because ``prometheus_client`` costs ~5 MiB of RSS and locksmithd must idle under its unit's ``MemoryHigh=32M``;
  the tests parse our output with ``prometheus_client``'s own parser.
* Values are read at scrape time: a family may have a *collector* (a callable run just before rendering) for
  values that are cheaper to compute on demand than to keep up to date (ages, "since" times).
* Two ways out, both optional and both I/O shells: :class:`MetricsSocket` serves one scrape per connection on a
  Unix stream socket (connect, read to EOF — Zincati's convention, so ``socat - UNIX-CONNECT:PATH`` or a local
  exporter can scrape a node without a network port), and :class:`TextfileWriter` writes the same text atomically
  for node_exporter's textfile collector. Neither may stop a daemon: a path taken by something else is a
  :class:`MetricsError` that the daemon logs before carrying on without that output.
* The socket file gets mode 0660 and, when the group exists, group ``metrics``, so monitoring agents in that group
  can read it and nobody else can.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import grp
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coreos_common.files import replace_file

log = logging.getLogger(__name__)

METRICS_GROUP = "metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scraper that connects and never reads must not hold the daemon's loop: each connection gets this long.
_SCRAPE_TIMEOUT_S = 5.0


class MetricsError(Exception):
    """An output (socket or textfile) cannot be set up; the message names the path and says what to do."""


class Kind(enum.Enum):
    """Metric types of the text format that the node daemons use."""

    GAUGE = "gauge"
    COUNTER = "counter"


LabelValues = tuple[str, ...]


@dataclass
class Family:
    """One metric family: its samples are keyed by their label values, in the order of ``labels``."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    samples: dict[LabelValues, float] = field(default_factory=dict)

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name}: labels {sorted(labels)} do not match {sorted(self.labels)}")
        return tuple(str(labels[name]) for name in self.labels)

    def set(self, value: float, **labels: str) -> None:
        """Set the sample with these labels (gauges; a counter only through :meth:`inc`)."""
        if self.kind is Kind.COUNTER:
            raise TypeError(f"{self.name} is a counter: use inc()")
        self.samples[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add to the sample with these labels; counters only go up."""
        if amount < 0 and self.kind is Kind.COUNTER:
            raise ValueError(f"{self.name}: a counter cannot decrease")
        key = self._key(labels)
        self.samples[key] = self.samples.get(key, 0.0) + amount

    def set_one_hot(self, label: str, choices: Iterable[str], current: str | None) -> None:
        """A gauge with one sample per choice of ``label``: 1 for ``current``, 0 for the others."""
        if self.labels != (label,):
            raise ValueError(f"{self.name}: one-hot needs exactly the label {label!r}")
        self.samples = {(choice,): 1.0 if choice == current else 0.0 for choice in choices}

    def clear(self) -> None:
        self.samples.clear()


class Registry:
    """The metrics one daemon exports, in declaration order."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, family: Family) -> Family:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} declared twice")
        if not _valid_name(family.name) or not all(_valid_label(label) for label in family.labels):
            raise ValueError(f"invalid metric or label name in {family.name}{family.labels}")
        if family.kind is Kind.COUNTER and not family.name.endswith("_total"):
            raise ValueError(f"counter {family.name} must end in _total")
        self._families[family.name] = family
        return family

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Family:
        return self._add(Family(name, Kind.GAUGE, help, labels))

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Family:
        return self._add(Family(name, Kind.COUNTER, help, labels))

    def add_collector(self, collector: Callable[[], None]) -> None:
        """Run ``collector`` before every rendering, to refresh values computed on demand."""
        self._collectors.append(collector)

    def families(self) -> tuple[Family, ...]:
        return tuple(self._families.values())

    def render(self) -> str:
        """Run the collectors, then the text format of every family."""
        for collector in self._collectors:
            try:
                collector()
            except Exception:  # a broken collector must not cost the scrape of everything else
                log.exception("A metrics collector failed; its values are stale in this scrape")
        return render(self.families())


def _valid_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c.isascii() and (c.isalnum() or c in "_:") for c in name)


def _valid_label(name: str) -> bool:
    return _valid_name(name) and ":" not in name and not name.startswith("__")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as the text format writes it: integers without a fraction, ``+Inf``, ``-Inf``, ``NaN``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """Text exposition format 0.0.4: ``# HELP``, ``# TYPE``, then one line per sample, sorted by label values."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind.value}")
        for key in sorted(family.samples):
            value = format_value(family.samples[key])
            if family.labels:
                pairs = ",".join(
                    f'{name}="{_escape_label_value(label_value)}"'
                    for name, label_value in zip(family.labels, key, strict=True)
                )
                lines.append(f"{family.name}{{{pairs}}} {value}")
            else:
                lines.append(f"{family.name} {value}")
    return "\n".join(lines) + "\n"


def _set_group_readable(path: Path) -> None:
    """Mode 0660, group ``metrics`` when that group exists (else root's group: only root reads)."""
    os.chmod(path, 0o660)
    try:
        gid = grp.getgrnam(METRICS_GROUP).gr_gid
    except KeyError:
        log.info("No group %r on this system: only root can read %s", METRICS_GROUP, path)
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        log.warning("Cannot give %s to group %r: this process may not (it needs CAP_CHOWN, or to be in the group); "
                    "only this user can read it", path, METRICS_GROUP)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse anything else that is in the way."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise MetricsError(
            f"metrics socket path {path} exists and is not a socket: remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise MetricsError(f"metrics socket path {path} cannot be checked: {exc.strerror}") from exc
    else:
        raise MetricsError(
            f"metrics socket {path} is in use by another process: stop it or choose another path")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


class MetricsSocket:
    """Serves ``render()`` once per connection on a Unix stream socket, then closes the connection."""

    def __init__(self, path: Path, render: Callable[[], str]) -> None:
        self.path = path
        self._render = render
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind and listen; :class:`MetricsError` when the path cannot be used."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MetricsError(f"cannot create the directory of the metrics socket {self.path}: {exc}") from exc
        _clear_stale_socket(self.path)
        old_umask = os.umask(0o117)  # the socket never exists with wider permissions, not even for an instant
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as exc:
            raise MetricsError(f"cannot listen on the metrics socket {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        _set_group_readable(self.path)
        log.info("Metrics on unix:%s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._render().encode())
            await asyncio.wait_for(writer.drain(), _SCRAPE_TIMEOUT_S)
        except (TimeoutError, OSError):
            pass  # the scraper went away or stalled; the next scrape starts afresh
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _SCRAPE_TIMEOUT_S)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()


class TextfileWriter:
    """Writes the metrics text to ``path`` atomically (temporary file, rename), as node_exporter expects."""

    def __init__(self, path: Path) -> None:
        if path.suffix != ".prom":
            raise MetricsError(f"metrics textfile {path} must end in .prom (node_exporter reads only those)")
        self.path = path

    def write(self, text: str) -> None:
        """Replace the file; :class:`MetricsError` naming the path when it cannot be written."""
        try:
            replace_file(self.path, text.encode())
        except OSError as exc:
            raise MetricsError(f"cannot write the metrics textfile {self.path}: {exc.strerror}") from exc


class MetricsExporter:
    """The daemon's metrics outputs: a socket, a textfile, both or neither, fed from one registry.

    ``changed()`` asks for the textfile to be rewritten; writes are coalesced to at most one per
    ``textfile_interval`` seconds, so a burst of status changes costs one write.
    """

    def __init__(self, registry: Registry, *, socket_path: Path | None, textfile: Path | None,
                 textfile_interval: float = 1.0) -> None:
        self.registry = registry
        self._socket = MetricsSocket(socket_path, registry.render) if socket_path is not None else None
        self._textfile_path = textfile
        self._textfile: TextfileWriter | None = None
        self._interval = textfile_interval
        self._pending: asyncio.TimerHandle | None = None
        self._textfile_failing = False

    async def start(self) -> None:
        """Open what can be opened; what cannot is logged as an error and left out (the daemon carries on)."""
        if self._socket is not None:
            try:
                await self._socket.start()
            except MetricsError as exc:
                log.error("%s; metrics are not served on a socket", exc)
                self._socket = None
        if self._textfile_path is not None:
            try:
                self._textfile = TextfileWriter(self._textfile_path)
            except MetricsError as exc:
                log.error("%s; no metrics textfile is written", exc)
            else:
                self._write_textfile()

    def changed(self) -> None:
        """Some value changed: rewrite the textfile soon (coalesced)."""
        if self._textfile is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(self._interval, self._write_textfile)

    def _write_textfile(self) -> None:
        self._pending = None
        if self._textfile is None:
            return
        try:
            self._textfile.write(self.registry.render())
        except MetricsError as exc:
            if not self._textfile_failing:  # one error per outage, not one per status change
                log.error("%s; will retry at the next change", exc)
            self._textfile_failing = True
        else:
            if self._textfile_failing:
                log.info("Metrics textfile %s written again", self._textfile.path)
            self._textfile_failing = False

    async def close(self) -> None:
        """Write the final values to the textfile and stop serving the socket."""
        if self._pending is not None:
            self._pending.cancel()
            self._write_textfile()
        if self._socket is not None:
            await self._socket.close()
