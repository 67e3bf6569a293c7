"""REGISTER transaction pairing: challenges, duplicates, timeouts, bounds, NAT and expiry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model import FLAG_NAT
from sidecar.sip.parser import parse_message, parse_register_traffic
from sidecar.sip.registration import (
    METHOD_BITS,
    Binding,
    RegistrationOutcome,
    RegistrationTracker,
    binding_flags,
    format_received,
    format_socket,
    methods_bitmask,
)

PHONE = ("udp", "192.168.1.20", 5062)
PROXY = ("udp", "127.0.0.1", 5060)
NAT_PHONE = ("udp", "203.0.113.7", 40123)
T0 = 1_700_000_000.25


def register(
    *,
    cseq: int = 1,
    branch: str = "z9hG4bK-1",
    call_id: str = "call-1@192.168.1.20",
    contacts: tuple[str, ...] = ("<sip:1001@192.168.1.20:5062>",),
    extra: tuple[str, ...] = (),
    aor: str = "sip:1001@example.com",
) -> bytes:
    lines = [
        "REGISTER sip:example.com SIP/2.0",
        f"Via: SIP/2.0/UDP 192.168.1.20:5062;branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <{aor}>;tag=from1",
        f"To: <{aor}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {c}" for c in contacts),
        "User-Agent: Yealink SIP-T46S 66.86.0.15",
        *extra,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(
    status: int,
    *,
    cseq: int = 1,
    branch: str = "z9hG4bK-1",
    call_id: str = "call-1@192.168.1.20",
    contacts: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
    method: str = "REGISTER",
) -> bytes:
    reason = {100: "Trying", 200: "OK", 202: "Accepted", 401: "Unauthorized"}.get(status, "X")
    lines = [
        f"SIP/2.0 {status} {reason}",
        f"Via: SIP/2.0/UDP 192.168.1.20:5062;branch={branch};rport=5062;received=192.168.1.20",
        "From: <sip:1001@example.com>;tag=from1",
        "To: <sip:1001@example.com>;tag=to1",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *(f"Contact: {c}" for c in contacts),
        *extra,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def feed(tracker: RegistrationTracker, data: bytes, now: float = T0, src=PHONE, dst=PROXY):
    """Feed one message the way a capture does: REGISTERs from src, responses back to it."""
    msg = parse_message(data)
    if data.startswith(b"SIP/2.0"):
        return tracker.feed(msg, dst, src, now)
    return tracker.feed(msg, src, dst, now)


def one(outcomes: list[RegistrationOutcome]) -> RegistrationOutcome:
    assert len(outcomes) == 1
    return outcomes[0]


# --- pairing ------------------------------------------------------------------------------------
def test_challenge_then_authenticated_register_then_ok() -> None:
    tracker = RegistrationTracker()
    assert feed(tracker, register(cseq=1, branch="z9hG4bK-a")) == []
    assert feed(tracker, response(100, cseq=1, branch="z9hG4bK-a")) == []
    assert tracker.pending == 1
    assert feed(tracker, response(401, cseq=1, branch="z9hG4bK-a")) == []
    assert tracker.pending == 0
    assert tracker.stats.rejected == 1
    auth = ('Authorization: Digest username="1001", realm="example.com", nonce="n"',)
    assert feed(tracker, register(cseq=2, branch="z9hG4bK-b", extra=auth), T0 + 0.05) == []
    ok = response(200, cseq=2, branch="z9hG4bK-b",
                  contacts=("<sip:1001@192.168.1.20:5062>;expires=3600",))
    out = one(feed(tracker, ok, T0 + 0.1))
    assert out == RegistrationOutcome(
        aor="1001@example.com",
        callid="call-1@192.168.1.20",
        cseq=2,
        time=T0 + 0.1,
        received=None,
        socket="udp:127.0.0.1:5060",
        user_agent="Yealink SIP-T46S 66.86.0.15",
        path=None,
        bindings=[
            Binding("sip:1001@192.168.1.20:5062", int(T0 + 0.1) + 3600, -1, None, None, 0, True)
        ],
        wildcard_removed=False,
        complete=True,
    )
    assert tracker.pending == 0
    assert tracker.stats.outcomes == 1


def test_provisional_responses_leave_the_transaction_open() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register())
    for _ in range(3):
        assert feed(tracker, response(100)) == []
    assert tracker.pending == 1
    assert one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20:5062>",))))


@pytest.mark.parametrize("status", [301, 403, 407, 423, 480, 500, 503, 603])
def test_error_finals_produce_nothing_and_free_the_entry(status: int) -> None:
    tracker = RegistrationTracker()
    feed(tracker, register())
    assert feed(tracker, response(status)) == []
    assert tracker.pending == 0
    # A late 2xx for the same transaction must not resurrect it.
    assert feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20:5062>",))) == []


def test_pairing_needs_call_id_cseq_and_branch_to_match() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(cseq=5, branch="z9hG4bK-x"))
    contacts = ("<sip:1001@192.168.1.20:5062>",)
    assert feed(tracker, response(200, cseq=6, branch="z9hG4bK-x", contacts=contacts)) == []
    assert feed(tracker, response(200, cseq=5, branch="z9hG4bK-y", contacts=contacts)) == []
    assert feed(tracker, response(200, cseq=5, branch="z9hG4bK-x", call_id="other",
                                  contacts=contacts)) == []
    assert tracker.stats.unmatched_responses == 3
    assert one(feed(tracker, response(200, cseq=5, branch="z9hG4bK-x", contacts=contacts)))


def test_non_register_traffic_is_ignored() -> None:
    tracker = RegistrationTracker()
    invite = register().replace(b"REGISTER sip", b"INVITE sip").replace(b"1 REGISTER", b"1 INVITE")
    assert feed(tracker, invite) == []
    assert feed(tracker, response(200, method="INVITE", contacts=("<sip:x@y>",))) == []
    assert tracker.pending == 0
    assert tracker.stats.unmatched_responses == 0


# --- duplicates and retransmissions -------------------------------------------------------------
def test_loopback_double_capture_yields_one_outcome() -> None:
    tracker = RegistrationTracker()
    ok = response(200, contacts=("<sip:1001@192.168.1.20:5062>;expires=60",))
    assert feed(tracker, register()) == []
    assert feed(tracker, register()) == []  # the same packet seen on the other direction
    assert len(feed(tracker, ok)) == 1
    assert feed(tracker, ok) == []
    assert tracker.stats.duplicates == 2
    assert tracker.pending == 0


def test_retransmissions_before_and_after_the_final_response() -> None:
    tracker = RegistrationTracker()
    ok = response(200, contacts=("<sip:1001@192.168.1.20:5062>;expires=60",))
    feed(tracker, register(), T0)
    feed(tracker, register(), T0 + 0.5)  # Timer E retransmission
    feed(tracker, register(), T0 + 1.5)
    assert len(feed(tracker, ok, T0 + 1.6)) == 1
    # The 200 was lost on its way; the phone retransmits, the proxy answers again.
    assert feed(tracker, register(), T0 + 3.5) == []
    assert feed(tracker, ok, T0 + 3.6) == []
    assert tracker.pending == 0
    assert tracker.stats.outcomes == 1


def test_register_seen_on_both_legs_of_a_forwarding_proxy_is_one_outcome() -> None:
    tracker = RegistrationTracker()
    contacts = ("<sip:1001@192.168.1.20:5062>;expires=60",)
    feed(tracker, register(branch="z9hG4bK-phone"))
    feed(tracker, register(branch="z9hG4bK-proxy"), src=PROXY, dst=("udp", "127.0.0.2", 5060))
    assert len(feed(tracker, response(200, branch="z9hG4bK-proxy", contacts=contacts))) == 1
    assert feed(tracker, response(200, branch="z9hG4bK-phone", contacts=contacts)) == []
    assert tracker.stats.outcomes == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 3))
def test_any_delivery_pattern_yields_at_most_one_outcome_per_transaction(
    order: list[int], copies: int
) -> None:
    """Three transactions, each message delivered 1-3 times in a random (causal) order."""
    tracker = RegistrationTracker()
    outcomes = []
    answered: set[int] = set()
    for step, pick in enumerate(order):
        tx = pick % 3
        kwargs = {"cseq": tx + 1, "branch": f"z9hG4bK-{tx}"}
        now = T0 + step * 0.01
        for _ in range(copies):
            if pick < 3:
                outcomes += feed(tracker, register(**kwargs), now)
            else:
                ok = response(200, contacts=("<sip:1001@192.168.1.20:5062>",), **kwargs)
                got = feed(tracker, ok, now)
                if got:
                    answered.add(tx)
                outcomes += got
    assert sorted(o.cseq for o in outcomes) == sorted(tx + 1 for tx in answered)
    assert tracker.pending <= 3


# --- timeouts and bounds ------------------------------------------------------------------------
def test_unanswered_register_times_out() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(), T0)
    tracker.expire(T0 + 31.9)
    assert tracker.pending == 1
    tracker.expire(T0 + 32.0)
    assert tracker.pending == 0
    assert tracker.stats.dropped_timeout == 1
    assert feed(tracker, response(200, contacts=("<sip:x@y>",)), T0 + 33) == []
    assert tracker.stats.unmatched_responses == 1


def test_feeding_later_traffic_also_expires_old_transactions() -> None:
    tracker = RegistrationTracker(timeout=5.0)
    feed(tracker, register(cseq=1, branch="z9hG4bK-old"), T0)
    feed(tracker, register(cseq=2, branch="z9hG4bK-new"), T0 + 6)
    assert tracker.pending == 1
    assert tracker.stats.dropped_timeout == 1


def test_pending_table_is_bounded_and_drops_the_oldest() -> None:
    tracker = RegistrationTracker(max_pending=3)
    for i in range(5):
        feed(tracker, register(cseq=i + 1, branch=f"z9hG4bK-{i}"), T0 + i * 0.001)
    assert tracker.pending == 3
    assert tracker.stats.dropped_overflow == 2
    contacts = ("<sip:1001@192.168.1.20:5062>",)
    assert feed(tracker, response(200, cseq=1, branch="z9hG4bK-0", contacts=contacts)) == []
    assert one(feed(tracker, response(200, cseq=5, branch="z9hG4bK-4", contacts=contacts)))


def test_repeat_guard_is_bounded_too() -> None:
    tracker = RegistrationTracker(max_pending=2)
    for i in range(50):
        kwargs = {"cseq": i + 1, "branch": f"z9hG4bK-{i}"}
        feed(tracker, register(**kwargs))
        feed(tracker, response(200, contacts=("<sip:a@b>",), **kwargs))
    assert tracker.stats.outcomes == 50
    assert len(tracker._finished) <= 4


def test_bad_configuration_is_refused() -> None:
    for kwargs in ({"timeout": 0}, {"max_pending": 0}, {"default_expires": -1}):
        with pytest.raises(ValueError):
            RegistrationTracker(**kwargs)


# --- outcome contents ---------------------------------------------------------------------------
def test_wildcard_removal_leaves_no_bindings() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("*",), extra=("Expires: 0",)))
    out = one(feed(tracker, response(200)))
    assert out.bindings == []
    assert out.wildcard_removed is True
    assert out.complete is True
    assert out.received is None


def test_expires_zero_on_the_only_contact_leaves_no_bindings() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("<sip:1001@192.168.1.20:5062>;expires=0",)))
    out = one(feed(tracker, response(200)))
    assert (out.bindings, out.wildcard_removed, out.complete) == ([], False, True)


def test_two_hundred_lists_every_binding_of_the_aor() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("<sip:1001@192.168.1.20:5062>;expires=300",)))
    ok = response(200, contacts=(
        "<sip:1001@192.168.1.20:5062>;expires=300",
        "<sip:1001@10.9.9.9:5060>;expires=1200;q=0.5",
        "<sip:1001@10.8.8.8:5060>;expires=0",  # being removed: not a binding any more
    ))
    out = one(feed(tracker, ok))
    now = int(T0)
    assert out.bindings == [
        Binding("sip:1001@192.168.1.20:5062", now + 300, -1, None, None, 0, True),
        Binding("sip:1001@10.9.9.9:5060", now + 1200, 500, None, None, 0, False),
    ]


def test_query_register_reports_the_current_bindings() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=()))
    out = one(feed(tracker, response(200, contacts=("<sip:1001@10.9.9.9>;expires=100",))))
    assert [(b.uri, b.own) for b in out.bindings] == [("sip:1001@10.9.9.9", False)]
    assert out.received is None
    out_empty = RegistrationTracker()
    feed(out_empty, register(contacts=(), cseq=2))
    assert one(feed(out_empty, response(200, cseq=2))).bindings == []


@pytest.mark.parametrize(
    ("req_param", "req_extra", "ok_param", "delta"),
    [
        (";expires=50", ("Expires: 70",), ";expires=30", 30),  # the 2xx contact param
        (";expires=50", ("Expires: 70",), "", 50),  # else the REGISTER's contact param
        ("", ("Expires: 70",), "", 70),  # else the REGISTER's Expires header
        ("", (), "", 3600),  # else the default
    ],
)
def test_expiry_falls_back_from_reply_to_request_to_default(
    req_param: str, req_extra: tuple[str, ...], ok_param: str, delta: int
) -> None:
    tracker = RegistrationTracker()
    uri = "<sip:1001@192.168.1.20:5062>"
    feed(tracker, register(contacts=(uri + req_param,), extra=req_extra))
    out = one(feed(tracker, response(200, contacts=(uri + ok_param,))))
    assert out.bindings[0].expires_abs == int(T0) + delta


def test_default_expires_is_configurable() -> None:
    tracker = RegistrationTracker(default_expires=600)
    feed(tracker, register())
    out = one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20:5062>",))))
    assert out.bindings[0].expires_abs == int(T0) + 600


def test_outbound_binding_is_matched_by_instance_and_reg_id() -> None:
    tracker = RegistrationTracker()
    instance = '+sip.instance="<urn:uuid:0000-1111>"'
    feed(tracker, register(
        contacts=(f"<sip:1001@192.168.1.20:5062;ob>;reg-id=1;{instance};q=0.9;methods=\"INVITE,BYE\"",),
    ))
    # The registrar reports the flow with another URI spelling but the same instance/reg-id.
    reported = f"<sip:1001@192.168.1.20:5062;ob;x=1>;expires=600;{instance};reg-id=1"
    ok = response(200, contacts=(reported,))
    (binding,) = one(feed(tracker, ok)).bindings
    assert binding.own is True
    assert (binding.instance, binding.reg_id, binding.q) == ("<urn:uuid:0000-1111>", 1, 900)
    assert binding.methods == METHOD_BITS["INVITE"] | METHOD_BITS["BYE"]


def test_methods_come_from_allow_for_own_bindings() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(extra=("Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, X-FOO",)))
    ok = response(200, contacts=("<sip:1001@192.168.1.20:5062>", "<sip:1001@10.9.9.9>"))
    own, other = one(feed(tracker, ok)).bindings
    assert own.methods == 1 | 4 | 2 | 8 | 32 | 256
    assert other.methods is None


def test_uri_match_ignores_case() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("<sip:1001@Phone.Example.com:5062>;expires=20",)))
    out = one(feed(tracker, response(200, contacts=("<sip:1001@phone.example.com:5062>",))))
    assert out.bindings[0].own is True
    assert out.bindings[0].expires_abs == int(T0) + 20


def test_two_hundred_without_contacts_falls_back_to_the_request() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("<sip:1001@192.168.1.20:5062>;expires=120",)))
    out = one(feed(tracker, response(200)))
    assert out.complete is False
    assert [(b.uri, b.expires_abs, b.own) for b in out.bindings] == [
        ("sip:1001@192.168.1.20:5062", int(T0) + 120, True)
    ]


# --- received, socket, path, flags --------------------------------------------------------------
def test_no_nat_when_source_matches_contact() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(), src=PHONE)
    out = one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20:5062>",)), src=PHONE))
    assert out.received is None
    assert binding_flags(out, out.bindings[0]) == 0


def test_nat_when_source_differs_from_contact() -> None:
    tracker = RegistrationTracker()
    feed(tracker, register(), src=NAT_PHONE)
    ok = response(200, contacts=("<sip:1001@192.168.1.20:5062>", "<sip:1001@10.9.9.9>"))
    out = one(feed(tracker, ok, src=NAT_PHONE))
    assert out.received == "sip:203.0.113.7:40123"
    own, other = out.bindings
    assert binding_flags(out, own) == FLAG_NAT
    assert binding_flags(out, other) == 0


def test_nat_over_tcp_and_default_contact_port() -> None:
    tracker = RegistrationTracker()
    src = ("tcp", "192.168.1.20", 40001)
    feed(tracker, register(contacts=("<sip:1001@192.168.1.20;transport=tcp>",)), src=src,
         dst=("tcp", "127.0.0.1", 5060))
    out = one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20;transport=tcp>",)),
                   src=src, dst=("tcp", "127.0.0.1", 5060)))
    assert out.received == "sip:192.168.1.20:40001;transport=tcp"
    assert out.socket == "tcp:127.0.0.1:5060"
    # Port 5060 is what a contact without a port means.
    tracker = RegistrationTracker()
    src = ("udp", "192.168.1.20", 5060)
    feed(tracker, register(contacts=("<sip:1001@192.168.1.20>",)), src=src)
    assert one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20>",)))).received is None


def test_ipv6_addresses_compare_by_value_and_are_bracketed() -> None:
    tracker = RegistrationTracker()
    src = ("udp", "2001:db8::10", 5060)
    dst = ("udp", "2001:db8::1", 5060)
    ok = response(200, contacts=("<sip:1001@[2001:db8::10]>",))
    feed(tracker, register(contacts=("<sip:1001@[2001:DB8:0::10]:5060>",)), src=src, dst=dst)
    out = one(feed(tracker, ok, src=src, dst=dst))
    assert out.received is None
    assert out.socket == "udp:[2001:db8::1]:5060"
    tracker = RegistrationTracker()
    src = ("udp", "2001:db8::99", 6000)
    feed(tracker, register(contacts=("<sip:1001@[2001:db8::10]:5060>",)), src=src, dst=dst)
    out = one(feed(tracker, ok, src=src, dst=dst))
    assert out.received == "sip:[2001:db8::99]:6000"


def test_registration_through_an_edge_proxy_keeps_path_and_sets_no_received() -> None:
    tracker = RegistrationTracker()
    edge = ("udp", "10.1.1.1", 5060)
    feed(tracker, register(extra=("Path: <sip:edge.example.net;lr>",)), src=edge)
    out = one(feed(tracker, response(200, contacts=("<sip:1001@192.168.1.20:5062>",)), src=edge))
    assert out.path == "<sip:edge.example.net;lr>"
    assert out.received is None


def test_format_helpers() -> None:
    assert format_received(("udp", "198.51.100.7", 40000)) == "sip:198.51.100.7:40000"
    assert format_received(("TLS", "198.51.100.7", 5061)) == "sip:198.51.100.7:5061;transport=tls"
    assert format_received(("udp", "::1", 5060)) == "sip:[::1]:5060"
    assert format_socket(("UDP", "127.0.0.1", 5060)) == "udp:127.0.0.1:5060"
    assert format_socket(("tcp", "[::1]", 5060)) == "tcp:[::1]:5060"


def test_methods_bitmask() -> None:
    assert methods_bitmask(None) is None
    assert methods_bitmask("") == 0
    assert methods_bitmask("invite, Register ,PUBLISH,UNKNOWN") == 1 | 128 | 8192


# --- from bytes to outcome ----------------------------------------------------------------------
def test_parse_register_traffic_feeds_the_tracker() -> None:
    tracker = RegistrationTracker()
    options = b"OPTIONS sip:x SIP/2.0\r\nVia: whatever\r\n\r\n"
    produced = []
    for data, src, dst in [
        (options, PHONE, PROXY),
        (b"\r\n\r\n", PHONE, PROXY),
        (register(), NAT_PHONE, PROXY),
        (response(200, contacts=("<sip:1001@192.168.1.20:5062>;expires=90",)), PROXY, NAT_PHONE),
    ]:
        msg = parse_register_traffic(data)
        if msg is not None:
            produced += tracker.feed(msg, src, dst, T0)
    out = one(produced)
    assert out.received == "sip:203.0.113.7:40123"
    assert out.bindings[0].expires_abs == int(T0) + 90


def test_received_echoed_by_the_registrar_is_authoritative() -> None:
    # Contact equals the source address, so comparing addresses would say "not NATed", but
    # the registrar's 2xx says what it stored (Kamailio/OpenSIPS received_param)
    tracker = RegistrationTracker()
    feed(tracker, register())
    ok = response(200, contacts=(
        '<sip:1001@192.168.1.20:5062>;expires=3600;received="sip:203.0.113.7:40123"',))
    out = one(feed(tracker, ok, now=T0 + 0.01))
    assert out.received == "sip:203.0.113.7:40123"


def test_registrar_echoing_received_for_others_only_means_none_for_ours() -> None:
    # our Contact differs from the source (the address test would say NAT), but the registrar
    # stored no received for it: only the other device's contact carries one
    tracker = RegistrationTracker()
    feed(tracker, register(contacts=("<sip:1001@10.9.9.9:5062>",)))
    ok = response(200, contacts=(
        "<sip:1001@10.9.9.9:5062>;expires=3600",
        '<sip:1001@198.51.100.4:5060>;expires=100;received="sip:198.51.100.4:6000"'))
    out = one(feed(tracker, ok, now=T0 + 0.01))
    assert out.received is None
