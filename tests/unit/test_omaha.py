"""Omaha v3: byte-exact requests, hostile and malformed responses, the server side and version ordering."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from update_engine import OMAHA_UPDATER_VERSION
from update_engine.config import OemRelease, UpdateSettings
from update_engine.errors import FLAG_RESUMED, FLAG_TEST_OMAHA_URL, ErrorCode
from update_engine.omaha import (
    MAX_MESSAGE_BYTES,
    NOUPDATE,
    AppResponse,
    EventResult,
    EventType,
    InstallSource,
    NoUpdate,
    OmahaError,
    OmahaEvent,
    OmahaRequestParams,
    PayloadOffer,
    RequestEvent,
    UpdateOffer,
    build_event,
    build_ping,
    build_response,
    build_update_check,
    is_rollback,
    parse_request,
    parse_response,
    version_less,
    xml_escape,
)

PARAMS = OmahaRequestParams(
    version="3815.2.5",
    app_id="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}",
    track="stable",
    boot_id="6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
    machine_id="0123456789abcdef0123456789abcdef",
    board="amd64-usr",
    arch="x86_64",
    oem="azure",
    oem_version="2.9.1.1",
    aleph_version="3510.2.0",
    machine_alias="web-1",
)

HEAD = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" '
    b'installsource="scheduler" ismachine="1">\n'
    b'    <os version="Chateau" platform="CoreOS" sp="3815.2.5_x86_64"></os>\n'
    b'    <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" version="3815.2.5" track="stable" '
    b'bootid="{6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b}" oem="azure" oemversion="2.9.1.1" '
    b'alephversion="3510.2.0" machineid="0123456789abcdef0123456789abcdef" machinealias="web-1" '
    b'lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false" >\n'
)
TAIL = b"    </app>\n</request>\n"

SHA256_B64 = base64.b64encode(hashlib.sha256(b"payload").digest()).decode()


# -- requests ------------------------------------------------------------------------------------------------


def test_update_check_golden_bytes() -> None:
    expected = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" '
        b'installsource="scheduler" ismachine="1">\n'
        b'    <os version="Chateau" platform="CoreOS" sp="3815.2.5_x86_64"></os>\n'
        b'    <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" version="3815.2.5" track="stable" '
        b'bootid="{6c1f8a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b}" oem="azure" oemversion="2.9.1.1" '
        b'alephversion="3510.2.0" machineid="0123456789abcdef0123456789abcdef" machinealias="web-1" '
        b'lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false" >\n'
        b'        <ping active="1"></ping>\n'
        b"        <updatecheck></updatecheck>\n"
        b'        <event eventtype="3" eventresult="2" previousversion=""></event>\n'
        b"    </app>\n"
        b"</request>\n"
    )
    assert build_update_check(PARAMS, "", rollback_detected=False) == expected
    assert OMAHA_UPDATER_VERSION == "update_engine-0.4.10"


def test_update_check_reports_previous_version_after_reboot() -> None:
    body = build_update_check(PARAMS, "3760.2.0", rollback_detected=False)
    assert (
        body
        == HEAD
        + (
            b'        <ping active="1"></ping>\n'
            b"        <updatecheck></updatecheck>\n"
            b'        <event eventtype="3" eventresult="2" previousversion="3760.2.0"></event>\n'
        )
        + TAIL
    )


def test_update_check_without_previous_version_pref_sends_initial_version() -> None:
    body = build_update_check(PARAMS, None, rollback_detected=False)
    assert b'<event eventtype="3" eventresult="2" previousversion="0.0.0.0"></event>\n' in body


def test_update_check_on_rollback_sends_error_44() -> None:
    body = build_update_check(PARAMS, "3815.2.5", rollback_detected=True)
    assert (
        body
        == HEAD
        + (
            b'        <ping active="1"></ping>\n'
            b"        <updatecheck></updatecheck>\n"
            b'        <event eventtype="3" eventresult="0" errorcode="44"></event>\n'
        )
        + TAIL
    )


def test_rollback_detection() -> None:
    assert is_rollback("3815.2.5", "3815.2.5")
    assert not is_rollback("", "3815.2.5")
    assert not is_rollback(None, "3815.2.5")
    assert not is_rollback("3760.2.0", "3815.2.5")


def test_ping_only_golden_bytes() -> None:
    assert build_ping(PARAMS) == HEAD + b'        <ping active="1"></ping>\n' + TAIL


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (OmahaEvent.download_started(), b'<event eventtype="13" eventresult="1"></event>'),
        (OmahaEvent.download_finished(), b'<event eventtype="14" eventresult="1"></event>'),
        (OmahaEvent.update_complete(), b'<event eventtype="3" eventresult="1"></event>'),
        (OmahaEvent.failure(10), b'<event eventtype="3" eventresult="0" errorcode="10"></event>'),
        (OmahaEvent.failure(40), b'<event eventtype="3" eventresult="9" errorcode="40"></event>'),
        (OmahaEvent.failure(35), b'<event eventtype="3" eventresult="9" errorcode="35"></event>'),
        (OmahaEvent.failure(36), b'<event eventtype="3" eventresult="9" errorcode="36"></event>'),
        (
            OmahaEvent.failure(40 | FLAG_TEST_OMAHA_URL),
            b'<event eventtype="3" eventresult="9" errorcode="268435496"></event>',
        ),
        (
            OmahaEvent.failure(2503 | FLAG_RESUMED),
            b'<event eventtype="3" eventresult="0" errorcode="1073744327"></event>',
        ),
    ],
)
def test_event_golden_bytes(event: OmahaEvent, line: bytes) -> None:
    assert build_event(PARAMS, event) == HEAD + b"        " + line + b"\n" + TAIL


def test_event_constructors_use_protocol_numbers() -> None:
    assert OmahaEvent.download_started() == OmahaEvent(13, 1)
    assert OmahaEvent.download_finished() == OmahaEvent(14, 1)
    assert OmahaEvent.update_complete() == OmahaEvent(3, 1)
    assert OmahaEvent.failure(ErrorCode.DOWNLOAD_HASH_MISMATCH) == OmahaEvent(3, 0, 10)
    assert int(EventType.UPDATE_DOWNLOAD_FINISHED) == 14
    assert int(EventResult.UPDATE_DEFERRED) == 9


def test_on_demand_install_source_and_values_are_escaped() -> None:
    params = OmahaRequestParams(
        version="1.0.0",
        app_id="{app}",
        track='be"ta',
        boot_id="b",
        machine_id="m",
        board="amd64-usr",
        arch="aarch64",
        machine_alias="<web> & 'db'\n\x01\ud800",
        install_source=InstallSource.ON_DEMAND,
    )
    body = build_ping(params)
    assert b'installsource="ondemandupdate"' in body
    assert b'sp="1.0.0_aarch64"' in body
    assert b'track="be&quot;ta"' in body
    assert b'machinealias="&lt;web&gt; &amp; &apos;db&apos;&#10;\xef\xbf\xbd\xef\xbf\xbd"' in body
    # A server parsing the request sees the original values back.
    parsed = parse_request(body)
    assert parsed.apps[0].track == 'be"ta'
    assert parsed.apps[0].machine_alias == "<web> & 'db'\n\ufffd\ufffd"


def test_params_from_settings() -> None:
    params = OmahaRequestParams.from_settings(
        UpdateSettings(group="beta", version="3815.2.5", machine_alias="a"),
        OemRelease(id="gce", version_id="1"),
        machine_id="0" * 32,
        boot_id="b",
        aleph_version="3000.0.0",
        arch="x86_64",
        interactive=True,
    )
    assert params.track == "beta"
    assert params.oem == "gce" and params.oem_version == "1"
    assert params.install_source is InstallSource.ON_DEMAND
    assert params.updater_version == OMAHA_UPDATER_VERSION


def _xml_char(ch: str) -> bool:
    """The Char production of XML 1.0."""
    c = ord(ch)
    return c in (0x9, 0xA, 0xD) or 0x20 <= c <= 0xD7FF or 0xE000 <= c <= 0xFFFD or 0x10000 <= c <= 0x10FFFF


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=[])))
def test_escaped_values_round_trip_through_a_parser(value: str) -> None:
    params = OmahaRequestParams(
        version="1.0.0", app_id="a", track=value, boot_id="b", machine_id="m", board="b", arch="x86_64"
    )
    parsed = parse_request(build_ping(params))
    # Every character XML can carry comes back unchanged (tabs and newlines included); the rest become U+FFFD.
    assert parsed.apps[0].track == "".join(ch if _xml_char(ch) else "\ufffd" for ch in value)


# -- responses -----------------------------------------------------------------------------------------------


def offer_xml(
    *,
    updatecheck_attrs: str = 'status="ok"',
    urls: str = '<urls><url codebase="https://dl.example.com/3815.2.5/"/></urls>',
    manifest_attrs: str = 'version="3815.2.5"',
    package: str = '<package name="flatcar_production_update.gz" hash="x" size="1000" required="false"/>',
    action: str = f'<action event="postinstall" sha256="{SHA256_B64}" DisablePayloadBackoff="true"/>',
    prefix: str = '<?xml version="1.0" encoding="UTF-8"?>\n',
) -> bytes:
    return (
        f'{prefix}<response protocol="3.0" server="test"><daystart elapsed_seconds="0"/>'
        f'<app appid="{{e96281a6-d1af-4bde-9a0a-97b76e56dc57}}" status="ok"><ping status="ok"/>'
        f"<updatecheck {updatecheck_attrs}>{urls}<manifest {manifest_attrs}><packages>{package}</packages>"
        f"<actions>{action}</actions></manifest></updatecheck></app></response>"
    ).encode()


def expect_error(body: bytes, code: int, *words: str) -> OmahaError:
    with pytest.raises(OmahaError) as info:
        parse_response(body)
    assert info.value.code == code, str(info.value)
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value


def test_parse_offer() -> None:
    offer = parse_response(offer_xml())
    assert offer == UpdateOffer(
        version="3815.2.5",
        urls=("https://dl.example.com/3815.2.5/flatcar_production_update.gz",),
        size=1000,
        sha256_b64=SHA256_B64,
        is_delta=False,
        disable_payload_backoff=True,
        max_failure_count_per_url=10,
        poll_interval=None,
    )


def test_parse_offer_appends_slash_and_keeps_url_order() -> None:
    urls = '<urls><url codebase="http://a.example/p"/><url codebase="https://b.example/q/"/></urls>'
    offer = parse_response(offer_xml(urls=urls))
    assert isinstance(offer, UpdateOffer)
    assert offer.urls == (
        "http://a.example/p/flatcar_production_update.gz",
        "https://b.example/q/flatcar_production_update.gz",
    )


def test_parse_offer_optional_action_attributes() -> None:
    action = (
        f'<action event="install" sha256="bogus"/>'
        f'<action event="postinstall" sha256="{SHA256_B64}" MaxFailureCountPerUrl="3" IsDeltaPayload="true"/>'
    )
    offer = parse_response(offer_xml(action=action, updatecheck_attrs='status="ok" PollInterval="3600"'))
    assert isinstance(offer, UpdateOffer)
    assert offer.max_failure_count_per_url == 3
    assert offer.is_delta is True
    assert offer.disable_payload_backoff is False
    assert offer.poll_interval == 3600


def test_invalid_max_failure_count_falls_back_to_default() -> None:
    action = f'<action event="postinstall" sha256="{SHA256_B64}" MaxFailureCountPerUrl="many"/>'
    offer = parse_response(offer_xml(action=action))
    assert isinstance(offer, UpdateOffer) and offer.max_failure_count_per_url == 10


def test_noupdate_with_and_without_poll_interval() -> None:
    body = b'<response protocol="3.0"><app status="ok"><updatecheck status="noupdate"/></app></response>'
    assert parse_response(body) == NoUpdate(poll_interval=None)
    body = (
        b'<response protocol="3.0"><app status="ok">'
        b'<updatecheck status="noupdate" PollInterval="7200"/></app></response>'
    )
    assert parse_response(body) == NoUpdate(poll_interval=7200)
    body = b'<response><app><updatecheck status="noupdate" PollInterval="-5"/></app></response>'
    assert parse_response(body) == NoUpdate(poll_interval=None)


def test_first_app_with_an_updatecheck_is_used() -> None:
    body = (
        b"<response><app appid='other' status='ok'><ping status='ok'/></app>"
        b"<app status='ok'><updatecheck status='noupdate'/></app></response>"
    )
    assert parse_response(body) == NoUpdate()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<response/>", ["/response/app/updatecheck", "no <app>"]),
        (
            b'<response><app status="error-unknownApplication"/></response>',
            ["/response/app/updatecheck", "error-unknownApplication"],
        ),
        (b"<reply><app><updatecheck status='ok'/></app></reply>", ["<reply>", "expected <response>"]),
        (b"<response><updatecheck status='ok'/></response>", ["/response/app/updatecheck"]),
        (b"<response><app><updatecheck/></app></response>", ["no status"]),
        (b"<response><app><updatecheck status='error-internal'/></app></response>", ["'error-internal'"]),
    ],
)
def test_missing_updatecheck_or_bad_status_is_34(body: bytes, words: list[str]) -> None:
    expect_error(body, ErrorCode.OMAHA_RESPONSE_INVALID, *words)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"manifest_attrs": ""}, ["manifest has no version"]),
        ({"urls": ""}, ["urls/url"]),
        ({"urls": "<urls></urls>"}, ["urls/url"]),
        ({"urls": '<urls><url codebase=""/></urls>'}, ["empty codebase"]),
        ({"urls": "<urls><url/></urls>"}, ["empty codebase"]),
        ({"package": ""}, ["packages/package"]),
        ({"package": '<package size="10"/>'}, ["package has no name"]),
        ({"package": '<package name="" size="10"/>'}, ["package has no name"]),
        ({"package": '<package name="u.gz"/>'}, ["size is missing"]),
        ({"package": '<package name="u.gz" size="0"/>'}, ["size is '0'"]),
        ({"package": '<package name="u.gz" size="-1"/>'}, ["size is '-1'"]),
        ({"package": '<package name="u.gz" size="12abc"/>'}, ["'12abc'"]),
        ({"package": '<package name="u.gz" size="1_000"/>'}, ["'1_000'"]),
        ({"package": '<package name="u.gz" size="99999999999999999999"/>'}, ["size is"]),
        ({"action": ""}, ["postinstall"]),
        ({"action": f'<action event="install" sha256="{SHA256_B64}"/>'}, ["postinstall"]),
        ({"action": '<action event="postinstall"/>'}, ["no sha256"]),
        ({"action": '<action event="postinstall" sha256=""/>'}, ["no sha256"]),
        ({"action": '<action event="postinstall" sha256="not base64!"/>'}, ["not valid base64"]),
        (
            {"action": f'<action event="postinstall" sha256="{base64.b64encode(b"x" * 20).decode()}"/>'},
            ["20 bytes, not 32"],
        ),
    ],
)
def test_missing_or_invalid_offer_parts_are_34(kwargs: dict[str, str], words: list[str]) -> None:
    expect_error(offer_xml(**kwargs), ErrorCode.OMAHA_RESPONSE_INVALID, *words)


def test_manifest_of_another_app_is_not_borrowed() -> None:
    body = (
        b"<response><app><updatecheck status='ok'/></app>"
        b"<app><updatecheck status='ok'><manifest version='1'/></updatecheck></app></response>"
    )
    expect_error(body, ErrorCode.OMAHA_RESPONSE_INVALID, "manifest")


@pytest.mark.parametrize(
    "codebase",
    [
        "ftp://dl.example.com/",
        "file:///etc/",
        "javascript:alert(1)",
        "dl.example.com/payloads/",
        "http:///no-host/",
        "https://",
        "http://[::1/",
        "http://dl.example.com/a b/",
    ],
)
def test_non_http_urls_are_34_and_named(codebase: str) -> None:
    urls = f'<urls><url codebase="https://good.example/"/><url codebase="{codebase}"/></urls>'
    error = expect_error(offer_xml(urls=urls), ErrorCode.OMAHA_RESPONSE_INVALID, "payload URL")
    assert codebase.rstrip("/") in error.message


@pytest.mark.parametrize("codebase", ["https://dl.example.com:99999/", "https://dl.example.com:8x/",
                                      "http://dl.example.com:0/"])
def test_a_codebase_with_an_impossible_port_is_34(codebase: str) -> None:
    """Before, such a URL was accepted and its download retried for minutes as a transient error."""
    urls = f'<urls><url codebase="{codebase}"/></urls>'
    error = expect_error(offer_xml(urls=urls), ErrorCode.OMAHA_RESPONSE_INVALID, "payload URL")
    assert "port" in error.message.lower()


@pytest.mark.parametrize(
    "version",
    ["3815.2.5\n<3>forged line", "../../../etc/passwd", "3815/2/5", "3815\\2", "3815.2.5\x85next line", "..",
     "3815\u20282", "9" * 129],
)
def test_a_version_that_could_forge_a_log_line_or_name_a_path_is_34(version: str) -> None:
    """The version reaches log lines, file names and the D-Bus status; before, anything was taken."""
    manifest = f'version="{xml_escape(version)}"'
    error = expect_error(offer_xml(manifest_attrs=manifest), ErrorCode.OMAHA_RESPONSE_INVALID, "version")
    assert not any(ch in error.message for ch in "\n\x85\u2028")


def test_empty_body_is_30() -> None:
    expect_error(b"", ErrorCode.OMAHA_REQUEST_EMPTY_RESPONSE, "empty")


@pytest.mark.parametrize(
    "body",
    [
        b"   ",
        b"<response>",
        b"<html><body>502 Bad Gateway</body></html",
        b"<response></response>trailing",
        b"<response>\xff</response>",
        b"<response><app>&nbsp;</app></response>",
        b"\x00\x01\x02",
    ],
)
def test_bad_xml_is_31(body: bytes) -> None:
    expect_error(body, ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR)


def test_non_utf8_declared_encoding_is_31() -> None:
    body = offer_xml(prefix='<?xml version="1.0" encoding="idna"?>')
    expect_error(body, ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, "encoding", "idna")


def test_utf8_bom_is_accepted() -> None:
    assert isinstance(parse_response(b"\xef\xbb\xbf" + offer_xml()), UpdateOffer)


def test_body_over_one_mebibyte_is_refused() -> None:
    body = offer_xml()
    padded = body.replace(
        b"<daystart", b"<!--" + b"x" * (MAX_MESSAGE_BYTES - len(body) - 7) + b"--><daystart"
    )
    assert len(padded) == MAX_MESSAGE_BYTES
    assert isinstance(parse_response(padded), UpdateOffer)
    too_big = padded.replace(b"<!--", b"<!-- ")
    assert len(too_big) == MAX_MESSAGE_BYTES + 1
    expect_error(too_big, ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, "limit")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<response><app><updatecheck status="&lol4;"/></app></response>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE response [<!ENTITY xxe SYSTEM "file:///etc/shadow">]>
<response><app><updatecheck status="ok"><manifest version="&xxe;"/></updatecheck></app></response>"""

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE response SYSTEM "http://127.0.0.1:1/evil.dtd">
<response><app><updatecheck status="noupdate"/></app></response>"""

PLAIN_DTD = b"""<!DOCTYPE response><response><app><updatecheck status="noupdate"/></app></response>"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, EXTERNAL_ENTITY, EXTERNAL_DTD, PLAIN_DTD])
def test_dtd_and_entity_tricks_are_refused_with_31(body: bytes) -> None:
    expect_error(body, ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, "refused")


