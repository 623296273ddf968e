"""The Omaha endpoint (``POST /v1/update/``): parse, decide per ``<app>``, answer, write behind.

Theory of operation.  ``plan_app`` (pure) turns one ``<app>`` of a request into a plan: which application
and group it belongs to (``track`` is a group id or name), the package on offer, the check-in and events to
record, and — when the catalog alone can tell — the answer: unknown application or group, no package, up to
date, paused, outside office hours, or a group-wide refusal the server remembered a moment ago.  Only an
instance that may get an update costs a database transaction (``Store.try_grant``), which decides under the
group's lock.  Check-ins and events go to the write-behind queue; the answer does not wait for them.  An
instance a remembered limit held back is marked OnHold by that write, as one refused in the database is at once.

Unknown applications and groups get ``noupdate`` and a warning (once per application and track every ten
minutes), never an error.  A malformed or oversized body gets HTTP 400 or 413 and is counted; the database
being unreachable during a grant gets 503, and the node retries later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from coreupdate.catalog import Catalog
from coreupdate.instance_status import is_routine
from coreupdate.metrics import Metrics
from coreupdate.model import Group, Package
from coreupdate.policy import GROUP_WIDE_REFUSALS, Decision, Grant, OfficeHours, Refusal, Refuse
from coreupdate.storage.store import CheckIn, EventRecord, GrantOutcome
from coreupdate.validation import ValidationError, canonical_app_id
from coreupdate.writer import WriteBehind
from update_engine import omaha

log = logging.getLogger(__name__)

SERVER_NAME = "coreupdate"
# A group-wide refusal (a limit reached) is remembered this long before the database is asked again.
REFUSAL_MEMORY_S = 2.0
UNKNOWN_WARNING_INTERVAL_S = 600.0
MAX_RECENT_GRANTS = 100_000
MAX_CACHED_RESPONSES = 1024


@dataclass(frozen=True)
class AppPlan:
    """What to do for one ``<app>``: ``answer`` is set when no database decision is needed."""

    request: omaha.RequestApp
    app_id: str | None
    group: Group | None
    package: Package | None
    checkin: CheckIn | None
    events: list[EventRecord] = field(default_factory=list)
    answer: Refuse | None = None
    unknown: str = ""  # "application" or "group" when the request names one the catalog lacks


def plan_app(
    catalog: Catalog, app: omaha.RequestApp, *, remote_ip: str, now: float,
    office_hours: Mapping[str, OfficeHours | None],
) -> AppPlan:
    """Resolve one ``<app>`` against the catalog; see the module docstring.  Pure."""
    try:
        app_id = canonical_app_id(app.app_id)
    except ValidationError:
        app_id = None
    if app_id is None or app_id not in catalog.apps:
        return AppPlan(app, None, None, None, None, answer=Refuse(Refusal.NO_PACKAGE), unknown="application")
    group = catalog.group_for_track(app_id, app.track)
    checkin = CheckIn(
        app_id=app_id, machine_id=app.machine_id, version=app.version, track=app.track,
        group_id=group.id if group else None, at=now, alias=app.machine_alias, ip=remote_ip, oem=app.oem,
        board=app.board,
    ) if app.machine_id else None
    events = [
        EventRecord(app_id, app.machine_id, group.id if group else None, app.version, ev, now)
        for ev in app.events
        if app.machine_id and not is_routine(ev)
    ]
    if group is None:
        return AppPlan(app, app_id, None, None, checkin, events, Refuse(Refusal.NO_PACKAGE), unknown="group")
    package = catalog.package_for(group)
    if package is None:
        return AppPlan(app, app_id, group, None, checkin, events, Refuse(Refusal.NO_PACKAGE))
    try:
        older = omaha.version_less(app.version, package.version)
    except ValueError as exc:
        return AppPlan(app, app_id, group, package, checkin, events, Refuse(Refusal.INVALID_VERSION, str(exc)))
    if not older:
        return AppPlan(app, app_id, group, package, checkin, events, Refuse(Refusal.UP_TO_DATE))
    if not app.machine_id:
        return AppPlan(app, app_id, group, package, None, events, Refuse(Refusal.INVALID_VERSION, "no machineid"))
    if group.policy.updates_paused:
        return AppPlan(app, app_id, group, package, checkin, events, Refuse(Refusal.PAUSED))
    hours = office_hours.get(group.id)
    if hours is not None and not hours.contains(datetime.fromtimestamp(now, UTC)):
        return AppPlan(app, app_id, group, package, checkin, events, Refuse(Refusal.OUTSIDE_OFFICE_HOURS))
    return AppPlan(app, app_id, group, package, checkin, events)


def payload_offer(package: Package, base_url: str) -> omaha.PayloadOffer:
    """The Omaha offer for ``package``: the server's own download URL, or the package's URL split in two."""
    if package.url is None:
        codebase = f"{base_url.rstrip('/')}/v1/packages/{package.app_id}/{package.version}/"
        name = package.file_name
    else:
        codebase, _, name = package.url.rpartition("/")
        codebase += "/"
    return omaha.PayloadOffer(
        version=package.version, codebases=(codebase,), package_name=name, size=package.size,
        sha256_b64=package.sha256_b64, sha1_b64=package.sha1_b64,
    )


class DatabaseUnavailable(Exception):
    """A grant needed the database and it did not answer."""


GrantFunction = Callable[[CheckIn, str], Awaitable[GrantOutcome]]


class OmahaService:
    """The request handler's state: remembered refusals and recent grants, warnings already given."""

    def __init__(
        self, *, catalog: Callable[[], Catalog], office_hours: Callable[[], Mapping[str, OfficeHours | None]],
        grant: GrantFunction, writer: WriteBehind, metrics: Metrics, on_group_paused: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._office_hours = office_hours
        self._grant = grant
        self._writer = writer
        self._metrics = metrics
        self._on_group_paused = on_group_paused
        self._clock = clock
        # group id → (refusal, monotonic expiry, a request is asking the database again right now)
        self._refusals: dict[str, tuple[Refuse, float, bool]] = {}
        self._responses: dict[tuple[omaha.AppResponse, ...], bytes] = {}
        self._recent_grants: dict[tuple[str, str], str] = {}  # (app, machine) → version granted by us
        self._warned: dict[tuple[str, str, str], float] = {}

    def forget_refusals(self) -> None:
        """The catalog changed (a group's policy, a channel): decide afresh."""
        self._refusals.clear()

    async def answer(self, body: bytes, remote_ip: str, base_url: str) -> bytes:
        """The response body; raises OmahaError (bad request) or DatabaseUnavailable."""
        parsed = omaha.parse_request(body)
        catalog = self._catalog()
        hours = self._office_hours()
        now = self._clock()
        responses = []
        for app in parsed.apps:
            plan = plan_app(catalog, app, remote_ip=remote_ip, now=now, office_hours=hours)
            if plan.checkin is not None and any(r.event.result == omaha.EventResult.ERROR for r in plan.events):
                # A failed attempt ends the grant: the rules decide afresh, not the memory of the grant.
                self._recent_grants.pop((plan.checkin.app_id, plan.checkin.machine_id), None)
            update: omaha.PayloadOffer | str | None = None
            checkin = plan.checkin
            if app.update_check:
                decision, remembered = await self._decide(plan)
                self._metrics.update_checks.labels(
                    "grant" if isinstance(decision, Grant) else decision.reason.value
                ).inc()
                if isinstance(decision, Grant) and plan.package is not None:
                    update = payload_offer(plan.package, base_url)
                else:
                    update = omaha.NOUPDATE
                    held = remembered and isinstance(decision, Refuse) and decision.on_hold
                    if held and checkin is not None and plan.package is not None:
                        checkin = replace(checkin, held_back_from=plan.package.version)
            for record in plan.events:
                if record.event.result == omaha.EventResult.ERROR:
                    self._metrics.errors.labels(str(record.event.error_code)).inc()
            if plan.checkin is not None or plan.events:
                await self._writer.wait_room()
                self._writer.add(checkin if app.update_check or app.ping else None, plan.events)
            responses.append(omaha.AppResponse(
                app_id=app.app_id, ping=app.ping, events=len(app.events), updatecheck=update,
            ))
        # Most answers repeat (the same noupdate or offer for a whole fleet): keep their bytes.
        key = tuple(responses)
        answer = self._responses.get(key)
        if answer is None:
            answer = omaha.build_response(responses, server=SERVER_NAME)
            if len(self._responses) >= MAX_CACHED_RESPONSES:
                self._responses.clear()
            self._responses[key] = answer
        return answer

    async def _decide(self, plan: AppPlan) -> tuple[Decision, bool]:
        """The decision, and whether it is a group-wide refusal remembered (the database was not asked)."""
        if plan.unknown:
            self._warn_unknown(plan)
        if plan.answer is not None:
            if plan.answer.reason in (Refusal.PAUSED, Refusal.OUTSIDE_OFFICE_HOURS):
                regrant = self._regrant(plan)
                if regrant is not None:
                    return regrant, False
            return plan.answer, False
        assert plan.group is not None and plan.checkin is not None and plan.package is not None
        group_id = plan.group.id
        remembered = self._refusals.get(group_id)
        if remembered is not None:
            refusal, expiry, asking = remembered
            if expiry > time.monotonic() or asking:
                # Still fresh, or one request is already asking the database: the others keep the answer.
                regrant = self._regrant(plan)
                return (regrant, False) if regrant is not None else (refusal, True)
            self._refusals[group_id] = (refusal, expiry, True)
        try:
            outcome = await self._grant(plan.checkin, group_id)
        except Exception as exc:
            if remembered is not None:
                self._refusals[group_id] = remembered
            raise DatabaseUnavailable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        finally:
            current = self._refusals.get(group_id)
            if current is not None and current[2]:
                del self._refusals[group_id]
        decision = outcome.decision
        machine = plan.checkin.machine_id
        if isinstance(decision, Grant):
            if not decision.regrant:
                self._metrics.grants.labels(plan.group.name, decision.version).inc()
                log.info("Granted %s to %s (%s) in group %s", decision.version, machine, plan.checkin.version,
                         plan.group.name)
            if len(self._recent_grants) >= MAX_RECENT_GRANTS:
                self._recent_grants.pop(next(iter(self._recent_grants)))
            self._recent_grants[(plan.checkin.app_id, machine)] = decision.version
            return decision, False
        if decision.reason in GROUP_WIDE_REFUSALS:
            if plan.group.id not in self._refusals:
                log.info("Group %s: no update for %s (%s): %s %s", plan.group.name, machine, plan.checkin.version,
                         decision.reason.value, decision.detail)
            self._refusals[plan.group.id] = (decision, time.monotonic() + REFUSAL_MEMORY_S, False)
        if outcome.paused_group:
            log.warning("Group %s paused automatically: %s", plan.group.name, decision.pause_reason)
            self._on_group_paused()
        return decision, False

    def _regrant(self, plan: AppPlan) -> Grant | None:
        if plan.checkin is None or plan.package is None:
            return None
        granted = self._recent_grants.get((plan.checkin.app_id, plan.checkin.machine_id))
        return Grant(granted, regrant=True) if granted == plan.package.version else None

    def _warn_unknown(self, plan: AppPlan) -> None:
        key = (plan.unknown, plan.request.app_id, plan.request.track)
        now = time.monotonic()
        if self._warned.get(key, -UNKNOWN_WARNING_INTERVAL_S) + UNKNOWN_WARNING_INTERVAL_S > now:
            return
        self._warned[key] = now
        if plan.unknown == "application":
            log.warning("Update check for unknown application %r (machine %s): answered noupdate; create it with "
                        "'updateservicectl app create' if it is yours", plan.request.app_id, plan.request.machine_id)
        else:
            log.warning("Update check from %s names group %r, which application %s does not have: answered "
                        "noupdate; check GROUP= in its update.conf or create the group", plan.request.machine_id,
                        plan.request.track, plan.app_id)
