"""Standby loading by REGISTER replay: the sans-I/O builder and reply matcher (property and fuzz
tests), loop safety (the sidecar's own sources ignore replays), and the real Kamailio with
kamailio-cfg's route[REPLAY]: lossless contacts, untrusted sources refused, errors counted by
the loader, a 2,000-contact warm load that leaves the standby's pinger silent, and replays kept
out of the HEP mirror.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import model
from sidecar.config import ConfigError, parse_config
from sidecar.model import FLAG_NAT, make_record
from sidecar.ownership import Ownership, ProxySettings
from sidecar.proxy import kamailio_dump as kd
from sidecar.proxy.register_replay import (
    HDR_NAT,
    HDR_RECEIVED,
    HDR_REPLAY,
    HDR_SOCKET,
    REPLAY_BRANCH_PREFIX,
    ReplayError,
    ReplayRegister,
    ReplayResult,
    ReplayTransactions,
    build_register,
    replay_headers,
)
from sidecar.proxy.replay_client import RegisterReplayClient
from sidecar.replica import Replica
from sidecar.sip.parser import SipRequest, aor_of, parse_message
from sidecar.sip.registration import RegistrationTracker, methods_bitmask
from sidecar.sources.kamailio_source import reconcile
from tests.kamailio_fixture import KamailioInstance, free_port, require_kamailio

NOW = 1_800_000_000
VIA = ("127.0.0.1", 40123)
BRANCH = REPLAY_BRANCH_PREFIX + "t1"
COPY_MASK = 1 << 8  # kamailio-cfg FLB_SC_COPY
PEER = 1  # origin node of the replicated contacts
ME = 2  # the standby


def rec_of(**kw: Any) -> tuple:
    base: dict[str, Any] = {"aor": "alice", "uri": "sip:alice@127.0.0.9:5060",
                            "callid": "c1@phone", "cseq": 5, "expires": NOW + 300,
                            "handle": (PEER << 56) | 1, "last_modified": 1}
    base.update(kw)
    return make_record(**base)


def build(rec: tuple, **kw: Any) -> ReplayRegister | None:
    args: dict[str, Any] = {"node_id": ME, "via": VIA, "branch": BRANCH, "now": NOW}
    args.update(kw)
    return build_register(rec, **args)


def response(req: ReplayRegister, status: int = 200, reason: str = "OK",
             extra: str = "", branch: str | None = None) -> bytes:
    callid, cseq, br = req.key
    return (f"SIP/2.0 {status} {reason}\r\n"
            f"Via: SIP/2.0/UDP {VIA[0]}:{VIA[1]};branch={branch or br};rport={VIA[1]}\r\n"
            "From: <sip:alice@127.0.0.1>;tag=x\r\nTo: <sip:alice@127.0.0.1>;tag=y\r\n"
            f"Call-ID: {callid}\r\nCSeq: {cseq} REGISTER\r\n{extra}Content-Length: 0\r\n\r\n"
            ).encode()


# --- the builder --------------------------------------------------------------------------------

def test_replay_register_carries_every_field():
    rec = rec_of(received="sip:127.0.0.1:4000", path="<sip:127.0.0.3;lr>,<sip:127.0.0.4;lr>",
                 socket="udp:127.0.0.1:5060", q=500, user_agent="Phone A/1.0", flags=FLAG_NAT,
                 instance="<urn:uuid:00000000-0000-1000-8000-000000000001>", reg_id=1)
    req = build(rec)
    assert req is not None and req.key == ("c1@phone", 5, BRANCH)
    text = req.data.decode()
    assert text.startswith("REGISTER sip:127.0.0.1 SIP/2.0\r\n")
    msg = parse_message(req.data)
    assert isinstance(msg, SipRequest)
    assert (msg.call_id, msg.cseq, msg.via_branch, msg.via_rport, msg.aor) == (
        "c1@phone", 5, BRANCH, 0, "alice@127.0.0.1")
    (c,) = msg.contacts
    assert (c.uri, c.expires, c.q, c.instance, c.reg_id) == (
        "sip:alice@127.0.0.9:5060", 300, 500,
        "<urn:uuid:00000000-0000-1000-8000-000000000001>", 1)
    assert msg.path == "<sip:127.0.0.3;lr>,<sip:127.0.0.4;lr>"
    assert msg.user_agent == "Phone A/1.0"
    assert replay_headers(req.data) == {
        HDR_REPLAY.lower(): "2", HDR_RECEIVED.lower(): "sip:127.0.0.1:4000",
        HDR_SOCKET.lower(): "udp:127.0.0.1:5060", HDR_NAT.lower(): "1"}
    assert "Max-Forwards: 70\r\n" in text and text.endswith("Content-Length: 0\r\n\r\n")


def test_optional_fields_are_left_out_and_domains_and_escapes():
    req = build(rec_of(aor="a b%c@Example.COM", q=1000))
    assert req is not None
    msg = parse_message(req.data)
    assert msg.aor == "a b%c@example.com"
    assert "To: <sip:a%20b%25c@example.com>" in req.data.decode()
    assert msg.contacts[0].q == 1000
    assert msg.path is None and msg.user_agent is None
    assert replay_headers(req.data) == {"x-sc-replay": "2"}
    bare = build(rec_of(aor="bob"), domain="sip.example.net")
    assert bare is not None and parse_message(bare.data).aor == "bob@sip.example.net"


def test_expired_permanent_and_unsendable_contacts():
    assert build(rec_of(expires=NOW)) is None  # no time left: nothing to send
    with pytest.raises(ReplayError, match="permanent"):
        build(rec_of(expires=0))
    for bad in (rec_of(uri="sip:a b@host"), rec_of(callid="two words"),
                rec_of(user_agent=" padded"), rec_of(q=1001), rec_of(uri="*"),
                rec_of(instance='<urn:"x">'), rec_of(path="not an address <")):
        with pytest.raises(ReplayError) as err:
            build(bad)
        assert err.value.code is None
    with pytest.raises(ReplayError):
        build(rec_of(), branch="z9hG4bKnotours")


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_user = st.text(_ALNUM + "-_.!~*'()&=+$/%@ :;,?ü", min_size=1, max_size=20)
_host = st.from_regex(r"[a-z0-9]([a-z0-9.\-]{0,20}[a-z0-9])?", fullmatch=True)
_word = st.text(_ALNUM + "-_.!~*'%@:;/+=", min_size=1, max_size=30)
_ip = st.tuples(*(st.integers(0, 255),) * 3).map(lambda t: "127.{}.{}.{}".format(*t))
_contact_uri = st.builds(lambda u, ip, p, par: f"sip:{u}@{ip}:{p}{par}",
                         st.text(_ALNUM, min_size=1, max_size=12), _ip, st.integers(1, 65535),
                         st.sampled_from(["", ";ob", ";transport=tcp", ";line=2"]))


@st.composite
def replayable_records(draw: st.DrawFn) -> tuple:
    bare = _user.filter(lambda u: "@" not in u)  # a bare user with "@" would read as user@host
    aor = draw(st.one_of(bare, st.builds(lambda u, h: f"{u}@{h}", _user, _host)))
    instance = draw(st.one_of(st.none(), _word.map(lambda w: f"<urn:uuid:{w}>")))
    return make_record(
        aor=aor, uri=draw(_contact_uri), callid=draw(_word),
        cseq=draw(st.integers(0, 2**31 - 1)), expires=NOW + draw(st.integers(1, 10**9)),
        handle=(PEER << 56) | 1, last_modified=1,
        received=draw(st.one_of(st.none(), st.builds(lambda ip, p: f"sip:{ip}:{p}", _ip,
                                                     st.integers(1, 65535)))),
        path=draw(st.one_of(st.none(), st.lists(_ip, min_size=1, max_size=3).map(
            lambda ips: ",".join(f"<sip:{ip};lr>" for ip in ips)))),
        socket=draw(st.one_of(st.none(), _ip.map(lambda ip: f"udp:{ip}:5060"))),
        q=draw(st.one_of(st.just(-1), st.integers(0, 1000))),
        user_agent=draw(st.one_of(st.none(), st.text(_ALNUM + " /.()-", min_size=1,
                                                     max_size=30).map(str.strip)
                                  .filter(bool))),
        flags=draw(st.sampled_from([0, FLAG_NAT])), instance=instance,
        reg_id=draw(st.integers(0, 2**31 - 1)) if instance else 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replayable_records(), st.sampled_from(["127.0.0.1", "sip.example.net"]))
def test_every_replayable_record_parses_back_to_the_same_fields(rec, domain):
    req = build(rec, domain=domain)
    assert req is not None
    msg = parse_message(req.data)
    assert isinstance(msg, SipRequest) and msg.method == "REGISTER"
    aor = rec[model.AOR]
    want_aor = aor.rpartition("@")[0] + "@" + aor.rpartition("@")[2].lower() if "@" in aor \
        else f"{aor}@{domain}"
    assert msg.aor == want_aor == aor_of(msg.to_uri)
    assert (msg.call_id, msg.cseq) == (rec[model.CALLID], rec[model.CSEQ])
    assert msg.via_branch == BRANCH and msg.path == rec[model.PATH]
    assert msg.user_agent == rec[model.USER_AGENT]
    (c,) = msg.contacts
    assert (c.uri, c.expires, c.q, c.instance, c.reg_id) == (
        rec[model.URI], min(rec[model.EXPIRES] - NOW, 2**32 - 1), rec[model.Q],
        rec[model.INSTANCE], rec[model.REG_ID])
    headers = replay_headers(req.data)
    assert headers.get("x-sc-received") == rec[model.RECEIVED]
    assert headers.get("x-sc-socket") == rec[model.SOCKET]
    assert headers.get("x-sc-nat") == ("1" if rec[model.FLAGS] & FLAG_NAT else None)


_any_text = st.text(max_size=40)


@settings(max_examples=600, deadline=None)
@given(st.tuples(_any_text.filter(bool), _any_text.filter(bool),
                 st.one_of(st.none(), _any_text), st.one_of(st.none(), _any_text),
                 st.one_of(st.none(), _any_text), st.integers(0, 2 * NOW),
                 st.integers(-5, 2000), _any_text.filter(bool), st.integers(0, 2**33),
                 st.one_of(st.none(), _any_text), st.integers(0, 3),
                 st.one_of(st.none(), _any_text), st.integers(0, 2**33)))
def test_any_model_record_is_sent_intact_or_refused(fields):
    (aor, uri, received, path, sock, expires, q, callid, cseq, ua, flags, inst, reg_id) = fields
    rec = make_record(aor=aor, uri=uri, received=received, path=path, socket=sock,
                      expires=expires, q=q, callid=callid, cseq=cseq, user_agent=ua,
                      flags=flags, instance=inst, reg_id=reg_id, handle=1, last_modified=1)
    try:
        req = build(rec)
    except ReplayError as exc:
        assert exc.code is None
        return
    if req is None:
        assert 0 < rec[model.EXPIRES] <= NOW
        return
    msg = parse_message(req.data)  # never a message our own parser refuses
    (c,) = msg.contacts
    assert (msg.call_id, msg.cseq, c.uri, c.q, c.instance, msg.path, msg.user_agent) == (
        rec[model.CALLID], rec[model.CSEQ], rec[model.URI], rec[model.Q],
        rec[model.INSTANCE], rec[model.PATH], rec[model.USER_AGENT])


# --- the reply matcher --------------------------------------------------------------------------

def opened(window: int = 8, **kw: Any) -> tuple[ReplayTransactions, ReplayRegister]:
    tx = ReplayTransactions(window=window, **kw)
    req = build(rec_of())
    assert req is not None
    tx.add(req, 0.0)
    return tx, req


def test_replies_are_matched_by_callid_cseq_and_branch_and_classified():
    tx, req = opened()
    assert tx.on_datagram(response(req, branch=REPLAY_BRANCH_PREFIX + "other")) is None
    assert tx.on_datagram(response(req, 100, "Trying")) is None
    assert tx.pending == 1 and tx.stats.unmatched == 1 and tx.stats.provisional == 1
    assert tx.on_datagram(response(req)) == ReplayResult(req.key, "ok", 200, "OK")
    assert tx.pending == 0
    assert tx.on_datagram(response(req)) is None and tx.stats.unmatched == 2  # a repeat

    for status, reason, extra, kind in (
            (400, "Bad Request", "P-Registrar-Error: Invalid CSeq number\r\n", "held"),
            (400, "Invalid CSeq number", "", "held"),
            (400, "Bad Request", "", "rejected"),
            (403, "Replay not allowed", "", "rejected"),
            (503, "Too many registered contacts", "", "rejected")):
        tx, req = opened()
        result = tx.on_datagram(response(req, status, reason, extra))
        assert result is not None and (result.kind, result.status) == (kind, status)
        assert result.ok == (kind == "held")


def test_retransmissions_follow_timer_e_and_time_out():
    tx, req = opened(t1=0.5, t2=2.0, timeout=6.0)
    sent_at = []
    now = 0.0
    while tx.pending:
        wake = tx.next_wakeup()
        assert wake is not None and wake > now
        now = wake
        resend, expired = tx.poll(now)
        sent_at += [now] * len(resend)
        if expired:
            assert expired == [ReplayResult(req.key, "timeout", None, "no final response")]
    assert sent_at == [0.5, 1.5, 3.5, 5.5]  # T1, then doubling, capped at T2
    assert now == 6.0 and tx.stats.timeouts == 1 and tx.next_wakeup() is None

    tx, req = opened(t1=0.5, t2=4.0, timeout=30.0)
    assert tx.on_datagram(response(req, 100, "Trying")) is None
    resend, _ = tx.poll(0.5)
    assert resend == [req.data]
    assert tx.next_wakeup() == 4.5  # after a provisional: every T2


def test_window_is_bounded_and_keys_unique():
    tx, req = opened(window=1)
    with pytest.raises(ReplayError, match="window"):
        tx.add(build(rec_of(callid="other")), 0.0)
    tx2 = ReplayTransactions(window=4)
    tx2.add(req, 0.0)
    with pytest.raises(ReplayError, match="already open"):
        tx2.add(req, 0.0)
    tx2.cancel(req.key)
    assert tx2.pending == 0 and tx2.on_datagram(response(req)) is None


@settings(max_examples=800, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, 400), st.binary(max_size=8), st.integers(0, 400))))
def test_garbage_and_mutated_replies_never_raise(data):
    tx, req = opened()
    if isinstance(data, tuple):  # splice bytes into a valid reply
        good = response(req)
        at, chunk, cut = data
        at %= len(good)
        data = good[:at] + chunk + good[at + cut % 20:]
    result = tx.on_datagram(data)
    assert result is None or (result.key == req.key and result.kind in
                              ("ok", "held", "rejected"))
    s = tx.stats
    assert s.garbage + s.unmatched + s.provisional + s.ok + s.held + s.rejected == 1
    assert replay_headers(data) is not None


# --- loop safety --------------------------------------------------------------------------------

def test_tracker_ignores_replays_and_their_replies_but_not_phones():
    tracker = RegistrationTracker()
    req = build(rec_of(received="sip:127.0.0.1:4000", flags=FLAG_NAT))
    assert req is not None
    src, dst = ("udp", "127.0.0.1", VIA[1]), ("udp", "127.0.0.1", 5060)
    assert tracker.feed(parse_message(req.data), src, dst, NOW) == []
    ok = response(req, extra="Contact: <sip:alice@127.0.0.9:5060>;expires=300\r\n")
    assert tracker.feed(parse_message(ok), dst, src, NOW) == []
    assert tracker.stats.replayed_ignored == 2
    assert tracker.stats.unmatched_responses == 0 and tracker.pending == 0
    # The same REGISTER from a phone (its own branch) is a registration like any other.
    phone = req.data.replace(BRANCH.encode(), b"z9hG4bKphone1")
    assert tracker.feed(parse_message(phone), src, dst, NOW) == []
    outcomes = tracker.feed(parse_message(ok.replace(BRANCH.encode(), b"z9hG4bKphone1")),
                            dst, src, NOW)
    assert [o.aor for o in outcomes] == ["alice@127.0.0.1"]
    assert tracker.stats.replayed_ignored == 2


def dump_contact(aor: str, uri: str, cflags: int, **kw: Any) -> dict[str, Any]:
    c = {"table": "location", "aor": aor, "uri": uri, "expires": NOW + 300, "q": -1,
         "callid": "c@x", "cseq": 3, "user_agent": None, "received": None, "path": None,
         "socket": "udp:127.0.0.1:5060", "flags": 0, "cflags": cflags, "methods": None,
         "instance": None, "reg_id": 0, "last_modified": NOW, "loaded_by_rpc": False}
    c.update(kw)
    return c


def test_reconcile_leaves_replayed_copies_to_their_origin():
    replica = Replica(ME)
    copy = dump_contact("bob", "sip:bob@127.0.0.9", COPY_MASK | kd.NAT_BFLAG_MASK)
    own = dump_contact("carol", "sip:carol@127.0.0.9", 0)
    counts = reconcile(replica, [copy, own], dump_start_ms=NOW * 1000, now=NOW)
    assert (counts.replayed_copies, counts.puts) == (1, 1)
    assert replica.store.get("bob", "sip:bob@127.0.0.9") is None
    assert replica.store.get("carol", "sip:carol@127.0.0.9") is not None
    # A peer's contact that the proxy holds only as a copy is not deleted either.
    peer = make_record(aor="bob", uri="sip:bob@127.0.0.9", callid="c@x", cseq=3,
                       expires=NOW + 300, handle=(PEER << 56) | 7, last_modified=1)
    replica.store.put(peer)
    counts = reconcile(replica, [copy, own], dump_start_ms=NOW * 1000, now=NOW)
    assert counts.replayed_copies == 1 and counts.deletes == 0
    assert replica.store.get("bob", "sip:bob@127.0.0.9") == peer


def opensips_insert(bflags: int, callid: str = "bob-cid-1@test") -> dict[str, Any]:
    """An E_UL_CONTACT_INSERT as OpenSIPS 3.6 raises it (shape of the recorded samples)."""
    return {"jsonrpc": "2.0", "method": "E_UL_CONTACT_INSERT", "params": {
        "domain": "location", "aor": "bob", "uri": "sip:bob@127.0.0.9:5070",
        "received": "sip:127.0.0.1:7002", "path": None, "qval": -1,
        "user_agent": "pyua/1.0", "socket": "udp:127.0.0.1:5060", "bflags": bflags,
        "expires": NOW + 300, "callid": callid, "cseq": 1, "attr": "", "latency": 0,
        "shtag": ""}}


def test_opensips_events_of_replayed_copies_are_ignored():
    from sidecar.config import Section
    from sidecar.sources.opensips_source import OpensipsSource
    from sidecar.sources.registry import SourceContext, parse_source

    table = {"type": "opensips", "mi_url": "http://127.0.0.1:9/mi",
             "events_listen": ["udp:127.0.0.1:0"], "local_sockets": ["udp:127.0.0.1:5060"],
             "flag_bits": {"NAT": 1, "SIPPING": 2, "SIPPING_LAT": 4, "SC_COPY": 8}}
    cfg = parse_source(Section("sources[0]", table), Path("."))
    replica = Replica(ME)
    source = OpensipsSource(cfg.settings, SourceContext(replica, lambda: None, None, ME))
    source.handle_value(opensips_insert(1 | 2 | 4 | 8))  # what route[SC_REPLAY] saved
    assert source.stats.replayed_copies_ignored == 1 and len(replica.store) == 0
    source.handle_value(opensips_insert(1 | 2 | 4, callid="bob-cid-2@test"))  # the phone itself
    assert source.stats.puts == 1 and len(replica.store) == 1


def test_proxy_config_keys_are_validated(tmp_path):
    def load(extra: str) -> Any:
        import tomllib

        proxy = tomllib.loads('type = "kamailio"\nrpc_url = "http://127.0.0.1:5071/RPC"\n'
                              + extra)
        return parse_config({"node": {"id": 2}, "proxy": proxy}, tmp_path).proxy

    p = load("")
    assert (p.load_method, p.replay_target, p.replay_source) == (
        "rpc", ("127.0.0.1", 5060), "127.0.0.1")
    p = load('load_method = "register"\nreplay_target = "udp:127.0.0.1:5090"\n'
             'replay_source = "127.0.0.5"\nreplay_window = 16')
    assert (p.load_method, p.replay_target, p.replay_source, p.replay_window) == (
        "register", ("127.0.0.1", 5090), "127.0.0.5", 16)
    for extra, key in (('load_method = "ul"', "proxy.load_method"),
                       ('replay_target = "127.0.0.1:5060"', "proxy.replay_target"),
                       ('replay_target = "udp:proxy.local:5060"', "proxy.replay_target"),
                       ('replay_target = "udp:127.0.0.1:0"', "proxy.replay_target"),
                       ('replay_source = "localhost"', "proxy.replay_source"),
                       ("replay_window = 0", "proxy.replay_window")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load(extra)


# --- the real Kamailio --------------------------------------------------------------------------

def local_udp(ip: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.setblocking(False)
    return s


def replay_client(kam: KamailioInstance, rpc: Any, **kw: Any) -> RegisterReplayClient:
    return RegisterReplayClient(rpc, target=(kam.sip_ip, kam.sip_port), node_id=ME, **kw)


@pytest.mark.slow
async def test_replayed_contacts_are_stored_losslessly(tmp_path):
    require_kamailio()
    now = int(time.time())
    # NAT addresses are loopback sockets nobody reads: nothing may leave this host.
    nat = [f"sip:127.0.0.1:{free_port()}" for _ in range(2)]
    async with KamailioInstance(tmp_path) as kam, kam.http_rpc() as rpc:
        sock = kam.sip_socket
        records = [
            rec_of(aor="natphone", uri="sip:natphone@127.0.0.77:5060", callid="n1@ph", cseq=12,
                   expires=now + 300, received=nat[0], socket=sock, flags=FLAG_NAT,
                   user_agent="NAT phone/2.1",
                   methods=methods_bitmask("INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY")),
            rec_of(aor="edge", uri="sip:edge@127.0.0.78:5070;transport=udp", callid="e1@ph",
                   cseq=3, expires=now + 1800, path="<sip:127.0.0.3;lr>,<sip:127.0.0.4;lr>",
                   socket=sock, q=250, user_agent="Behind edge"),
            rec_of(aor="alice", uri="sip:alice@127.0.0.79:5062;ob", callid="a1@ph", cseq=41,
                   expires=now + 600, socket=sock, q=1000,
                   instance="<urn:uuid:00000000-0000-1000-8000-000000000001>", reg_id=1,
                   received=nat[1], flags=FLAG_NAT, user_agent="Phone A",
                   methods=methods_bitmask("INVITE, REGISTER, SUBSCRIBE, MESSAGE, PRACK")),
            rec_of(aor="desk", uri="sip:desk@127.0.0.80:5064;line=1", callid="d1@ph", cseq=7,
                   expires=now + 900, socket=sock, q=900, user_agent="Desk"),
            rec_of(aor="desk", uri="sip:desk@127.0.0.80:5064;line=2", callid="d2@ph", cseq=2,
                   expires=now + 120, socket=sock, user_agent="Desk"),
        ]
        client = replay_client(kam, rpc)
        try:
            assert all(await asyncio.gather(*(client.ul_add_record(r) for r in records)))
            dumped = await rpc.ul_dump()
        finally:
            await client.close()
    assert client.stats["replayed"] == len(records)
    assert client.tx.stats.ok == len(records) and client.tx.stats.unmatched == 0
    got = {(c["aor"], c["uri"]): c for c in dumped}
    assert set(got) == {(r[model.AOR], r[model.URI]) for r in records}
    for r in records:
        c = got[(r[model.AOR], r[model.URI])]
        assert (c["received"], c["path"], c["socket"], c["callid"], c["cseq"], c["q"],
                c["user_agent"], c["instance"], c["reg_id"]) == (
            r[model.RECEIVED], r[model.PATH], r[model.SOCKET], r[model.CALLID], r[model.CSEQ],
            r[model.Q], r[model.USER_AGENT], r[model.INSTANCE], r[model.REG_ID])
        assert abs(c["expires"] - r[model.EXPIRES]) <= 2
        nat_bits = kd.NAT_BFLAG_MASK | kd.SIPPING_BFLAG_MASK
        assert c["cflags"] & nat_bits == (nat_bits if r[model.FLAGS] & FLAG_NAT else 0)
        assert c["cflags"] & COPY_MASK and not c["loaded_by_rpc"]
        back = kd.kamailio_contact_to_record(c, handle=1, last_modified=1)
        assert back[model.FLAGS] & FLAG_NAT == r[model.FLAGS] & FLAG_NAT
        assert back[model.METHODS] == r[model.METHODS]  # Allow names, Kamailio's own bits
    # A reconcile on this (standby) node sees copies, not registrations to take over.
    replica = Replica(ME)
    counts = reconcile(replica, dumped, dump_start_ms=now * 1000)
    assert counts.replayed_copies == len(records) and len(replica.store) == 0


@pytest.mark.slow
async def test_untrusted_sources_get_no_replay_privileges(tmp_path):
    require_kamailio()
    now = int(time.time())
    async with KamailioInstance(tmp_path) as kam, kam.http_rpc() as rpc:
        rec = rec_of(aor="eve", uri="sip:eve@127.0.0.81", expires=now + 300,
                     received=f"sip:127.0.0.1:{free_port()}", socket=kam.sip_socket,
                     flags=FLAG_NAT)
        impostor = replay_client(kam, rpc, source_ip="127.0.0.2")
        try:
            with pytest.raises(ReplayError) as err:
                await impostor.ul_add_record(rec)
        finally:
            await impostor.close()
        assert err.value.code == 403
        # The headers without X-SC-Replay, or a replay branch alone, from a phone: refused too.
        phone = local_udp("127.0.0.2")
        loop = asyncio.get_running_loop()
        try:
            req = build(rec, via=phone.getsockname(), now=now)
            assert req is not None
            variants = [req.data.replace(b"X-SC-Replay: 2\r\n", b""),
                        req.data.replace(b"X-SC-Received", b"X-Other")
                        .replace(b"X-SC-Socket", b"X-Other2").replace(b"X-SC-NAT", b"X-Other3")
                        .replace(b"X-SC-Replay: 2\r\n", b"")]
            for data in variants:
                await loop.sock_sendto(phone, data, (kam.sip_ip, kam.sip_port))
                async with asyncio.timeout(5):
                    reply = await loop.sock_recv(phone, 65535)
                assert reply.startswith(b"SIP/2.0 403 "), reply[:80]
        finally:
            phone.close()
        assert await rpc.ul_dump() == []


async def stop_ownership(own: Ownership) -> None:
    if own.loader is not None and own.loader is not own.client:
        await own.loader.close()
    await own.client.close()


@pytest.mark.slow
async def test_refusals_and_timeouts_are_counted_by_the_loader(tmp_path):
    require_kamailio()
    now = int(time.time())
    async with KamailioInstance(tmp_path) as kam:
        replica = Replica(ME)
        good = [rec_of(aor=f"u{i}", uri=f"sip:u{i}@127.0.0.9", callid=f"c{i}",
                       expires=now + 300, handle=(PEER << 56) | (i + 1)) for i in range(20)]
        too_long = rec_of(aor="long", uri="sip:long@127.0.0.9;" + "x" * 600, expires=now + 300,
                          handle=(PEER << 56) | 99)
        # A REGISTER cannot carry these two: they are loaded over RPC (ul.add) instead.
        permanent = rec_of(aor="perm", uri="sip:perm@127.0.0.9", expires=0,
                           handle=(PEER << 56) | 97)
        spaced = rec_of(aor="spaced", uri="sip:spaced@127.0.0.9", callid="two words",
                        expires=now + 300, handle=(PEER << 56) | 98)
        for r in (*good, too_long, permanent, spaced):
            replica.store.put(r)
        settings_ = ProxySettings(type="kamailio", rpc_url=kam.rpc_url, load="warm",
                                  load_method="register",
                                  replay_target=(kam.sip_ip, kam.sip_port), timeout_s=0.6)
        own = Ownership(replica, lambda: None, settings_, None)
        try:
            await own.load_pass()
            assert own.load_stats["added"] == 22
            assert own.load_stats["errors"] == own.load_stats["rejected"] == 1
            assert "400" in own.last_error
            await own.load_pass()  # the refused version is not retried until it changes
            assert own.loader.tx.stats.sent == 21 and own.load_stats["errors"] == 1
            async with kam.http_rpc() as rpc:
                dumped = {c["aor"]: c for c in await rpc.ul_dump()}
            assert len(dumped) == 22 and "long" not in dumped
            assert dumped["perm"]["expires"] == 0 and dumped["perm"]["loaded_by_rpc"]
            assert dumped["spaced"]["loaded_by_rpc"]
            replay = own.status()["proxy_load"]["replay"]
            assert (replay["rejected"], replay["permanent_via_rpc"],
                    replay["unsendable_via_rpc"]) == (1, 1, 1)
        finally:
            await stop_ownership(own)

    # Nobody answers (the proxy is down): the pass fails as a whole, like a failed ul.add.
    silent = local_udp()
    try:
        replica = Replica(ME)
        replica.store.put(good[0])
        settings_ = ProxySettings(type="kamailio", rpc_url="http://127.0.0.1:9/RPC",
                                  load="warm", load_interval_s=0.1, load_method="register",
                                  replay_target=silent.getsockname(), timeout_s=1.2)
        own = Ownership(replica, lambda: None, settings_, None)
        await own.start()
        try:
            async with asyncio.timeout(10):
                while own.load_stats["errors"] < 1:
                    await asyncio.sleep(0.05)
        finally:
            await own.stop()
        assert "no answer" in own.last_error and own.load_stats["added"] == 0
        assert own.loader.tx.stats.retransmitted >= 1  # Timer E fired before giving up
    finally:
        silent.close()


def drain(socks: list[socket.socket]) -> list[bytes]:
    got = []
    for s in socks:
        while True:
            try:
                got.append(s.recv(65535))
            except BlockingIOError:
                break
    return got


@pytest.mark.slow
async def test_warm_load_of_2000_contacts_leaves_the_pinger_off(tmp_path):
    require_kamailio()
    n = 2000
    phones = [local_udp() for _ in range(4)]  # the NAT addresses of the contacts
    now = int(time.time())
    try:
        async with KamailioInstance(tmp_path, natping_interval=1, pkg_mb=32) as kam:
            replica = Replica(ME)
            for i in range(n):
                port = phones[i % len(phones)].getsockname()[1]
                replica.store.put(rec_of(
                    aor=f"w{i}", uri=f"sip:w{i}@127.0.0.66:5060", callid=f"w{i}@ph",
                    cseq=i + 1, expires=now + 600 + i % 60, handle=(PEER << 56) | (i + 1),
                    received=f"sip:127.0.0.1:{port}", socket=kam.sip_socket, flags=FLAG_NAT,
                    q=i % 1001, user_agent=f"UA {i % 7}"))
            settings_ = ProxySettings(type="kamailio", rpc_url=kam.rpc_url, load="warm",
                                      load_rate=20_000, load_method="register",
                                      replay_target=(kam.sip_ip, kam.sip_port))
            own = Ownership(replica, lambda: None, settings_, None)
            try:
                started = time.monotonic()
                await own.load_pass()
                took = time.monotonic() - started
                async with kam.http_rpc(timeout=20) as rpc:
                    dumped = await rpc.ul_dump()
                    assert own.load_stats["added"] == n and own.load_stats["errors"] == 0
                    assert len(dumped) == n
                    by_aor = {c["aor"]: c for c in dumped}
                    for i in range(0, n, 97):
                        c = by_aor[f"w{i}"]
                        assert (c["callid"], c["cseq"], c["q"]) == (f"w{i}@ph", i + 1, i % 1001)
                    assert all(c["cflags"] & kd.NAT_BFLAG_MASK for c in dumped)
                    # Loading made nothing ping: with a 1 s NAT ping interval, 2,000 NATed
                    # contacts and the pinger off, the phones hear nothing.
                    drain(phones)
                    await asyncio.sleep(2.5)
                    assert drain(phones) == []
                    # Control: the same contacts are pinged as soon as the pinger is on.
                    await rpc.nathelper_enable_ping(True)
                    async with asyncio.timeout(5):
                        while not (heard := drain(phones)):
                            await asyncio.sleep(0.05)
                    await rpc.nathelper_enable_ping(False)
                    assert heard[0].startswith(b"OPTIONS sip:w")
                # A second pass has nothing left to do.
                await own.load_pass()
                assert own.loader.tx.stats.sent == n
            finally:
                await stop_ownership(own)
        assert took < 20, f"2,000 replays took {took:.1f} s"
    finally:
        for s in phones:
            s.close()


@pytest.mark.slow
async def test_replays_stay_out_of_the_hep_mirror(tmp_path):
    require_kamailio()
    hep = local_udp()
    now = int(time.time())
    try:
        async with KamailioInstance(tmp_path, hep_dst=hep.getsockname()) as kam, \
                kam.http_rpc() as rpc:
            client = replay_client(kam, rpc)
            try:
                assert await client.ul_add_record(
                    rec_of(aor="copy", uri="sip:copy@127.0.0.9", expires=now + 300))
            finally:
                await client.close()
            # A phone's REGISTER afterwards: once its mirror arrives, the replay's would have.
            phone = local_udp()
            try:
                req = build(rec_of(aor="real", uri="sip:real@127.0.0.9", callid="real@ph"),
                            via=phone.getsockname(), now=now,
                            branch=REPLAY_BRANCH_PREFIX + "x")
                assert req is not None
                data = (req.data.replace(REPLAY_BRANCH_PREFIX.encode() + b"x", b"z9hG4bKreal")
                        .replace(b"X-SC-Replay: 2\r\n", b""))
                phone.sendto(data, (kam.sip_ip, kam.sip_port))
                mirrored: list[bytes] = []
                async with asyncio.timeout(5):
                    while sum(b"z9hG4bKreal" in m for m in mirrored) < 2:  # request + reply
                        mirrored += drain([hep])
                        await asyncio.sleep(0.02)
            finally:
                phone.close()
            assert not any(REPLAY_BRANCH_PREFIX.encode() in m for m in mirrored)
            assert {c["aor"] for c in await rpc.ul_dump()} == {"copy", "real"}
    finally:
        hep.close()
