"""HEP source: real HEP frames over real UDP/TCP sockets, bad input, settings, and the proof.

The first tests run the source in-process on 127.0.0.1 with a real Replica and send frames
built with ``encode_hep``. The ``slow`` tests start Debian's Kamailio with kamailio-cfg
(``WITH_HEP``: siptrace mirrors every REGISTER and reply) and real ``sidecar run`` processes,
register 10,000 SIPp phones and require the sidecar's table to equal Kamailio's ``ul.dump``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import ConfigError, parse_config
from sidecar.lab.nodes import NodeProcess, wait_until
from sidecar.model import (
    CALLID,
    CSEQ,
    EXPIRES,
    FLAG_NAT,
    FLAGS,
    RECEIVED,
    SOCKET,
    URI,
)
from sidecar.replica import Replica
from sidecar.sources.hep import (
    FAMILY_IPV4,
    PROTO_TCP,
    PROTO_TYPE_SIP,
    PROTO_UDP,
    HepPacket,
    encode_hep,
)
from sidecar.sources.hep_source import HepSettings, HepSource
from sidecar.sources.registry import SourceContext
from tests.kamailio_fixture import (
    KamailioInstance,
    free_port,
    require_kamailio,
    require_sipp,
)
from tests.sip_load import compare, node_contacts, plan_load, proxy_dump, run_load

PROXY = ("127.0.0.2", 5060)
PHONE = ("127.0.0.1", 40000)  # where the phone's packets come from
NAT_CONTACT = "sip:alice@127.0.0.9:5070"  # what the phone behind NAT believes it is


# --- SIP and HEP frames ---------------------------------------------------------------------

def register(user: str, contact: str, *, callid: str, cseq: int = 1, expires: int = 600,
             via: str = "127.0.0.9:5070", branch: str | None = None, pad: int = 0) -> bytes:
    branch = branch or f"z9hG4bK-{callid}-{cseq}"
    return (
        f"REGISTER sip:{PROXY[0]} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {via};branch={branch}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{PROXY[0]}>;tag=f{cseq}\r\nTo: <sip:{user}@{PROXY[0]}>\r\n"
        f"Call-ID: {callid}\r\nCSeq: {cseq} REGISTER\r\n"
        f"Contact: {contact}\r\nExpires: {expires}\r\nUser-Agent: test-phone\r\n"
        + (f"X-Pad: {'x' * pad}\r\n" if pad else "")
        + "Content-Length: 0\r\n\r\n"
    ).encode()


def ok(user: str, contacts: list[tuple[str, int]], *, callid: str, cseq: int = 1,
       via: str = "127.0.0.9:5070", branch: str | None = None) -> bytes:
    """A 200 OK as Kamailio's registrar sends it: every binding of the AOR, with expires."""
    branch = branch or f"z9hG4bK-{callid}-{cseq}"
    listed = "".join(f"Contact: <{uri}>;expires={exp}\r\n" for uri, exp in contacts)
    return (
        f"SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP {via};branch={branch};rport={PHONE[1]};received={PHONE[0]}\r\n"
        f"From: <sip:{user}@{PROXY[0]}>;tag=f{cseq}\r\nTo: <sip:{user}@{PROXY[0]}>;tag=t1\r\n"
        f"Call-ID: {callid}\r\nCSeq: {cseq} REGISTER\r\n{listed}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def hep(payload: bytes, *, inbound: bool = True, ts: float | None = None,
        proto: int = PROTO_UDP, proto_type: int = PROTO_TYPE_SIP,
        auth_key: str | None = None, compress: bool = False) -> bytes:
    """The frame siptrace sends: requests phone -> proxy, replies proxy -> phone."""
    src, dst = (PHONE, PROXY) if inbound else (PROXY, PHONE)
    pkt = HepPacket(family=FAMILY_IPV4, proto=proto, src_ip=src[0], dst_ip=dst[0],
                    src_port=src[1], dst_port=dst[1], ts=time.time() if ts is None else ts,
                    proto_type=proto_type, capture_id=1, auth_key=auth_key, payload=payload)
    return encode_hep(pkt, compress=compress)


