"""Kamailio JSON-RPC client: parsing (recorded from Kamailio 5.6.3, fuzzed) and the real thing.

The ``slow`` tests start Debian's Kamailio with kamailio-cfg/kamailio.cfg on 127.0.0.x, register
phones with real SIPp, and talk to it over both HTTP and the FIFO.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import model
from sidecar.model import FLAG_NAT, make_record
from sidecar.proxy import kamailio_dump as kd
from sidecar.proxy.kamailio import (
    NAT_BFLAG_MASK,
    KamailioRpc,
    ProxyRpcError,
    kamailio_contact_to_record,
)
from tests.kamailio_fixture import (
    KamailioInstance,
    Phone,
    free_port,
    require_kamailio,
    require_sipp,
    sipp_register,
)

# ul.dump over HTTP from Kamailio 5.6.3 running kamailio-cfg (SIP on udp:127.0.0.1:5070) after
# three SIPp phones (alice: outbound, q 0.5; natphone: Via/Contact 127.0.0.77 = NAT; desk: two
# contacts) and two ul.add calls (bob: path/received/socket/q 0.7; carol: permanent).
RECORDED_NOW = 1795414868
RECORDED_DUMP = (
    b'{"jsonrpc":"2.0","result":{"Domains":[{"Domain":{"Domain":"location","Size":1024,"AoRs":['
    b'{"Info":{"AoR":"desk","HashID":1761231456,"Contacts":[{"Contact":{"Address":"sip:desk@127'
    b'.0.0.1:5064;line=1","Expires":600,"Q":0.900000,"Call-ID":"d1@sipp","CSeq":7,"User-Agent":'
    b'"Desk","Received":"[not set]","Path":"[not set]","State":"CS_NEW","Flags":0,"CFlags":0,"So'
    b'cket":"udp:127.0.0.1:5070","Methods":4294967295,"Ruid":"uloc-6b03db53-258f-4","Instance":'
    b'"[not set]","Reg-Id":0,"Server-Id":0,"Tcpconn-Id":-1,"Keepalive":0,"Last-Keepalive":179541'
    b'4868,"KA-Roundtrip":0,"Last-Modified":1795414868}},{"Contact":{"Address":"sip:desk@127.0.0'
    b'.1:5064;line=2","Expires":120,"Q":-1,"Call-ID":"d1@sipp","CSeq":7,"User-Agent":"Desk","Rec'
    b'eived":"[not set]","Path":"[not set]","State":"CS_NEW","Flags":0,"CFlags":0,"Socket":"udp:'
    b'127.0.0.1:5070","Methods":4294967295,"Ruid":"uloc-6b03db53-258f-3","Instance":"[not set]",'
    b'"Reg-Id":0,"Server-Id":0,"Tcpconn-Id":-1,"Keepalive":0,"Last-Keepalive":1795414868,"KA-Rou'
    b'ndtrip":0,"Last-Modified":1795414868}}]}},{"Info":{"AoR":"natphone","HashID":3375319730,"C'
    b'ontacts":[{"Contact":{"Address":"sip:natphone@127.0.0.77:5060","Expires":300,"Q":-1,"Call-'
    b'ID":"n1@sipp","CSeq":1,"User-Agent":"NAT phone","Received":"sip:127.0.0.1:5063","Path":"[n'
    b'ot set]","State":"CS_NEW","Flags":0,"CFlags":192,"Socket":"udp:127.0.0.1:5070","Methods":4'
    b'294967295,"Ruid":"uloc-6b03db53-258f-2","Instance":"[not set]","Reg-Id":0,"Server-Id":0,"T'
    b'cpconn-Id":-1,"Keepalive":1,"Last-Keepalive":1795414868,"KA-Roundtrip":0,"Last-Modified":1'
    b'795414868}}]}},{"Info":{"AoR":"carol","HashID":1864284022,"Contacts":[{"Contact":{"Address'
    b'":"sip:carol@127.0.0.9","Expires":"permanent","Q":-1,"Call-ID":"dfjrewr12386fd6-343@kamail'
    b'io.rpc","CSeq":1,"User-Agent":"kamailio SIP Router - RPC Server","Received":"[not set]","P'
    b'ath":"[not set]","State":"CS_NEW","Flags":0,"CFlags":0,"Socket":"[not set]","Methods":4294'
    b'967295,"Ruid":"ulcx-6b03db53-2595-2","Instance":"[not set]","Reg-Id":0,"Server-Id":0,"Tcpc'
    b'onn-Id":-1,"Keepalive":0,"Last-Keepalive":1795414868,"KA-Roundtrip":0,"Last-Modified":0}}'
    b']}},{"Info":{"AoR":"bob","HashID":7222211,"Contacts":[{"Contact":{"Address":"sip:bob@127.0'
    b'.0.9:5099","Expires":300,"Q":0.700000,"Call-ID":"dfjrewr12386fd6-343@kamailio.rpc","CSeq":'
    b'1,"User-Agent":"kamailio SIP Router - RPC Server","Received":"sip:127.0.0.1:40000","Path":'
    b'"<sip:127.0.0.3;lr>","State":"CS_NEW","Flags":0,"CFlags":192,"Socket":"udp:127.0.0.1:5070'
    b'","Methods":31,"Ruid":"ulcx-6b03db53-2595-1","Instance":"[not set]","Reg-Id":0,"Server-Id"'
    b':0,"Tcpconn-Id":-1,"Keepalive":1,"Last-Keepalive":1795414868,"KA-Roundtrip":0,"Last-Modif'
    b'ied":0}}]}},{"Info":{"AoR":"alice","HashID":1834153949,"Contacts":[{"Contact":{"Address":"'
    b'sip:alice@127.0.0.1:5062;ob","Expires":600,"Q":0.500000,"Call-ID":"a1@sipp","CSeq":10,"Use'
    b'r-Agent":"Phone A/1.0","Received":"[not set]","Path":"[not set]","State":"CS_NEW","Flags":'
    b'0,"CFlags":0,"Socket":"udp:127.0.0.1:5070","Methods":4294967295,"Ruid":"uloc-6b03db53-258f'
    b'-1","Instance":"<urn:uuid:00000000-0000-1000-8000-000000000001>","Reg-Id":1,"Server-Id":0,'
    b'"Tcpconn-Id":-1,"Keepalive":0,"Last-Keepalive":1795414868,"KA-Roundtrip":0,"Last-Modified'
    b'":1795414868}}]}}],"Stats":{"Records":5,"Max-Slots":1}}}]},"id":1}'
)
ALL = 0xFFFFFFFF
ALICE_INSTANCE = "<urn:uuid:00000000-0000-1000-8000-000000000001>"


def contact(aor: str, uri: str, **fields: Any) -> dict[str, Any]:
    """Expected parse of one contact: registrar defaults overridden by ``fields``."""
    base: dict[str, Any] = {
        "table": "location", "aor": aor, "uri": uri, "q": -1, "user_agent": None,
        "received": None, "path": None, "socket": None, "flags": 0, "cflags": 0,
        "methods": ALL, "instance": None, "reg_id": 0, "keepalive": 0, "loaded_by_rpc": False,
    }
    base.update(fields)
    return base


def without(contacts: list[dict[str, Any]], *keys: str) -> dict[tuple[str, str], dict]:
    """Contacts keyed by (aor, uri, instance) minus the given volatile keys."""
    return {(c["aor"], c["uri"], c["instance"] or ""): {k: v for k, v in c.items()
                                                        if k not in keys}
            for c in contacts}


# --- parsing (no processes) -----------------------------------------------------------------

def test_recorded_dump_parses_to_exact_contacts():
    result = kd.decode_response(RECORDED_DUMP, 1)
    got = without(kd.parse_ul_dump(result, now=RECORDED_NOW), "ruid")
    sock = "udp:127.0.0.1:5070"
    n = RECORDED_NOW
    expected = [
        contact("desk", "sip:desk@127.0.0.1:5064;line=1", expires=n + 600, q=900,
                callid="d1@sipp", cseq=7, user_agent="Desk", socket=sock, last_modified=n),
        contact("desk", "sip:desk@127.0.0.1:5064;line=2", expires=n + 120,
                callid="d1@sipp", cseq=7, user_agent="Desk", socket=sock, last_modified=n),
        contact("natphone", "sip:natphone@127.0.0.77:5060", expires=n + 300, callid="n1@sipp",
                cseq=1, user_agent="NAT phone", received="sip:127.0.0.1:5063", socket=sock,
                cflags=192, keepalive=1, last_modified=n),
        contact("carol", "sip:carol@127.0.0.9", expires=0, callid=kd.UL_ADD_CALLID, cseq=1,
                user_agent=kd.UL_ADD_USER_AGENT, last_modified=0, loaded_by_rpc=True),
        contact("bob", "sip:bob@127.0.0.9:5099", expires=n + 300, q=700,
                callid=kd.UL_ADD_CALLID, cseq=1, user_agent=kd.UL_ADD_USER_AGENT,
                received="sip:127.0.0.1:40000", path="<sip:127.0.0.3;lr>", socket=sock,
                cflags=192, methods=31, keepalive=1, last_modified=0, loaded_by_rpc=True),
        contact("alice", "sip:alice@127.0.0.1:5062;ob", expires=n + 600, q=500,
                callid="a1@sipp", cseq=10, user_agent="Phone A/1.0", socket=sock,
                instance=ALICE_INSTANCE, reg_id=1, last_modified=n),
    ]
    assert got == without(expected)


def test_expired_and_deleted_contacts_are_left_out_and_lookup_parses():
    result = kd.decode_response(RECORDED_DUMP, 1)
    info = result["Domains"][0]["Domain"]["AoRs"][0]["Info"]
    info["Contacts"][0]["Contact"]["Expires"] = "expired"
    info["Contacts"][1]["Contact"]["Expires"] = "deleted"
    assert kd.parse_ul_lookup({"AoR": "desk", "Contacts": info["Contacts"]},
                              table="location", now=RECORDED_NOW) == []
    assert [c["aor"] for c in kd.parse_ul_dump(result, now=RECORDED_NOW)] == [
        "natphone", "carol", "bob", "alice"]
    info["Contacts"][0]["Contact"]["Expires"] = "soon"
    with pytest.raises(ProxyRpcError, match="Expires"):
        kd.parse_ul_dump(result, now=RECORDED_NOW)


def test_contact_to_record_sets_nat_flag_from_bflag_or_received():
    result = kd.decode_response(RECORDED_DUMP, 1)
    by_aor = {c["aor"]: c for c in kd.parse_ul_dump(result, now=RECORDED_NOW)}
    nat = kamailio_contact_to_record(by_aor["natphone"], handle=7, last_modified=123,
                                     nat_bflag_mask=NAT_BFLAG_MASK)
    assert nat == make_record(
        aor="natphone", uri="sip:natphone@127.0.0.77:5060", callid="n1@sipp", cseq=1,
        expires=RECORDED_NOW + 300, handle=7, last_modified=123,
        received="sip:127.0.0.1:5063", socket="udp:127.0.0.1:5070", user_agent="NAT phone",
        flags=FLAG_NAT, cflags=192, methods=None)  # no Allow: every method
    alice = kamailio_contact_to_record(by_aor["alice"], handle=8, last_modified=5,
                                       nat_bflag_mask=NAT_BFLAG_MASK)
    assert alice[model.FLAGS] == 0
    assert (alice[model.INSTANCE], alice[model.REG_ID], alice[model.Q]) == (ALICE_INSTANCE, 1, 500)
    # received alone marks NAT; the bflag alone too (with another mask it is not the NAT bit).
    received_only = dict(by_aor["natphone"], cflags=0)
    assert kamailio_contact_to_record(received_only, handle=1, last_modified=1,
                                      nat_bflag_mask=64)[model.FLAGS] == FLAG_NAT
    bflag_only = dict(by_aor["alice"], cflags=64)
    assert kamailio_contact_to_record(bflag_only, handle=1, last_modified=1,
                                      nat_bflag_mask=64)[model.FLAGS] == FLAG_NAT
    assert kamailio_contact_to_record(bflag_only, handle=1, last_modified=1,
                                      nat_bflag_mask=1)[model.FLAGS] == 0
    with pytest.raises(ProxyRpcError):
        kamailio_contact_to_record(dict(by_aor["alice"], callid=""), handle=1,
                                   last_modified=1, nat_bflag_mask=64)


def test_ul_add_params_follow_kamailio_56_order():
    now = 1_000_000
    assert kd.ul_add_params("location", "bob", "sip:bob@h", expires=now + 300, now=now, q=700,
                            path="<sip:p;lr>", flags=0, cflags=64, methods=31,
                            received="sip:127.0.0.1:4000", socket="udp:127.0.0.1:5060") == [
        "location", "bob", "sip:bob@h", 300, 0.7, "<sip:p;lr>", 0, 64, 31,
        "sip:127.0.0.1:4000", "udp:127.0.0.1:5060"]
    assert kd.ul_add_params("location", "c", "sip:c@h", expires=0, now=now) == [
        "location", "c", "sip:c@h", 0, -1, ".", 0, 0, ALL, ".", "."]
    assert kd.ul_add_params("location", "c", "sip:c@h", expires=now, now=now) is None
    for bad in ({"q": 1001}, {"q": 0.5}, {"cflags": -1}, {"methods": 1 << 32},
                {"expires": -5}, {"path": "."}, {"socket": "0"}):
        args: dict[str, Any] = {"expires": now + 10, "now": now, **bad}
        with pytest.raises(ProxyRpcError):
            kd.ul_add_params("location", "c", "sip:c@h", **args)
    with pytest.raises(ProxyRpcError):
        kd.ul_add_params("location", "", "sip:c@h", expires=0, now=now)


def test_decode_response_errors_and_ids():
    with pytest.raises(ProxyRpcError) as err:
        kd.decode_response(b'{"jsonrpc":"2.0","error":{"code":500,"message":"Method Not '
                           b'Found"},"id":1}', 1)
    assert (err.value.code, err.value.message) == (500, "Method Not Found")
    assert str(err.value) == "[500] Method Not Found"
    assert kd.decode_response(b'{"jsonrpc":"2.0","result":{},"id":3}', 3) == {}
    for body in (b"", b"  ", b"[1]", b"{", b'{"id":1}', b'{"result":1,"id":2}',
                 b'{"error":"x","id":1}'):
        with pytest.raises(ProxyRpcError) as err:
            kd.decode_response(body, 1)
        assert err.value.code is None


def fifo_frame_length(data: bytes) -> int | None:
    """How many bytes jsonrpcs' FIFO reader takes as the first request (None: never ends).

    Follows jsonrpc_read_stream() in Kamailio's jsonrpcs_fifo.c: braces are counted outside
    quotes, and a quote preceded by a backslash does not toggle the quoted state.
    """
    in_quote, quote_kind, depth, seen = False, 0, 0, False
    for i, ch in enumerate(data):
        escaped = i > 0 and data[i - 1] == 0x5C
        if ch == 0x22 and (not in_quote or quote_kind == 1):
            if not escaped:
                in_quote, quote_kind = not in_quote, 1
        elif ch == 0x27 and (not in_quote or quote_kind == 2):
            if not escaped:
                in_quote, quote_kind = not in_quote, 2
        elif ch == 0x7B and not in_quote:
            seen, depth = True, depth + 1
        elif ch == 0x7D and not in_quote:
            depth -= 1
        if seen and depth == 0:
            return i + 1
    return None


def test_plain_json_would_wedge_the_fifo_but_encoded_request_does_not():
    params = ["a\\", "}"]
    plain = json.dumps({"jsonrpc": "2.0", "method": "core.echo", "params": params,
                        "reply_name": "r1", "id": 1}).encode()
    assert fifo_frame_length(plain) != len(plain)
    body = kd.encode_request("core.echo", params, 1, reply_name="r1")
    assert fifo_frame_length(body) == len(body)
    assert json.loads(body)["params"] == params


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(max_size=40) | st.integers() | st.none(), max_size=6))
def test_fifo_requests_always_frame_exactly_and_round_trip(params):
    body = kd.encode_request("core.echo", params, 9, reply_name="sc1x2")
    assert fifo_frame_length(body) == len(body)
    doc = json.loads(body)
    assert (doc["params"], doc["reply_name"], doc["id"]) == (params, "sc1x2", 9)
    assert b"\\\\" not in body and b"'" not in body


def test_bad_reply_names_and_oversized_fifo_requests_are_refused():
    for name in ("a.b", "a/b", "a\\b", "", "x" * 65):
        with pytest.raises(ProxyRpcError):
            kd.encode_request("core.echo", [], 1, reply_name=name)
    with pytest.raises(ProxyRpcError, match="too large"):
        kd.encode_request("core.echo", ["x" * 5000], 1, reply_name="ok")
    assert len(kd.encode_request("core.echo", ["x" * 5000], 1)) > 5000  # HTTP has no cap
    with pytest.raises(ProxyRpcError):
        kd.encode_request("core.echo", [float("nan")], 1)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn's result, or the ProxyRpcError it raised (any other exception fails the test)."""
    try:
        return fn(*args, **kwargs)
    except ProxyRpcError as exc:
        assert exc.message
        return exc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20)
