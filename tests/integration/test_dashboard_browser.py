"""The dashboard in a real headless Chromium: an admin signs in, creates a group, uploads and promotes a payload,
pauses and resumes the rollout, changes its rate and watches simulated clients (``updateservicectl instance
fake``) move the progress bar and the chart without reloading; a form without its CSRF token is refused; a
viewer cannot change a group; the pages work at phone size, by keyboard, in the viewer's time zone, with AA
contrast.  Any JavaScript console error fails the test.  Screenshots of each step go to
``$DASHBOARD_SCREENSHOT_DIR`` (default: a temporary directory)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from sim.browser import HeadlessChromium
from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, cpp_update_check, start_coreupdate
from sim.tools import VENV_BIN
from tests.integration.test_dashboard_http import ADMIN, VIEWER, add_user
from update_engine.payload.generate import generate_full_payload, make_key_pair

pytestmark = pytest.mark.integration

WAIT_S = 30
# The browser logs a failed load for the 403 pages these tests ask for on purpose; nothing else may appear.
EXPECTED_REFUSAL = re.compile(r"status of 403")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("DASHBOARD_SCREENSHOT_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("release")
    make_key_pair(d / "key.pem", d / "key.pub.pem")
    (d / "usr.img").write_bytes(os.urandom(8192) + b"usr " * 4096)
    generate_full_payload(d / "usr.img", d / "update.gz", (d / "key.pem").read_bytes())
    return {"payload": d / "update.gz", "public": d / "key.pub.pem"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, release: dict[str, Path]) -> Iterator[CoreUpdateServer]:
    data = tmp_path_factory.mktemp("srv")
    add_user(data, *ADMIN, "admin")
    add_user(data, *VIEWER, "viewer")
    with start_coreupdate(data, extra_args=("--payload-public-key", str(release["public"]),
                                            "--history-resolution", "2")) as srv:
        yield srv


class Ui:
    """The browser pointed at the server, with the waits and checks every step needs."""

    def __init__(self, browser: HeadlessChromium, server: CoreUpdateServer, shots: Path) -> None:
        self.browser = browser
        self.d: WebDriver = browser.driver
        self.server = server
        self.shots = shots
        self.allowed_errors: re.Pattern[str] | None = None

    def open(self, path: str) -> None:
        self.d.get(self.server.url + path)
        self.clean()

    def clean(self) -> None:
        """No console error other than the ones this step expects."""
        errors = [e for e in self.browser.console_errors()
                  if not (self.allowed_errors and self.allowed_errors.search(e))]
        assert errors == [], f"JavaScript console errors on {self.d.current_url}: {errors}"

    def wait(self, condition: Callable[[WebDriver], object], what: str, timeout: float = WAIT_S) -> None:
        # A document being replaced (a navigation, the live refresh) can fail a probe: probe again.
        WebDriverWait(self.d, timeout, poll_frequency=0.2, ignored_exceptions=(WebDriverException,)).until(
            condition, message=f"waiting for {what}")

    def text(self) -> str:
        return str(self.d.find_element(By.TAG_NAME, "body").text)

    def shot(self, name: str) -> None:
        self.browser.screenshot(self.shots / f"{name}.png")

    def type(self, field_id: str, text: str) -> None:
        element = self.d.find_element(By.ID, field_id)
        element.clear()
        element.send_keys(text)

    def click(self, element_id: str) -> None:
        """Click a button that loads another page, and wait until that page has loaded."""
        self.follow(self.d.find_element(By.ID, element_id))

    def follow(self, element: WebElement) -> None:
        """Click, then wait for a new document (the old one's window mark is gone) that has loaded."""
        self.d.execute_script("window.beforeFollow = true;")

        def loaded(d: WebDriver) -> bool:
            try:
                return bool(d.execute_script("return !window.beforeFollow && document.readyState === 'complete';"))
            except WebDriverException:  # asked while the documents change over
                return False

        element.click()
        self.wait(loaded, "the next page")
        self.clean()

    def sign_in(self, name: str, password: str) -> None:
        self.d.delete_all_cookies()
        self.open("/login")
        self.type("f-name", name)
        self.type("f-password", password)
        self.follow(self.d.find_element(By.CSS_SELECTOR, "main button[type=submit]"))
        assert self.d.find_elements(By.CSS_SELECTOR, "form.signout"), self.text()

    def group(self, group: str) -> dict[str, object]:
        return dict(self.server.api("GET", f"/apps/{COREOS_APP_ID}/groups/{group}"))


@pytest.fixture
def ui(chromium: HeadlessChromium, server: CoreUpdateServer, shots: Path) -> Iterator[Ui]:
    chromium.resize(1280, 900)
    chromium.console_errors()  # forget what an earlier test left
    yield Ui(chromium, server, shots)


def test_an_admin_rolls_out_a_payload_and_watches_the_fleet_converge(ui: Ui, release: dict[str, Path]) -> None:
    ui.sign_in(*ADMIN)
    assert "Overview" in ui.text() and "stable" in ui.text()
    ui.shot("01-overview-before")

    ui.follow(ui.d.find_element(By.LINK_TEXT, "New group"))
    ui.type("f-name", "web")
    ui.type("f-id", "web")
    Select(ui.d.find_element(By.ID, "f-channel")).select_by_visible_text("stable")
    ui.type("f-update_count", "1")
    ui.type("f-update_interval", "1h")
    ui.click("create-group")
    assert "Done: created." in ui.text() and "1 every 60 min" in ui.text()
    ui.shot("02-group-created")

    ui.follow(ui.d.find_element(By.LINK_TEXT, "CoreOS packages"))
    ui.type("f-version", "2.0.0")
    ui.d.find_element(By.ID, "f-payload").send_keys(str(release["payload"]))
    ui.click("upload")
    assert "Package 2.0.0 verified and stored" in ui.text()
    assert "verified with the server's public key" in ui.text()
    ui.shot("03-payload-uploaded")
    Select(ui.d.find_element(By.ID, "promote-stable")).select_by_visible_text("2.0.0")
    ui.click("promote-stable-button")
    assert "Promote 2.0.0 to channel stable?" in ui.text() and "web: 0 instance(s)" in ui.text()
    ui.shot("04-promote-confirmation")
    ui.click("confirm-promote")
    assert "Done: promoted." in ui.text()

    ui.open("/apps/" + COREOS_APP_ID + "/groups/web")
    ui.type("f-reason", "checking the canaries")
    ui.click("pause")
    assert "Paused — checking the canaries" in ui.text()
    assert ui.group("web")["updates_paused"] is True
    ui.shot("05-group-paused")
    ui.click("resume")
    assert ui.group("web")["updates_paused"] is False and "Paused" not in ui.text()

    ui.type("f-update_count", "3")
    ui.type("f-update_interval", "2")
    ui.click("save-policy")
    assert "3 every 2 s" in ui.text() and ui.group("web")["update_count"] == 3

    # Nine simulated clients check in every second; the page refreshes itself (no reload) as they update.
    progress = ui.d.find_element(By.ID, "group-progress")
    assert progress.get_attribute("value") == "0"
    env = {**os.environ, "UPDATECTL_SERVER": ui.server.url, "UPDATECTL_KEY": ui.server.token}
    fake = subprocess.Popen(
        [str(VENV_BIN / "updateservicectl"), "instance", "fake", "--app-id", COREOS_APP_ID, "--group-id", "web",
         "--version", "1.0.0", "--clients-per-app", "9", "--min-sleep", "1", "--max-sleep", "1", "--rounds", "8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen: set[str] = set()

        def converged(d: WebDriver) -> bool:
            try:  # the live refresh swaps the element: read both values from one of them
                bar = d.find_element(By.ID, "group-progress")
                value, maximum = bar.get_attribute("value") or "", bar.get_attribute("max") or ""
            except StaleElementReferenceException:
                return False
            seen.add(f"{value}/{maximum}")
            return value == "9" and maximum == "9"

        ui.wait(converged, "all nine clients on 2.0.0", timeout=60)
        out, _ = fake.communicate(timeout=WAIT_S)
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait()
    assert fake.returncode == 0, out
    assert out.count("updated from 1.0.0 to 2.0.0") == 9
    assert len(seen) >= 2, f"the bar never moved before it was full: {seen}"
    ui.clean()
    assert "Complete — every instance seen in the last day runs 2.0.0" in ui.text()
    tips = [e.get_attribute("data-tip") or "" for e in ui.d.find_elements(By.CSS_SELECTOR, "#live-charts .bar")]
    assert any("2.0.0 9" in tip for tip in tips), tips
    ui.shot("06-group-rollout-complete")

    ui.follow(ui.d.find_element(By.CSS_SELECTOR, "table.instances a.mono"))
    assert "update complete: success reboot" in ui.text() and "granted 2.0.0 in group web" in ui.text()
    ui.clean()
    ui.shot("07-instance")

    ui.follow(ui.d.find_element(By.CSS_SELECTOR, "form.signout button"))
    assert "/login" in ui.d.current_url
    ui.open("/apps/" + COREOS_APP_ID + "/groups/web")
    assert "/login" in ui.d.current_url  # the session is gone


def test_a_form_without_its_csrf_token_is_refused(ui: Ui) -> None:
    ui.sign_in(*ADMIN)
    ui.open(f"/apps/{COREOS_APP_ID}/groups/stable")
    ui.allowed_errors = EXPECTED_REFUSAL
    ui.d.execute_script(
        "var form = document.querySelector('form[action$=\"/pause\"]');"
        "form.querySelector('input[name=csrf_token]').remove(); form.submit();")
    ui.wait(lambda d: "Not allowed" in d.title, "the refusal")
    assert "security token is missing or out of date" in ui.text()
    ui.clean()
    assert ui.group("stable")["updates_paused"] is False


def test_a_viewer_sees_the_group_but_cannot_change_it(ui: Ui) -> None:
    ui.sign_in(*VIEWER)
    ui.open(f"/apps/{COREOS_APP_ID}/groups/stable")
    assert "may look but not change" in ui.text()
    assert not ui.d.find_elements(By.ID, "save-policy") and not ui.d.find_elements(By.ID, "pause")
    before = ui.group("stable")
    ui.allowed_errors = EXPECTED_REFUSAL
    # A hand-made form with the viewer's own valid token: the role, not the token, is what refuses it.
    ui.d.execute_script(
        "var token = document.querySelector('form.signout input[name=csrf_token]').value;"
        "var form = document.createElement('form'); form.method = 'post'; form.action = arguments[0];"
        "for (var [k, v] of [['csrf_token', token], ['update_count', '99'], ['update_interval', '1'],"
        "                    ['update_timeout', '60'], ['timezone', 'UTC'], ['channel', 'stable']]) {"
        "  var i = document.createElement('input'); i.name = k; i.value = v; form.appendChild(i); }"
        "document.body.appendChild(form); form.submit();",
        f"/apps/{COREOS_APP_ID}/groups/stable/policy")
    ui.wait(lambda d: "Not allowed" in d.title, "the refusal")
    assert "viewer account" in ui.text()
    ui.clean()
    assert ui.group("stable") == before
    ui.shot("08-viewer-refused")


def _contrast(foreground: str, background: str) -> float:
    def luminance(colour: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"\d+", colour)[:3])
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_phone_width_keyboard_contrast_and_local_times(ui: Ui) -> None:
    ui.sign_in(*ADMIN)
    ui.open(f"/apps/{COREOS_APP_ID}/groups/stable")
    # Keyboard: the first Tab reaches the skip link, which moves the focus to the content.
    ui.d.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert ui.d.switch_to.active_element.get_attribute("class") == "skip"
    # Every control has a label.
    unlabelled = ui.d.execute_script(
        "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.name);")
    assert unlabelled == []
    # AA contrast for text, muted text, links, buttons and errors.
    pairs = ui.d.execute_script(
        "function bg(e) { while (e) { var c = getComputedStyle(e).backgroundColor;"
        "  if (c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c; e = e.parentElement; }"
        "  return 'rgb(255,255,255)'; }"
        "return [...document.querySelectorAll('body, .muted, a, button, .hint, dt, .crumbs')]"
        ".map(e => [e.tagName + '.' + e.className, getComputedStyle(e).color, bg(e)]);")
    poor = [(what, round(_contrast(fg, back), 2)) for what, fg, back in pairs if _contrast(fg, back) < 4.5]
    assert poor == []
    # Times: the browser's zone in the text, UTC in the title.
    assert ui.server.omaha(cpp_update_check("0123456789abcdef0123456789abcdef"))[0] == 200
    ui.wait(lambda d: ui.server.request("GET", f"/api/v1/apps/{COREOS_APP_ID}/instances/"
                                                "0123456789abcdef0123456789abcdef")[0] == 200, "the check-in")
    ui.open(f"/apps/{COREOS_APP_ID}/instances/0123456789abcdef0123456789abcdef")
    stamp = ui.d.find_element(By.CSS_SELECTOR, "time")
    assert stamp.get_attribute("title").endswith("UTC")
    assert re.search(r"EST|EDT|GMT-[45]", stamp.text), stamp.text
    # A phone-sized window: nothing wider than the screen.
    ui.browser.resize(390, 844)
    for path in ("/", f"/apps/{COREOS_APP_ID}/groups/stable", f"/apps/{COREOS_APP_ID}/packages"):
        ui.open(path)
        overflow = ui.d.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert overflow <= 0, f"{path} is {overflow} px wider than a phone"
    ui.shot("09-phone-overview")