def transaction(user: str = "alice", contact: str = NAT_CONTACT, *, callid: str = "a1@test",
                cseq: int = 1, expires: int = 600, **kw) -> list[bytes]:
    listed = [(contact, expires)] if expires else []
    return [hep(register(user, f"<{contact}>", callid=callid, cseq=cseq, expires=expires), **kw),
            hep(ok(user, listed, callid=callid, cseq=cseq), inbound=False, **kw)]


# --- an in-process source on real sockets ---------------------------------------------------

class Running:
    def __init__(self, source: HepSource, replica: Replica, kicks: list[int]) -> None:
        self.source, self.replica, self.kicks = source, replica, kicks

    @property
    def counters(self) -> dict:
        return self.source.status()

    async def until(self, predicate: Callable[[], object], what: str,
                    timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached; status {self.counters}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(**overrides) -> AsyncIterator[Running]:
    replica = Replica(1)
    kicks: list[int] = []
    ctx = zmq.asyncio.Context()
    settings_ = HepSettings(host="127.0.0.1", port=0, **overrides)
    source = HepSource(settings_, SourceContext(replica, lambda: kicks.append(1), ctx, 1))
    await source.start()
    try:
        yield Running(source, replica, kicks)
    finally:
        await source.stop()
        ctx.term()


def udp_send(addr: tuple[str, int], *frames: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for f in frames:
            s.sendto(f, addr)


async def tcp_send(addr: tuple[str, int], data: bytes, *, pieces: int = 1,
                   wait_close: bool = False) -> bool:
    """Send ``data`` in ``pieces`` writes; with ``wait_close`` return whether the source
    closed the connection (EOF or reset) within 3 s."""
    reader, writer = await asyncio.open_connection(*addr)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
    closed = False
    if wait_close:
        try:
            async with asyncio.timeout(3):
                closed = await reader.read(1) == b""
        except (ConnectionResetError, TimeoutError) as exc:
            closed = isinstance(exc, ConnectionResetError)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return closed


# --- tests: real frames, real sockets -------------------------------------------------------

async def test_udp_register_then_unregister_changes_the_replica():
    async with running() as r:
        addr = r.source.udp_address
        assert addr is not None and r.source.tcp_address == addr  # one port, both transports
        before = int(time.time())
        udp_send(addr, *transaction(expires=600))
        store = r.replica.store
        await r.until(lambda: store.get("alice", NAT_CONTACT) is not None, "binding stored")
        rec = store.get("alice", NAT_CONTACT)
        assert rec[URI] == NAT_CONTACT
        assert rec[RECEIVED] == f"sip:{PHONE[0]}:{PHONE[1]}"  # behind NAT: source address kept
        assert rec[SOCKET] == f"udp:{PROXY[0]}:{PROXY[1]}"
        assert rec[CALLID] == "a1@test" and rec[CSEQ] == 1 and rec[FLAGS] & FLAG_NAT
        assert before + 600 <= rec[EXPIRES] <= int(time.time()) + 600
        assert r.kicks, "the publisher must be kicked after a change"

        udp_send(addr, *transaction(callid="a1@test", cseq=2, expires=0))
        await r.until(lambda: store.get("alice", NAT_CONTACT) is None, "binding deleted")
        c = r.counters
        assert (c["messages"], c["outcomes"], c["puts"], c["deletes"]) == (4, 2, 1, 1)
        assert c["bad_hep"] == c["parse_errors"] == c["drops"] == 0


async def test_tcp_frames_split_anywhere_and_compressed_are_all_read():
    async with running(transports=("tcp",)) as r:
        assert r.source.udp_address is None
        addr = r.source.tcp_address
        stream = b"".join(
            frame for i in range(20)
            for frame in transaction(f"u{i}", f"sip:u{i}@127.0.0.1:40000", callid=f"c{i}@t",
                                     proto=PROTO_TCP, compress=i % 2 == 1))
        await tcp_send(addr, stream, pieces=37)  # cuts through headers and chunk bodies
        store = r.replica.store
        await r.until(lambda: len(store) == 20, "20 bindings over TCP")
        rec = store.get("u3", "sip:u3@127.0.0.1:40000")
        assert rec[RECEIVED] is None  # Contact = source address: not NATed
        assert rec[SOCKET] == f"udp:{PROXY[0]}:{PROXY[1]}"  # the Via says UDP: that socket
        assert r.counters["tcp_connections"] == 1 and r.counters["tcp_dropped"] == 0


async def test_siptrace_duplicates_are_counted_once():
    async with running() as r:
        frames = transaction()
        udp_send(r.source.udp_address, frames[0], frames[0], frames[1], frames[1])
        await r.until(lambda: r.counters["messages"] == 4, "4 frames")
        c = r.counters
        assert (c["outcomes"], c["puts"], c["duplicates"]) == (1, 1, 2)
        assert len(r.replica.store) == 1


async def test_garbage_auth_oversize_and_non_register_are_counted_and_harmless():
    async with running(auth_key="s3cret", max_message=2048) as r:
        addr = r.source.udp_address
        good = transaction(auth_key="s3cret")
        udp_send(addr,
                 b"not hep at all",                                   # bad_hep
                 good[0][:-3],                                       # truncated: bad_hep
                 *transaction("mallory", callid="m@t"),              # no key: auth x2
                 *transaction("mallory", callid="m@t", auth_key="guess"),  # wrong key: x2
                 hep(register("big", "<sip:big@127.0.0.1:1>", callid="b@t", pad=3000),
                     auth_key="s3cret"),                             # oversize: bad_hep
                 hep(b"\x80\x00rtcp", proto_type=5, auth_key="s3cret"),  # non_sip
                 hep(b"OPTIONS sip:x SIP/2.0\r\n\r\n", auth_key="s3cret"),  # non_register
                 hep(b"REGISTER sip:x SIP/2.0\r\nbroken\r\n\r\n", auth_key="s3cret"),  # parse
                 *good)
        store = r.replica.store
        await r.until(lambda: r.counters["messages"] == 12, "12 frames")
        c = r.counters
        assert (c["bad_hep"], c["auth_failures"], c["non_sip"], c["non_register"],
                c["parse_errors"]) == (3, 4, 1, 1, 1)
        assert store.get("mallory", NAT_CONTACT) is None
        assert store.get("alice", NAT_CONTACT) is not None and len(store) == 1

        # A TCP peer sending garbage loses its connection; the next one is served.
        assert await tcp_send(addr, b"GET / HTTP/1.1\r\n\r\n", wait_close=True)
        oversize = hep(register("big", "<sip:big@127.0.0.1:1>", callid="b2@t", pad=3000),
                       proto=PROTO_TCP, auth_key="s3cret")
        assert await tcp_send(addr, oversize, wait_close=True)
        assert r.counters["tcp_dropped"] == 2
        await tcp_send(addr, b"".join(transaction("bob", "sip:bob@127.0.0.9:5070",
                                                  callid="b@t", auth_key="s3cret")))
        await r.until(lambda: store.get("bob", "sip:bob@127.0.0.9:5070") is not None,
                      "bob over a fresh TCP connection")


async def test_connections_beyond_the_limit_are_refused():
    async with running(max_connections=1) as r:
        addr = r.source.tcp_address
        _, first = await asyncio.open_connection(*addr)
        await r.until(lambda: r.counters["tcp_open"] == 1, "first connection accepted")
        assert await tcp_send(addr, b"", wait_close=True)
        assert r.counters["tcp_refused"] == 1
        first.close()
        await r.until(lambda: r.counters["tcp_open"] == 0, "first connection gone")


async def test_capture_time_far_off_uses_the_local_clock():
    async with running() as r:
        udp_send(r.source.udp_address, *transaction(ts=12345.0, expires=300))
        store = r.replica.store
        await r.until(lambda: store.get("alice", NAT_CONTACT) is not None, "binding stored")
        assert r.counters["ts_skew"] == 2
        assert abs(store.get("alice", NAT_CONTACT)[EXPIRES] - (time.time() + 300)) <= 2


async def test_unanswered_registers_are_dropped_after_the_pair_timeout():
    async with running(pair_timeout_s=0.5) as r:
        udp_send(r.source.udp_address, transaction()[0])
        await r.until(lambda: r.counters["pending"] == 1, "REGISTER pending")
        await r.until(lambda: r.counters["drops"] == 1, "REGISTER dropped", timeout=5)
        assert r.counters["pending"] == 0 and len(r.replica.store) == 0


def test_listening_on_a_taken_port_raises_and_leaves_nothing_open():
    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            replica = Replica(1)
            source = HepSource(HepSettings(port=port, transports=("udp",)),
                               SourceContext(replica, lambda: None, None, 1))  # type: ignore[arg-type]
            with pytest.raises(OSError):
                await source.start()
            assert source.status()["messages"] == 0
    asyncio.run(scenario())


# --- settings -------------------------------------------------------------------------------

def source_config(**table) -> object:
    return parse_config({"node": {"id": 1}, "sources": [{"type": "hep", **table}]},
                        Path("/tmp")).sources[0].settings


def test_settings_defaults_and_values():
    d = source_config()
    assert d == HepSettings()
    s = source_config(listen="[::1]:9999", transports=["tcp"], auth_key="k", use_domain=True,
                      max_message=4096, pair_timeout_s=5)
    assert (s.host, s.port, s.transports, s.auth_key, s.use_domain, s.max_message,
            s.pair_timeout_s) == ("::1", 9999, ("tcp",), "k", True, 4096, 5.0)


@pytest.mark.parametrize(("table", "key"), [
    ({"listen": "9060"}, "sources[0].listen"),
    ({"listen": "127.0.0.1:99999"}, "sources[0].listen"),
    ({"listen": 9060}, "sources[0].listen"),
    ({"transports": ["sctp"]}, "sources[0].transports"),
    ({"transports": []}, "sources[0].transports"),
    ({"transports": "udp"}, "sources[0].transports"),
    ({"auth_key": ""}, "sources[0].auth_key"),
    ({"use_domain": "yes"}, "sources[0].use_domain"),
    ({"max_message": 10}, "sources[0].max_message"),
    ({"max_message": 70000}, "sources[0].max_message"),
    ({"pair_timeout_s": 0}, "sources[0].pair_timeout_s"),
    ({"lisen": "127.0.0.1:1"}, "sources[0].lisen"),
])
def test_settings_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as err:
        source_config(**table)
    assert str(err.value).startswith(key + ":")


# --- fuzz: nothing that arrives can raise ---------------------------------------------------

_FUZZ_SOURCE = HepSource(HepSettings(max_message=4096),
                         SourceContext(Replica(1), lambda: None, None, 1))  # type: ignore[arg-type]
_VALID = transaction() + transaction("bob", "sip:bob@127.0.0.1:40000", callid="b@t",
                                     compress=True)
def _mutate(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data)
    return data[:at] + junk + data[at + len(junk):]


def _damaged_pair(n: int, which: int, at: int, junk: bytes) -> list[bytes]:
    """A REGISTER and its 200 OK (fresh Call-ID, so the tracker pairs them), one damaged."""
    callid = f"f{n}@t"
    sip = [register("alice", f"<{NAT_CONTACT}>, <sip:a2@127.0.0.1:1>;expires=0", callid=callid),
           ok("alice", [(NAT_CONTACT, 60), ("sip:a2@127.0.0.1:1", 30)], callid=callid)]
    if which < 2:
        sip[which] = _mutate(sip[which], at, junk)
    return [hep(sip[0]), hep(sip[1], inbound=False)]


_JUNK = (st.sampled_from([b";", b",", b"*", b"0", b"\r\n", b" ", b"<", b"99999", b"@"])
         | st.binary(min_size=1, max_size=4))


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=300).map(lambda b: [b]),
    st.builds(_mutate, st.sampled_from(_VALID), st.integers(0, 2000),
              st.binary(min_size=1, max_size=8)).map(lambda b: [b]),
    # valid HEP around damaged SIP: exercises the parser, the tracker and apply_outcome
    st.builds(_damaged_pair, st.integers(0, 10**9), st.integers(0, 2), st.integers(0, 2000),
              _JUNK),
))
def test_fuzz_handle_frame_never_raises(frames):
    before = _FUZZ_SOURCE.counters.messages
    for data in frames:
        _FUZZ_SOURCE.handle_frame(data)
    assert _FUZZ_SOURCE.counters.messages == before + len(frames)


