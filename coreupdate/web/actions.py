"""The dashboard's changes (POST): create a group, change its policy, pause and resume it, upload a payload,
promote a version to a channel.

Rules: only ``admin`` sessions get here, with the form's CSRF token checked (``Dashboard.page``); the values go
through the API's validation (``forms.py`` → ``validation.py``) and the same storage calls as the API, so the
dashboard can never store what the API would refuse; a refused form is shown again with each message next to its
field (400); a change answers 303 to the page that shows it (reloading does not post again), reloads the
catalog and is logged with the user who made it.  Promoting a version asks for a confirmation first, which
names the groups that follow the channel.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from coreupdate import validation
from coreupdate.model import Group, GroupPolicy
from coreupdate.storage.store import Conflict, NotFound
from coreupdate.uploads import store_upload
from coreupdate.validation import ValidationError
from coreupdate.web import forms
from coreupdate.web.common import Ctx, Dashboard, Forbidden
from coreupdate.web.pages import Pages

log = logging.getLogger("coreupdate.web")

UPLOAD_CHUNK = 1 << 20


def group_url(group: Group) -> str:
    return f"/apps/{group.app_id}/groups/{quote(group.id, safe='')}"


class Actions:
    def __init__(self, dash: Dashboard, pages: Pages) -> None:
        self.dash = dash
        self.pages = pages
        self.server = dash.server

    async def _changed(self) -> None:
        await self.server.reload_catalog()

    # -- groups --------------------------------------------------------------------------------------------

    async def new_group_form(self, request: web.Request, ctx: Ctx, *, status: int = 200,
                             values: dict[str, str] | None = None, errors: dict[str, str] | None = None
                             ) -> web.StreamResponse:
        app_id = self.pages.app_id(request)
        channels = sorted(name for (app, name) in self.server.catalog.channels if app == app_id)
        blank = {"name": "", "id": "", "channel": channels[0] if channels else "", "description": "",
                 **forms.policy_values(GroupPolicy(update_count=1, update_interval=GroupPolicy().update_timeout))}
        return self.dash.render("group_new.html", status, session=ctx.session, app=self.server.catalog.apps[app_id],
                                channels=channels, form=values or blank, errors=errors or {})

    async def create_group(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        app_id = self.pages.app_id(request)
        form = ctx.form
        result = forms.policy_form(GroupPolicy(), form)
        errors = dict(result.errors)
        values = {**result.values, **{k: form.get(k, "") for k in ("name", "id", "channel", "description")}}
        checks: dict[str, Callable[[str], str]] = {
            "name": lambda v: validation.label(v, "name"),
            "description": lambda v: validation.label(v, "description"),
            "channel": lambda v: validation.name(v, "channel"),
            "id": lambda v: validation.name(v, "id") if v else "",
        }
        fields: dict[str, str] = {}
        for key, check in checks.items():
            try:
                fields[key] = check(values[key].strip())
            except ValidationError as exc:
                errors[exc.field] = exc.problem
        if not errors and not fields["name"]:
            errors["name"] = "give the group a name"
        if not errors and result.policy is not None:
            group = Group(id=fields["id"], app_id=app_id, name=fields["name"], channel=fields["channel"],
                          description=fields["description"], policy=result.policy)
            try:
                created = await self.server.db(self.server.store.create_group, group)
            except Conflict as exc:
                errors["id" if "id" in str(exc) and fields["id"] else "name"] = str(exc)
            except NotFound as exc:
                errors["channel"] = str(exc)
            else:
                await self._changed()
                log.info("Group %s (%s) created in application %s by %s: %s", created.name, created.id, app_id,
                         ctx.session.user.name, result.policy)
                return self.dash.redirect(group_url(created) + "?done=created")
        return await self.new_group_form(request, ctx, status=400, values=values, errors=errors)

    async def update_policy(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        group = self.pages.group(request)
        result = forms.policy_form(group.policy, ctx.form)
        errors = dict(result.errors)
        channel = ctx.form.get("channel", group.channel)
        try:
            validation.name(channel, "channel")
        except ValidationError as exc:
            errors["channel"] = exc.problem
        if errors or result.policy is None:
            values = {**result.values, "channel": channel}
            return await self.pages.group_page(request, ctx, form_values=values, form_errors=errors, status=400)
        policy = result.policy
        try:  # the form does not pause or resume: that stays as the group has it now
            await self.server.db(self.server.store.update_group, group.app_id, group.id,
                                 lambda g: replace(g, channel=channel, policy=replace(
                                     policy, updates_paused=g.policy.updates_paused)))
        except NotFound as exc:
            return await self.pages.group_page(request, ctx, form_values={**result.values, "channel": channel},
                                               form_errors={"channel": str(exc)}, status=400)
        await self._changed()
        log.info("Group %s policy changed by %s: channel %s, %s", group.name, ctx.session.user.name, channel, policy)
        return self.dash.redirect(group_url(group) + "?done=saved")

    async def pause(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        group = self.pages.group(request)
        try:
            reason = validation.label(ctx.form.get("reason", "").strip(), "reason")
        except ValidationError as exc:
            raise Forbidden(f"The reason was refused: {exc.problem}") from None
        reason = reason or f"paused by {ctx.session.user.name}"
        await self.server.db(self.server.store.update_group, group.app_id, group.id, lambda g: replace(
            g, pause_reason=reason, policy=replace(g.policy, updates_paused=True)))
        await self._changed()
        log.info("Group %s paused by %s: %s", group.name, ctx.session.user.name, reason)
        return self.dash.redirect(group_url(group) + "?done=paused")

    async def resume(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        group = self.pages.group(request)
        await self.server.db(self.server.store.update_group, group.app_id, group.id, lambda g: replace(
            g, pause_reason="", policy=replace(g.policy, updates_paused=False)))
        await self._changed()
        log.info("Group %s resumed by %s", group.name, ctx.session.user.name)
        return self.dash.redirect(group_url(group) + "?done=resumed")

    # -- packages and channels ---------------------------------------------------------------------------

    async def upload(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        """A multipart form whose parts come in the page's order: csrf_token, version, then the file (so the
        token and the version are checked before a byte of the payload is stored)."""
        app_id = self.pages.app_id(request)
        reader = await request.multipart()
        fields: dict[str, str] = {}
        error = ""
        while True:
            part = await reader.next()
            if part is None:
                error = "Choose a payload file to upload."
                break
            if not isinstance(part, BodyPartReader):
                error = "The form is not a flat upload form."
                break
            if part.name == "payload":
                self.dash.check_csrf(ctx.session, fields.get("csrf_token", ""))
                try:
                    version = validation.version(fields.get("version", "").strip())
                    name = validation.file_name(part.filename or "update.gz", "payload")
                    stored = await store_upload(self.server, app_id, version, name, _chunks(part), require_key=True)
                except (ValidationError, Conflict) as exc:
                    log.warning("Payload upload by %s refused: %s", ctx.session.user.name, exc)
                    return await self.pages.packages_page(request, ctx, status=400, error=str(exc))
                await self._changed()
                log.info("Package %s %s uploaded by %s: %d bytes, sha256 %s, signature verified", app_id, version,
                         ctx.session.user.name, stored.package.size, stored.package.sha256_b64)
                return await self.pages.packages_page(request, ctx, status=201, uploaded=stored)
            fields[part.name or ""] = (await part.read(decode=True)).decode("utf-8", errors="replace")[:1000]
        self.dash.check_csrf(ctx.session, fields.get("csrf_token", ""))
        return await self.pages.packages_page(request, ctx, status=400, error=error)

    async def promote(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
        app_id = self.pages.app_id(request)
        channel_name = request.match_info["channel"]
        catalog = self.server.catalog
        channel = catalog.channels.get((app_id, channel_name))
        if channel is None:
            raise web.HTTPNotFound()
        version = ctx.form.get("version", "")
        if (app_id, version) not in catalog.packages:
            return await self.pages.packages_page(request, ctx, status=400,
                                                  error=f"version: application {app_id} has no package {version!r}")
        followers = sorted((g for g in catalog.groups.values() if g.app_id == app_id and g.channel == channel_name),
                           key=lambda g: g.name)
        if ctx.form.get("confirm") != "yes":
            counts = await self.server.db(self.dash.queries.fleet_counts, [g.id for g in followers])
            return self.dash.render("promote.html", session=ctx.session, app=catalog.apps[app_id], channel=channel,
                                    version=version, followers=followers, counts=counts,
                                    package=catalog.packages[(app_id, version)])
        await self.server.db(self.server.store.set_channel, app_id, channel_name, version, create=False)
        await self._changed()
        log.info("Channel %s of %s promoted from %s to %s by %s (followed by %s)", channel_name, app_id,
                 channel.version, version, ctx.session.user.name, ", ".join(g.name for g in followers) or "no group")
        return self.dash.redirect(f"/apps/{app_id}/packages?done=promoted")


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(UPLOAD_CHUNK):
        yield chunk