def test_deeply_nested_document_is_handled() -> None:
    depth = 50_000
    body = b"<response>" + b"<a>" * depth + b"</a>" * depth + b"</response>"
    expect_error(body, ErrorCode.OMAHA_RESPONSE_INVALID)


# A small grammar of Omaha-ish fragments, so that hypothesis reaches past the XML parser into the rules.
XMLISH_TOKENS = [
    "<response>",
    "</response>",
    "<response protocol='3.0'>",
    "<app>",
    "</app>",
    "<app status='ok'>",
    "<updatecheck status='ok'>",
    "<updatecheck status='noupdate'/>",
    "</updatecheck>",
    "<updatecheck>",
    "<urls>",
    "</urls>",
    "<url codebase='http://h/'/>",
    "<url codebase=''/>",
    "<url codebase='ftp://x'/>",
    "<manifest version='1.2.3'>",
    "</manifest>",
    "<packages>",
    "</packages>",
    "<package name='u.gz' size='10'/>",
    "<package name='' size='0'/>",
    "<package name='u' size='-1'/>",
    "<actions>",
    "</actions>",
    f"<action event='postinstall' sha256='{SHA256_B64}'/>",
    "<action event='postinstall' sha256='@@'/>",
    "<action event='postinstall'/>",
    "<!DOCTYPE r>",
    "<!ENTITY e 'x'>",
    "&e;",
    "&amp;",
    "&#0;",
    "&#x10FFFF;",
    "<![CDATA[x]]>",
    "<!-- c -->",
    "<?xml version='1.0'?>",
    "<?xml version='1.0' encoding='latin-1'?>",
    "<?pi x?>",
    "'",
    '"',
    "<",
    ">",
    "=",
    "<request protocol='3.0'>",
    "</request>",
    "<event eventtype='3' eventresult='2' previousversion=''/>",
    "<event eventtype='x'/>",
    "<event eventtype='3' eventresult='0' errorcode='-5'/>",
    "<ping/>",
]
xmlish_text = st.lists(st.one_of(st.sampled_from(XMLISH_TOKENS), st.text(max_size=8)), max_size=40).map(
    "".join
)


