"""OpenSIPS usrloc events and MI dumps: every recorded payload, cross-checks, errors, fuzzing.

The payloads were captured from a real OpenSIPS 3.6 full-sharing pair (node A on 127.0.0.1,
node B on 127.0.0.2); see shared/opensips-samples/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import model
from sidecar.model import FLAG_NAT
from sidecar.sources.opensips_events import (
    EVENT_NAMES,
    OpensipsEventError,
    UsrlocEvent,
    event_change_kind,
    event_to_record,
    is_peer_copy,
    mi_contact_to_record,
    parse_event,
    parse_ul_dump,
    parse_ul_show_contact,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "opensips-samples"
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"OpenSIPS samples not found at {SAMPLES}"
)

SOCKETS = {"A": {"udp:127.0.0.1:5060"}, "B": {"udp:127.0.0.2:5060"}}
NAT_MASK = 1  # bit of the "NAT" bflag in the sample config (NAT|SIPPING|SIPPING_LAT = 7)
FLAG_BITS = {"NAT": 1, "SIPPING": 2, "SIPPING_LAT": 4}
HANDLE = (1 << 56) | 42
LM = 1_795_389_600_000
CAROL_URI = "sip:carol@127.0.0.9:5071;pn-provider=fcm;pn-prid=PRID123;pn-param=PARAM456"

# A copy of the recorded bob NAT insert, so the fuzz tests run without the samples folder.
BOB_INSERT = {
    "jsonrpc": "2.0",
    "method": "E_UL_CONTACT_INSERT",
    "params": {
        "domain": "location", "aor": "bob", "uri": "sip:bob@127.0.0.9:5070",
        "received": "sip:127.0.0.1:7002", "path": None, "qval": -1,
        "user_agent": "pyua/1.0 test agent", "socket": "udp:127.0.0.1:5060", "bflags": 7,
        "expires": 1795389736, "callid": "bob-cid-1@test", "cseq": 1, "attr": "",
        "latency": 0, "shtag": "",
    },
}


def load(*parts: str) -> Any:
    return json.loads(SAMPLES.joinpath(*parts).read_text())


def event_file(name: str) -> dict:
    return load("events", name)["payload"]


def scenario() -> list[dict]:
    text = SAMPLES.joinpath("events", "sequence_scenario2.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def mi_result(name: str) -> Any:
    return load("mi", name)["response"]["result"]


# --- every recorded event -----------------------------------------------------------------------


@needs_samples
def test_every_recorded_event_file_parses() -> None:
    files = sorted(SAMPLES.joinpath("events").glob("E_UL_*.json"))
    assert len(files) == 17
    seen = set()
    for path in files:
        doc = json.loads(path.read_text())
        for payload in doc.get("payloads", [doc.get("payload")]):
            ev = parse_event(payload)
            assert ev.name == payload["method"]
            assert ev.aor == payload["params"]["aor"]
            assert event_change_kind(ev) in {"put", "delete", "delete_aor", "refresh", "ignore"}
            seen.add(ev.name)
    assert seen == EVENT_NAMES


@needs_samples
def test_every_scenario_notification_parses() -> None:
    lines = scenario()
    assert len(lines) == 122
    for line in lines:
        ev = parse_event(line["payload"])
        assert ev.name == line["payload"]["method"]


@needs_samples
def test_bob_nat_insert_exact() -> None:
    ev = parse_event(event_file("E_UL_CONTACT_INSERT.nat.json"))
    assert ev == UsrlocEvent(
        name="E_UL_CONTACT_INSERT", domain="location", aor="bob", uri="sip:bob@127.0.0.9:5070",
        received="sip:127.0.0.1:7002", path=None, q=-1, user_agent="pyua/1.0 test agent",
        socket="udp:127.0.0.1:5060", bflags=7, expires=1795389736, callid="bob-cid-1@test",
        cseq=1, attr=None, latency=0, shtag=None, reason=None, req_callid=None,
    )
    assert ev == parse_event(BOB_INSERT)
    assert not is_peer_copy(ev, SOCKETS["A"])
    assert is_peer_copy(ev, SOCKETS["B"])  # not one of B's sockets
    assert event_change_kind(ev) == "put"
    rec = event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)
    assert model.to_dict(rec) == {
        "aor": "bob", "uri": "sip:bob@127.0.0.9:5070", "received": "sip:127.0.0.1:7002",
        "path": None, "socket": "udp:127.0.0.1:5060", "expires": 1795389736, "q": -1,
        "callid": "bob-cid-1@test", "cseq": 1, "user_agent": "pyua/1.0 test agent",
        "flags": FLAG_NAT, "cflags": 7, "methods": None, "instance": None, "reg_id": 0,
        "attr": None, "last_modified": LM, "handle": HANDLE, "origin": 1,
    }


@needs_samples
def test_nat_flag_from_received_alone_or_bflags_alone() -> None:
    ev = parse_event(event_file("E_UL_CONTACT_INSERT.nat.json"))
    rec = event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=0)
    assert rec[model.FLAGS] == FLAG_NAT  # received is set
    payload = copy.deepcopy(event_file("E_UL_CONTACT_INSERT.nat.json"))
    payload["params"]["received"] = None
    ev = parse_event(payload)
    assert event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=1)[
        model.FLAGS] == FLAG_NAT
    assert event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=8)[
        model.FLAGS] == 0


@needs_samples
def test_plain_insert_and_its_peer_copy() -> None:
    own = parse_event(event_file("E_UL_CONTACT_INSERT.plain.json"))
    peer = parse_event(event_file("E_UL_CONTACT_INSERT.replicated_on_peer.json"))
    assert (own.received, own.path, own.q, own.socket) == (None, None, -1, "udp:127.0.0.1:5060")
    assert (own.expires, own.cseq, own.callid) == (1795389733, 1, "alice-cid-1@test")
    assert peer.socket is None
    assert not is_peer_copy(own, SOCKETS["A"])
    assert is_peer_copy(peer, SOCKETS["B"])
    assert is_peer_copy(peer, SOCKETS["A"])
    assert is_peer_copy(peer, set())
    assert not is_peer_copy(own, set())  # no sockets configured: any non-empty one is ours
    rec = event_to_record(own, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)
    assert rec[model.FLAGS] == 0 and rec[model.CFLAGS] == 0
    # the copy differs only by the socket
    assert (model.to_dict(event_to_record(peer, handle=HANDLE, last_modified=LM,
                                           nat_bflag_mask=NAT_MASK))
            == {**model.to_dict(rec), "socket": None})


@needs_samples
def test_update_events() -> None:
    own = parse_event(event_file("E_UL_CONTACT_UPDATE.refresh_register.json"))
    peer = parse_event(event_file("E_UL_CONTACT_UPDATE.replicated_on_peer.json"))
    assert (own.cseq, own.expires) == (2, 1795389734)
    assert event_change_kind(own) == "put"
    assert not is_peer_copy(own, SOCKETS["A"]) and is_peer_copy(peer, SOCKETS["B"])


@needs_samples
def test_q_path_attr_insert() -> None:
    ev = parse_event(event_file("E_UL_CONTACT_INSERT.q_path_attr.json"))
    assert (ev.q, ev.path, ev.attr) == (500, "<sip:127.0.0.5;lr>", "tenant=acme;dev=desk")
    assert ev.user_agent == "Acme Phone 2.0 (Linux)"
    rec = event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)
    assert (rec[model.Q], rec[model.PATH], rec[model.ATTR]) == (
        500, "<sip:127.0.0.5;lr>", "tenant=acme;dev=desk")


@needs_samples
def test_push_notification_insert_keeps_pn_params_in_uri() -> None:
    ev = parse_event(event_file("E_UL_CONTACT_INSERT.push_notification.json"))
    assert ev.uri == CAROL_URI
    assert (ev.received, ev.bflags, ev.expires) == ("sip:127.0.0.1:7003", 7, 1795389748)


@needs_samples
def test_mi_added_contacts() -> None:
    ev = parse_event(event_file("E_UL_CONTACT_INSERT.mi_ul_add.json"))
    assert (ev.q, ev.socket, ev.callid, ev.user_agent) == (
        700, None, "dfjrewr12386fd6-343@opensips.mi", "OpenSIPS MI Server")
    assert is_peer_copy(ev, SOCKETS["A"])  # empty socket on both nodes
    payloads = load("events", "E_UL_CONTACT_INSERT.mi_ul_add_variants.json")["payloads"]
    events = [parse_event(p) for p in payloads]
    assert [e.name for e in events] == [
        "E_UL_AOR_INSERT", *["E_UL_CONTACT_INSERT"] * 3, *["E_UL_CONTACT_DELETE"] * 3,
        "E_UL_AOR_DELETE",
    ]
    inserts = {e.uri: (e.q, e.expires) for e in events[1:4]}
    assert inserts == {
        "sip:typetest@127.0.0.1:7030": (0, 1795391519),  # q sent as JSON number 0.5 -> 0
        "sip:typetest@127.0.0.1:7031": (500, 1795391519),
        "sip:typetest@127.0.0.1:7032": (1000, 0),  # permanent
    }
    permanent = event_to_record(events[3], handle=HANDLE, last_modified=LM, nat_bflag_mask=1)
    assert permanent[model.EXPIRES] == 0
    assert [event_change_kind(e) for e in events] == [
        "ignore", "put", "put", "put", "delete", "delete", "delete", "delete_aor"]


@needs_samples
def test_delete_events_carry_last_state() -> None:
    dereg = parse_event(event_file("E_UL_CONTACT_DELETE.deregister.json"))
    assert (dereg.cseq, dereg.expires, dereg.socket) == (2, 1795389734, "udp:127.0.0.1:5060")
    assert event_change_kind(dereg) == "delete"
    expired = parse_event(event_file("E_UL_CONTACT_DELETE.expired.json"))
    assert (expired.aor, expired.socket, expired.expires) == ("dave", None, 1795389629)
    assert is_peer_copy(expired, SOCKETS["A"])
    removed = parse_event(event_file("E_UL_CONTACT_DELETE.mi_ul_rm_contact.json"))
    assert (removed.uri, removed.q) == ("sip:frank@127.0.0.2:7011", 1000)
    rec = event_to_record(dereg, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)
    assert (rec[model.CALLID], rec[model.CSEQ]) == ("alice-cid-1@test", 2)


@needs_samples
def test_refresh_events() -> None:
    reg = parse_event(event_file("E_UL_CONTACT_REFRESH.reg-refresh.json"))
    assert (reg.reason, reg.req_callid, reg.cseq, reg.latency, reg.path, reg.q) == (
        "reg-refresh", None, None, None, None, -1)
    assert (reg.expires, reg.callid, reg.socket) == (
        1795389748, "carol-cid-1@test", "udp:127.0.0.1:5060")
    assert event_change_kind(reg) == "refresh"
    invite = parse_event(event_file("E_UL_CONTACT_REFRESH.ini-INVITE.json"))
    assert (invite.reason, invite.req_callid) == ("ini-INVITE", "inv-carol-1@test")
    assert event_change_kind(invite) == "ignore"
    with pytest.raises(OpensipsEventError, match="full contact"):
        event_to_record(reg, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)


@needs_samples
def test_latency_and_aor_events() -> None:
    lat = parse_event(event_file("E_UL_LATENCY_UPDATE.json"))
    assert (lat.latency, lat.uri, lat.cseq) == (673, CAROL_URI, 1)
    assert event_change_kind(lat) == "ignore"
    ins = parse_event(event_file("E_UL_AOR_INSERT.json"))
    dele = parse_event(event_file("E_UL_AOR_DELETE.json"))
    assert ins == UsrlocEvent(name="E_UL_AOR_INSERT", domain="location", aor="alice")
    assert (event_change_kind(ins), event_change_kind(dele)) == ("ignore", "delete_aor")
    assert not is_peer_copy(dele, SOCKETS["A"])  # no socket to tell by
    with pytest.raises(OpensipsEventError):
        event_to_record(dele, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)


# --- the scenario as two consumers see it -------------------------------------------------------


def replay(node: str, lines: list[dict], until_step: str | None = None):
    """Apply one node's notifications (one transport) the way a sidecar consumer would.

    Returns (owned, seen): ``owned`` keeps only changes this node reports as its own (peer
    copies skipped); ``seen`` applies every put/delete, i.e. the proxy's full table.
    """
    owned: dict[tuple[str, str], tuple] = {}
    seen: dict[tuple[str, str], tuple] = {}
    for line in lines:
        if line["node"] != node or line["transport"] != "udp":
            continue
        if until_step is not None and line["after_step"] > until_step:
            break
        ev = parse_event(line["payload"])
        kind = event_change_kind(ev)
        if kind not in ("put", "delete"):
            continue
        key = (ev.aor, ev.uri)
        targets = [seen] if is_peer_copy(ev, SOCKETS[node]) else [seen, owned]
        for table in targets:
            if kind == "put":
                table[key] = event_to_record(ev, handle=HANDLE, last_modified=LM,
                                             nat_bflag_mask=NAT_MASK)
            else:
                table.pop(key, None)
    return owned, seen


@needs_samples
def test_each_register_is_reported_by_exactly_one_node() -> None:
    lines = scenario()
    own_puts: dict[tuple, list[str]] = {}
    for line in lines:
        if line["transport"] != "udp":
            continue
        ev = parse_event(line["payload"])
        if event_change_kind(ev) == "put" and not is_peer_copy(ev, SOCKETS[line["node"]]):
            own_puts.setdefault((ev.aor, ev.uri, ev.cseq), []).append(line["node"])
    assert own_puts == {
        ("alice", "sip:alice@127.0.0.1:7001", 1): ["A"],
        ("alice", "sip:alice@127.0.0.1:7001", 2): ["A"],
        ("alice", "sip:alice@127.0.0.1:7005", 1): ["A"],
        ("bob", "sip:bob@127.0.0.9:5070", 1): ["A"],
        ("erin", "sip:erin@127.0.0.9:5072", 1): ["B"],
        ("carol", CAROL_URI, 1): ["A"],
        ("dave", "sip:dave@127.0.0.1:7004", 1): ["B"],
    }  # frank (MI ul_add) has an empty socket on both nodes, so neither claims it


@needs_samples
def test_owned_views_of_both_nodes_add_up_to_the_final_table() -> None:
    lines = scenario()
    owned_a, seen_a = replay("A", lines)
    owned_b, seen_b = replay("B", lines)
    assert set(owned_a) == {("bob", "sip:bob@127.0.0.9:5070"), ("carol", CAROL_URI)}
    assert set(owned_b) == {("erin", "sip:erin@127.0.0.9:5072")}
    final = {(aor, c["Contact"]) for aor, cs in parse_ul_dump(mi_result("ul_dump_end_A.json"))
             for c in cs}
    assert set(owned_a) | set(owned_b) == final == set(seen_a) == set(seen_b)


# --- MI payloads ----------------------------------------------------------------------------------


def mi_records(result: Any, now: float) -> dict[tuple[str, str], tuple]:
    out = {}
    for aor, contacts in parse_ul_dump(result, domain="location"):
        for c in contacts:
            rec = mi_contact_to_record(aor, c, now=now, handle=HANDLE, last_modified=LM,
                                       nat_bflag_mask=NAT_MASK, flag_bits=FLAG_BITS)
            assert rec is not None
            out[(aor, c["Contact"])] = rec
    return out


def without_methods(rec: tuple) -> dict:
    d = model.to_dict(rec)
    del d["methods"]
    return d


@needs_samples
@pytest.mark.parametrize(
    ("node", "dump", "dump_time", "after_step"),
    [
        # Expires in each dump is absolute expiry minus the dump time: 1795389620 / ...659.
        ("A", "ul_dump_A.json", 1795389620.4, "07_register_dave_short_expiry_on_B"),
        ("B", "ul_dump_B.json", 1795389620.4, "07_register_dave_short_expiry_on_B"),
        ("A", "ul_dump_end_A.json", 1795389659.9, None),
        ("B", "ul_dump_end_B.json", 1795389659.9, None),
    ],
)
def test_mi_dump_matches_event_view(node: str, dump: str, dump_time: float,
                                    after_step: str | None) -> None:
    """Reconciliation must see the same contacts, field by field, as the events built."""
    _, seen = replay(node, scenario(), until_step=after_step)
    from_mi = mi_records(mi_result(dump), dump_time)
    assert set(from_mi) == set(seen)
    for key, rec in from_mi.items():
        assert without_methods(rec) == without_methods(seen[key]), key
        assert rec[model.METHODS] == 4294967295


@needs_samples
def test_mi_dump_exact_values() -> None:
    recs = mi_records(mi_result("ul_dump_A.json"), 1795389620.0)
    bob = model.to_dict(recs[("bob", "sip:bob@127.0.0.9:5070")])
    assert (bob["received"], bob["q"], bob["expires"], bob["socket"]) == (
        "sip:127.0.0.1:7002", -1, 1795389736, "udp:127.0.0.1:5060")
    assert (bob["flags"], bob["cflags"]) == (FLAG_NAT, 7)
    erin = model.to_dict(recs[("erin", "sip:erin@127.0.0.9:5072")])
    assert erin["socket"] is None  # replicated from B: no Socket key on A
    alice2 = model.to_dict(recs[("alice", "sip:alice@127.0.0.1:7005")])
    assert (alice2["q"], alice2["path"], alice2["attr"], alice2["flags"]) == (
        500, "<sip:127.0.0.5;lr>", "tenant=acme;dev=desk", 0)


@needs_samples
def test_mi_nat_flag_by_name_with_default_flag_bits() -> None:
    contact = parse_ul_show_contact(mi_result("ul_show_contact_bob_B.json"))[0]
    contact = {k: v for k, v in contact.items() if k != "Received"}
    rec = mi_contact_to_record("bob", contact, now=1795389620.0, handle=HANDLE,
                               last_modified=LM, nat_bflag_mask=NAT_MASK)
    assert rec is not None
    assert (rec[model.FLAGS], rec[model.CFLAGS], rec[model.SOCKET]) == (FLAG_NAT, NAT_MASK, None)
    renamed = mi_contact_to_record("bob", contact, now=1795389620.0, handle=HANDLE,
                                   last_modified=LM, nat_bflag_mask=16, nat_flag_name="BEHIND")
    assert renamed is not None and renamed[model.FLAGS] == 0


@needs_samples
def test_ul_show_contact_samples() -> None:
    for name in ("alice_A", "alice_B", "bob_A", "bob_B", "frank_A", "frank_B"):
        contacts = parse_ul_show_contact(mi_result(f"ul_show_contact_{name}.json"))
        assert contacts and all("Contact" in c for c in contacts)
    frank = parse_ul_show_contact(mi_result("ul_show_contact_frank_A.json"))
    recs = [mi_contact_to_record("frank", c, now=1795389622.0, handle=HANDLE,
                                 last_modified=LM, nat_bflag_mask=NAT_MASK) for c in frank]
    assert [(r[model.URI], r[model.Q], r[model.EXPIRES], r[model.METHODS]) for r in recs] == [
        ("sip:frank@127.0.0.2:7011", 1000, 1795389741, 32767),
        ("sip:frank@127.0.0.1:7010", 700, 1795389740, 32767),
    ]
    with pytest.raises(OpensipsEventError):  # the "AOR not found" error object
        parse_ul_show_contact(load("mi", "ul_show_contact_nobody_A.json")["response"]["error"])


@needs_samples
@pytest.mark.parametrize("name", ["ul_show_contact_typetest.json",
                                  "ul_show_contact_typetest_B.json"])
def test_typetest_q_and_permanent(name: str) -> None:
    contacts = parse_ul_show_contact(mi_result(name))
    recs = {c["Contact"]: mi_contact_to_record("typetest", c, now=1795391460.0, handle=HANDLE,
                                               last_modified=LM, nat_bflag_mask=NAT_MASK)
            for c in contacts}
    got = {uri: (r[model.Q], r[model.EXPIRES]) for uri, r in recs.items() if r is not None}
    # the same values the E_UL_CONTACT_INSERT events of these contacts carried
    assert got == {
        "sip:typetest@127.0.0.1:7030": (0, 1795391519),
        "sip:typetest@127.0.0.1:7031": (500, 1795391519),
        "sip:typetest@127.0.0.1:7032": (1000, 0),
    }


@needs_samples
@pytest.mark.parametrize("name", ["ul_dump_brief_int_A.json", "ul_dump_brief_numeric_string_B.json",
                                  "ul_dump_brief_positional_A.json"])
def test_brief_dump(name: str) -> None:
    assert parse_ul_dump(mi_result(name)) == [("iris", []), ("henry", [])]
    assert parse_ul_dump(mi_result(name), domain="other") == []


# --- MI conversion rules and errors -----------------------------------------------------------


def mi_contact(**changes: Any) -> dict:
    c = {
        "Contact": "sip:x@127.0.0.1:7000", "ContactID": "1", "Expires": 60, "Q": "",
        "Callid": "cid", "Cseq": 3, "User-agent": "ua", "State": "CS_NEW", "Flags": 0,
        "Cflags": "", "Methods": 4294967295,
    }
    c.update(changes)
    return {k: v for k, v in c.items() if v is not ...}


def convert(c: dict, now: float = 1000.5) -> tuple | None:
    return mi_contact_to_record("x", c, now=now, handle=HANDLE, last_modified=LM,
                                nat_bflag_mask=NAT_MASK, flag_bits=FLAG_BITS)


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"Expires": 60}, model.EXPIRES, 1060),
        ({"Expires": "60"}, model.EXPIRES, 1060),
        ({"Expires": "permanent"}, model.EXPIRES, 0),
        ({"Q": "0.25"}, model.Q, 250),
        ({"Q": "1"}, model.Q, 1000),
        ({"Q": 0.5}, model.Q, 500),
        ({"Q": ""}, model.Q, -1),
        ({"Cflags": "SIPPING NAT"}, model.CFLAGS, 3),
        ({"Cflags": "UNKNOWN_FLAG"}, model.CFLAGS, 0),
        ({"Cflags": 5}, model.CFLAGS, 5),
        ({"Cflags": "SIPPING"}, model.FLAGS, 0),
        ({"Cflags": 1}, model.FLAGS, FLAG_NAT),
        ({"Received": "sip:1.2.3.4:5"}, model.FLAGS, FLAG_NAT),
        ({"Cseq": "7"}, model.CSEQ, 7),
        ({"Methods": ...}, model.METHODS, None),
        ({"User-agent": ...}, model.USER_AGENT, None),
        ({"Socket": "udp:127.0.0.1:5060"}, model.SOCKET, "udp:127.0.0.1:5060"),
    ],
)
def test_mi_conversion_rules(changes: dict, field: int, expected: Any) -> None:
    rec = convert(mi_contact(**changes))
    assert rec is not None
    assert rec[field] == expected


@pytest.mark.parametrize("state", ["expired", "deleted"])
def test_mi_contacts_already_gone_are_skipped(state: str) -> None:
    assert convert(mi_contact(Expires=state)) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"Contact": ...}, {"Contact": ""}, {"Contact": 5},
        {"Callid": ...}, {"Callid": ""},
        {"Cseq": ...}, {"Cseq": -1}, {"Cseq": "3a"}, {"Cseq": True}, {"Cseq": 2.5},
        {"Expires": ...}, {"Expires": -5}, {"Expires": "soon"}, {"Expires": None},
        {"Q": "1.5"}, {"Q": "abc"}, {"Q": "-0.5"}, {"Q": [1]}, {"Q": True},
        {"Cflags": ["NAT"]}, {"Methods": "all"}, {"Received": 7}, {"Path": {}},
        {"Attr": "\ud800"},
    ],
)
def test_mi_malformed_contacts(changes: dict) -> None:
    with pytest.raises(OpensipsEventError):
        convert(mi_contact(**changes))


@pytest.mark.parametrize(
    "result",
    [
        None, [], "x", {}, {"Domains": {}}, {"Domains": [1]}, {"Domains": [{"AORs": []}]},
        {"Domains": [{"name": "location", "AORs": {}}]},
        {"Domains": [{"name": "location", "AORs": [{"Contacts": []}]}]},
        {"Domains": [{"name": "location", "AORs": [{"AOR": ""}]}]},
        {"Domains": [{"name": "location", "AORs": [{"AOR": "a", "Contacts": {}}]}]},
        {"Domains": [{"name": "location", "AORs": [{"AOR": "a", "Contacts": [1]}]}]},
    ],
)
def test_malformed_ul_dump(result: Any) -> None:
    with pytest.raises(OpensipsEventError):
        parse_ul_dump(result)


def test_ul_dump_domain_filter() -> None:
    result = {"Domains": [
        {"name": "location", "AORs": [{"AOR": "a", "Contacts": [mi_contact()]}]},
        {"name": "other", "AORs": [{"AOR": "b", "Contacts": []}]},
    ]}
    assert [a for a, _ in parse_ul_dump(result)] == ["a", "b"]
    assert [a for a, _ in parse_ul_dump(result, domain="location")] == ["a"]


def test_mi_bad_arguments() -> None:
    with pytest.raises(OpensipsEventError):
        mi_contact_to_record("", mi_contact(), now=1.0, handle=HANDLE, last_modified=LM,
                             nat_bflag_mask=1)
    with pytest.raises(OpensipsEventError):
        mi_contact_to_record("x", [], now=1.0, handle=HANDLE, last_modified=LM,  # type: ignore
                             nat_bflag_mask=1)
    with pytest.raises(OpensipsEventError):
        mi_contact_to_record("x", mi_contact(), now=float("nan"), handle=HANDLE,
                             last_modified=LM, nat_bflag_mask=1)


# --- malformed events -------------------------------------------------------------------------


def mutated(params_changes: dict | None = None, **top: Any) -> dict:
    payload = copy.deepcopy(BOB_INSERT)
    for key, value in (params_changes or {}).items():
        if value is ...:
            payload["params"].pop(key, None)
        else:
            payload["params"][key] = value
    for key, value in top.items():
        if value is ...:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    "payload",
    [
        None, 1, "x", [], [BOB_INSERT],
        mutated(jsonrpc="1.0"), mutated(jsonrpc=...), mutated(id=1), mutated(id=None),
        mutated(method=...), mutated(method=7), mutated(method="E_UL_SOMETHING"),
        mutated(params=...), mutated(params=[]), mutated(params="x"),
        mutated({"domain": ...}), mutated({"aor": ""}), mutated({"aor": None}),
        mutated({"uri": ...}), mutated({"uri": 5}),
        mutated({"expires": ...}), mutated({"expires": "1795389736"}), mutated({"expires": -1}),
        mutated({"expires": 1.5}), mutated({"expires": True}), mutated({"expires": 1 << 70}),
        mutated({"callid": ...}), mutated({"callid": ""}),
        mutated({"cseq": ...}), mutated({"cseq": -1}), mutated({"cseq": 1 << 40}),
        mutated({"qval": 1001}), mutated({"qval": -2}), mutated({"qval": "500"}),
        mutated({"qval": None}),
        mutated({"bflags": -1}), mutated({"bflags": "7"}),
        mutated({"received": 5}), mutated({"path": []}), mutated({"socket": {}}),
        mutated({"user_agent": 1}), mutated({"attr": False}), mutated({"latency": "0"}),
        mutated({"uri": "sip:\udc80@x"}),  # lone surrogate from a JSON escape
        {"jsonrpc": "2.0", "method": "E_UL_CONTACT_REFRESH",
         "params": {**BOB_INSERT["params"]}},  # REFRESH needs 'reason'
        {"jsonrpc": "2.0", "method": "E_UL_AOR_INSERT", "params": {"domain": "location"}},
    ],
)
def test_malformed_events(payload: Any) -> None:
    with pytest.raises(OpensipsEventError):
        parse_event(payload)


def test_optional_params_may_be_absent_and_unknown_ones_are_ignored() -> None:
    payload = mutated({"received": ..., "path": ..., "qval": ..., "user_agent": ...,
                       "socket": ..., "bflags": ..., "attr": ..., "latency": ..., "shtag": ...,
                       "future_param": {"x": 1}})
    ev = parse_event(payload)
    assert (ev.received, ev.q, ev.socket, ev.bflags, ev.latency) == (None, -1, None, 0, 0)
    assert is_peer_copy(ev, SOCKETS["A"])


def test_event_to_record_reports_model_errors() -> None:
    ev = UsrlocEvent(name="E_UL_CONTACT_INSERT", domain="location", aor="a", uri="sip:a@b",
                     callid=None, cseq=1)
    with pytest.raises(OpensipsEventError):
        event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=1)


# --- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)
PARAM_KEYS = [*BOB_INSERT["params"], "reason", "req_callid"]


@settings(max_examples=1000, deadline=None)
@given(json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    try:
        ev = parse_event(value)
    except OpensipsEventError:
        return
    assert ev.name in EVENT_NAMES


@settings(max_examples=700, deadline=None)
@given(
    st.sampled_from(sorted(EVENT_NAMES)),
    st.dictionaries(st.sampled_from(PARAM_KEYS), json_values | st.just(...), max_size=6),
)
def test_fuzz_mutated_params(method: str, changes: dict) -> None:
    payload = mutated({"reason": "reg-refresh", "req_callid": None, **changes}, method=method)
    try:
        ev = parse_event(payload)
    except OpensipsEventError:
        return
    kind = event_change_kind(ev)
    is_peer_copy(ev, SOCKETS["A"])
    if kind in ("put", "delete"):
        rec = event_to_record(ev, handle=HANDLE, last_modified=LM, nat_bflag_mask=NAT_MASK)
        assert len(rec) == model.RECORD_LEN


MI_KEYS = ["Contact", "Expires", "Q", "Callid", "Cseq", "User-agent", "Received", "Path",
           "Socket", "Methods", "Attr", "Cflags"]


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(MI_KEYS), json_values | st.just(...), max_size=5))
def test_fuzz_mi_contact(changes: dict) -> None:
    try:
        rec = convert(mi_contact(**changes))
    except OpensipsEventError:
        return
    assert rec is None or len(rec) == model.RECORD_LEN


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_fuzz_mi_containers(value: Any) -> None:
    for parse in (parse_ul_dump, parse_ul_show_contact):
        with contextlib.suppress(OpensipsEventError):
            parse(value)
    try:
        pairs = parse_ul_dump({"Domains": [{"name": "location", "AORs": value}]})
    except OpensipsEventError:
        return
    assert all(isinstance(aor, str) and isinstance(cs, list) for aor, cs in pairs)