CONTACT_KEYS = list(json.loads(RECORDED_DUMP)["result"]["Domains"][0]["Domain"]["AoRs"][0]
                    ["Info"]["Contacts"][0]["Contact"])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_decode_response_raises_only_proxy_rpc_error(body):
    outcome(kd.decode_response, body, 1)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fuzz_parse_ul_dump_on_arbitrary_values(value):
    for result in (value, {"Domains": value}, {"Domains": [{"Domain": value}]}):
        assert isinstance(outcome(kd.parse_ul_dump, result, now=1), list | ProxyRpcError)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([*CONTACT_KEYS, "AoR", "Info", "Contacts"]),
       json_values | st.just(None), st.booleans())
def test_fuzz_mutated_recorded_dump(key, value, delete):
    result = json.loads(RECORDED_DUMP)["result"]
    info = result["Domains"][0]["Domain"]["AoRs"][1]["Info"]
    target = info if key in ("AoR", "Contacts") else info["Contacts"][0]["Contact"]
    if key == "Info":
        target = result["Domains"][0]["Domain"]["AoRs"][1]
    if delete:
        target.pop(key, None)
    else:
        target[key] = value
    contacts = outcome(kd.parse_ul_dump, result, now=RECORDED_NOW)
    if isinstance(contacts, ProxyRpcError):
        return
    # Only natphone's single contact was touched: it is kept or (expired/no contacts) left out.
    assert len(contacts) in (5, 6)
    assert {c["aor"] for c in contacts} >= {"desk", "carol", "bob", "alice"}
    for c in contacts:
        rec = outcome(kamailio_contact_to_record, c, handle=1, last_modified=1,
                      nat_bflag_mask=64)
        assert isinstance(rec, tuple | ProxyRpcError)