# Well-formed trees over the Omaha vocabulary with adversarial attribute values, so that hypothesis exercises
# the response and request rules and not only the XML parser.
OMAHA_TAGS = [
    "app",
    "updatecheck",
    "urls",
    "url",
    "manifest",
    "packages",
    "package",
    "actions",
    "action",
    "ping",
    "event",
    "daystart",
    "os",
]
OMAHA_ATTRS = [
    "status",
    "codebase",
    "version",
    "name",
    "size",
    "sha256",
    "event",
    "PollInterval",
    "MaxFailureCountPerUrl",
    "IsDeltaPayload",
    "DisablePayloadBackoff",
    "protocol",
    "appid",
    "eventtype",
    "eventresult",
    "errorcode",
    "previousversion",
]
attr_values = st.one_of(
    st.sampled_from(
        [
            "ok",
            "noupdate",
            "postinstall",
            "3.0",
            "http://h/",
            "https://h:8/p",
            "ftp://x/",
            "https://",
            "",
            "0",
            "1",
            "-1",
            "10",
            "true",
            SHA256_B64,
            "AAAA",
            "1.2.3",
            "99999999999999999999",
            "u.gz",
        ]
    ),
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=10),
)
attributes = st.dictionaries(st.sampled_from(OMAHA_ATTRS), attr_values, max_size=4)


