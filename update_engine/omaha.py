"""Omaha v3 protocol: request bodies, response parsing, and the server side used by the dev server.

Pure functions over bytes and values.  Requests are written byte for byte like the original
update_engine's (servers and dashboards such as Nebraska parse them); responses are parsed with the same
rules but stricter: a response comes from the network, so it is size-capped, parsed without DTDs or
entities, and every URL and hash in an offer is checked before anyone downloads anything.

Attribute values are escaped as ``&`` ``<`` ``>`` ``"`` ``'`` → entity references, tab/LF/CR → character
references (so they survive attribute-value normalisation), and characters XML 1.0 cannot carry (C0 controls,
lone surrogates, U+FFFE/U+FFFF) are replaced by U+FFFD.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element, ParseError
from xml.parsers import expat

import defusedxml
import defusedxml.ElementTree as SafeElementTree

from update_engine import OMAHA_UPDATER_VERSION
from update_engine.config import OemRelease, UpdateSettings
from update_engine.errors import (
    DEFERRED_CODES,
    FLAG_DEV_MODE,
    FLAG_RESUMED,
    FLAG_TEST_IMAGE,
    FLAG_TEST_OMAHA_URL,
    ErrorCode,
    UpdateEngineError,
)

# Responses (and, on the server, requests) larger than this are refused unread, as go-omaha does.
MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_MAX_FAILURE_COUNT_PER_URL = 10
# Sent as previousversion when the previous-version pref has never been written (a fresh install).
INITIAL_PREVIOUS_VERSION = "0.0.0.0"
DEVSERVER_NAME = "update-engine-devserver"

_MAX_INT64 = (1 << 63) - 1
MAX_VERSION_CHARS = 128
# C0 and C1 controls, DEL, the Unicode line separators, and both path separators.
_UNSAFE_VERSION_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029/\\\\]")
_SHOWN_VALUE_CHARS = 120


class OmahaError(UpdateEngineError):
    """An Omaha message that cannot be used; ``code`` is the Omaha action code (30, 31, 34, …)."""


class InstallSource(enum.StrEnum):
    """Why the request is made: a timer, or an operator asking (D-Bus AttemptUpdate)."""

    SCHEDULER = "scheduler"
    ON_DEMAND = "ondemandupdate"


class EventType(enum.IntEnum):
    """Omaha event types (go-omaha ``codes.go``)."""

    UNKNOWN = 0
    DOWNLOAD_COMPLETE = 1
    INSTALL_COMPLETE = 2
    UPDATE_COMPLETE = 3
    UNINSTALL = 4
    DOWNLOAD_STARTED = 5
    INSTALL_STARTED = 6
    NEW_APPLICATION_INSTALL_STARTED = 9
    SETUP_STARTED = 10
    SETUP_FINISHED = 11
    UPDATE_APPLICATION_STARTED = 12
    UPDATE_DOWNLOAD_STARTED = 13
    UPDATE_DOWNLOAD_FINISHED = 14
    UPDATE_INSTALLER_STARTED = 15
    SETUP_UPDATE_BEGIN = 16
    SETUP_UPDATE_COMPLETE = 17
    REGISTER_PRODUCT_COMPLETE = 20
    OEM_INSTALL_FIRST_CHECK = 30
    APP_SPECIFIC_COMMAND_STARTED = 40
    APP_SPECIFIC_COMMAND_ENDED = 41
    SETUP_FAILURE = 100
    COM_SERVER_FAILURE = 102
    SETUP_UPDATE_FAILURE = 103


class EventResult(enum.IntEnum):
    """Omaha event results (go-omaha ``codes.go``)."""

    ERROR = 0
    SUCCESS = 1
    SUCCESS_REBOOT = 2
    SUCCESS_RESTART_BROWSER = 3
    CANCELLED = 4
    ERROR_INSTALLER_MSI = 5
    ERROR_INSTALLER_OTHER = 6
    NO_UPDATE = 7
    INSTALLER_SYSTEM = 8
    UPDATE_DEFERRED = 9
    HANDOFF_ERROR = 10


_ERROR_FLAGS = FLAG_DEV_MODE | FLAG_RESUMED | FLAG_TEST_IMAGE | FLAG_TEST_OMAHA_URL


@dataclass(frozen=True)
class OmahaEvent:
    """One progress or failure report; ``error_code`` is only sent when ``result`` is not SUCCESS."""

    type: int
    result: int
    error_code: int | None = None

    @classmethod
    def download_started(cls) -> OmahaEvent:
        return cls(EventType.UPDATE_DOWNLOAD_STARTED, EventResult.SUCCESS)

    @classmethod
    def download_finished(cls) -> OmahaEvent:
        return cls(EventType.UPDATE_DOWNLOAD_FINISHED, EventResult.SUCCESS)

    @classmethod
    def update_complete(cls) -> OmahaEvent:
        return cls(EventType.UPDATE_COMPLETE, EventResult.SUCCESS)

    @classmethod
    def failure(cls, code: int) -> OmahaEvent:
        """3/0 with ``code`` (flag bits included), or 3/9 when the attempt was deferred by policy/backoff."""
        deferred = (code & ~_ERROR_FLAGS) in DEFERRED_CODES
        result = EventResult.UPDATE_DEFERRED if deferred else EventResult.ERROR
        return cls(EventType.UPDATE_COMPLETE, result, code)


@dataclass(frozen=True, kw_only=True)
class OmahaRequestParams:
    """Everything that goes into a request's ``<request>``, ``<os>`` and ``<app>`` attributes.

    ``boot_id`` is the kernel's boot id as read (the request wraps it in braces); ``machine_id`` is sent
    as is.
    """

    version: str
    app_id: str
    track: str
    boot_id: str
    machine_id: str
    board: str
    arch: str
    oem: str = ""
    oem_version: str = ""
    aleph_version: str = ""
    machine_alias: str = ""
    install_source: InstallSource = InstallSource.SCHEDULER
    updater_version: str = OMAHA_UPDATER_VERSION

    @classmethod
    def from_settings(
        cls,
        settings: UpdateSettings,
        oem: OemRelease,
        *,
        machine_id: str,
        boot_id: str,
        aleph_version: str,
        arch: str,
        interactive: bool,
    ) -> OmahaRequestParams:
        return cls(
            version=settings.version,
            app_id=settings.app_id,
            track=settings.group,
            boot_id=boot_id,
            machine_id=machine_id,
            board=settings.board,
            arch=arch,
            oem=oem.id,
            oem_version=oem.version_id,
            aleph_version=aleph_version,
            machine_alias=settings.machine_alias,
            install_source=InstallSource.ON_DEMAND if interactive else InstallSource.SCHEDULER,
        )


# ------------------------------------------------------------------------------------------------------------
# Escaping

_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "'": "&apos;",
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}
_ESCAPE_RE = re.compile("[&<>\"'\t\n\r]")
_NOT_XML_CHAR_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_escape(value: str) -> str:
    """Escape ``value`` for a double-quoted attribute (see the module docstring for the exact set)."""
    value = _NOT_XML_CHAR_RE.sub("\ufffd", value)
    return _ESCAPE_RE.sub(lambda match: _ESCAPES[match.group()], value)


# ------------------------------------------------------------------------------------------------------------
# Requests (client side)


def _request(params: OmahaRequestParams, app_body: str) -> bytes:
    e = xml_escape
    text = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<request protocol="3.0" version="{e(params.updater_version)}" '
        f'updaterversion="{e(params.updater_version)}" installsource="{e(params.install_source.value)}" '
        'ismachine="1">\n'
        f'    <os version="Chateau" platform="CoreOS" sp="{e(params.version)}_{e(params.arch)}"></os>\n'
        f'    <app appid="{e(params.app_id)}" version="{e(params.version)}" track="{e(params.track)}" '
        f'bootid="{{{e(params.boot_id)}}}" oem="{e(params.oem)}" oemversion="{e(params.oem_version)}" '
        f'alephversion="{e(params.aleph_version)}" machineid="{e(params.machine_id)}" '
        f'machinealias="{e(params.machine_alias)}" lang="en-US" board="{e(params.board)}" '
        'hardware_class="" delta_okay="false" >\n'
        f"{app_body}"
        "    </app>\n"
        "</request>\n"
    )
    return text.encode("utf-8")


_PING_LINE = '        <ping active="1"></ping>\n'


def _event_line(event: OmahaEvent) -> str:
    error_code = ""
    if event.result != EventResult.SUCCESS:
        error_code = f' errorcode="{0 if event.error_code is None else int(event.error_code)}"'
    return (
        f'        <event eventtype="{int(event.type)}" eventresult="{int(event.result)}"{error_code}>'
        "</event>\n"
    )


def is_rollback(previous_version: str | None, current_version: str) -> bool:
    """The node still runs the version it ran when an update was installed: the new one failed to boot."""
    return bool(previous_version) and previous_version == current_version


def build_update_check(
    params: OmahaRequestParams, previous_version: str | None, rollback_detected: bool
) -> bytes:
    """Ping + updatecheck + the post-reboot event.

    ``previous_version`` is the previous-version pref (None when the pref file is missing: sent as
    ``0.0.0.0``).
    On a rollback the event is 3/0 with errorcode 44 instead of 3/2 with previousversion.
    """
    if rollback_detected:
        event = _event_line(
            OmahaEvent(EventType.UPDATE_COMPLETE, EventResult.ERROR, int(ErrorCode.ROLLBACK_ERROR))
        )
    else:
        shown = INITIAL_PREVIOUS_VERSION if previous_version is None else previous_version
        event = (
            f'        <event eventtype="{int(EventType.UPDATE_COMPLETE)}" '
            f'eventresult="{int(EventResult.SUCCESS_REBOOT)}" previousversion="{xml_escape(shown)}">'
            "</event>\n"
        )
    return _request(params, _PING_LINE + "        <updatecheck></updatecheck>\n" + event)


def build_ping(params: OmahaRequestParams) -> bytes:
    """Ping only: what a node waiting for its reboot sends instead of an update check."""
    return _request(params, _PING_LINE)


def build_event(params: OmahaRequestParams, event: OmahaEvent) -> bytes:
    """One event; ``errorcode`` appears only when the result is not SUCCESS (``0`` if the event has none)."""
    return _request(params, _event_line(event))


# ------------------------------------------------------------------------------------------------------------
# Parsing helpers

_XML_DECLARATION_ENCODING_RE = re.compile(r"<\?xml\s[^>]*?\bencoding\s*=\s*([\"'])(.*?)\1")
_UTF8_NAMES = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_UNSIGNED_RE = re.compile(r"[0-9]{1,19}")
_SIGNED_RE = re.compile(r"-?[0-9]{1,19}")


def _truncate(value: str) -> str:
    return value if len(value) <= _SHOWN_VALUE_CHARS else value[:_SHOWN_VALUE_CHARS] + "…"


def _show(value: str) -> str:
    return repr(_truncate(value))


def _decode_document(body: bytes, what: str) -> str:
    """The text of a UTF-8 document of at most 1 MiB that declares no other encoding."""
    if not body:
        raise OmahaError(ErrorCode.OMAHA_REQUEST_EMPTY_RESPONSE, f"{what} is empty")
    if len(body) > MAX_MESSAGE_BYTES:
        raise OmahaError(
            ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
            f"{what} is {len(body)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit; not parsed",
        )
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise OmahaError(
            ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, f"{what} is not valid UTF-8 (byte {exc.start})"
        ) from None
    declared = _XML_DECLARATION_ENCODING_RE.match(text)
    if declared and declared.group(2).lower() not in _UTF8_NAMES:
        raise OmahaError(
            ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
            f"{what} declares encoding {_show(declared.group(2))}; only UTF-8 is accepted",
        )
    return text


def _dtd_refused(what: str) -> OmahaError:
    return OmahaError(
        ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
        f"{what} contains a DTD (<!DOCTYPE>); refused, DTDs are never processed",
    )


def _entities_refused(what: str) -> OmahaError:
    return OmahaError(
        ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
        f"{what} declares XML entities; refused, entities are never expanded",
    )


def _parse_xml(body: bytes, what: str) -> Element:
    """Parse a UTF-8 document with no DTD, no entities, no external references, at most 1 MiB."""
    text = _decode_document(body, what)
    code = ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR
    try:
        root: Element = SafeElementTree.fromstring(
            text, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DTDForbidden:
        raise _dtd_refused(what) from None
    except defusedxml.EntitiesForbidden:
        raise _entities_refused(what) from None
    except defusedxml.ExternalReferenceForbidden:
        raise OmahaError(code, f"{what} refers to an external resource; refused") from None
    except ParseError as exc:
        raise OmahaError(code, f"{what} is not well-formed XML: {exc}") from None
    except (ValueError, LookupError, RecursionError) as exc:
        raise OmahaError(code, f"{what} cannot be parsed as XML: {exc}") from None
    return root


def _invalid(message: str) -> OmahaError:
    return OmahaError(ErrorCode.OMAHA_RESPONSE_INVALID, message)


def _positive_int(text: str | None) -> int | None:
    if text is None or not _UNSIGNED_RE.fullmatch(text):
        return None
    value = int(text)
    return value if 0 < value <= _MAX_INT64 else None


def _check_payload_url(url: str) -> None:
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _invalid(f"Omaha response payload URL {_show(url)} contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"Omaha response payload URL {_show(url)} is malformed: {exc}") from None
    if port == 0:
        raise _invalid(f"Omaha response payload URL {_show(url)} names port 0")
    if parts.scheme not in ("http", "https"):
        raise _invalid(f"Omaha response payload URL {_show(url)} is not http or https")
    if not host:
        raise _invalid(f"Omaha response payload URL {_show(url)} has no host")


def _check_version_text(version: str) -> None:
    """A version goes into log lines, file names and the status: no control characters, no path separators."""
    if len(version) > MAX_VERSION_CHARS:
        raise _invalid(f"Omaha response manifest version is {len(version)} characters long, over {MAX_VERSION_CHARS}")
    if _UNSAFE_VERSION_RE.search(version) or version in (".", ".."):
        raise _invalid(f"Omaha response manifest version {_show(version)} contains control characters or path "
                       "separators; refused")


def _check_sha256_b64(value: str) -> None:
    try:
        digest = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise _invalid(f"Omaha response sha256 {_show(value)} is not valid base64") from None
    if len(digest) != 32:
        raise _invalid(f"Omaha response sha256 {_show(value)} decodes to {len(digest)} bytes, not 32")


# ------------------------------------------------------------------------------------------------------------
# Responses (client side)


@dataclass(frozen=True)
class NoUpdate:
    """The server has nothing newer; ``poll_interval`` (s) is its wish for the next check, if it sent one."""

    poll_interval: int | None = None


@dataclass(frozen=True)
class UpdateOffer:
    """An update the server offers; ``urls`` are complete payload URLs, tried in order."""

    version: str
    urls: tuple[str, ...]
    size: int
    sha256_b64: str
    is_delta: bool = False
    disable_payload_backoff: bool = False
    max_failure_count_per_url: int = DEFAULT_MAX_FAILURE_COUNT_PER_URL
    poll_interval: int | None = None


OmahaResponse: TypeAlias = NoUpdate | UpdateOffer


def parse_response(body: bytes) -> OmahaResponse:
    """Parse an update-check response.

    Codes: empty body → 30; over 1 MiB, not UTF-8, bad XML, DTD or entities → 31; anything missing or
    invalid → 34.  Unlike the original's document-wide XPath, the manifest, URLs and actions are taken from
    the first ``/response/app/updatecheck`` itself, so parts of two apps are never mixed.
    """
    root = _parse_xml(body, "Omaha response")
    if root.tag != "response":
        raise _invalid(f"Omaha response root element is <{_truncate(root.tag)}>, expected <response>")
    updatecheck: Element | None = None
    app_statuses: list[str] = []
    for app in root.findall("app"):
        app_statuses.append(app.get("status", ""))
        updatecheck = app.find("updatecheck")
        if updatecheck is not None:
            break
    if updatecheck is None:
        detail = (
            f" (app status {', '.join(_show(s) for s in app_statuses)})" if app_statuses else " (no <app>)"
        )
        raise _invalid(f"Omaha response has no /response/app/updatecheck element{detail}")

    poll_interval = _positive_int(updatecheck.get("PollInterval"))
    status = updatecheck.get("status")
    if status is None:
        raise _invalid("Omaha response updatecheck has no status attribute")
    if status == "noupdate":
        return NoUpdate(poll_interval=poll_interval)
    if status != "ok":
        raise _invalid(f"Omaha response updatecheck status is {_show(status)}, expected 'ok' or 'noupdate'")

    manifest = updatecheck.find("manifest")
    if manifest is None:
        raise _invalid("Omaha response has no updatecheck/manifest element")
    version = manifest.get("version", "")
    if not version:
        raise _invalid("Omaha response manifest has no version")
    _check_version_text(version)

    url_elements = updatecheck.findall("urls/url")
    if not url_elements:
        raise _invalid("Omaha response has no updatecheck/urls/url element")
    codebases: list[str] = []
    for url_element in url_elements:
        codebase = url_element.get("codebase", "")
        if not codebase:
            raise _invalid("Omaha response has a url element with an empty codebase")
        codebases.append(codebase)

    package = manifest.find("packages/package")
    if package is None:
        raise _invalid("Omaha response has no manifest/packages/package element")
    package_name = package.get("name", "")
    if not package_name:
        raise _invalid("Omaha response package has no name")
    urls = tuple(codebase + ("" if codebase.endswith("/") else "/") + package_name for codebase in codebases)
    for codebase, url in zip(codebases, urls, strict=True):
        # The codebase alone must name a host: "https://" + "name" would otherwise turn the name into one.
        _check_payload_url(codebase)
        _check_payload_url(url)
    size_text = package.get("size")
    size = _positive_int(size_text)
    if size is None:
        shown = "missing" if size_text is None else _show(size_text)
        raise _invalid(f"Omaha response package size is {shown}, expected an integer > 0")

    action = next(
        (a for a in manifest.findall("actions/action") if a.get("event") == "postinstall"),
        None,
    )
    if action is None:
        raise _invalid('Omaha response has no manifest/actions/action with event="postinstall"')
    sha256_b64 = action.get("sha256", "")
    if not sha256_b64:
        raise _invalid("Omaha response postinstall action has no sha256")
    _check_sha256_b64(sha256_b64)
    max_failures = _positive_int(action.get("MaxFailureCountPerUrl"))

    return UpdateOffer(
        version=version,
        urls=urls,
        size=size,
        sha256_b64=sha256_b64,
        is_delta=action.get("IsDeltaPayload") == "true",
        disable_payload_backoff=action.get("DisablePayloadBackoff") == "true",
        max_failure_count_per_url=DEFAULT_MAX_FAILURE_COUNT_PER_URL if max_failures is None else max_failures,
        poll_interval=poll_interval,
    )


# ------------------------------------------------------------------------------------------------------------
# Requests (server side)


@dataclass(frozen=True)
class RequestEvent:
    type: int
    result: int
    error_code: int | None = None
    previous_version: str | None = None


@dataclass(frozen=True)
class RequestApp:
    """One ``<app>`` of a request; missing attributes read as empty strings."""

    app_id: str
    version: str = ""
    track: str = ""
    machine_id: str = ""
    boot_id: str = ""
    oem: str = ""
    oem_version: str = ""
    aleph_version: str = ""
    machine_alias: str = ""
    board: str = ""
    ping: bool = False
    update_check: bool = False
    events: tuple[RequestEvent, ...] = ()


@dataclass(frozen=True)
class ParsedRequest:
    protocol: str
    install_source: str
    updater_version: str
    apps: tuple[RequestApp, ...]


def _request_invalid(message: str) -> OmahaError:
    return OmahaError(ErrorCode.OMAHA_REQUEST_ERROR, message)


class _RequestReader:
    """Collects a request's parts straight from expat's events (a server reads many requests: no element tree).

    The same rules as ``_parse_xml`` (no DTD, no entities, no external references) and the same view as the
    tree would give: the root, its ``<app>`` children, and each app's ``<event>``, ``<ping>`` and
    ``<updatecheck>`` children.  Names keep their namespace (``uri}name``), so a namespaced element never passes
    for one of ours.
    """

    WHAT = "Omaha request"

    def __init__(self) -> None:
        self.depth = 0
        self.root_tag: str | None = None
        self.root_attrs: dict[str, str] = {}
        self.apps: list[tuple[dict[str, str], list[dict[str, str]], set[str]]] = []
        self._in_app = False  # the current depth-1 element is an <app>

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        if self.depth == 0:
            self.root_tag, self.root_attrs = tag, attrs
        elif self.depth == 1 and tag == "app":
            self.apps.append((attrs, [], set()))
        elif self.depth == 2 and self._in_app:
            children = self.apps[-1]
            if tag == "event":
                children[1].append(attrs)
            else:
                children[2].add(tag)
        if self.depth == 1:
            self._in_app = tag == "app"
        self.depth += 1

    def end(self, _tag: str) -> None:
        self.depth -= 1

    def doctype(self, *_args: object) -> None:
        raise _dtd_refused(self.WHAT)

    def entity(self, *_args: object) -> None:
        raise _entities_refused(self.WHAT)

    def external(self, *_args: object) -> int:
        raise OmahaError(ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, f"{self.WHAT} refers to an external resource; "
                         "refused")


def _request_int(attrs: dict[str, str], tag: str, name: str, *, signed: bool = False,
                 required: bool = False) -> int | None:
    text = attrs.get(name)
    if text is None:
        if required:
            raise _request_invalid(f"Omaha request <{tag}> has no {name}")
        return None
    if not (_SIGNED_RE if signed else _UNSIGNED_RE).fullmatch(text):
        raise _request_invalid(f"Omaha request <{tag}> {name} is {_show(text)}, not an integer")
    return int(text)


def parse_request(body: bytes) -> ParsedRequest:
    """Parse a client's request for a server: empty → 30, unparseable → 31, wrong content → 2.

    ``errorcode`` may be negative: the original client prints error codes with bit 31 set as signed numbers.
    """
    what = _RequestReader.WHAT
    text = _decode_document(body, what)
    reader = _RequestReader()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.StartDoctypeDeclHandler = reader.doctype
    parser.EntityDeclHandler = reader.entity
    parser.UnparsedEntityDeclHandler = reader.entity
    parser.ExternalEntityRefHandler = reader.external
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise OmahaError(ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, f"{what} is not well-formed XML: {exc}") from None
    except (ValueError, LookupError, RecursionError) as exc:
        raise OmahaError(ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, f"{what} cannot be parsed as XML: {exc}") from None
    if reader.root_tag != "request":
        shown = _truncate(reader.root_tag or "")
        raise _request_invalid(f"Omaha request root element is <{shown}>, expected <request>")
    protocol = reader.root_attrs.get("protocol", "")
    if protocol != "3.0":
        raise _request_invalid(f"Omaha request protocol is {_show(protocol)}, only '3.0' is supported")
    apps: list[RequestApp] = []
    for attrs, event_attrs, children in reader.apps:
        events = tuple(
            RequestEvent(
                type=_request_int(ev, "event", "eventtype", required=True) or 0,
                result=_request_int(ev, "event", "eventresult", required=True) or 0,
                error_code=_request_int(ev, "event", "errorcode", signed=True),
                previous_version=ev.get("previousversion"),
            )
            for ev in event_attrs
        )
        apps.append(
            RequestApp(
                app_id=attrs.get("appid", ""),
                version=attrs.get("version", ""),
                track=attrs.get("track", ""),
                machine_id=attrs.get("machineid", ""),
                boot_id=attrs.get("bootid", ""),
                oem=attrs.get("oem", ""),
                oem_version=attrs.get("oemversion", ""),
                aleph_version=attrs.get("alephversion", ""),
                machine_alias=attrs.get("machinealias", ""),
                board=attrs.get("board", ""),
                ping="ping" in children,
                update_check="updatecheck" in children,
                events=events,
            )
        )
    return ParsedRequest(
        protocol=protocol,
        install_source=reader.root_attrs.get("installsource", ""),
        updater_version=reader.root_attrs.get("updaterversion", ""),
        apps=tuple(apps),
    )


# ------------------------------------------------------------------------------------------------------------
# Responses (server side)

NOUPDATE = "noupdate"


@dataclass(frozen=True)
class PayloadOffer:
    """What a server offers: a payload at ``codebase + name`` for each codebase."""

    version: str
    codebases: tuple[str, ...]
    package_name: str
    size: int
    sha256_b64: str
    sha1_b64: str | None = None
    disable_payload_backoff: bool = False

    def __post_init__(self) -> None:
        if not self.codebases:
            raise ValueError("a payload offer needs at least one codebase")
        if self.size <= 0:
            raise ValueError(f"a payload offer needs a size > 0, not {self.size}")
        if not self.package_name or not self.sha256_b64 or not self.version:
            raise ValueError("a payload offer needs a version, a package name and a sha256")


@dataclass(frozen=True)
class AppResponse:
    """One ``<app>`` of a response.

    ``updatecheck``: None when the app did not ask; a PayloadOffer for ``status="ok"``; otherwise the status
    string (``NOUPDATE``, ``"error-internal"``, …).  An app whose ``status`` is not ``ok`` gets no children.
    """

    app_id: str
    status: str = "ok"
    ping: bool = False
    events: int = 0
    updatecheck: PayloadOffer | str | None = None
    poll_interval: int | None = None


def _attrs(pairs: Sequence[tuple[str, str | None]]) -> str:
    return "".join(f' {name}="{xml_escape(value)}"' for name, value in pairs if value is not None)


def _updatecheck_lines(app: AppResponse) -> list[str]:
    poll = None if app.poll_interval is None else str(app.poll_interval)
    check = app.updatecheck
    if check is None:
        return []
    if isinstance(check, str):
        return [f"\t\t<updatecheck{_attrs([('status', check), ('PollInterval', poll)])}/>"]
    action_attrs: list[tuple[str, str | None]] = [("event", "postinstall"), ("sha256", check.sha256_b64)]
    if check.disable_payload_backoff:
        action_attrs.append(("DisablePayloadBackoff", "true"))
    package_attrs: list[tuple[str, str | None]] = [
        ("name", check.package_name),
        ("hash", check.sha1_b64),
        ("size", str(check.size)),
        ("required", "false"),
    ]
    return [
        f"\t\t<updatecheck{_attrs([('status', 'ok'), ('PollInterval', poll)])}>",
        "\t\t\t<urls>",
        *(f"\t\t\t\t<url{_attrs([('codebase', codebase)])}/>" for codebase in check.codebases),
        "\t\t\t</urls>",
        f"\t\t\t<manifest{_attrs([('version', check.version)])}>",
        "\t\t\t\t<packages>",
        f"\t\t\t\t\t<package{_attrs(package_attrs)}/>",
        "\t\t\t\t</packages>",
        "\t\t\t\t<actions>",
        f"\t\t\t\t\t<action{_attrs(action_attrs)}/>",
        "\t\t\t\t</actions>",
        "\t\t\t</manifest>",
        "\t\t</updatecheck>",
    ]


def build_response(apps: Sequence[AppResponse], server: str = DEVSERVER_NAME) -> bytes:
    """A response shaped like go-omaha's and Nebraska's (tab-indented, ``daystart elapsed_seconds="0"``)."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<response protocol="3.0"{_attrs([("server", server)])}>',
        '\t<daystart elapsed_seconds="0"/>',
    ]
    for app in apps:
        head = f"\t<app{_attrs([('appid', app.app_id), ('status', app.status)])}"
        if app.status != "ok":
            lines.append(head + "/>")
            continue
        lines.append(head + ">")
        if app.ping:
            lines.append('\t\t<ping status="ok"/>')
        lines.extend(_updatecheck_lines(app))
        lines.extend('\t\t<event status="ok"/>' for _ in range(app.events))
        lines.append("\t</app>")
    lines.append("</response>")
    return ("\n".join(lines) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------------------
# Versions

_VERSION_RE = re.compile(
    r"(?P<release>[0-9]+(?:\.[0-9]+)*)"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)

_PreReleaseKey: TypeAlias = tuple[tuple[int, int, str], ...]


@functools.lru_cache(maxsize=4096)
def _version_key(version: str) -> tuple[tuple[int, ...], int, _PreReleaseKey]:
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise ValueError(
            f"version {_show(version)} is not dotted numbers with an optional -prerelease and +build suffix"
        )
    release = tuple(int(part) for part in match.group("release").split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    pre = match.group("pre")
    if pre is None:
        # A release sorts after all of its pre-releases.
        return release, 1, ()
    identifiers = tuple((0, int(ident), "") if ident.isdigit() else (1, 0, ident) for ident in pre.split("."))
    return release, 0, identifiers


def version_less(a: str, b: str) -> bool:
    """``a < b`` for versions like ``3815.2.5`` or ``1.2.3-rc.1+build5``.

    Semver precedence; missing release parts count as 0 and build metadata is ignored.  Raises ValueError
    naming the version that is not one.
    """
    return _version_key(a) < _version_key(b)