def test_client_needs_exactly_one_transport():
    with pytest.raises(ValueError):
        KamailioRpc()
    with pytest.raises(ValueError):
        KamailioRpc(url="http://127.0.0.1:1/RPC", fifo_path="/nonexistent")


async def test_silent_http_server_and_unanswered_fifo_time_out(tmp_path):
    release = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, KamailioRpc(url=f"http://127.0.0.1:{port}/RPC", timeout=0.3) as rpc:
        with pytest.raises(ProxyRpcError, match="timed out") as err:
            await rpc.call("core.version")
        assert err.value.code is None
        release.set()

    # A FIFO somebody reads but never answers; and a regular file where the FIFO should be.
    fifo = tmp_path / "rpc.fifo"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with KamailioRpc(fifo_path=fifo, reply_dir=tmp_path, timeout=0.3) as rpc:
            with pytest.raises(ProxyRpcError, match="no reply"):
                await rpc.call("core.version")
            sent = os.read(keep_open, 65536)
        assert json.loads(sent)["method"] == "core.version"
    finally:
        os.close(keep_open)
    plain = tmp_path / "plain"
    plain.write_text("")
    async with KamailioRpc(fifo_path=plain, reply_dir=tmp_path, timeout=0.3) as rpc:
        with pytest.raises(ProxyRpcError, match="not a FIFO"):
            await rpc.call("core.version")
    assert plain.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "rpc.fifo"]