def _element(tag: str, attrs: dict[str, str], children: list[str]) -> str:
    rendered = "".join(f" {name}={quoteattr(value)}" for name, value in attrs.items())
    return f"<{tag}{rendered}>{''.join(children)}</{tag}>"


omaha_elements = st.recursive(
    st.builds(_element, st.sampled_from(OMAHA_TAGS), attributes, st.just([])),
    lambda children: st.builds(
        _element, st.sampled_from(OMAHA_TAGS), attributes, st.lists(children, max_size=4)
    ),
    max_leaves=25,
)
omaha_documents = st.builds(
    _element, st.sampled_from(["response", "request"]), attributes, st.lists(omaha_elements, max_size=3)
)


def _maybe(element: str) -> st.SearchStrategy[str]:
    return st.sampled_from([element, ""])


@st.composite
def response_variants(draw: st.DrawFn) -> str:
    """A complete offer in which any attribute value may be hostile and any element may be missing."""

    def value(good: str) -> str:
        hostile = draw(st.integers(0, 5)) == 0
        return quoteattr(draw(attr_values) if hostile else good)

    def maybe(element: str) -> str:
        return "" if draw(st.integers(0, 7)) == 0 else element

    url = f"<url codebase={value('https://h/p')}/>"
    urls = maybe(f"<urls>{maybe(url)}{maybe(url)}</urls>")
    package = maybe(f"<packages><package name={value('u.gz')} size={value('10')}/></packages>")
    action = (
        f"<action event={value('postinstall')} sha256={value(SHA256_B64)}"
        f" MaxFailureCountPerUrl={value('3')}/>"
    )
    manifest = maybe(
        f"<manifest version={value('1.2.3')}>{package}<actions>{maybe(action)}</actions></manifest>"
    )
    updatecheck = (
        f"<updatecheck status={value('ok')} PollInterval={value('60')}>{urls}{manifest}</updatecheck>"
    )
    return f'<response protocol="3.0"><app status={value("ok")}>{maybe(updatecheck)}</app></response>'