# --- the proof: real Kamailio + siptrace -> real `sidecar run` -----------------------------

PROOF_FIELDS = ("received", "socket", "path", "callid", "cseq")


def hep_node(node_id: int, workdir: Path, hep_port: int, transports: str = '["udp"]'
             ) -> NodeProcess:
    return NodeProcess(node_id, workdir, extra_toml=(
        f'[[sources]]\ntype = "hep"\nlisten = "127.0.0.1:{hep_port}"\n'
        f"transports = {transports}\n"))


def wait_equal(node: NodeProcess, dump: list[dict], timeout: float) -> float:
    """Poll until the node's table equals ``dump``; return how long it took."""
    started = time.monotonic()
    diffs: list[str] = []

    def equal() -> bool:
        nonlocal diffs
        diffs = compare(node_contacts(node), dump, fields=PROOF_FIELDS)
        return not diffs

    try:
        wait_until(equal, timeout, interval=0.2, what="replica equal to ul.dump")
    except TimeoutError:
        raise AssertionError(f"{len(diffs)} differences, first: {diffs[:10]}") from None
    return time.monotonic() - started


@pytest.mark.slow
def test_10k_sipp_phones_through_kamailio_hep_equal_its_ul_dump(tmp_path):
    require_kamailio()
    require_sipp()
    hep_port = free_port("127.0.0.1")
    a = hep_node(1, tmp_path / "a", hep_port)
    b = NodeProcess(2, tmp_path / "b")
    a.peers, b.peers = [b], [a]
    try:
        a.start()
        b.start()
        with KamailioInstance(tmp_path, sip_ip="127.0.0.2", hep_dst=("127.0.0.1", hep_port),
                              pkg_mb=64) as kam:
            plan = plan_load(10_000, phone_port=free_port("127.0.0.1"))
            report = asyncio.run(run_load(plan, kam, workdir=tmp_path / "sipp", rate=2000))
            load_done = time.monotonic()
            dump = asyncio.run(proxy_dump(kam))
        assert plan.check_proxy(dump, kam.sip_socket) == []
        assert len(dump) == 9500

        wait_equal(a, dump, timeout=30)
        converged = time.monotonic() - load_done
        status = a.mi("sc_status")["sources"]["hep"]
        rows = len(plan.register) + len(plan.unregister)
        assert status["outcomes"] == rows, status
        assert status["puts"] == len(plan.register) and status["deletes"] == 2500, status
        assert status["bad_hep"] == status["parse_errors"] == status["drops"] == 0, status

        wait_until(lambda: a.mi("sc_digest") == b.mi("sc_digest"), 20, interval=0.2,
                   what="replica B equal to A")
        assert b.mi("sc_digest")["count"] == 9500
        print(f"\nSIPp+Kamailio: {report.register.rate:.0f} REGISTER/s "
              f"({report.register.rows} in {report.register.elapsed_s:.2f} s), "
              f"unregister {report.unregister.rate:.0f}/s; sidecar equal to ul.dump "
              f"{converged:.2f} s after the load ended")
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_hep_over_tcp_from_kamailio(tmp_path):
    require_kamailio()
    require_sipp()
    async with running(transports=("tcp",)) as r:
        host, port = r.source.tcp_address
        kam = KamailioInstance(tmp_path, sip_ip="127.0.0.2", extra_defines=[
            "WITH_HEP", f'HEP_URI="sip:{host}:{port};transport=tcp"'])
        async with kam:
            plan = plan_load(500, phone_port=free_port("127.0.0.1"), tag="tcp")
            await run_load(plan, kam, workdir=tmp_path / "sipp", rate=1000)
            dump = await proxy_dump(kam)
        assert plan.check_proxy(dump, kam.sip_socket) == []
        await r.until(lambda: not compare(r.replica.store.records(), dump,
                                          fields=PROOF_FIELDS), "replica equal over TCP")
        assert r.counters["tcp_connections"] >= 1 and r.counters["bad_hep"] == 0
