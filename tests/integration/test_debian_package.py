"""The Debian packages: built from a copy of this tree, installed with apt, run on Debian's python3, purged.

One source builds three binary packages: ``python3-coreos-update-stack`` (the Python modules), the node package
``coreos-update-stack`` (update-engine, locksmithd and their units) and the server package ``coreupdate``.

Everything after the install runs the installed programs with /usr/bin/python3 and a clean environment, so
the code is exercised with Debian's own library versions (python3-dbus-fast, -aiohttp, -protobuf,
-cryptography), not with the development venv's.  The tests share one build and install and run in file
order; the last one purges the package.  They need root and apt (a Debian machine), and install the build
tools they miss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.bus import start_private_bus
from sim.disks import cgpt_flags, make_usr_disk, partition_bytes
from sim.node import make_node_root
from sim.ports import free_port, wait_for_port
from tests.conftest import require_tool
from tests.fixtures.etcd import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "coreos-update-stack"
LIB_PACKAGE = "python3-coreos-update-stack"
SERVER_PACKAGE = "coreupdate"
ALL_PACKAGES = (SERVER_PACKAGE, PACKAGE, LIB_PACKAGE)
SERVER_PROGRAMS = ("coreupdate", "updateservicectl")
SERVER_UNIT = "coreupdate.service"
SERVER_STATE_DIR = Path("/var/lib/coreupdate")
BUILD_TOOLS = (
    "dpkg-dev", "debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-all", "python3-setuptools",
    "python3-wheel", "lintian",
)
PROGRAMS = (
    "update_engine", "update_engine_client", "locksmithd", "locksmithctl", "update-payload",
    "update-engine-devserver",
)
UNITS = ("update-engine.service", "locksmithd.service")
DBUS_POLICY = Path("/usr/share/dbus-1/system.d/com.coreos.update1.conf")
KEY_DIR = Path("/usr/share/update_engine")
TMPFILES = Path("/usr/lib/tmpfiles.d/update-engine.conf")
SAMPLE = Path(f"/usr/share/doc/{PACKAGE}/examples/update.conf.sample")
STATE_DIR = Path("/var/lib/update_engine")
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"
USR_A, USR_B = 3, 4
# Debian's interpreter and library paths only: no venv, no pyenv shims, no user site.
DEBIAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "PYTHONNOUSERSITE": "1",
    "PYTHONUNBUFFERED": "1",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}


def run(args: Sequence[str], *, timeout: float = 120, cwd: Path | None = None,
        check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # cwd "/" by default: run from the repository, `python3 -c` would import the work tree instead.
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or "/",
                            env=DEBIAN_ENV, input=stdin)
    if check and result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        pytest.fail(f"{' '.join(args)} exited {result.returncode}:\n{output}")
    return result


def dpkg_status(package: str) -> str:
    """dpkg's status (``install ok installed``, ``deinstall ok config-files``); "" if dpkg never saw it."""
    result = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def is_installed(package: str) -> bool:
    return dpkg_status(package).endswith(" installed")


def apt_install(args: Sequence[str]) -> None:
    """apt-get install, refreshing the package lists once if they are missing or stale."""
    first = run(["apt-get", "install", "-y", "-q", *args], timeout=600, check=False)
    if first.returncode == 0:
        return
    run(["apt-get", "update", "-q"], timeout=600)
    run(["apt-get", "install", "-y", "-q", *args], timeout=600)


def purge() -> subprocess.CompletedProcess[str]:
    installed = [p for p in ALL_PACKAGES if dpkg_status(p) not in ("", "unknown ok not-installed")]
    return run(["apt-get", "purge", "-y", "-q", *installed], timeout=300)


