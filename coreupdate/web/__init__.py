"""The dashboard: server-rendered pages of ``coreupdate serve`` for operators, at ``/``.

Theory of operation.  Pages are Jinja2 templates rendered by the server from the in-memory catalog and from
aggregates the database computes (``storage/dashboard.py``); charts are SVG drawn on the server
(``charts.py``).  Everything works without JavaScript; ``static/dashboard.js`` only refreshes the parts of a
page marked ``data-live`` every few seconds (it fetches the same page and swaps those elements), shows times in
the viewer's zone and shows chart tooltips.  There is no front-end build step: templates and static files ship
inside the Python package.

Modules: ``common`` (templates, sessions, the checks of every page), ``signin`` (sign-in and out, rate
limits), ``pages`` (GET), ``actions`` (POST changes), ``forms`` (form text → the API's validation), ``present``
(rollout states and one-line policies in words), ``charts`` (SVG), ``ratelimit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from coreupdate.web.actions import Actions
from coreupdate.web.common import HERE, Dashboard
from coreupdate.web.pages import Pages
from coreupdate.web.signin import SignIn

if TYPE_CHECKING:
    from coreupdate.server import Server


def add_routes(app: web.Application, server: Server) -> Dashboard:
    dash = Dashboard(server)
    pages = Pages(dash)
    actions = Actions(dash, pages)
    signin = SignIn(dash)
    page = dash.page
    r = app.router
    r.add_get("/login", signin.show)
    r.add_post("/login", signin.submit)
    r.add_post("/logout", page(signin.sign_out))
    r.add_get("/", page(pages.overview))
    r.add_get("/apps/{app_id}/groups/new", page(actions.new_group_form))
    r.add_post("/apps/{app_id}/groups", page(actions.create_group, change=True))
    r.add_get("/apps/{app_id}/groups/{group}", page(pages.group_page))
    r.add_post("/apps/{app_id}/groups/{group}/policy", page(actions.update_policy, change=True))
    r.add_post("/apps/{app_id}/groups/{group}/pause", page(actions.pause, change=True))
    r.add_post("/apps/{app_id}/groups/{group}/resume", page(actions.resume, change=True))
    r.add_get("/apps/{app_id}/instances/{machine_id}", page(pages.instance_page))
    r.add_get("/apps/{app_id}/packages", page(pages.packages_page))
    r.add_post("/apps/{app_id}/packages", page(actions.upload, change=True, form=False))
    r.add_post("/apps/{app_id}/channels/{channel}/promote", page(actions.promote, change=True))
    r.add_static("/static/", HERE / "static", append_version=False)
    return dash
