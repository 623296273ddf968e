"""``coreupdate serve`` over real HTTP on loopback, on SQLite and on a real PostgreSQL server: Omaha requests in
the original C++ client's format and ours, bad input, the API's checks, concurrent grants (also with two
server processes on one PostgreSQL), a database outage and recovery, metrics."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coreupdate import openapi
from coreupdate.storage import engine as db_engine
from coreupdate.storage.store import CheckIn, EventRecord, Store
from sim.coreupdate import COREOS_APP_ID, CoreUpdateServer, coreupdate_command, cpp_update_check, start_coreupdate
from update_engine.omaha import RequestEvent

pytestmark = pytest.mark.integration

APP = f"/apps/{COREOS_APP_ID}"
PAYLOAD_BYTES = b"not a real payload, served by URL only"
SHA256 = base64.b64encode(hashlib.sha256(PAYLOAD_BYTES).digest()).decode()
SHA1 = base64.b64encode(hashlib.sha1(PAYLOAD_BYTES).digest()).decode()

def cpp_request(machine: str, track: str = "stable", version: str = "1.0.0") -> bytes:
    return cpp_update_check(machine, track, version)


def event_request(machine: str, track: str, event: str, version: str = "1.0.0") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<request protocol="3.0" version="update_engine-0.4.10" '
            f'updaterversion="update_engine-0.4.10" installsource="scheduler" ismachine="1">\n'
            f'    <app appid="{{{COREOS_APP_ID}}}" version="{version}" track="{track}" machineid="{machine}" >\n'
            f'        {event}\n    </app>\n</request>\n').encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database("s" + uuid.uuid4().hex[:12]))


@pytest.fixture
def server(tmp_path: Path, database: str | None) -> Iterator[CoreUpdateServer]:
    srv = start_coreupdate(tmp_path / "srv", database=database)
    try:
        yield srv
    finally:
        srv.stop()


def release(server: CoreUpdateServer, version: str = "2.0.0", channel: str = "stable") -> None:
    server.api("POST", f"{APP}/packages", {"version": version, "url": f"https://mirror.example/{version}/update.gz",
                                           "size": len(PAYLOAD_BYTES), "sha256": SHA256, "sha1": SHA1})
    server.api("PUT", f"{APP}/channels/{channel}", {"version": version})


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def metric(server: CoreUpdateServer, name: str, **labels: str) -> float:
    status, text = server.request("GET", "/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_a_request_in_the_original_clients_format_gets_an_offer(server: CoreUpdateServer) -> None:
    release(server)
    status, body = server.omaha(cpp_request("cpp-node-1"))
    assert status == 200
    text = body.decode()
    assert '<updatecheck status="ok">' in text
    assert '<url codebase="https://mirror.example/2.0.0/"/>' in text
    assert f'name="update.gz" hash="{SHA1}" size="{len(PAYLOAD_BYTES)}"' in text
    assert f'sha256="{SHA256}"' in text
    # The track may name a group by id too; a newer instance gets noupdate.
    group_id = server.api("GET", f"{APP}/groups/stable")["id"]
    assert b'status="ok"' in server.omaha(cpp_request("cpp-node-2", track=group_id))[1]
    assert b'<updatecheck status="noupdate"/>' in server.omaha(cpp_request("cpp-node-3", version="2.0.0"))[1]
    server.wait_for_log("Granted 2.0.0 to cpp-node-1")
    instance = server.api("GET", f"{APP}/instances/cpp-node-1")
    assert (instance["alias"], instance["oem"], instance["status"]) == ("web-1", "ami", "UpdateGranted")


def test_bad_omaha_bodies_are_refused_counted_and_the_server_keeps_serving(server: CoreUpdateServer) -> None:
    for body in (b"", b"<request", b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><request/>',
                 b'<request protocol="2.0"></request>'):
        status, answer = server.omaha(body)
        assert status == 400 and answer.startswith(b"Bad Omaha request: ")
    status, _ = server.omaha(b"<request>" + b" " * (2 << 20))
    assert status == 413
    assert metric(server, "coreupdate_omaha_refused_requests_total", reason="malformed") == 4
    assert metric(server, "coreupdate_omaha_refused_requests_total", reason="too-large") == 1
    unknown_app = cpp_request("m1").replace(COREOS_APP_ID.encode(), b"0000-unknown")
    assert b'<updatecheck status="noupdate"/>' in server.omaha(unknown_app)[1]
    server.wait_for_log("unknown application '{0000-unknown}'")
    assert server.omaha(cpp_request("m2"))[0] == 200


def test_the_api_needs_a_token_and_names_bad_fields(server: CoreUpdateServer) -> None:
    assert server.request("GET", "/api/v1/apps", token="")[0] == 401
    assert server.request("GET", "/api/v1/apps", token="cu_wrong")[0] == 401
    status, doc = server.request("GET", "/api/v1/openapi.json", token="")
    assert status == 200 and doc["openapi"].startswith("3.")
    status, answer = server.request("POST", f"/api/v1{APP}/groups", {"name": "g", "channel": "stable",
                                                                      "update_count": 0})
    assert (status, answer["field"]) == (400, "update_count")
    status, answer = server.request("POST", f"/api/v1{APP}/groups", {"name": "g", "channel": "stable",
                                                                      "office_hours": "Mon-Fri 25:00 1h"})
    assert (status, answer["field"]) == (400, "office_hours")
    status, answer = server.request("POST", f"/api/v1{APP}/groups", {"name": "g", "channel": "stable",
                                                                      "timezone": "Mars/Base"})
    assert (status, answer["field"]) == (400, "timezone")
    assert server.request("GET", f"/api/v1{APP}/groups/nope")[0] == 404
    assert server.request("POST", "/api/v1/apps", {"id": "{" + COREOS_APP_ID.upper() + "}"})[0] == 409
    assert server.request("PUT", f"/api/v1{APP}/channels/stable", {"version": "9.9.9"})[0] == 404
    status, answer = server.request("PUT", f"/api/v1{APP}/packages/3.0.0/payload", raw=b"CrAU garbage")
    assert status == 400 and answer["field"] == "payload" and "not a valid signed update payload" in answer["error"]
    assert not list((server.data_dir / "packages").rglob("3.0.0*"))


def test_openapi_lists_every_api_route() -> None:
    from aiohttp import web

    from coreupdate import api

    app = web.Application()
    api.add_routes(app, SimpleNamespace(store=None))  # type: ignore[arg-type]
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    documented = {(m, f"/api/v1{p}") for m, p, *_ in openapi.OPERATIONS} | {("get", "/api/v1/openapi.json")}
    assert {(m, re.sub(r"\{[^}]+\}", "{}", p)) for m, p in routes} == {
        (m, re.sub(r"\{[^}]+\}", "{}", p)) for m, p in documented}


async def _check_all(urls: list[str], bodies: list[bytes]) -> list[tuple[int, bytes]]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(url: str, body: bytes) -> tuple[int, bytes]:
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=120)) as resp:
                return resp.status, await resp.read()

        return await asyncio.gather(*(one(u, b) for u, b in zip(urls, bodies, strict=True)))


def test_240_concurrent_check_ins_never_exceed_the_period_count(server: CoreUpdateServer) -> None:
    release(server)
    server.api("PATCH", f"{APP}/groups/stable", {"update_count": 5, "update_interval": 3600})
    bodies = [cpp_request(f"node-{i:03d}") for i in range(240)]
    answers = asyncio.run(_check_all([server.omaha_url] * 240, bodies))
    assert all(status == 200 for status, _ in answers)
    assert sum(b'<updatecheck status="ok">' in body for _, body in answers) == 5
    page = server.api("GET", f"{APP}/instances?status=UpdateGranted")
    assert page["total"] == 5


def test_a_remembered_limit_holds_instances_back_but_keeps_a_rollback(server: CoreUpdateServer) -> None:
    release(server)
    server.api("PATCH", f"{APP}/groups/stable", {"update_count": 1, "update_interval": 3600})
    assert b'status="ok"' in server.omaha(cpp_request("r1"))[1]
    server.omaha(event_request("r1", "stable", '<event eventtype="3" eventresult="0" errorcode="44"></event>'))
    wait_for(lambda: server.api("GET", f"{APP}/instances/r1")["status"] == "RolledBack", "r1 RolledBack")
    # r2 is refused by the database (the period's one grant is used), which the server then remembers a moment:
    # r1 and r3 are answered from that memory.
    for machine in ("r2", "r1", "r3"):
        assert b"noupdate" in server.omaha(cpp_request(machine))[1], machine
    wait_for(lambda: server.request("GET", f"/api/v1{APP}/instances/r3")[1].get("status") == "OnHold", "r3 OnHold")
    assert server.api("GET", f"{APP}/instances/r2")["status"] == "OnHold"
    assert server.api("GET", f"{APP}/instances/r1")["status"] == "RolledBack"


def test_two_servers_on_one_postgresql_share_the_limit(tmp_path: Path, postgres_server: Any) -> None:
    url = postgres_server.create_database("two" + uuid.uuid4().hex[:10])
    first = start_coreupdate(tmp_path / "a", database=url)
    second = start_coreupdate(tmp_path / "b", database=url, token=first.token)
    try:
        release(first)
        first.api("PATCH", f"{APP}/groups/stable", {"update_count": 7, "update_interval": 3600})
        second.wait_for_log("Serving Omaha")
        # The second server sees the change through catalog_version within its poll interval.
        for _ in range(100):
            if second.api("GET", f"{APP}/groups/stable")["update_count"] == 7:
                break
        urls = [first.omaha_url if i % 2 else second.omaha_url for i in range(240)]
        answers = asyncio.run(_check_all(urls, [cpp_request(f"pair-{i:03d}") for i in range(240)]))
        assert all(status == 200 for status, _ in answers)
        assert sum(b'<updatecheck status="ok">' in body for _, body in answers) == 7
    finally:
        first.stop()
        second.stop()


def test_events_set_statuses_and_failures_pause_the_rollout(server: CoreUpdateServer) -> None:
    release(server)
    server.api("PATCH", f"{APP}/groups/stable", {"failure_pause_count": 2})
    for i in range(3):
        assert b'status="ok"' in server.omaha(cpp_request(f"f{i}"))[1]
    server.omaha(event_request("f0", "stable", '<event eventtype="13" eventresult="1"></event>'))
    server.omaha(event_request("f1", "stable", '<event eventtype="3" eventresult="0" errorcode="1073741833">'
                                               '</event>'))
    server.omaha(event_request("f2", "stable", '<event eventtype="3" eventresult="0" errorcode="44"></event>'))
    server.wait_for_log("Rollout paused automatically")
    statuses = {m: server.api("GET", f"{APP}/instances/{m}")["status"] for m in ("f0", "f1", "f2")}
    assert statuses == {"f0": "Downloading", "f1": "Error", "f2": "RolledBack"}
    assert server.api("GET", f"{APP}/instances/f1")["error_code"] == 9
    group = server.api("GET", f"{APP}/groups/stable")
    assert group["updates_paused"] and "2 instance(s) failed version 2.0.0" in group["pause_reason"]
    activity = server.api("GET", f"/activity?app={COREOS_APP_ID}&group=stable")
    assert activity[0]["kind"] == "rollout-paused"
    assert {"instance-failed", "instance-rolled-back", "rollout-started"} <= {a["kind"] for a in activity}
    # Paused now: a new instance gets nothing, the granted one that asks again still gets its grant.
    assert b"noupdate" in server.omaha(cpp_request("f9"))[1]
    assert b'status="ok"' in server.omaha(cpp_request("f0"))[1]
    # The failed ones do not: neither f1 (error 9) nor f2, which rolled back from 2.0.0.
    for machine in ("f1", "f2"):
        assert b"noupdate" in server.omaha(cpp_request(machine))[1], machine
    assert metric(server, "coreupdate_instance_errors_total", code="1073741833") == 1
    assert metric(server, "coreupdate_instances", group="stable", version="1.0.0", status="RolledBack") == 1
    assert metric(server, "coreupdate_instances", group="stable", status="Error") == 1
    assert metric(server, "coreupdate_instances", group="stable", status="Downloading") == 1
    assert metric(server, "coreupdate_grants_total", group="stable", version="2.0.0") == 3
    assert metric(server, "coreupdate_update_checks_total", decision="updates-paused") >= 1


def test_a_database_outage_gives_503_and_recovers_without_a_restart(
    tmp_path: Path, postgres_server: Any
) -> None:
    from sim.postgres import PostgresServer

    pg = PostgresServer()
    pg.start()
    srv = start_coreupdate(tmp_path / "srv", database=pg.create_database("outage"))
    try:
        release(srv)
        assert srv.request("GET", f"/api/v1{APP}/groups")[0] == 200
        pg.stop()
        status, answer = srv.request("GET", f"/api/v1{APP}/groups")
        assert status == 503 and "database is unavailable" in answer["error"]
        assert srv.omaha(cpp_request("during-outage"))[0] == 503
        assert srv.request("GET", "/health")[0] == 503
        pg.start()
        for _ in range(200):
            if srv.request("GET", "/health")[0] == 200:
                break
        assert srv.request("GET", f"/api/v1{APP}/groups")[0] == 200
        assert b'status="ok"' in srv.omaha(cpp_request("after-outage"))[1]
        assert srv.process.poll() is None
    finally:
        srv.stop()
        pg.close()


def test_serve_prunes_events_and_silent_instances_after_the_retention_it_is_given(
    tmp_path: Path, database: str | None
) -> None:
    """``--events-retention`` and ``--instances-retention`` (days) are applied when the server starts, then
    hourly: events older than the first go, and instances whose last check-in is older than the second."""
    day = 86400.0
    data_dir = tmp_path / "srv"
    data_dir.mkdir()
    engine = db_engine.create(database or db_engine.sqlite_url(data_dir))
    now = time.time()
    try:
        store = Store(engine, clock=lambda: now)
        store.migrate()
        stable = store.get_group(COREOS_APP_ID, "stable").id
        store.record(
            [CheckIn(COREOS_APP_ID, "silent", "1.0.0", "stable", stable, now - 25 * day),
             CheckIn(COREOS_APP_ID, "active", "1.0.0", "stable", stable, now)],
            [EventRecord(COREOS_APP_ID, "active", stable, "1.0.0", RequestEvent(3, 0, code), now - age * day)
             for code, age in ((9, 15), (10, 5))],
        )
    finally:
        engine.dispose()
    srv = start_coreupdate(data_dir, database=database,
                           extra_args=("--events-retention", "10", "--instances-retention", "20"))
    try:
        srv.wait_for_log("Retention: deleted")
        deleted = srv.log_text().split("Retention: deleted ", 1)[1].splitlines()[0]
        assert "1 events" in deleted and "1 instances" in deleted
        status, _ = srv.request("GET", f"/api/v1{APP}/instances/silent")
        assert status == 404
        active = srv.api("GET", f"{APP}/instances/active")
        assert [e["error_code"] for e in active["events"]] == [10]
    finally:
        srv.stop()
    refused = subprocess.run(coreupdate_command("serve", "--events-retention", "0", "--data-dir", str(data_dir)),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "must be more than 0 days" in refused.stderr