@settings(max_examples=200, deadline=None)
@given(response_variants())
def test_hostile_offer_variants_raise_only_omaha_error(document: str) -> None:
    try:
        result = parse_response(document.encode("utf-8", errors="surrogatepass"))
    except OmahaError:
        return
    if isinstance(result, UpdateOffer):
        assert result.size > 0 and result.urls and result.version
        assert len(base64.b64decode(result.sha256_b64)) == 32


@settings(max_examples=200, deadline=None)
@given(omaha_documents)
def test_arbitrary_omaha_trees_raise_only_omaha_error(document: str) -> None:
    body = document.encode("utf-8", errors="surrogatepass")
    for parse in (parse_response, parse_request):
        with contextlib.suppress(OmahaError):
            parse(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_omaha_error(body: bytes) -> None:
    for parse in (parse_response, parse_request):
        with contextlib.suppress(OmahaError):
            parse(body)


@settings(max_examples=200, deadline=None)
@given(xmlish_text)
def test_arbitrary_xmlish_text_raises_only_omaha_error(text: str) -> None:
    body = text.encode("utf-8", errors="surrogatepass")
    for parse in (parse_response, parse_request):
        with contextlib.suppress(OmahaError):
            parse(body)


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.lists(st.text(max_size=30), max_size=5),
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
)
def test_offer_with_arbitrary_attribute_values_raises_only_omaha_error(
    version: str, codebases: list[str], name: str, size: int
) -> None:
    urls = "<urls>" + "".join(f'<url codebase="{xml_escape(c)}"/>' for c in codebases) + "</urls>"
    body = offer_xml(
        manifest_attrs=f'version="{xml_escape(version)}"',
        urls=urls,
        package=f'<package name="{xml_escape(name)}" size="{size}"/>',
    )
    try:
        result = parse_response(body)
    except OmahaError as exc:
        assert exc.code == ErrorCode.OMAHA_RESPONSE_INVALID
    else:
        assert isinstance(result, UpdateOffer)
        assert result.size == size > 0
        assert all(url.startswith(("http://", "https://")) for url in result.urls)