# --- real Kamailio + SIPp -------------------------------------------------------------------

@pytest.fixture
async def kam(tmp_path):
    require_kamailio()
    async with KamailioInstance(tmp_path) as instance:
        yield instance


def phones(ip: str = "127.0.0.1") -> dict[str, Phone]:
    a, n, d = (free_port(ip) for _ in range(3))
    return {
        "alice": Phone(user="alice", ip=ip, port=a, cseq=10, callid="a1@sipp",
                       user_agent="Phone A/1.0",
                       contact=f'<sip:alice@{ip}:{a};ob>;q=0.5;+sip.instance="{ALICE_INSTANCE}"'
                               f";reg-id=1"),
        # Behind NAT: believes it is 127.0.0.77:5060, packets come from ip:n.
        "natphone": Phone(user="natphone", ip=ip, port=n, via_host="127.0.0.77", via_port=5060,
                          contact="<sip:natphone@127.0.0.77:5060>", expires=300,
                          callid="n1@sipp", user_agent="NAT phone"),
        "desk": Phone(user="desk", ip=ip, port=d, cseq=7, callid="d1@sipp", user_agent="Desk",
                      contact=f"<sip:desk@{ip}:{d};line=1>;q=0.9, "
                              f"<sip:desk@{ip}:{d};line=2>;expires=120"),
    }


