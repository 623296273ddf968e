"""Take the README's dashboard screenshots from the demo (``scripts/screenshots`` runs this in the .venv).

Rules: the demo runs as ``demo/fleet.py --serve`` in its own process group; once the rolling update is done it
prints ``dashboard: URL`` and ``sign in: NAME / PASSWORD`` and keeps serving; a headless Chromium
(``sim.browser``, 1280x900) signs in and saves ``dashboard-overview.png``, then the demo group's page (1280x1500:
the rollout, both charts, the policy) as ``dashboard-group.png``; then the demo is stopped (SIGINT to its
process group, SIGKILL after 60 s).  Every wait is bounded; the script exits non-zero with the demo's last lines
when something does not show up.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sim.browser import HeadlessChromium  # noqa: E402
from sim.coreupdate import COREOS_APP_ID  # noqa: E402

DEMO_TIMEOUT_S = 300
DEMO_GROUP = "demo-fleet"
GROUP_PAGE_HEIGHT = 1500
URL_LINE = re.compile(r"dashboard:\s+(http://\S+?)/?$")
SIGN_IN_LINE = re.compile(r"sign in:\s+(\S+) / (\S+)$")


class DemoFailed(RuntimeError):
    pass


def wait_for_dashboard(demo: subprocess.Popen[str], lines: list[str]) -> tuple[str, str, str]:
    """(url, user, password) from the demo's output, within DEMO_TIMEOUT_S.  A thread reads the pipe (a select()
    on it would miss lines already in the reader's buffer)."""
    assert demo.stdout is not None
    stdout = demo.stdout
    queued: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stdout:
            queued.put(line)
        queued.put(None)

    threading.Thread(target=read, daemon=True).start()
    url = user = password = None
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = queued.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise DemoFailed(f"the demo exited ({demo.wait()}) before it served the dashboard")
        lines.append(line.rstrip())
        print(line, end="", flush=True)
        if match := URL_LINE.search(line.strip()):
            url = match.group(1)
        if match := SIGN_IN_LINE.search(line.strip()):
            user, password = match.groups()
        if url and user and password:
            return url, user, password
    raise DemoFailed(f"the demo did not print its dashboard's address within {DEMO_TIMEOUT_S} s")


def capture(url: str, user: str, password: str, out: Path) -> None:
    with HeadlessChromium(width=1280, height=900) as browser:
        d = browser.driver
        d.get(url + "/login")
        d.find_element(By.ID, "f-name").send_keys(user)
        d.find_element(By.ID, "f-password").send_keys(password)
        d.find_element(By.CSS_SELECTOR, "main button[type=submit]").click()
        WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "form.signout"))
        d.execute_script("document.body.removeAttribute('data-refresh')")  # a still picture
        browser.screenshot(out / "dashboard-overview.png")
        browser.resize(1280, GROUP_PAGE_HEIGHT)  # the rollout, both charts and the first instances
        d.get(f"{url}/apps/{COREOS_APP_ID}/groups/{DEMO_GROUP}")
        WebDriverWait(d, 30).until(lambda d: d.find_elements(By.ID, "live-charts"))
        d.execute_script("document.body.removeAttribute('data-refresh')")
        browser.screenshot(out / "dashboard-group.png")
        errors = browser.console_errors()
        if errors:
            raise DemoFailed(f"the browser logged errors: {errors}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where to save the PNGs (default docs/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    demo = subprocess.Popen([sys.executable, "-m", "demo.fleet", "--serve"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"})
    lines: list[str] = []
    try:
        url, user, password = wait_for_dashboard(demo, lines)
        capture(url, user, password, args.out)
    except DemoFailed as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        print("\n".join(lines[-20:]), file=sys.stderr)
        return 1
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()
    print(f"screenshots: saved {args.out / 'dashboard-overview.png'} and {args.out / 'dashboard-group.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
