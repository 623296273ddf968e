"""The dashboard over real HTTP on loopback, as a browser without JavaScript uses it: sign-in, sessions and
their cookies, rate limits, CSRF tokens, roles, the group form's messages, the instance history, uploads
verified against the server's key, promotion with a confirmation."""

from __future__ import annotations

import html
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, coreupdate_command, cpp_update_check, start_coreupdate
from tests.integration.test_coreupdate_server import event_request, release, wait_for
from update_engine.payload.generate import generate_full_payload, make_key_pair

pytestmark = pytest.mark.integration

ADMIN, VIEWER = ("alice", "alice-password"), ("bob", "bob-password")
GROUP_URL = f"/apps/{COREOS_APP_ID}/groups/canary"


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("payload")
    make_key_pair(d / "key.pem", d / "key.pub.pem")
    make_key_pair(d / "other.pem", d / "other.pub.pem")
    image = d / "usr.img"
    image.write_bytes(os.urandom(8192) + b"usr " * 4096)
    generate_full_payload(image, d / "update.gz", (d / "key.pem").read_bytes())
    generate_full_payload(image, d / "other.gz", (d / "other.pem").read_bytes())
    return {"payload": d / "update.gz", "foreign": d / "other.gz", "public": d / "key.pub.pem"}


def add_user(data_dir: Path, name: str, password: str, role: str) -> None:
    done = subprocess.run(coreupdate_command("user", "add", name, "--role", role, "--data-dir", str(data_dir)),
                          input=password + "\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, payloads: dict[str, Path]) -> Iterator[CoreUpdateServer]:
    data = tmp_path_factory.mktemp("srv")
    add_user(data, *ADMIN, "admin")
    add_user(data, *VIEWER, "viewer")
    srv = start_coreupdate(data, extra_args=("--payload-public-key", str(payloads["public"])))
    try:
        srv.api("POST", f"/apps/{COREOS_APP_ID}/groups", {"id": "canary", "name": "canary", "channel": "stable",
                                                          "update_count": 1, "update_interval": 5400})
        yield srv
    finally:
        srv.stop()


class Browser:
    """A cookie-keeping HTTP client that reads the CSRF token of the last page."""

    def __init__(self, server: CoreUpdateServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = session
        self.page = ""

    async def get(self, path: str, status: int = 200) -> str:
        async with self.http.get(self.server.url + path) as response:
            self.page = await response.text()
            assert response.status == status, self.page[-2000:]
            return self.page

    def csrf(self) -> str:
        match = re.search(r'name="csrf_token" value="([^"]+)"', self.page)
        assert match, "no CSRF token on the page"
        return match.group(1)

    async def post(self, path: str, data: dict[str, str] | aiohttp.FormData, status: int = 303,
                   csrf: bool = True) -> aiohttp.ClientResponse:
        if csrf and isinstance(data, dict):
            data = {"csrf_token": self.csrf(), **data}
        async with self.http.post(self.server.url + path, data=data, allow_redirects=False) as response:
            self.page = await response.text()
            assert response.status == status, self.page[-3000:]
            return response

    async def sign_in(self, name: str, password: str, status: int = 303) -> aiohttp.ClientResponse:
        await self.get("/login")
        return await self.post("/login", {"name": name, "password": password, "next": "/"}, status)


@pytest.fixture
async def browser(server: CoreUpdateServer) -> AsyncIterator[Browser]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browser(server, session)


async def test_pages_need_a_session_and_failed_sign_ins_are_limited(server: CoreUpdateServer, browser: Browser
                                                                    ) -> None:
    async with browser.http.get(server.url + GROUP_URL, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/login?next=" + GROUP_URL.replace("/", "%2F")
    await browser.get("/login")
    # A form without the token of its cookie is refused before the password is looked at.
    await browser.post("/login", {"name": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"}, 403, csrf=False)
    for _ in range(5):
        await browser.sign_in("mallory", "guess", 401)
        assert "Wrong user name or password." in browser.page
    await browser.sign_in("mallory", "guess", 429)
    assert "Too many failed sign-ins" in browser.page
    assert "too many failed attempts" in server.log_text()
    response = await browser.sign_in(*ADMIN)
    cookie = next(v for k, v in response.headers.items() if k == "Set-Cookie" and "coreupdate_session=" in v)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    page = await browser.get("/")
    assert "canary" in page and "1 every 90 min" in page and "alice" in page
    assert "User alice (admin) signed in from 127.0.0.1" in server.log_text()


async def test_an_admin_changes_a_group_and_sees_each_wrong_field_named(server: CoreUpdateServer,
                                                                         browser: Browser) -> None:
    await browser.sign_in(*ADMIN)
    await browser.get(GROUP_URL)
    fields = {"channel": "stable", "update_count": "many", "update_interval": "90 minutes", "update_timeout": "1h",
              "office_hours": "Mon-Fri 25:00 8h", "timezone": "Europe/Berlin", "failure_pause_count": "",
              "failure_pause_fraction": "1.5"}
    await browser.post(f"{GROUP_URL}/policy", {"csrf_token": "stale", **fields}, 403, csrf=False)
    await browser.post(f"{GROUP_URL}/policy", fields, 400)
    errors = dict(re.findall(r'<p class="error" id="e-([a-z_]+)">([^<]+)</p>', browser.page))
    assert set(errors) == {"update_count", "update_interval", "office_hours", "failure_pause_fraction"}
    assert "is not an integer" in html.unescape(errors["update_count"])
    assert "(0, 1]" in html.unescape(errors["failure_pause_fraction"])
    assert 'value="90 minutes"' in browser.page  # what was typed is shown again
    group = server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary")
    assert group["update_count"] == 1  # nothing was stored
    fields.update(update_count="2", update_interval="45m", office_hours="Mon-Fri 09:00 8h",
                  failure_pause_fraction="0.25")
    response = await browser.post(f"{GROUP_URL}/policy", fields)
    assert response.headers["Location"].endswith("?done=saved")
    group = server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary")
    assert (group["update_count"], group["update_interval"], group["office_hours"], group["timezone"],
            group["failure_pause_fraction"]) == (2, 2700, "Mon-Fri 09:00 8h", "Europe/Berlin", 0.25)
    page = await browser.get(GROUP_URL)
    assert "2 every 45 min, office hours Mon-Fri 09:00 8h Europe/Berlin, pause at 25% failed" in page
    await browser.post(f"{GROUP_URL}/pause", {"reason": "change freeze"})
    assert server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary")["pause_reason"] == "change freeze"
    assert "change freeze" in await browser.get("/")
    await browser.get(GROUP_URL)
    await browser.post(f"{GROUP_URL}/resume", {})
    assert not server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary")["updates_paused"]
    activity = [a["message"] for a in server.api("GET", f"/activity?app={COREOS_APP_ID}&group=canary")]
    assert any("paused by an operator: change freeze" in m for m in activity)


async def test_a_viewer_reads_everything_and_changes_nothing(server: CoreUpdateServer, browser: Browser) -> None:
    await browser.sign_in(*VIEWER)
    page = await browser.get(GROUP_URL)
    assert "Save the policy" not in page and "Pause the rollout" not in page
    before = server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary")
    await browser.post(f"{GROUP_URL}/pause", {"reason": "not mine to pause"}, 403)
    assert "viewer account" in browser.page
    assert server.api("GET", f"/apps/{COREOS_APP_ID}/groups/canary") == before
    await browser.get(f"/apps/{COREOS_APP_ID}/packages")
    await browser.post(f"/apps/{COREOS_APP_ID}/channels/stable/promote", {"version": "2.0.0", "confirm": "yes"}, 403)


async def test_the_instance_page_shows_events_with_error_names_and_grants(server: CoreUpdateServer,
                                                                          browser: Browser) -> None:
    release(server, "3.0.0", "beta")
    machine = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
    status, _ = server.omaha(event_request(machine, "beta", "<updatecheck></updatecheck>"))
    assert status == 200
    server.omaha(event_request(machine, "beta", '<event eventtype="13" eventresult="1"></event>'))
    server.omaha(event_request(machine, "beta", '<event eventtype="3" eventresult="0" errorcode="10"></event>'))
    await browser.sign_in(*ADMIN)
    for _ in range(100):
        page = await browser.get(f"/apps/{COREOS_APP_ID}/instances/{machine}")
        if "DOWNLOAD_HASH_MISMATCH" in page:
            break
        await browser.get("/")  # the events are written behind the answers: ask again
    assert "10 DOWNLOAD_HASH_MISMATCH" in page and "update download started: success" in page
    assert "granted 3.0.0 in group beta" in page
    beta = await browser.get(f"/apps/{COREOS_APP_ID}/groups/beta?status=Error")
    assert machine in beta and "1 instance(s)" in beta
    await browser.get(f"/apps/{COREOS_APP_ID}/groups/beta?sort=sideways", 400)
    assert "sort: 'sideways' is not one of" in html.unescape(browser.page)


async def test_uploads_are_verified_and_promotion_asks_first(server: CoreUpdateServer, browser: Browser,
                                                             payloads: dict[str, Path]) -> None:
    await browser.sign_in(*ADMIN)
    packages = f"/apps/{COREOS_APP_ID}/packages"

    def upload_form(version: str, path: Path) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("csrf_token", browser.csrf())
        form.add_field("version", version)
        form.add_field("payload", path.read_bytes(), filename="update.gz", content_type="application/octet-stream")
        return form

    await browser.get(packages)
    await browser.post(packages, upload_form("4.0.0", payloads["foreign"]), 400)
    assert "is not a valid signed update payload" in html.unescape(browser.page)
    await browser.post(packages, upload_form("4.0.0", payloads["payload"]), 201)
    assert "Package 4.0.0 verified and stored" in browser.page
    assert "verified with the server&#39;s public key" in browser.page and "REPLACE" in browser.page
    await browser.post(f"/apps/{COREOS_APP_ID}/channels/alpha/promote", {"version": "4.0.0"}, 200)
    assert "Promote 4.0.0 to channel alpha?" in browser.page and "alpha: 0 instance(s)" in browser.page
    assert server.api("GET", f"/apps/{COREOS_APP_ID}/channels")[0]["version"] is None  # not yet
    response = await browser.post(f"/apps/{COREOS_APP_ID}/channels/alpha/promote",
                                  {"version": "4.0.0", "confirm": "yes"})
    assert response.headers["Location"] == f"{packages}?done=promoted"
    channels = {c["name"]: c["version"] for c in server.api("GET", f"/apps/{COREOS_APP_ID}/channels")}
    assert channels["alpha"] == "4.0.0"
    assert "Channel alpha of" in server.log_text() and "promoted from None to 4.0.0 by alice" in server.log_text()


async def test_signing_out_ends_the_session_on_the_server(server: CoreUpdateServer, browser: Browser) -> None:
    await browser.sign_in(*ADMIN)
    session_cookie = browser.http.cookie_jar.filter_cookies(URL(server.url))["coreupdate_session"].value
    await browser.get("/")
    await browser.post("/logout", {})
    async with aiohttp.ClientSession(cookies={"coreupdate_session": session_cookie}) as stranger, \
            stranger.get(server.url + "/", allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"].startswith("/login")


async def test_unknown_things_are_404_pages(server: CoreUpdateServer, browser: Browser) -> None:
    await browser.sign_in(*VIEWER)
    for path in (f"/apps/{COREOS_APP_ID}/groups/no-such-group", "/apps/no-such-app/packages",
                 f"/apps/{COREOS_APP_ID}/instances/no-such-machine"):
        page = await browser.get(path, 404)
        assert "<h1>Not found</h1>" in page and "Traceback" not in page


async def test_a_database_outage_is_a_503_page_and_the_dashboard_recovers(tmp_path: Path) -> None:
    from sim.postgres import PostgresServer

    with PostgresServer() as pg:  # its own server: this test stops it
        url = pg.create_database("dashboard")
        done = subprocess.run(coreupdate_command("user", "add", ADMIN[0], "--role", "admin", "--database", url),
                              input=ADMIN[1] + "\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        with start_coreupdate(tmp_path / "srv", database=url) as srv:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
                browser = Browser(srv, session)
                await browser.sign_in(*ADMIN)
                await browser.get("/")
                pg.stop()
                page = await browser.get("/", 503)
                assert "cannot reach its database" in page and "Traceback" not in page
                pg.start()
                for _ in range(200):
                    if srv.request("GET", "/health")[0] == 200:
                        break
                assert "canary" not in await browser.get("/") and srv.process.poll() is None


async def test_behind_a_tls_proxy_cookies_are_secure_and_the_address_is_the_clients(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    add_user(data, *ADMIN, "admin")
    with start_coreupdate(data, extra_args=("--behind-tls-proxy",)) as srv:
        # The proxy speaks TLS to the browser, which sends Secure cookies back; this client plays both.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                         headers={"X-Forwarded-For": "203.0.113.7"}) as session:
            async with session.get(srv.url + "/login") as response:
                form = await response.text()
                login_cookie = response.headers["Set-Cookie"]
            assert "Secure" in login_cookie
            token = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert token is not None
            async with session.post(srv.url + "/login", allow_redirects=False,
                                    headers={"Cookie": login_cookie.split(";")[0]},
                                    data={"csrf_token": token.group(1), "name": ADMIN[0], "password": ADMIN[1],
                                          "next": "/"}) as response:
                assert response.status == 303
                cookie = response.headers.getall("Set-Cookie")
        session_cookie = next(c for c in cookie if c.startswith("coreupdate_session="))
        assert "Secure" in session_cookie and "HttpOnly" in session_cookie and "SameSite=Strict" in session_cookie
        srv.wait_for_log("User alice (admin) signed in from 203.0.113.7")


async def test_the_group_page_shows_the_end_of_a_rollout(server: CoreUpdateServer, browser: Browser) -> None:
    release(server, "3.5.0", "finish")
    server.api("POST", f"/apps/{COREOS_APP_ID}/groups", {"id": "finish", "name": "finish", "channel": "finish"})
    assert server.omaha(cpp_update_check("finisher", "finish", "1.0.0"))[0] == 200  # granted 3.5.0
    assert server.omaha(cpp_update_check("finisher", "finish", "3.5.0"))[0] == 200  # back up on it: complete

    def completed() -> list[str]:
        return [a["message"] for a in server.api("GET", f"/activity?app={COREOS_APP_ID}&group=finish")
                if a["kind"] == "rollout-completed"]

    wait_for(lambda: bool(completed()), "the rollout of 3.5.0 to finish recorded as completed")
    await browser.sign_in(*ADMIN)
    page = html.unescape(await browser.get(f"/apps/{COREOS_APP_ID}/groups/finish"))
    assert "rollout-completed" in page and completed()[0] in page