@pytest.mark.slow
async def test_sipp_registrations_dump_identically_over_http_and_fifo(kam):
    require_sipp()
    ph = phones()
    before = int(time.time())
    await asyncio.gather(*(sipp_register(p, kam) for p in ph.values()))
    async with kam.http_rpc() as http, kam.fifo_rpc() as fifo:
        over_http = await http.ul_dump()
        over_fifo = await fifo.ul_dump()
        desk = await fifo.ul_lookup("location", "desk")
        assert await http.ul_lookup("location", "nobody") == []
    after = int(time.time())

    sock = kam.sip_socket
    a, n, d = ph["alice"].port, ph["natphone"].port, ph["desk"].port
    expected = [
        contact("alice", f"sip:alice@127.0.0.1:{a};ob", q=500, callid="a1@sipp", cseq=10,
                user_agent="Phone A/1.0", socket=sock, instance=ALICE_INSTANCE, reg_id=1),
        contact("natphone", "sip:natphone@127.0.0.77:5060", callid="n1@sipp", cseq=1,
                user_agent="NAT phone", received=f"sip:127.0.0.1:{n}", socket=sock,
                cflags=192, keepalive=1),
        contact("desk", f"sip:desk@127.0.0.1:{d};line=1", q=900, callid="d1@sipp", cseq=7,
                user_agent="Desk", socket=sock),
        contact("desk", f"sip:desk@127.0.0.1:{d};line=2", callid="d1@sipp", cseq=7,
                user_agent="Desk", socket=sock),
    ]
    volatile = ("expires", "last_modified", "ruid")
    assert without(over_http, *volatile) == without(expected)
    assert without(over_fifo, *volatile) == without(expected)
    assert without(over_http, "expires") == without(over_fifo, "expires")
    lifetimes = {("alice", 0): 600, ("natphone", 0): 300, ("desk", 1): 600, ("desk", 2): 120}
    for c in over_http:
        line = 2 if c["uri"].endswith("line=2") else 1 if c["aor"] == "desk" else 0
        life = lifetimes[(c["aor"], line)]
        assert before + life - 1 <= c["expires"] <= after + life + 1
        assert before <= c["last_modified"] <= after
    assert sorted(c["uri"] for c in desk) == sorted(c["uri"] for c in over_http
                                                    if c["aor"] == "desk")
    records = {c["aor"]: kamailio_contact_to_record(c, handle=1, last_modified=1,
                                                    nat_bflag_mask=NAT_BFLAG_MASK)
               for c in over_http}
    assert records["natphone"][model.FLAGS] == FLAG_NAT
    assert records["alice"][model.FLAGS] == 0