def copy_tree(destination: Path) -> None:
    """The files git would commit (tracked plus new, not ignored): no venv, caches or earlier build output."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def unit_dir() -> Path:
    """Where dh_installsystemd put the units on this release (/lib on bookworm, /usr/lib later)."""
    for candidate in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")):
        if (candidate / UNITS[0]).exists():
            return candidate
    pytest.fail(f"{UNITS[0]} is in neither /lib/systemd/system nor /usr/lib/systemd/system")


@dataclass(frozen=True)
class Built:
    deb: Path
    lib_deb: Path
    server_deb: Path
    changes: Path
    lintian: str
    untracked_after_build: list[str]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if os.geteuid() != 0:
        pytest.skip("building and installing a Debian package needs root")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("not a Debian system (no apt-get/dpkg)")
    if any(dpkg_status(p) not in ("", "unknown ok not-installed") for p in ALL_PACKAGES):
        purge()  # left behind by an interrupted run, installed or with its files still on disk
    elif STATE_DIR.exists() or SERVER_STATE_DIR.exists():
        pytest.skip(f"{STATE_DIR} exists without the package: it looks like a real node's state, left alone")
    missing = [p for p in BUILD_TOOLS if not is_installed(p)]
    if missing:
        apt_install(["--no-install-recommends", *missing])

    work = tmp_path_factory.mktemp("deb")
    source = work / PACKAGE
    copy_tree(source)
    git = ["git", "-C", str(source)]
    run([*git, "init", "-q"])
    run([*git, "add", "-A"])
    run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=source, timeout=600)
    untracked = run([*git, "ls-files", "--others", "--exclude-standard"]).stdout.splitlines()
    untracked += run([*git, "diff", "--name-only"]).stdout.splitlines()
    debs = {name: sorted(work.glob(f"{name}_*_all.deb")) for name in ALL_PACKAGES}
    changes = sorted(work.glob(f"{PACKAGE}_*.changes"))
    assert all(len(found) == 1 for found in debs.values()) and len(changes) == 1, sorted(
        p.name for p in work.iterdir())
    lintian = run(["lintian", str(changes[0])], timeout=300, check=False)
    try:
        apt_install([str(debs[name][0]) for name in ALL_PACKAGES])
        yield Built(debs[PACKAGE][0], debs[LIB_PACKAGE][0], debs[SERVER_PACKAGE][0], changes[0],
                    lintian.stdout + lintian.stderr, untracked)
    finally:
        if any(is_installed(p) for p in ALL_PACKAGES):
            purge()


def test_lintian_reports_no_errors(package: Built) -> None:
    errors = [line for line in package.lintian.splitlines() if line.startswith("E:")]
    assert errors == [], package.lintian


def test_build_leaves_nothing_for_git_to_see(package: Built) -> None:
    """Building in a checkout must not leave files that .gitignore does not cover."""
    assert package.untracked_after_build == []


def test_files_are_where_systemd_and_dbus_look_for_them(package: Built) -> None:
    units = unit_dir()
    for name in UNITS:
        assert (units / name).read_text() == (REPO / "units" / name).read_text()
    assert DBUS_POLICY.read_text() == (REPO / "units/com.coreos.update1.conf").read_text()
    assert TMPFILES.read_text() == (REPO / "units/update-engine.tmpfiles").read_text()
    assert SAMPLE.read_text() == (REPO / "units/update.conf.sample").read_text()
    for program in PROGRAMS:
        path = Path("/usr/bin") / program
        assert os.access(path, os.X_OK), path
        assert path.read_text().startswith("#!/usr/bin/python3"), path
    # Where the payload-signing key goes is there, empty, for the operator to fill.
    assert KEY_DIR.is_dir() and not list(KEY_DIR.iterdir())
    # The postinst applied the tmpfiles entry; the units are installed but neither enabled nor started.
    assert STATE_DIR.is_dir()
    assert not list(Path("/etc/systemd/system").glob("*.wants/update-engine.service"))
    assert not list(Path("/etc/systemd/system").glob("*.wants/locksmithd.service"))


def test_installed_units_pass_verify(package: Built) -> None:
    """With the programs really at their ExecStart paths, verify runs on the installed files as they are."""
    analyze = require_tool("systemd-analyze")
    paths = [str(unit_dir() / name) for name in UNITS]
    result = run([analyze, "verify", *paths], check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not output.strip(), output


def test_every_module_imports_with_debian_python_and_libraries(package: Built) -> None:
    script = """
import importlib, json, pkgutil
result = {"failed": {}, "files": {}}
for top in ("coreos_common", "update_engine", "locksmithd", "coreupdate"):
    pkg = importlib.import_module(top)
    result["files"][top] = pkg.__file__
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            result["failed"][info.name] = repr(exc)
for lib in ("dbus_fast", "aiohttp", "google.protobuf", "cryptography", "pyudev", "sdnotify",
            "defusedxml", "sqlalchemy", "prometheus_client", "psycopg2"):
    result["files"][lib] = importlib.import_module(lib).__file__