# -- server side ---------------------------------------------------------------------------------------------


def test_parse_request_of_an_update_check() -> None:
    parsed = parse_request(build_update_check(PARAMS, "3760.2.0", rollback_detected=False))
    assert parsed.protocol == "3.0"
    assert parsed.install_source == "scheduler"
    assert parsed.updater_version == "update_engine-0.4.10"
    (app,) = parsed.apps
    assert app.app_id == PARAMS.app_id
    assert app.version == "3815.2.5"
    assert app.track == "stable"
    assert app.machine_id == PARAMS.machine_id
    assert app.boot_id == "{" + PARAMS.boot_id + "}"
    assert (app.oem, app.oem_version, app.aleph_version) == ("azure", "2.9.1.1", "3510.2.0")
    assert app.machine_alias == "web-1" and app.board == "amd64-usr"
    assert app.ping and app.update_check
    assert app.events == (RequestEvent(type=3, result=2, error_code=None, previous_version="3760.2.0"),)


def test_parse_request_of_events() -> None:
    failure = parse_request(build_event(PARAMS, OmahaEvent.failure(2503 | FLAG_RESUMED)))
    assert failure.apps[0].events == (RequestEvent(3, 0, 2503 | FLAG_RESUMED, None),)
    assert not failure.apps[0].ping and not failure.apps[0].update_check
    ping = parse_request(build_ping(PARAMS))
    assert ping.apps[0].ping and ping.apps[0].events == ()
    # The original client prints codes with bit 31 set as negative numbers.
    body = (
        b'<request protocol="3.0"><app appid="a">'
        b'<event eventtype="3" eventresult="0" errorcode="-2147483606"/></app></request>'
    )
    assert parse_request(body).apps[0].events[0].error_code == -2147483606


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"", ErrorCode.OMAHA_REQUEST_EMPTY_RESPONSE, ["empty"]),
        (b"<request", ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, ["well-formed"]),
        (b'<request protocol="2.0"/>', ErrorCode.OMAHA_REQUEST_ERROR, ["protocol", "'2.0'"]),
        (b"<request/>", ErrorCode.OMAHA_REQUEST_ERROR, ["protocol"]),
        (b'<response protocol="3.0"/>', ErrorCode.OMAHA_REQUEST_ERROR, ["<response>"]),
        (
            b'<request protocol="3.0"><app><event eventresult="1"/></app></request>',
            ErrorCode.OMAHA_REQUEST_ERROR,
            ["eventtype"],
        ),
        (
            b'<request protocol="3.0"><app><event eventtype="three" eventresult="1"/></app></request>',
            ErrorCode.OMAHA_REQUEST_ERROR,
            ["'three'"],
        ),
        (PLAIN_DTD.replace(b"response", b"request"), ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR, ["DTD"]),
        (
            b"<request>" + b" " * MAX_MESSAGE_BYTES + b"</request>",
            ErrorCode.OMAHA_REQUEST_XML_PARSE_ERROR,
            ["limit"],
        ),
    ],
)
def test_bad_requests(body: bytes, code: int, words: list[str]) -> None:
    with pytest.raises(OmahaError) as info:
        parse_request(body)
    assert info.value.code == code
    for word in words:
        assert word in info.value.message