@pytest.mark.slow
async def test_ul_add_with_received_and_socket_shows_in_dump(kam):
    now = int(time.time())
    async with kam.http_rpc() as http, kam.fifo_rpc() as fifo:
        assert await http.ul_add("location", "bob", "sip:bob@127.0.0.9:5099", now + 300, q=700,
                                 path="<sip:127.0.0.3;lr>", cflags=NAT_BFLAG_MASK, methods=31,
                                 received="sip:127.0.0.1:40000", socket=kam.sip_socket)
        assert await fifo.ul_add("location", "carol", "sip:carol@127.0.0.9", 0)
        assert not await fifo.ul_add("location", "gone", "sip:gone@127.0.0.9", now - 5)
        # A socket Kamailio does not listen on is dropped without an error.
        assert await http.ul_add("location", "dan", "sip:dan@127.0.0.9", now + 60,
                                 socket="udp:127.0.0.1:9")
        rec = make_record(aor="erin", uri="sip:erin@127.0.0.10:5070", callid="e@x", cseq=4,
                          expires=now + 200, handle=1, last_modified=1, q=250,
                          received="sip:127.0.0.1:41000", socket=kam.sip_socket,
                          flags=FLAG_NAT, methods=5)
        assert await fifo.ul_add_record(rec)
        dumped = {c["aor"]: c for c in await fifo.ul_dump()}
        # Updating the same contact replaces it in place.
        assert await http.ul_add("location", "carol", "sip:carol@127.0.0.9", 0, q=100)
        carol = await http.ul_lookup("location", "carol")
    assert set(dumped) == {"bob", "carol", "dan", "erin"}
    bob = dumped["bob"]
    assert {k: bob[k] for k in ("uri", "q", "path", "cflags", "methods", "received", "socket",
                                "callid", "cseq", "user_agent", "loaded_by_rpc",
                                "last_modified")} == {
        "uri": "sip:bob@127.0.0.9:5099", "q": 700, "path": "<sip:127.0.0.3;lr>", "cflags": 64,
        "methods": 31, "received": "sip:127.0.0.1:40000", "socket": kam.sip_socket,
        "callid": kd.UL_ADD_CALLID, "cseq": 1, "user_agent": kd.UL_ADD_USER_AGENT,
        "loaded_by_rpc": True, "last_modified": 0}
    assert now + 298 <= bob["expires"] <= int(time.time()) + 301
    assert dumped["carol"]["expires"] == 0 and dumped["carol"]["socket"] is None
    assert dumped["dan"]["socket"] is None
    erin = kamailio_contact_to_record(dumped["erin"], handle=1, last_modified=1,
                                      nat_bflag_mask=NAT_BFLAG_MASK)
    for field in (model.URI, model.RECEIVED, model.SOCKET, model.Q, model.METHODS,
                  model.FLAGS):
        assert erin[field] == rec[field]
    assert abs(erin[model.EXPIRES] - rec[model.EXPIRES]) <= 1
    assert [(c["uri"], c["q"]) for c in carol] == [("sip:carol@127.0.0.9", 100)]


