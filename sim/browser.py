"""A headless Chromium driven by Selenium: Debian's ``chromium`` and ``chromium-driver``, for the dashboard's tests
and its screenshots.

Rules: the browser runs headless (``--headless=new``; ``--no-sandbox`` because tests run as root) with a fresh
profile in a temporary directory, and with everything that would reach the network switched off (this machine's
network is closed: no component updates, sync, background requests or first-run pages); its console is logged
(``console_errors`` returns the SEVERE entries since the last call); ``zone`` sets the time zone the browser
shows times in.  :class:`HeadlessChromium` is a context manager whose exit quits the browser and removes the
profile, also after an error; page loads and scripts are bounded by timeouts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from sim.tools import MissingTool

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PAGE_LOAD_TIMEOUT_S = 30
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-default-apps", "--disable-extensions", "--metrics-recording-only", "--mute-audio",
)


class HeadlessChromium:
    """``with HeadlessChromium() as browser: browser.driver.get(url)``."""

    def __init__(self, *, width: int = 1280, height: int = 900, zone: str = "UTC") -> None:
        for path in (CHROMIUM, CHROMEDRIVER):
            if not path.exists():
                raise MissingTool(path.name)
        self.width, self.height, self.zone = width, height, zone
        self.profile = Path(tempfile.mkdtemp(prefix="sim-chromium-"))
        self._driver: webdriver.Chrome | None = None

    @property
    def driver(self) -> webdriver.Chrome:
        if self._driver is None:
            raise RuntimeError("the browser is not running (use HeadlessChromium as a context manager)")
        return self._driver

    def __enter__(self) -> HeadlessChromium:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={self.width},{self.height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(str(CHROMEDRIVER), env={**os.environ, "TZ": self.zone})
        try:
            self._driver = webdriver.Chrome(service=service, options=options)
        except Exception:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self._driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
        self._driver.set_script_timeout(PAGE_LOAD_TIMEOUT_S)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            if self._driver is not None:
                self._driver.quit()
        finally:
            self._driver = None
            shutil.rmtree(self.profile, ignore_errors=True)

    def console_errors(self) -> list[str]:
        """The SEVERE console entries since the last call (JavaScript errors, failed loads)."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [str(e.get("message", "")) for e in entries if e.get("level") == "SEVERE"]

    def resize(self, width: int, height: int) -> None:
        self.driver.set_window_size(width, height)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path