OFFER = PayloadOffer(
    version="3815.2.5",
    codebases=("http://127.0.0.1:8000/packages/", "https://mirror.example/flatcar"),
    package_name="update.gz",
    size=123456,
    sha256_b64=SHA256_B64,
    sha1_b64=base64.b64encode(hashlib.sha1(b"payload").digest()).decode(),
    disable_payload_backoff=True,
)


def test_build_response_round_trip() -> None:
    body = build_response([AppResponse(app_id=PARAMS.app_id, ping=True, events=1, updatecheck=OFFER)])
    assert parse_response(body) == UpdateOffer(
        version="3815.2.5",
        urls=("http://127.0.0.1:8000/packages/update.gz", "https://mirror.example/flatcar/update.gz"),
        size=123456,
        sha256_b64=SHA256_B64,
        disable_payload_backoff=True,
    )


def test_build_response_golden_bytes() -> None:
    offer = PayloadOffer(
        version="3815.2.5",
        codebases=("http://127.0.0.1:8000/packages/",),
        package_name="update.gz",
        size=42,
        sha256_b64=SHA256_B64,
    )
    body = build_response(
        [
            AppResponse(app_id="{a}", ping=True, events=2, updatecheck=offer, poll_interval=60),
            AppResponse(app_id="{b}", updatecheck=NOUPDATE),
            AppResponse(app_id="{c}", status="error-unknownApplication", updatecheck=NOUPDATE),
        ]
    )
    expected = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<response protocol="3.0" server="update-engine-devserver">\n'
        '\t<daystart elapsed_seconds="0"/>\n'
        '\t<app appid="{a}" status="ok">\n'
        '\t\t<ping status="ok"/>\n'
        '\t\t<updatecheck status="ok" PollInterval="60">\n'
        "\t\t\t<urls>\n"
        '\t\t\t\t<url codebase="http://127.0.0.1:8000/packages/"/>\n'
        "\t\t\t</urls>\n"
        '\t\t\t<manifest version="3815.2.5">\n'
        "\t\t\t\t<packages>\n"
        '\t\t\t\t\t<package name="update.gz" size="42" required="false"/>\n'
        "\t\t\t\t</packages>\n"
        "\t\t\t\t<actions>\n"
        f'\t\t\t\t\t<action event="postinstall" sha256="{SHA256_B64}"/>\n'
        "\t\t\t\t</actions>\n"
        "\t\t\t</manifest>\n"
        "\t\t</updatecheck>\n"
        '\t\t<event status="ok"/>\n'
        '\t\t<event status="ok"/>\n'
        "\t</app>\n"
        '\t<app appid="{b}" status="ok">\n'
        '\t\t<updatecheck status="noupdate"/>\n'
        "\t</app>\n"
        '\t<app appid="{c}" status="error-unknownApplication"/>\n'
        "</response>\n"
    ).encode()
    assert body == expected
    parsed = parse_response(body)
    assert isinstance(parsed, UpdateOffer) and parsed.poll_interval == 60