@pytest.mark.slow
async def test_ul_rm_and_ul_rm_contact(kam):
    now = int(time.time())
    async with kam.http_rpc() as http, kam.fifo_rpc() as fifo:
        for aor, uri in (("dave", "sip:dave@127.0.0.9:1"), ("dave", "sip:dave@127.0.0.9:2"),
                         ("erin", "sip:erin@127.0.0.9")):
            assert await http.ul_add("location", aor, uri, now + 100)
        await fifo.ul_rm_contact("location", "dave", "sip:dave@127.0.0.9:1")
        assert [c["uri"] for c in await http.ul_lookup("location", "dave")] == [
            "sip:dave@127.0.0.9:2"]
        for aor, uri in (("dave", "sip:dave@127.0.0.9:1"), ("nobody", "sip:x@y")):
            with pytest.raises(ProxyRpcError) as err:
                await http.ul_rm_contact("location", aor, uri)
            assert err.value.code == 404
        await http.ul_rm("location", "dave")
        await fifo.ul_rm("location", "nobody")  # unknown AOR: Kamailio reports success
        assert await fifo.ul_lookup("location", "dave") == []
        assert [c["aor"] for c in await http.ul_dump()] == ["erin"]
        with pytest.raises(ProxyRpcError) as err:
            await http.ul_rm("no_such_table", "erin")
        assert err.value.code == 500


@pytest.mark.slow
async def test_fifo_concurrent_calls_awkward_strings_and_big_dump(kam):
    awkward = ["a\\", "\\\"", "}{", "'", "\"'\\'", "ü€", "x" * 1000, ""]
    async with kam.http_rpc(timeout=20) as http, kam.fifo_rpc(timeout=20) as fifo:
        calls = [fifo.call("core.echo", s, str(i)) for i, s in enumerate(awkward * 4)]
        results = await asyncio.gather(*calls)
        assert results == [[s, str(i)] for i, s in enumerate(awkward * 4)]
        now = int(time.time())
        for start in range(0, 400, 100):
            await asyncio.gather(*(http.ul_add("location", f"u{i}", f"sip:u{i}@127.0.0.9:5060",
                                               now + 600, received="sip:127.0.0.1:4000",
                                               socket=kam.sip_socket)
                                   for i in range(start, start + 100)))
        over_fifo = await fifo.ul_dump()  # about 200 KB: more than a pipe buffer
        over_http = await http.ul_dump()
    assert len(over_fifo) == 400
    assert without(over_fifo, "expires") == without(over_http, "expires")


async def recv_within(sock: socket.socket, seconds: float) -> tuple[bytes, Any] | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            return await loop.sock_recvfrom(sock, 65535)
    except TimeoutError:
        return None


@pytest.mark.slow
async def test_nathelper_enable_ping_switches_real_pings(tmp_path):
    require_kamailio()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", 0))
        phone.setblocking(False)
        port = phone.getsockname()[1]
        async with KamailioInstance(tmp_path, natping_interval=1) as kam, \
                kam.http_rpc() as rpc:
            assert await rpc.ul_add("location", "pingme", "sip:pingme@127.0.0.66:5060",
                                    int(time.time()) + 300, cflags=kd.NAT_BFLAG_MASK
                                    | kd.SIPPING_BFLAG_MASK, received=f"sip:127.0.0.1:{port}",
                                    socket=kam.sip_socket)
            assert await recv_within(phone, 2.5) is None  # the config starts with pinging off
            await rpc.nathelper_enable_ping(True)
            got = await recv_within(phone, 5)
            assert got is not None
            data, source = got
            assert data.startswith(b"OPTIONS sip:pingme@127.0.0.66:5060 SIP/2.0\r\n")
            assert source == ("127.0.0.1", kam.sip_port)  # pings leave from the proxy socket
            await rpc.nathelper_enable_ping(False)
            while await recv_within(phone, 1.2) is not None:  # drain pings already under way
                pass
            assert await recv_within(phone, 2.2) is None


@pytest.mark.slow
async def test_errors_bad_method_and_stopped_kamailio(tmp_path):
    require_kamailio()
    kam = KamailioInstance(tmp_path)
    await kam.astart()
    try:
        async with kam.http_rpc() as http, kam.fifo_rpc() as fifo:
            for rpc in (http, fifo):
                with pytest.raises(ProxyRpcError) as err:
                    await rpc.call("no.such_method")
                assert (err.value.code, err.value.message) == (500, "Method Not Found")
                with pytest.raises(ProxyRpcError) as err:
                    await rpc.call("ul.add", "location")
                assert err.value.code == 500
                assert await rpc.call("core.echo", "still", "fine") == ["still", "fine"]
    finally:
        assert await kam.astop() == 0
    async with kam.http_rpc(timeout=2) as http, kam.fifo_rpc(timeout=2) as fifo:
        for rpc in (http, fifo):
            with pytest.raises(ProxyRpcError) as err:
                await rpc.ul_dump()
            assert err.value.code is None
    leftovers = [p.name for p in kam.reply_dir.iterdir()]
    assert leftovers == []