print(json.dumps(result))
"""
    result = run(["/usr/bin/python3", "-I", "-c", script])
    report = json.loads(result.stdout)
    assert report["failed"] == {}
    outside = {name: path for name, path in report["files"].items() if not path.startswith(DIST_PACKAGES)}
    assert outside == {}, "imported from outside Debian's dist-packages"


def test_programs_start_on_debian_python(package: Built) -> None:
    assert "--run-dir" in run(["/usr/bin/update_engine", "--help"]).stdout
    assert "-check_for_update" in run(["/usr/bin/update_engine_client", "--help"]).stdout
    assert run(["/usr/bin/update_engine", "--version"]).stdout.startswith("update_engine ")
    assert run(["/usr/bin/update_engine_client", "--version"]).stdout.startswith("update_engine_client ")
    assert "send-need-reboot" in run(["/usr/bin/locksmithctl", "help"]).stdout
    assert run(["/usr/bin/locksmithd", "--version"]).stdout.startswith("locksmithd version ")
    assert "--payload" in run(["/usr/bin/update-engine-devserver", "--help"]).stdout


@dataclass(frozen=True)
class Release:
    image: Path
    kernel: Path
    payload: Path
    public_key: Path


def make_release(workdir: Path) -> Release:
    """Keys, a USR image and a kernel, and their payload, all made by the installed update-payload."""
    workdir.mkdir(parents=True, exist_ok=True)
    private, public = workdir / "key.pem", workdir / "key.pub.pem"
    run(["/usr/bin/update-payload", "keygen", "--private-key", str(private), "--public-key", str(public)])
    image = workdir / "usr.img"
    data = os.urandom(1024 * 1024) + b"debian python " * 75_000  # random and compressible parts
    image.write_bytes(data + bytes(-len(data) % 4096))  # whole 4 KiB blocks
    kernel = workdir / "vmlinuz"
    kernel.write_bytes(os.urandom(50_000))
    payload = workdir / "update.gz"
    run(["/usr/bin/update-payload", "generate", "--image", str(image), "--kernel", str(kernel),
         "--private-key", str(private), "-o", str(payload)])
    return Release(image, kernel, payload, public)


def test_payload_generate_and_verify(package: Built, tmp_path: Path) -> None:
    release = make_release(tmp_path)
    verified = json.loads(run(["/usr/bin/update-payload", "verify", "--public-key", str(release.public_key),
                               "--json", str(release.payload)]).stdout)
    assert verified["verified"] is True
    assert verified["size"] == release.payload.stat().st_size

    other = make_release(tmp_path / "other")
    refused = run(["/usr/bin/update-payload", "verify", "--public-key", str(other.public_key),
                   str(release.payload)], check=False)
    assert refused.returncode != 0
    assert "DOWNLOAD_PAYLOAD_PUBKEY_VERIFICATION_ERROR" in refused.stderr


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_update_through_dbus_on_debian_libraries(package: Built, tmp_path: Path) -> None:
    """The installed daemon, client and dev server: an update asked for over D-Bus lands on USR-B."""
    release = make_release(tmp_path / "release")
    port = free_port()
    server = subprocess.Popen(
        ["/usr/bin/update-engine-devserver", "--listen", f"127.0.0.1:{port}",
         "--payload", str(release.payload), "--version", "2.0.0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=DEBIAN_ENV, cwd="/",
    )
    bus = None
    daemon = None
    try:
        wait_for_port(port, server)
        # The bus loads the installed policy file: root may own com.coreos.update1 and call AttemptUpdate.
        bus = start_private_bus(tmp_path / "dbus", [DBUS_POLICY])
        omaha_url = f"http://127.0.0.1:{port}/v1/update/"
        node = make_node_root(tmp_path / "root", version="1.0.0", server=omaha_url)
        disk = make_usr_disk(tmp_path / "disk.img")
        usr_a_before = partition_bytes(disk, USR_A)
        daemon_log = (tmp_path / "update_engine.log").open("wb")
        daemon = subprocess.Popen(
            ["/usr/bin/update_engine", "--bus-address", bus.address, "--disk", str(disk), "--booted", "USR-A",
             "--state-dir", str(node.state_dir), "--run-dir", str(node.run_dir),
             "--config-root", str(node.root),
             "--kernel-dir", str(node.kernel_dir), "--public-key", str(release.public_key),
             "--first-check-delay", "3600", "--healthy-boot-delay", "3600"],
            stdout=daemon_log, stderr=subprocess.STDOUT, env=DEBIAN_ENV, cwd="/",
        )
        daemon_log.close()
        client = ["/usr/bin/update_engine_client", "--bus-address", bus.address, "--wait", "30"]
        idle = json.loads(run([*client, "-status", "--json"], timeout=60).stdout)
        assert idle["current_operation"] == "UPDATE_STATUS_IDLE"

        updated = run([*client, "-update"], timeout=120, check=False)
        log_text = (tmp_path / "update_engine.log").read_text(errors="replace")
        assert updated.returncode == 0, updated.stdout + updated.stderr + log_text[-3000:]
        status = json.loads(run([*client, "-status", "--json"]).stdout)
        assert status["current_operation"] == "UPDATE_STATUS_UPDATED_NEED_REBOOT"
        assert status["new_version"] == "2.0.0"
    finally:
        for process in (daemon, server):
            if process is not None:
                stop(process)
        if bus is not None:
            bus.stop()
    image = release.image.read_bytes()
    assert partition_bytes(disk, USR_B)[: len(image)] == image
    assert partition_bytes(disk, USR_A) == usr_a_before
    assert cgpt_flags(disk, USR_B) == (2, 1, 0)  # priority 2, one try, not yet successful
    assert (node.kernel_dir / "vmlinuz-b").read_bytes() == release.kernel.read_bytes()


def test_locksmithctl_locks_and_unlocks_in_etcd_on_debian_libraries(package: Built, tmp_path: Path) -> None:
    cluster = start_cluster(1, tmp_path / "etcd")
    try:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
        ctl = ["/usr/bin/locksmithctl", f"-endpoint={cluster.endpoint(0)}", f"-config-root={tmp_path}"]
        run([*ctl, "lock"])
        held = run([*ctl, "status"]).stdout
        assert "0123456789abcdef0123456789abcdef" in held
        run([*ctl, "unlock"])
        deadline = time.monotonic() + 10
        while "0123456789abcdef0123456789abcdef" in run([*ctl, "status"]).stdout:
            assert time.monotonic() < deadline, "the lock was not released"
            time.sleep(0.2)
    finally:
        cluster.stop_all()


def test_node_and_server_packages_do_not_pull_each_other(package: Built) -> None:
    def depends(deb: Path) -> set[str]:
        text = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
        return {item.split()[0] for item in text.replace("\n", " ").split(",") if item.strip()}

    node, server, lib = depends(package.deb), depends(package.server_deb), depends(package.lib_deb)
    assert SERVER_PACKAGE not in node and "python3-sqlalchemy" not in node | lib
    assert PACKAGE not in server and LIB_PACKAGE in server and LIB_PACKAGE in node
    assert {"python3-sqlalchemy", "python3-psycopg2", "python3-prometheus-client"} <= server
    server_files = run(["dpkg-deb", "-c", str(package.server_deb)]).stdout
    assert "update_engine.service" not in server_files and "/usr/bin/locksmithd" not in server_files


def test_server_files_user_and_unit(package: Built) -> None:
    units = unit_dir()
    assert (units / SERVER_UNIT).read_text() == (REPO / "units" / SERVER_UNIT).read_text()
    for program in SERVER_PROGRAMS:
        path = Path("/usr/bin") / program
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/python3"), path
    user = run(["getent", "passwd", "coreupdate"]).stdout
    assert ":/var/lib/coreupdate:" in user
    assert SERVER_STATE_DIR.is_dir() and SERVER_STATE_DIR.owner() == "coreupdate"
    analyze = require_tool("systemd-analyze")
    result = run([analyze, "verify", str(units / SERVER_UNIT)], check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    security = run([analyze, "security", "--offline=true", str(units / SERVER_UNIT)], check=False)
    assert "Overall exposure level for coreupdate.service: 1." in security.stdout + security.stderr


# Sign in to the dashboard as "ops" and print the overview and the stylesheet's first line (stdlib only).
DASHBOARD_SIGN_IN = """
import re, sys, urllib.parse, urllib.request, http.cookiejar
base = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
form = opener.open(base + "/login").read().decode()
token = re.search('name="csrf_token" value="([^"]+)"', form).group(1)
data = urllib.parse.urlencode({"csrf_token": token, "name": "ops", "password": "a long password", "next": "/"})
print(opener.open(base + "/login", data.encode()).read().decode())
print(opener.open(base + "/static/style.css").read().decode().splitlines()[0])
"""


def test_server_runs_a_rollout_on_debian_libraries(package: Built, tmp_path: Path) -> None:
    """The installed server and CLI on Debian's SQLAlchemy 1.4, aiohttp, prometheus-client: a payload made by
    the installed update-payload is uploaded, verified and offered; fake clients update; metrics answer."""
    release = make_release(tmp_path / "release")
    data = tmp_path / "cu"
    token = run(["/usr/bin/coreupdate", "token", "create", "--data-dir", str(data)]).stdout.strip()
    port = free_port()
    log_path = tmp_path / "coreupdate.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(["/usr/bin/coreupdate", "serve", "--data-dir", str(data), "--listen",
                                   f"127.0.0.1:{port}", "--payload-public-key", str(release.public_key)],
                                  stdout=log, stderr=subprocess.STDOUT, env=DEBIAN_ENV, cwd="/")
    try:
        wait_for_port(port, server)
        ctl = ["/usr/bin/updateservicectl", "--server", f"http://127.0.0.1:{port}", "--key", token]
        app = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
        run([*ctl, "package", "create", "--app-id", app, "--version", "2.0.0", "--file", str(release.payload),
             "--public-key", str(release.public_key)])
        run([*ctl, "channel", "update", "--app-id", app, "--channel", "stable", "--version", "2.0.0"])
        run([*ctl, "group", "update", "--app-id", app, "--group-id", "stable", "--update-count", "1",
             "--update-interval", "3600", "--office-hours", "Mon-Sun 0:00 24h", "--timezone", "Europe/Berlin"])
        fake = run([*ctl, "instance", "fake", "--app-id", app, "--group-id", "stable", "--version", "1.0.0",
                    "--clients-per-app", "2", "--min-sleep", "0", "--max-sleep", "0"]).stdout
        assert fake.splitlines() == ["{fake-client-000}: updated from 1.0.0 to 2.0.0", "{fake-client-001}: noupdate"]
        # Events are written behind the answers: wait (bounded) until the last ones are in.
        deadline = time.monotonic() + 20
        while True:
            listed = json.loads(run([*ctl, "--json", "instance", "list", "--app-id", app]).stdout)
            statuses = {i["status"] for i in listed["instances"]}
            if statuses == {"Complete", "OnHold"} or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert statuses == {"Complete", "OnHold"}
        # The dashboard's templates and static files are installed and render on Debian's Jinja2.
        run(["/usr/bin/coreupdate", "user", "add", "ops", "--role", "viewer", "--data-dir", str(data)],
            stdin="a long password\n")
        page = run(["/usr/bin/python3", "-c", DASHBOARD_SIGN_IN, f"http://127.0.0.1:{port}"]).stdout
        assert "1 every 60 min, office hours Mon-Sun 0:00 24h Europe/Berlin" in page and "Complete" in page
        metrics = run(["/usr/bin/python3", "-c", f"import urllib.request; print(urllib.request.urlopen("
                       f"'http://127.0.0.1:{port}/metrics').read().decode())"]).stdout
        assert 'coreupdate_update_checks_total{decision="grant"} 1.0' in metrics
    finally:
        stop(server)
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_server_on_postgresql_with_debian_psycopg2(package: Built, postgres_server: object) -> None:
    url = postgres_server.create_database("debpkg")  # type: ignore[attr-defined]
    made = run(["/usr/bin/coreupdate", "token", "create", "--database", url.replace("+psycopg2", "")])
    assert made.stdout.startswith("cu_")
    listed = run(["/usr/bin/coreupdate", "token", "list", "--database", url]).stdout
    assert listed.splitlines()[1].split()[:2] == ["1", "admin"]


def test_purge_removes_every_installed_file(package: Built) -> None:
    units = unit_dir()
    purge()
    assert not any(is_installed(p) for p in ALL_PACKAGES)
    for path in (*(units / name for name in (*UNITS, SERVER_UNIT)), DBUS_POLICY, TMPFILES, SAMPLE,
                 *(Path("/usr/bin") / p for p in (*PROGRAMS, *SERVER_PROGRAMS)),
                 Path(DIST_PACKAGES) / "update_engine", Path(DIST_PACKAGES) / "locksmithd",
                 Path(DIST_PACKAGES) / "coreupdate", Path(DIST_PACKAGES) / "coreos_common", STATE_DIR,
                 SERVER_STATE_DIR, KEY_DIR):
        assert not path.exists(), f"{path} survived the purge"