def test_build_response_noupdate_round_trip() -> None:
    body = build_response([AppResponse(app_id="{a}", updatecheck=NOUPDATE, poll_interval=1800)])
    assert parse_response(body) == NoUpdate(poll_interval=1800)


def test_payload_offer_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="size"):
        PayloadOffer(version="1", codebases=("http://h/",), package_name="u", size=0, sha256_b64="x")
    with pytest.raises(ValueError, match="codebase"):
        PayloadOffer(version="1", codebases=(), package_name="u", size=1, sha256_b64="x")


# -- versions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("3815.2.4", "3815.2.5"),
        ("3815.2.5", "3815.10.0"),
        ("999.99.99", "1000.0.0"),
        ("0.0.0", "3815.2.5"),
        ("0.0.0.0", "0.0.1"),
        ("1.2.3-alpha", "1.2.3"),
        ("1.2.3-alpha", "1.2.3-alpha.1"),
        ("1.2.3-alpha.1", "1.2.3-alpha.beta"),
        ("1.2.3-alpha.2", "1.2.3-alpha.10"),
        ("1.2.3-beta.11", "1.2.3-rc.1"),
        ("1.2.3+build.9", "1.2.4"),
    ],
)
def test_version_less(a: str, b: str) -> None:
    assert version_less(a, b)
    assert not version_less(b, a)


@pytest.mark.parametrize(("a", "b"), [("3815.2.5", "3815.2.5"), ("1.2", "1.2.0"), ("1.2.3+a", "1.2.3+b")])
def test_equal_versions_are_not_less(a: str, b: str) -> None:
    assert not version_less(a, b)
    assert not version_less(b, a)


@pytest.mark.parametrize(
    "bad", ["", "latest", "v1.2.3", "1..2", "1.2.", " 1.2.3", "1.2.3-", "1.2.3+", "1.2.x"]
)
def test_non_numeric_version_is_a_clear_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="version"):
        version_less(bad, "1.0.0")
    with pytest.raises(ValueError, match="version"):
        version_less("1.0.0", bad)