def hep_chunks(packet: bytes) -> dict[int, bytes]:
    """Generic chunks (vendor 0) of one HEP v3 packet, by type."""
    assert packet[:4] == b"HEP3"
    assert struct.unpack("!H", packet[4:6])[0] == len(packet)
    chunks: dict[int, bytes] = {}
    pos = 6
    while pos < len(packet):
        vendor, kind, length = struct.unpack("!HHH", packet[pos:pos + 6])
        if vendor == 0:
            chunks[kind] = packet[pos + 6:pos + length]
        pos += length
    return chunks


@pytest.mark.slow
async def test_two_instances_on_two_loopback_ips_and_hep_mirror(tmp_path):
    require_kamailio()
    require_sipp()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hep:
        hep.bind(("127.0.0.1", 0))
        hep.setblocking(False)
        hep_port = hep.getsockname()[1]
        async with KamailioInstance(tmp_path, sip_ip="127.0.0.1") as one, \
                KamailioInstance(tmp_path, sip_ip="127.0.0.2",
                                 hep_dst=("127.0.0.1", hep_port)) as two:
            phone = Phone(user="zoe", port=free_port(), callid="z1@sipp")
            await sipp_register(phone, two)
            async with one.http_rpc() as rpc_one, two.fifo_rpc() as rpc_two:
                assert await rpc_one.ul_dump() == []
                dumped = await rpc_two.ul_dump()
            assert [(c["aor"], c["socket"]) for c in dumped] == [
                ("zoe", f"udp:127.0.0.2:{two.sip_port}")]
            request = await recv_within(hep, 3)
            reply = await recv_within(hep, 3)
    assert request is not None and reply is not None
    req, rpl = hep_chunks(request[0]), hep_chunks(reply[0])
    assert req[0x0F].startswith(b"REGISTER sip:127.0.0.2 SIP/2.0\r\n")
    assert b"Call-ID: z1@sipp\r\n" in req[0x0F]
    assert socket.inet_ntoa(req[0x04]) == "127.0.0.2"  # IPv4 destination
    assert struct.unpack("!H", req[0x08])[0] == two.sip_port
    assert rpl[0x0F].startswith(b"SIP/2.0 200 OK\r\n")
    assert socket.inet_ntoa(rpl[0x03]) == "127.0.0.2"  # IPv4 source
    assert struct.unpack("!I", req[0x0C])[0] == 1  # capture agent id (HEP_CAPTURE_ID)


@pytest.mark.slow
async def test_methods_bits_translate_both_ways_against_real_kamailio(kam):
    """One REGISTER per SIP method, each allowing only that method: the mask Kamailio stores
    must translate to the sidecar's bit for it (and back for ul.add)."""
    from sidecar.sip.registration import METHOD_BITS, methods_bitmask

    names = sorted(METHOD_BITS)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        port = sock.getsockname()[1]
        for i, name in enumerate(names):
            msg = (f"REGISTER sip:{kam.sip_ip} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-m{i};rport\r\n"
                   f"Max-Forwards: 70\r\nFrom: <sip:m{i}@{kam.sip_ip}>;tag=t{i}\r\n"
                   f"To: <sip:m{i}@{kam.sip_ip}>\r\nCall-ID: methods-{i}\r\n"
                   f"CSeq: 1 REGISTER\r\nContact: <sip:m{i}@127.0.0.1:{port}>\r\n"
                   f"Allow: {name}\r\nExpires: 300\r\nContent-Length: 0\r\n\r\n")
            sock.sendto(msg.encode(), (kam.sip_ip, kam.sip_port))
            assert sock.recv(65535).startswith(b"SIP/2.0 200"), name
    async with kam.http_rpc() as rpc:
        dumped = {c["aor"]: c for c in await rpc.ul_dump()}
    for i, name in enumerate(names):
        stored = dumped[f"m{i}"]["methods"]
        assert stored == kd.KAMAILIO_METHOD_BITS[name], name
        assert kd.methods_from_kamailio(stored) == methods_bitmask(name) == METHOD_BITS[name]
        assert kd.methods_to_kamailio(METHOD_BITS[name]) == stored
    assert kd.methods_from_kamailio(kd.ALL_METHODS) is None
    assert kd.methods_to_kamailio(None) == kd.ALL_METHODS
