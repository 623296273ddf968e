"""The catalog: applications, packages, channels and groups as one immutable snapshot.  Pure.

The server keeps the current snapshot in memory and answers most update checks from it without touching the
database; it loads a new one whenever ``catalog_version`` in the database moves (after its own changes at
once, after another server's within a second or two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from coreupdate.model import Application, Channel, Group, Package


@dataclass(frozen=True)
class Catalog:
    version: int = 0
    apps: dict[str, Application] = field(default_factory=dict)
    packages: dict[tuple[str, str], Package] = field(default_factory=dict)  # (app_id, version)
    channels: dict[tuple[str, str], Channel] = field(default_factory=dict)  # (app_id, name)
    groups: dict[str, Group] = field(default_factory=dict)  # id
    token_hashes: tuple[str, ...] = ()  # hex SHA-256 of the API tokens not revoked

    @cached_property
    def _groups_by_track(self) -> dict[tuple[str, str], Group]:
        by_track: dict[tuple[str, str], Group] = {}
        for group in self.groups.values():
            by_track.setdefault((group.app_id, group.name), group)
        for group in self.groups.values():  # an id wins over another group's name
            by_track[(group.app_id, group.id)] = group
        return by_track

    def group_for_track(self, app_id: str, track: str) -> Group | None:
        """The group a node's ``GROUP=`` names: a group id, or a group name, of that application."""
        return self._groups_by_track.get((app_id, track))

    def package_for(self, group: Group) -> Package | None:
        channel = self.channels.get((group.app_id, group.channel))
        if channel is None or channel.version is None:
            return None
        return self.packages.get((group.app_id, channel.version))
