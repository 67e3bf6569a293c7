"""SIP parser: the sample corpus, header-grammar edge cases, stream framing and fuzzing.

The fuzzers hold the parser to its one promise about bad input: whatever bytes arrive, the
only exception is ``SipParseError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.sip import parser as parser_module
from sidecar.sip.parser import (
    DEFAULT_MAX_MESSAGE,
    ContactHeader,
    SipParseError,
    SipRequest,
    SipResponse,
    aor_of,
    is_keepalive,
    message_length,
    parse_message,
    parse_register_traffic,
    sniff_method,
)

CORPUS = Path(__file__).parent / "sip_corpus"
VALID = sorted((CORPUS / "valid").glob("*.sip"))
MALFORMED = sorted((CORPUS / "malformed").glob("*.sip"))
EXPECTED = json.loads((CORPUS / "valid" / "expected.json").read_text(encoding="utf-8"))
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def message(
    *headers: str, start: str = "REGISTER sip:example.com SIP/2.0", body: str = ""
) -> bytes:
    """A message from header lines; Call-ID, CSeq, Via and To are added unless given."""
    names = {h.split(":", 1)[0].strip().lower() for h in headers}
    base = []
    if not names & {"via", "v"}:
        base.append("Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKdefault")
    if not names & {"to", "t"}:
        base.append("To: <sip:alice@example.com>")
    if not names & {"call-id", "i"}:
        base.append("Call-ID: default-call")
    if not names & {"cseq"}:
        method = start.split(" ", 1)[0] if not start.startswith("SIP/") else "REGISTER"
        base.append(f"CSeq: 1 {method}")
    lines = [start, *base, *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def contacts_of(*headers: str) -> list[ContactHeader]:
    return parse_message(message(*headers)).contacts


# --- corpus -------------------------------------------------------------------------------------
def test_corpus_is_present() -> None:
    assert len(VALID) >= 10
    assert len(MALFORMED) >= 50
    assert {p.stem for p in VALID} == set(EXPECTED)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_corpus_parses_to_expected_fields(path: Path) -> None:
    msg = parse_message(path.read_bytes())
    for name, want in EXPECTED[path.stem].items():
        got = getattr(msg, name)
        if name == "body":
            assert got.decode("latin-1") == want
        elif name == "contacts":
            assert len(got) == len(want)
            for contact, fields in zip(got, want, strict=True):
                for field_name, value in fields.items():
                    assert getattr(contact, field_name) == value, (field_name, contact)
        else:
            assert got == want, name


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p.stem)
def test_malformed_corpus_raises_only_parse_error(path: Path) -> None:
    data = path.read_bytes()
    with pytest.raises(SipParseError):
        parse_message(data)
    # The cheap paths may skip or accept more, but they never raise anything else.
    for call in (parse_register_traffic, sniff_method, message_length):
        with contextlib.suppress(SipParseError):
            call(data)


def test_parse_error_is_a_value_error() -> None:
    assert issubclass(SipParseError, ValueError)


# --- header names -------------------------------------------------------------------------------
def test_compact_forms_are_understood() -> None:
    data = message(
        "v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKc",
        "f: <sip:alice@example.com>;tag=1",
        "t: <sip:alice@example.com>",
        "i: compact-1",
        "CSeq: 9 REGISTER",
        "m: <sip:alice@10.0.0.1>",
        "k: path",
        "s: subject",
        "c: text/plain",
        "e: gzip",
        "o: reg",
        "l: 4",
        body="abcd",
    )
    msg = parse_message(data)
    assert msg.call_id == "compact-1"
    assert msg.via_branch == "z9hG4bKc"
    assert msg.contacts[0].uri == "sip:alice@10.0.0.1"
    assert msg.content_length == 4
    assert msg.body == b"abcd"


def test_header_names_are_case_insensitive_and_allow_space_before_colon() -> None:
    data = message(
        "VIA : SIP/2.0/udp 10.0.0.1;branch=z9hG4bKx",
        "call-id: lower-1",
        "cseq: 4 REGISTER",
        "cOnTaCt: <sip:a@10.0.0.1>",
        "M: <sip:b@10.0.0.1>",
        "EXPIRES: 60",
        "user-agent: Phone/1.0",
    )
    msg = parse_message(data)
    assert (msg.call_id, msg.cseq, msg.expires_header) == ("lower-1", 4, 60)
    assert msg.via_transport == "UDP"
    assert [c.uri for c in msg.contacts] == ["sip:a@10.0.0.1", "sip:b@10.0.0.1"]
    assert msg.user_agent == "Phone/1.0"


def test_folded_lines_are_joined() -> None:
    data = message(
        "Via: SIP/2.0/UDP 10.0.0.1:5060",
        " ;branch=z9hG4bKfold",
        "Contact: <sip:a@10.0.0.1>;expires=60,",
        "\t<sip:b@10.0.0.1>",
        "   ;q=0.5",
        "Expires:",
        " 120",
    )
    msg = parse_message(data)
    assert msg.via_branch == "z9hG4bKfold"
    assert [(c.uri, c.expires, c.q) for c in msg.contacts] == [
        ("sip:a@10.0.0.1", 60, -1),
        ("sip:b@10.0.0.1", None, 500),
    ]
    assert msg.expires_header == 120


def test_unknown_headers_are_skipped_but_must_be_tokens() -> None:
    ok = message("X-Weird.Header!%*_+`'~: anything at all", "Contact: <sip:a@b>")
    assert parse_message(ok).contacts[0].uri == "sip:a@b"
    with pytest.raises(SipParseError):
        parse_message(message("X-Bad(Name): 1"))


def test_repeated_identical_single_headers_are_tolerated() -> None:
    msg = parse_message(message("Call-ID: same", "i: same", "Content-Length: 0", "l: 0"))
    assert msg.call_id == "same"


# --- Contact ------------------------------------------------------------------------------------
def test_contact_params_are_typed_and_kept_raw() -> None:
    (c,) = contacts_of(
        'Contact: "Alice" <sip:alice@10.0.0.1:5062;transport=tcp>;expires=600;q=0.7;'
        'methods="INVITE,MESSAGE";+sip.instance="<urn:uuid:0123-abcd>";reg-id=2;'
        "Custom-Flag;x=y"
    )
    assert c.uri == "sip:alice@10.0.0.1:5062;transport=tcp"
    assert c.display == "Alice"
    assert (c.expires, c.q, c.reg_id) == (600, 700, 2)
    assert c.methods == "INVITE,MESSAGE"
    assert c.instance == "<urn:uuid:0123-abcd>"
    assert c.params == {
        "expires": "600",
        "q": "0.7",
        "methods": '"INVITE,MESSAGE"',
        "+sip.instance": '"<urn:uuid:0123-abcd>"',
        "reg-id": "2",
        "custom-flag": None,
        "x": "y",
    }


def test_contact_without_params_has_defaults() -> None:
    (c,) = contacts_of("Contact: <sip:a@b>")
    assert c == ContactHeader("sip:a@b", None, None, -1, None, None, 0, {})


@pytest.mark.parametrize(
    ("text", "q"),
    [("0", 0), ("0.", 0), ("0.5", 500), ("0.05", 50), ("0.123", 123), ("1", 1000), ("1.000", 1000)],
)
def test_q_values_become_thousandths(text: str, q: int) -> None:
    (c,) = contacts_of(f"Contact: <sip:a@b>;q={text}")
    assert c.q == q


def test_display_names_with_commas_quotes_and_tokens() -> None:
    contacts = contacts_of(
        'Contact: "Doe, Jane \\"JD\\"" <sip:jane@10.0.0.1>, Bob Smith <sip:bob@10.0.0.2>, '
        "<sip:carol@10.0.0.3>, sip:dave@10.0.0.4;expires=30"
    )
    assert [(c.display, c.uri, c.expires) for c in contacts] == [
        ('Doe, Jane "JD"', "sip:jane@10.0.0.1", None),
        ("Bob Smith", "sip:bob@10.0.0.2", None),
        (None, "sip:carol@10.0.0.3", None),
        (None, "sip:dave@10.0.0.4", 30),
    ]


def test_angle_brackets_keep_commas_semicolons_and_uri_params_inside() -> None:
    contacts = contacts_of(
        "Contact: <sip:a@10.0.0.1;expires=5;lr?X-H=a,b;c>;expires=60, <sip:b@10.0.0.2;q=0.1>"
    )
    assert contacts[0].uri == "sip:a@10.0.0.1;expires=5;lr?X-H=a,b;c"
    assert contacts[0].expires == 60
    assert contacts[1].uri == "sip:b@10.0.0.2;q=0.1"
    assert (contacts[1].expires, contacts[1].q) == (None, -1)


def test_quoted_param_values_may_hold_separators() -> None:
    (c,) = contacts_of('Contact: <sip:a@b>;+sip.instance="<urn:x;y,z>";methods="A;B,C"')
    assert c.instance == "<urn:x;y,z>"
    assert c.methods == "A;B,C"


def test_whitespace_around_param_separators() -> None:
    (c,) = contacts_of("Contact:   <sip:a@b>  ;  expires = 45 ; q = 0.2  ")
    assert (c.expires, c.q) == (45, 200)


def test_several_contact_headers_keep_message_order() -> None:
    contacts = contacts_of(
        "Contact: <sip:1@h>, <sip:2@h>", "Max-Forwards: 70", "m: <sip:3@h>", "Contact: <sip:4@h>"
    )
    assert [c.uri for c in contacts] == ["sip:1@h", "sip:2@h", "sip:3@h", "sip:4@h"]


def test_wildcard_contact() -> None:
    msg = parse_message(message("Contact: *", "Expires: 0"))
    assert msg.contact_wildcard is True
    assert msg.contacts == []
    assert msg.expires_header == 0
    assert parse_message(message("Contact: <sip:a@b>")).contact_wildcard is False


def test_delta_seconds_are_capped_and_leading_zeros_ignored() -> None:
    msg = parse_message(message("Expires: 99999999999999999999", "Contact: <sip:a@b>;expires=0060"))
    assert msg.expires_header == 2**32 - 1
    assert msg.contacts[0].expires == 60
    hostile = "9" * 5000  # longer than int()'s default digit limit
    msg = parse_message(message(f"Expires: {hostile}", f"Contact: <sip:a@b>;expires={hostile}"))
    assert msg.expires_header == msg.contacts[0].expires == 2**32 - 1


def test_no_contact_header_means_a_query() -> None:
    msg = parse_message(message())
    assert msg.contacts == []
    assert msg.contact_wildcard is False


# --- Via, CSeq, To, Path, other fields ----------------------------------------------------------
def test_top_via_fields() -> None:
    msg = parse_message(
        message(
            "Via: SIP / 2.0 / tcp 10.0.0.9 : 5070 ;branch=z9hG4bKtop;received=203.0.113.5;"
            "rport=41000, SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKsecond",
            "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKthird",
        )
    )
    assert msg.via_transport == "TCP"
    assert msg.via_sent_by == "10.0.0.9:5070"
    assert msg.via_branch == "z9hG4bKtop"
    assert msg.via_received == "203.0.113.5"
    assert msg.via_rport == 41000


def test_via_without_branch_rport_or_port() -> None:
    msg = parse_message(message("Via: SIP/2.0/UDP host.example.com"))
    assert (msg.via_sent_by, msg.via_branch, msg.via_rport) == ("host.example.com", None, None)
    msg = parse_message(message("Via: SIP/2.0/UDP [2001:db8::1]:5060;rport;branch=z9hG4bK6"))
    assert (msg.via_sent_by, msg.via_rport) == ("[2001:db8::1]:5060", 0)


def test_cseq_number_and_method() -> None:
    msg = parse_message(message("CSeq:   2147483647   REGISTER"))
    assert (msg.cseq, msg.cseq_method) == (2**31 - 1, "REGISTER")


@pytest.mark.parametrize(
    ("uri", "aor"),
    [
        ("sip:alice@example.com", "alice@example.com"),
        ("sip:Alice@EXAMPLE.com:5080;transport=tcp", "Alice@example.com"),
        ("sips:bob:secret@example.com", "bob@example.com"),
        ("sip:+15551234;npdi;rn=x@gw.example.com;user=phone", "+15551234;npdi;rn=x@gw.example.com"),
        ("sip:example.com", "example.com"),
        ("sip:carol@[2001:DB8::1]:5060", "carol@[2001:db8::1]"),
        ("sip:dave@example.com?Subject=hi", "dave@example.com"),
        ("sip:first%20last%40x@example.com", "first last@x@example.com"),
        ("tel:+15551234;phone-context=example.com", "+15551234"),
    ],
)
def test_aor_of(uri: str, aor: str) -> None:
    assert aor_of(uri) == aor


def test_aor_refuses_escaped_control_characters() -> None:
    with pytest.raises(SipParseError):
        aor_of("sip:evil%0d%0aX@example.com")


def test_to_header_gives_raw_uri_and_aor() -> None:
    msg = parse_message(message('To: "Alice A." <sip:Alice@Example.COM:5060;user=phone>;tag=x'))
    assert msg.to_uri == "sip:Alice@Example.COM:5060;user=phone"
    assert msg.aor == "Alice@example.com"
    msg = parse_message(message("t: sip:bob@example.com;tag=abc"))
    assert (msg.to_uri, msg.aor) == ("sip:bob@example.com", "bob@example.com")


def test_path_headers_keep_order() -> None:
    msg = parse_message(
        message("Path: <sip:p1.example.net;lr>", "Path: <sip:p2.example.net;lr>,<sip:p3;lr>")
    )
    assert msg.path == "<sip:p1.example.net;lr>,<sip:p2.example.net;lr>,<sip:p3;lr>"
    assert parse_message(message()).path is None


def test_allow_and_user_agent() -> None:
    msg = parse_message(message("Allow: INVITE, ACK", "Allow: BYE", "User-Agent: Linphone 5.2"))
    assert msg.allow == "INVITE, ACK,BYE"
    assert msg.user_agent == "Linphone 5.2"


# --- start line, body, framing of a datagram ----------------------------------------------------
def test_responses_with_various_reason_phrases() -> None:
    for start, status, reason in [
        ("SIP/2.0 100 Trying", 100, "Trying"),
        ("SIP/2.0 200 OK", 200, "OK"),
        ("SIP/2.0 423 Interval Too Brief", 423, "Interval Too Brief"),
        ("SIP/2.0 500", 500, ""),
    ]:
        msg = parse_message(message(start=start))
        assert isinstance(msg, SipResponse)
        assert (msg.status, msg.reason) == (status, reason)


def test_request_fields() -> None:
    msg = parse_message(message(start="REGISTER sips:registrar.example.com;transport=tls SIP/2.0"))
    assert isinstance(msg, SipRequest)
    assert (msg.method, msg.uri) == ("REGISTER", "sips:registrar.example.com;transport=tls")


def test_body_is_cut_at_content_length_or_runs_to_the_end() -> None:
    msg = parse_message(message("Content-Length: 3", body="abcdef"))
    assert (msg.content_length, msg.body) == (3, b"abc")
    msg = parse_message(message(body="abcdef"))
    assert (msg.content_length, msg.body) == (None, b"abcdef")


def test_leading_crlf_is_skipped_and_buffer_types_accepted() -> None:
    data = b"\r\n\r\n" + message()
    assert parse_message(data).call_id == "default-call"
    assert parse_message(bytearray(data)).call_id == "default-call"
    assert parse_message(memoryview(data)).call_id == "default-call"
    with pytest.raises(SipParseError):
        parse_message(data.decode())  # type: ignore[arg-type]


def test_max_size_is_enforced() -> None:
    data = message("X-Pad: " + "a" * 2000)
    assert parse_message(data, max_size=4096).call_id == "default-call"
    with pytest.raises(SipParseError):
        parse_message(data, max_size=1024)


def test_utf8_and_latin1_display_names() -> None:
    (c,) = parse_message(message('Contact: "Zoë 日本" <sip:z@h>')).contacts
    assert c.display == "Zoë 日本"
    latin1 = message('Contact: "Zo@" <sip:z@h>').replace(b"Zo@", b"Zo\xeb")
    (c,) = parse_message(latin1).contacts
    assert c.display == "Zoë"


# --- cheap paths --------------------------------------------------------------------------------
def test_sniff_method() -> None:
    assert sniff_method(message()) == "REGISTER"
    assert sniff_method(message(start="INVITE sip:bob@example.com SIP/2.0")) == "INVITE"
    assert sniff_method(message("CSeq: 5 OPTIONS", start="SIP/2.0 200 OK")) == "OPTIONS"
    assert sniff_method(b"\r\n" + message(start="SIP/2.0 401 Unauthorized")) == "REGISTER"
    for junk in (b"", b"hello world\r\n", b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n"):
        with pytest.raises(SipParseError):
            sniff_method(junk)


def test_parse_register_traffic_skips_everything_else() -> None:
    assert parse_register_traffic(b"\r\n\r\n") is None
    assert parse_register_traffic(b"\r\n") is None
    assert parse_register_traffic(message(start="INVITE sip:bob@example.com SIP/2.0")) is None
    assert parse_register_traffic(message("CSeq: 1 INVITE", start="SIP/2.0 180 Ringing")) is None
    assert parse_register_traffic(message()).call_id == "default-call"
    assert parse_register_traffic(message(start="SIP/2.0 200 OK")).status == 200
    # Skipping is cheap because it does not validate what it skips.
    assert parse_register_traffic(b"OPTIONS sip:x SIP/2.0\r\nbroken\r\n\r\n") is None


def test_is_keepalive() -> None:
    assert is_keepalive(b"\r\n\r\n") and is_keepalive(b"\r\n")
    assert not is_keepalive(b"") and not is_keepalive(message())


# --- TCP framing --------------------------------------------------------------------------------
def test_message_length_partial_exact_and_concatenated() -> None:
    first = message("Content-Length: 5", body="hello")
    second = message("Call-ID: second", "l: 0")
    stream = first + second
    assert message_length(b"") is None
    assert message_length(first[:10]) is None  # start line incomplete
    assert message_length(first[:60]) is None  # headers incomplete
    assert message_length(first[:-2]) is None  # body incomplete
    assert message_length(first) == len(first)
    assert message_length(stream) == len(first)
    assert message_length(stream[len(first):]) == len(second)
    assert parse_message(stream[len(first):]).call_id == "second"


def test_message_length_counts_leading_keepalives() -> None:
    msg = message()
    assert message_length(b"\r\n\r\n") == 4
    assert message_length(b"\r\n") == 2
    assert message_length(b"\r\n\r\n" + msg) == 4 + len(msg)
    assert message_length(b"\r\n\r\n" + msg[:20]) is None


def test_message_length_missing_content_length_means_empty_body() -> None:
    msg = message()
    assert message_length(msg + b"REGISTER") == len(msg)


def test_message_length_rejects_garbage_and_oversize() -> None:
    with pytest.raises(SipParseError):
        message_length(b"GET / HTTP/1.1\r\n")  # start line judged as soon as it is complete
    with pytest.raises(SipParseError):
        message_length(b"REGISTER sip:x SIP/2.0\r\n" + b"X: y\r\n" * 2000, max_size=4096)
    with pytest.raises(SipParseError):
        message_length(message("Content-Length: 70000"))
    with pytest.raises(SipParseError):
        message_length(message("Content-Length: 1", "l: 2"))
    with pytest.raises(SipParseError):
        message_length(message("Content-Length: x"))
    with pytest.raises(SipParseError):  # refused before the body arrives
        message_length(message("Content-Length: 3000"), max_size=2048)


def test_stream_fed_in_random_chunks_yields_every_message() -> None:
    messages = [
        message(f"Call-ID: stream-{i}", f"Content-Length: {i}", body="x" * i) for i in range(20)
    ]
    stream = b"".join(b"\r\n\r\n" * (i % 2) + m for i, m in enumerate(messages))
    rng = random.Random(7)
    buffer = bytearray()
    got = []
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 90)
        buffer += stream[pos : pos + step]
        pos += step
        while (n := message_length(buffer)) is not None:
            frame = bytes(buffer[:n])
            del buffer[:n]
            parsed = parse_register_traffic(frame)
            if parsed is not None:
                got.append((parsed.call_id, parsed.body))
    assert got == [(f"stream-{i}", b"x" * i) for i in range(20)]
    assert not buffer


def test_default_max_message_is_64k() -> None:
    assert DEFAULT_MAX_MESSAGE == 64 * 1024


# --- round trip of generated REGISTERs ----------------------------------------------------------
_user = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.!~*'+", min_size=1, max_size=12)
_host = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.just("[2001:db8::5]"),
)
_display = st.one_of(
    st.none(),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=15),
)


@st.composite
def _contacts(draw: st.DrawFn) -> list[dict]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        port = draw(st.one_of(st.none(), st.integers(1, 65535)))
        uri = f"sip:{draw(_user)}@{draw(_host)}" + (f":{port}" if port else "")
        if draw(st.booleans()):
            uri += ";transport=tcp"
        out.append(
            {
                "uri": uri,
                "display": draw(_display),
                "expires": draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
                "q": draw(st.one_of(st.just(-1), st.integers(0, 1000))),
                "instance": draw(st.one_of(st.none(), st.uuids().map(lambda u: f"<urn:uuid:{u}>"))),
                "reg_id": draw(st.integers(0, 5)),
            }
        )
    return out


def _render_contact(c: dict, rng: random.Random) -> str:
    text = f"<{c['uri']}>"
    if c["display"] is not None:
        escaped = c["display"].replace("\\", "\\\\").replace('"', '\\"')
        text = f'"{escaped}" {text}'
    params = []
    if c["expires"] is not None:
        params.append(f"expires={c['expires']}")
    if c["q"] != -1:
        params.append(f"q={c['q'] // 1000}.{c['q'] % 1000:03d}")
    if c["instance"] is not None:
        params.append(f'+sip.instance="{c["instance"]}"')
    if c["reg_id"]:
        params.append(f"reg-id={c['reg_id']}")
    rng.shuffle(params)
    return text + "".join(rng.choice([";", " ; ", ";"]) + p for p in params)


@FUZZ
@given(_contacts(), st.integers(0, 2**31 - 1), st.randoms(use_true_random=False))
def test_generated_registers_round_trip(
    contacts: list[dict], cseq: int, rng: random.Random
) -> None:
    rendered = [_render_contact(c, rng) for c in contacts]
    headers = []
    while rendered:
        take = rng.randint(1, len(rendered))
        name = rng.choice(["Contact", "m", "CONTACT", "contact "])
        value = rendered[0]
        for item in rendered[1:take]:  # sometimes fold the list between elements
            value += rng.choice([", ", ",", " , ", ",\r\n\t", "\r\n ,"]) + item
        headers.append(f"{name}: {value}")
        del rendered[:take]
    headers.append(f"{rng.choice(['CSeq', 'cseq'])}: {cseq} REGISTER")
    msg = parse_message(message(*headers))
    assert msg.cseq == cseq
    got = [
        {
            "uri": c.uri,
            "display": c.display,
            "expires": c.expires,
            "q": c.q,
            "instance": c.instance,
            "reg_id": c.reg_id,
        }
        for c in msg.contacts
    ]
    assert got == contacts


# --- fuzzing ------------------------------------------------------------------------------------
def _only_parse_errors(data: bytes) -> None:
    for call in (parse_message, parse_register_traffic, sniff_method, message_length):
        with contextlib.suppress(SipParseError):
            call(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _only_parse_errors(data)


@FUZZ
@given(st.lists(st.sampled_from(
    [b"REGISTER ", b"SIP/2.0", b" 200 OK", b"\r\n", b"\n", b"\r", b":", b";", b",", b"<", b">",
     b'"', b"\\", b" ", b"\t", b"sip:", b"@", b"Via", b"Contact", b"m", b"CSeq", b"Call-ID",
     b"To", b"Expires", b"l", b"Content-Length", b"=", b"expires", b"q", b"0.5", b"*",
     b"+sip.instance", b"reg-id", b"1", b"99999999999", b"[", b"]", b"\x00", b"\xff", b"\xc3"]
), max_size=80))
def test_fuzz_sip_shaped_tokens(parts: list[bytes]) -> None:
    _only_parse_errors(b"".join(parts))


_SEEDS = [p.read_bytes() for p in VALID]
_JUNK = [b"\r\n", b"\n", b"\r", b" ", b"\t", b",", b";", b"<", b">", b'"', b"\\", b":", b"=", b"*",
         b"\x00", b"\xff", b"\r\n ", b"9" * 12, b"@"]


@FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.lists(
        st.tuples(st.sampled_from(["flip", "insert", "delete", "dup_line", "drop_line", "cut"]),
                  st.integers(0, 10**6), st.sampled_from(_JUNK), st.integers(0, 255)),
        min_size=1, max_size=6,
    ),
)
def test_fuzz_mutated_valid_messages(seed: bytes, edits: list) -> None:
    data = bytearray(seed)
    for kind, where, junk, byte in edits:
        if not data:
            break
        i = where % len(data)
        if kind == "flip":
            data[i] = byte
        elif kind == "insert":
            data[i:i] = junk
        elif kind == "delete":
            del data[i : i + 1 + byte % 8]
        elif kind == "cut":
            del data[i:]
        else:
            lines = bytes(data).split(b"\r\n")
            j = where % len(lines)
            if kind == "dup_line":
                lines.insert(j, lines[j])
            else:
                del lines[j]
            data = bytearray(b"\r\n".join(lines))
    data = bytes(data)
    try:
        msg = parse_message(data)
    except SipParseError:
        msg = None
    if msg is not None:  # a surviving mutation still yields a well-typed message
        assert isinstance(msg.call_id, str) and msg.call_id
        assert 0 <= msg.cseq <= 2**31 - 1
        assert isinstance(msg.aor, str) and msg.aor
        for c in msg.contacts:
            assert c.uri and (c.expires is None or 0 <= c.expires <= 2**32 - 1)
            assert c.q == -1 or 0 <= c.q <= 1000
    _only_parse_errors(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_bytes_inside_a_header_value(junk: bytes) -> None:
    assume(b"\r\n\r\n" not in junk)
    data = message("Contact: " + junk.decode("latin-1"))
    _only_parse_errors(data)


def _mostly(good: list[str], bad: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(good * 8 + bad)


_PARAM_PIECE = st.tuples(
    _mostly(["", " ", "\t "], ["\u00a0"]),
    _mostly(["expires", "q", "+sip.instance", "reg-id", "Lr", "x"], ["é", "a b", "", "<"]),
    st.sampled_from(["", "=", " = ", "=\t"]),
    _mostly(["3600", "0.5", '"<urn:uuid:1>"', "[::1]:5", "tcp"],
            ['"<u;v>"', '"a"b"', "", "x>", "\u00a0"]),
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_mostly(["", " "], ["x", "\t"]), st.lists(_PARAM_PIECE, max_size=4))
def test_split_fast_path_agrees_with_the_regex_path(lead: str, pieces: list) -> None:
    """``str.split`` handles the usual params; when it answers, the regexes must agree."""
    rest = lead + "".join(f";{ws}{name}{eq}{value if eq else ''}" for ws, name, eq, value in pieces)
    fast = parser_module._split_params(rest)
    assume(fast is not None)
    end = parser_module._PARAM_RUN.match(rest).end()
    assert not rest[end:].strip(" \t")  # the regex path also consumes the whole text
    slow = {n.lower(): v or None for n, v in parser_module._PARAM.findall(rest, 0, end)}
    assert fast == slow


# --- fast paths against the general code --------------------------------------------------------
# parse_message tries stricter patterns for the everyday shapes first and makes its result
# objects without __init__; neither may change what a message parses to.
_FAST_PATTERNS = (
    "_FAST_TOP_VIA", "_FAST_VIA", "_FAST_ADDRESS", "_FAST_NAME_ADDR", "_FAST_LIST_ELEMENT",
    "_FAST_PARAMS", "_FAST_REQUEST_START", "_FAST_AOR",
)


@contextlib.contextmanager
def _general_paths_only():
    saved = {name: getattr(parser_module, name) for name in _FAST_PATTERNS}
    never = re.compile(r"(?!)")
    try:
        for name in saved:
            setattr(parser_module, name, never)
        yield
    finally:
        for name, pattern in saved.items():
            setattr(parser_module, name, pattern)


def _outcome(data: bytes) -> object:
    try:
        return parse_message(data)
    except SipParseError:
        return SipParseError


def _seldom(good: list, bad: list) -> st.SearchStrategy:
    """One of ``good``, or about one time in thirty one of ``bad``."""
    return st.sampled_from(good * (30 * len(bad) // len(good) + 1) + bad)


def _param_run(pairs: list[str]) -> st.SearchStrategy[str]:
    piece = st.tuples(
        _seldom([";"], [" ;", "; ", ";;", ";\t"]),
        _seldom(pairs, ["é", "", "a b", "x=", 'x="a;b"', 'x="a\\"b"', "x=\u00a0", "x = 1"]),
    )
    return st.lists(piece, max_size=4).map(lambda ps: "".join(sep + p for sep, p in ps))


_VIA_PARAMS = ["branch=z9hG4bK1", "rport", "rport=5060", "received=192.0.2.9", "RPORT=0",
               "Branch=X", "ttl=1", "rport=65536", "rport=²"]
_CONTACT_PARAMS = ["expires=3600", "expires=0", "q=0.5", "q=1", '+sip.instance="<urn:uuid:1>"',
                   "reg-id=1", 'methods="INVITE,BYE"', "ob", "Expires=007", "tag=a1", "lr",
                   'expires="60"', "q=2", "reg-id=x", "expires=", "expires=99999999999"]
_URIS = _seldom(
    ["sip:u7@192.0.2.1", "sips:Bob@Example.COM:5061", "sip:a:pw@h;transport=tcp", "sip:h.example",
     "tel:+4930123", "sip:u;x=1@h?y=z", "sip:u%41@h", "sip:[2001:db8::1]:5060", "SIP:u@H"],
    ["sip:", "sip:@h", "sip:u%00@h", "x", "1sip:u@h", "sip:u@[::1", "sip:u@", "sip:u@:5"],
)


def _via_value(draw: st.DrawFn) -> str:
    value = draw(_seldom(
        ["SIP/2.0/UDP ", "SIP/2.0/TLS "], ["sip/2.0/udp ", "SIP / 2.0/UDP ", "SIP/2.0/UDP\t"]
    ))
    value += draw(_seldom(["192.0.2.1", "[2001:db8::1]", "pc.example"], ["é", "", "a b"]))
    value += draw(_seldom(["", ":5060", ":65535", ":65536"], [":99999", ":123456", ": 5060"]))
    value += draw(_param_run(_VIA_PARAMS))
    return value + draw(_seldom(["", ",SIP/2.0/UDP 10.0.0.1", " , x"], [" junk", ";"]))


@st.composite
def _address_value(draw: st.DrawFn) -> str:
    value = ""
    for i in range(draw(_seldom([1], [2, 3]))):
        if i:
            value += draw(_seldom([",", ", "], [";", " ,,"]))
        display = draw(_seldom(["", "", '"Phone 7" ', "Bob "], ['"a,b" ', '"x', "<"]))
        uri = draw(_URIS)
        value += draw(_seldom([f"{display}<{uri}>"], [uri, f"< {uri} >"]))
        value += draw(_param_run(_CONTACT_PARAMS))
    return value


@st.composite
def _fast_path_message(draw: st.DrawFn) -> bytes:
    headers = [f"Via: {_via_value(draw)}"]
    headers += [f"To: {draw(_address_value())}", f"Contact: {draw(_address_value())}"]
    if draw(st.booleans()):
        headers.append(f"Path: {draw(_address_value())}")
    start = draw(_seldom(
        ["REGISTER sip:example.com SIP/2.0", "SIP/2.0 200 OK", "REGISTER sips:[::1] SIP/2.0"],
        ["register sip:example.com sip/2.0", "REGISTER sip:a\tb SIP/2.0", "REGISTER x SIP/2.0",
         "REGISTER  sip:x SIP/2.0", "REGISTER sip:x SIP/2.0 ", "REG@ISTER sip:x SIP/2.0",
         "SIP/2.0 2\u00b20 OK"],
    ))
    return message(*headers, start=start)


@FUZZ
@given(_fast_path_message())
def test_fast_paths_read_what_the_general_code_reads(data: bytes) -> None:
    fast = _outcome(data)
    with _general_paths_only():
        general = _outcome(data)
    assert fast == general


@FUZZ
@given(st.one_of(
    st.text("sipSIPtel:@%;?[]:.aZ09-+é \t<>\"", max_size=30),
    st.tuples(st.sampled_from(["sip:", "sips:", "tel:", "SIP:"]),
              st.text("u:@%;?[]:.aZ09-+é", max_size=25)).map("".join),
))
def test_aor_fast_path_agrees_with_the_general_code(uri: str) -> None:
    outcomes = []
    for call in (aor_of, parser_module._aor_general):
        try:
            outcomes.append(call(uri))
        except SipParseError:
            outcomes.append(SipParseError)
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_parsed_objects_hold_every_field(path: Path) -> None:
    """The result objects are built without __init__: each must equal one built with it."""
    msg = parse_message(path.read_bytes())
    assert msg == type(msg)(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)})
    for c in msg.contacts:
        assert c == ContactHeader(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)})


def test_header_block_ending_with_the_data_or_before_a_body() -> None:
    for body in ("", "a\r\n\r\n", "\r\n\r\n"):
        data = message(f"Content-Length: {len(body)}", body=body)
        assert parse_message(data).body == body.encode()
    data = message(body="\r\nX: y\r\n\r\n")  # an empty line ends the headers, even at the end
    assert parse_message(data).body == b"\r\nX: y\r\n\r\n"


def test_status_code_digits_that_int_refuses_are_a_parse_error() -> None:
    with pytest.raises(SipParseError):
        parse_message(message(start="SIP/2.0 2\u00b20 OK"))
