"""Keepalive wire side: payloads and reply matching (sans-I/O), sending over real UDP sockets on
127.0.0.0/8 (sharing a "proxy" port, loss counting with answering and silent "phones"), the
proxy pinger switches against a real Kamailio and against an OpenSIPS MI endpoint replaying
the captured nh_enable_ping payload.

Time is driven by a manual clock and ``KeepaliveService.run_once``; loopback ``sendto`` queues
the datagram at the receiver before it returns, so every check is on counts, never on delays.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.keepalive.messages import (
    CRLF_PING,
    NULL_PING,
    KeepaliveKind,
    KeepaliveMessageError,
    OptionsPinger,
    is_pong,
    static_payload,
)
from sidecar.keepalive.proxy_pinger import (
    KamailioPinger,
    OpensipsPinger,
    ProxyPingerError,
    ProxyPingingKeeper,
)
from sidecar.keepalive.scheduler import KeepaliveScheduler, Ping, ReplyMode
from sidecar.keepalive.sender import (
    KeepaliveSender,
    KeepaliveSocketError,
    ReplyReceiver,
    SourceSockets,
    measure_send_rate,
    measure_sender_rate,
    open_reply_socket,
    open_source_socket,
)
from sidecar.keepalive.service import KeepaliveService
from sidecar.keepalive.targets import PingTarget
from sidecar.proxy.opensips_mi import OpensipsMi
from sidecar.sip.parser import SipParseError, SipRequest, SipResponse, parse_message

SAMPLES = Path("/work/shared/opensips-samples")
NH_ENABLE_PING_SAMPLE = SAMPLES / "mi" / "nh_enable_ping_A.json"
OPTIONS_SAMPLE = SAMPLES / "sip" / "nathelper_OPTIONS_ping.txt"


# --- helpers ------------------------------------------------------------------------------------

def udp(ip: str, port: int = 0, *, reuseaddr: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.setblocking(False)
    return s


def drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(65535))
        except BlockingIOError:
            return out


def answer_options(request: bytes, status: int = 200) -> tuple[bytes, tuple[str, int]]:
    """What a phone does with an OPTIONS: copy Via/From/To/Call-ID/CSeq into a response and
    send it to the Via sent-by (RFC 3261 §8.2.6, §18.2.2)."""
    msg = parse_message(request)
    assert isinstance(msg, SipRequest) and msg.method == "OPTIONS"
    lines = request.decode().split("\r\n")
    copied = []
    for line in lines[1:]:
        name = line.split(":", 1)[0].strip().lower()
        if name in ("via", "from", "call-id", "cseq"):
            copied.append(line)
        elif name == "to":
            copied.append(line + ";tag=phone")
    reply = (f"SIP/2.0 {status} OK\r\n" + "\r\n".join(copied)
             + "\r\nContent-Length: 0\r\n\r\n").encode()
    host, _, port = msg.via_sent_by.rpartition(":")
    return reply, (host, int(port))


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def phone_target(phone: socket.socket, source: tuple[str, int] | None, i: int = 0) -> PingTarget:
    addr = phone.getsockname()
    return PingTarget(f"sip:phone{i}@{addr[0]}:{addr[1]}", addr, source, f"call{i}", 1)


# --- messages (sans-I/O) --------------------------------------------------------------------------

def test_options_ping_looks_like_nathelpers() -> None:
    pinger = OptionsPinger(from_uri="sip:pinger@127.0.0.2", tag="5c721054")
    data = pinger.build(0xC0FC, "sip:bob@127.0.0.9:5070", ("127.0.0.2", 5060))
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    assert (msg.method, msg.uri, msg.cseq, msg.cseq_method) == (
        "OPTIONS", "sip:bob@127.0.0.9:5070", 1, "OPTIONS")
    assert msg.via_sent_by == "127.0.0.2:5060" and msg.via_branch.startswith("z9hG4bK")
    assert msg.call_id == "ka5c721054-c0fc"
    sample_headers = {line.split(":")[0] for line in OPTIONS_SAMPLE.read_text().splitlines()[1:]
                      if ":" in line}
    ours = {line.split(":")[0] for line in data.decode().split("\r\n")[1:] if ":" in line}
    assert sample_headers <= ours


def test_options_reply_matching() -> None:
    pinger = OptionsPinger(tag="abc123")
    request = pinger.build(42, "sip:alice@192.0.2.5:5060", ("127.0.0.2", 5062))
    reply, dest = answer_options(request, status=404)
    assert dest == ("127.0.0.2", 5062)
    assert pinger.match(reply) == 42  # any status proves the phone alive
    assert OptionsPinger(tag="other").match(reply) is None  # another node's/process's ping
    assert pinger.match(request) is None  # a request, not a reply
    assert pinger.match(CRLF_PING) is None and pinger.match(NULL_PING) is None
    assert pinger.match(reply.replace(b"1 OPTIONS", b"1 INVITE")) is None
    assert pinger.match(reply.replace(b"ka" + b"abc123-2a", b"kaabc123-zz")) is None
    # a response without our Call-ID prefix is someone else's: not even parsed
    assert pinger.match(b"SIP/2.0 200 OK\r\nbroken\r\n\r\n") is None
    with pytest.raises(KeepaliveMessageError):  # ours, but not SIP: the full parser says why
        pinger.match(b"SIP/2.0 200 OK\r\nbroken\r\nCall-ID: kaabc123-2a\r\n\r\n")
    with pytest.raises(KeepaliveMessageError):
        pinger.match(b"SIP/2.0 200 OK\r\n" + b"X" * 70_000)


def test_ipv6_via_and_static_payloads() -> None:
    data = OptionsPinger(tag="t1").build(1, "sip:[2001:db8::5]:5060", ("2001:db8::1", 5060))
    assert parse_message(data).via_sent_by == "[2001:db8::1]:5060"
    assert static_payload("crlf") == b"\r\n\r\n" and static_payload(KeepaliveKind.NULL) == NULL_PING
    assert is_pong(b"\r\n") and not is_pong(b"OPTIONS")
    with pytest.raises(KeepaliveMessageError):
        static_payload("options")


@pytest.mark.parametrize("uri", ["", "sip:a b@x", "sip:a@x\r\nX: y", "sip:<a>", "sip:é@x",
                                 "sip:" + "a" * 2000])
def test_options_refuses_uris_that_would_break_the_message(uri: str) -> None:
    with pytest.raises(KeepaliveMessageError):
        OptionsPinger().build(1, uri, ("127.0.0.1", 5060))


def test_pinger_rejects_bad_settings() -> None:
    for kwargs in ({"tag": ""}, {"tag": "a-b"}, {"from_uri": "sip:x\r\n"},
                   {"user_agent": "a\r\nb"}):
        with pytest.raises(KeepaliveMessageError):
            OptionsPinger(**kwargs)


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=300))
def test_reply_matching_fuzz_random_bytes(data: bytes) -> None:
    pinger = OptionsPinger(tag="f00d")
    for candidate in (data, b"SIP/2.0 " + data):
        try:
            result = pinger.match(candidate)
        except KeepaliveMessageError:
            continue
        assert result is None or isinstance(result, int)


@settings(max_examples=500, deadline=None)
@given(ping_id=st.integers(1, 2**63), cut=st.integers(0, 400), junk=st.binary(max_size=8))
def test_reply_matching_fuzz_mutated_replies(ping_id: int, cut: int, junk: bytes) -> None:
    pinger = OptionsPinger(tag="beef")
    reply, _ = answer_options(pinger.build(ping_id, "sip:x@10.0.0.1", ("127.0.0.1", 5060)))
    assert pinger.match(reply) == ping_id
    mutated = reply[:cut] + junk + reply[cut + len(junk):]
    try:
        result = pinger.match(mutated)
    except KeepaliveMessageError:
        return
    assert result is None or isinstance(result, int)


def _full_match(pinger: OptionsPinger, data: bytes) -> int | None:
    """What match() answered before its quick path: always the full parse."""
    msg = parse_message(data)
    if not isinstance(msg, SipResponse) or msg.cseq_method != "OPTIONS":
        return None
    return pinger.ping_id_of(msg.call_id)


_HEADER_SPELLINGS = {"call-id": ["Call-ID", "call-id", "CALL-ID", "i", "Call-Id "],
                     "cseq": ["CSeq", "cseq", "CSEQ", "CSeq "],
                     "via": ["Via", "v"], "from": ["From", "f"], "to": ["To", "t"]}


@settings(max_examples=400, deadline=None)
@given(ping_id=st.integers(1, 2**64 - 1), status=st.integers(100, 699),
       spelling=st.data(), extra=st.lists(st.sampled_from(
           ["Server: phone 1.0", "Allow: INVITE, OPTIONS", "Content-Type: application/sdp",
            "Accept: application/sdp", "Supported: replaces"]), max_size=3),
       order=st.randoms(use_true_random=False))
def test_quick_reply_match_agrees_with_the_full_parse(ping_id, status, spelling, extra,
                                                      order) -> None:
    """Everyday replies, whatever header spelling and order: the quick path returns exactly
    what the full parser finds (and it did answer them, not fall back)."""
    pinger = OptionsPinger(tag="beef")
    reply, _ = answer_options(pinger.build(ping_id, "sip:x@10.0.0.1", ("127.0.0.1", 5060)),
                              status=status)
    lines = reply.decode().split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        choices = _HEADER_SPELLINGS.get(name.strip().lower())
        if choices:
            name = spelling.draw(st.sampled_from(choices))
        headers.append(f"{name}:{value}")
    headers += extra
    order.shuffle(headers)
    data = ("\r\n".join([lines[0], *headers]) + "\r\n\r\n").encode()
    assert pinger._quick_match(data) == ping_id
    assert pinger.match(data) == _full_match(pinger, data) == ping_id


@settings(max_examples=1500, deadline=None)
@given(ping_id=st.integers(1, 2**63), cut=st.integers(0, 400), junk=st.binary(max_size=12))
def test_quick_reply_match_never_contradicts_the_full_parse(ping_id: int, cut: int,
                                                            junk: bytes) -> None:
    """On damaged replies the quick path either defers (None) or gives the id the full parser
    gives; the full parser may still refuse a header the quick path does not read (an answer
    with a broken Via still proves the phone alive, as nathelper's reply filter assumes)."""
    pinger = OptionsPinger(tag="beef")
    reply, _ = answer_options(pinger.build(ping_id, "sip:x@10.0.0.1", ("127.0.0.1", 5060)))
    mutated = reply[:cut] + junk + reply[cut + len(junk):]
    quick = pinger._quick_match(mutated)
    if quick is None:
        return
    try:
        full = _full_match(pinger, mutated)
    except SipParseError:
        return
    assert full == quick


# --- sockets: sharing the proxy's port ------------------------------------------------------------

def test_unconnected_second_socket_would_steal_the_proxys_traffic() -> None:
    """Why the shared socket is connected: the kernel gives datagrams to the newest socket."""
    proxy = udp("127.0.0.61", reuseaddr=True)
    port = proxy.getsockname()[1]
    naive = udp("127.0.0.61", port, reuseaddr=True)
    client = udp("127.0.0.1")
    for _ in range(10):
        client.sendto(b"REGISTER", ("127.0.0.61", port))
    assert len(drain(naive)) == 10 and drain(proxy) == []
    for s in (proxy, naive, client):
        s.close()


def test_keepalives_leave_from_the_proxy_address_and_the_proxy_keeps_its_traffic() -> None:
    proxy = udp("127.0.0.62", reuseaddr=True)  # Kamailio/OpenSIPS set SO_REUSEADDR
    source = proxy.getsockname()
    sock = open_source_socket(source, shared=True)
    phone = udp("127.0.0.63")
    client = udp("127.0.0.1")
    try:
        for payload in (CRLF_PING, NULL_PING):
            sock.sendto(payload, phone.getsockname())
        assert drain(phone) == [(CRLF_PING, source), (NULL_PING, source)]
        for i in range(20):  # REGISTERs to the proxy port still reach the proxy
            client.sendto(b"REGISTER %d" % i, source)
        assert len(drain(proxy)) == 20
        phone.sendto(b"pong", source)  # even the phone's answer goes to the proxy
        assert [d for d, _ in drain(proxy)] == [b"pong"]
        # the proxy restarts while the sidecar holds the port: it can bind again and gets
        # its traffic
        proxy.close()
        proxy = udp(*source, reuseaddr=True)
        client.sendto(b"REGISTER again", source)
        assert [d for d, _ in drain(proxy)] == [b"REGISTER again"]
    finally:
        for s in (proxy, sock, phone, client):
            s.close()


def test_proxy_socket_without_reuseaddr_gives_a_clear_error() -> None:
    exclusive = udp("127.0.0.64")
    try:
        with pytest.raises(KeepaliveSocketError, match="SO_REUSEADDR"):
            open_source_socket(exclusive.getsockname())
    finally:
        exclusive.close()


def test_reply_socket_taken_gives_a_clear_error() -> None:
    taken = udp("127.0.0.64")
    try:
        with pytest.raises(KeepaliveSocketError, match="replies"):
            open_reply_socket(taken.getsockname())
    finally:
        taken.close()


def test_unusable_source_is_retried_later_not_per_ping() -> None:
    exclusive = udp("127.0.0.65")
    clock = ManualClock()
    sockets = SourceSockets(retry_after=5.0, clock=clock)
    phone = udp("127.0.0.66")
    sender = KeepaliveSender("null", sockets=sockets)
    target = phone_target(phone, exclusive.getsockname())
    pings = [Ping(i, ("a", str(i)), target) for i in range(100)]
    try:
        assert sender.send_now(pings) == (100, None)
        assert sender.stats.no_source == 100 and sender.stats.sent == 0
        assert "SO_REUSEADDR" in next(iter(sockets.errors().values()))
        exclusive.close()  # the port frees up; retried only after retry_after
        assert sockets.get(target.source) is None
        clock.now += 5
        assert sockets.get(target.source) is not None
        sender.send_now(pings[:3])
        assert len(drain(phone)) == 3
    finally:
        sender.close()
        phone.close()
        exclusive.close()


# --- the service over real sockets ---------------------------------------------------------------

class Phones:
    """UDP "phones" on loopback; the answering ones reply to OPTIONS like a real phone."""

    def __init__(self, count: int, silent: set[int]) -> None:
        self.socks = [udp("127.0.0.67") for _ in range(count)]
        self.silent = silent
        self.received = [0] * count

    def answer_all(self) -> int:
        answered = 0
        for i, sock in enumerate(self.socks):
            for data, _ in drain(sock):
                self.received[i] += 1
                if i not in self.silent:
                    reply, dest = answer_options(data)
                    sock.sendto(reply, dest)
                    answered += 1
        return answered

    def close(self) -> None:
        for s in self.socks:
            s.close()


async def test_silent_phone_dropped_after_max_lost_through_real_sockets() -> None:
    proxy = udp("127.0.0.68", reuseaddr=True)
    source = proxy.getsockname()
    reply_sock = open_reply_socket(("127.0.0.68", 0))
    clock = ManualClock()
    sched = KeepaliveScheduler(interval=1.0, tick=0.25, reply_mode=ReplyMode.TOKEN,
                               reply_timeout=0.5, max_lost=3)
    pinger = OptionsPinger(tag="t3st")
    sender = KeepaliveSender("options", pinger=pinger, reply_via=reply_sock.getsockname())
    receiver = ReplyReceiver(sched, pinger)
    receiver.attach(reply_sock)
    drops = []
    service = KeepaliveService(sched, sender, receiver=receiver, on_drop=drops.append,
                               clock=clock)
    phones = Phones(6, silent={2})
    for i, sock in enumerate(phones.socks):
        sched.upsert(("aor", str(i)), phone_target(sock, source, i))
    try:
        service.set_active(True, sweep=False)
        for _ in range(4 * 5):  # five intervals
            await service.run_once()
            answered = phones.answer_all()
            expected = receiver.stats.datagrams + answered
            await until(lambda expected=expected: receiver.stats.datagrams >= expected)
            clock.now += 0.25
        assert [d.key for d in drops] == [("aor", "2")] and drops[0].lost == 3
        assert len(sched) == 5
        assert phones.received[2] == 3  # not pinged after the drop
        assert all(n == 5 for i, n in enumerate(phones.received) if i != 2)
        assert sched.stats.replies == 25 and sched.stats.lost == 3
        assert receiver.stats.matched == 25 and receiver.stats.bad == 0
        assert drain(proxy) == []  # the proxy saw none of it
        snap = json.loads(json.dumps(service.snapshot()))
        assert snap["dropped"] == 1 and snap["sender"]["sent"] == 28
    finally:
        await service.stop()
        phones.close()
        proxy.close()
        reply_sock.close()


async def test_exclusive_source_reads_echoes_for_address_mode() -> None:
    """A dedicated keepalive address (nothing else listens): replies come to the source itself,
    and for CRLF any packet back from the phone counts."""
    clock = ManualClock()
    sched = KeepaliveScheduler(interval=1.0, tick=0.5, reply_mode=ReplyMode.ADDRESS,
                               reply_timeout=0.4, max_lost=2)
    receiver = ReplyReceiver(sched)
    sockets = SourceSockets(shared=False, on_open=receiver.attach, on_close=receiver.detach)
    sender = KeepaliveSender("crlf", sockets=sockets)
    service = KeepaliveService(sched, sender, receiver=receiver, on_drop=lambda d: None,
                               clock=clock)
    source = ("127.0.0.69", udp_free_port("127.0.0.69"))
    echo, mute = udp("127.0.0.70"), udp("127.0.0.70")
    sched.upsert(("a", "echo"), phone_target(echo, source))
    sched.upsert(("a", "mute"), phone_target(mute, source))
    try:
        service.set_active(True, sweep=False)
        echoed = 0
        for _ in range(8):
            await service.run_once()
            for data, addr in drain(echo):
                assert data == CRLF_PING and addr == source
                echo.sendto(b"\r\n", addr)
                echoed += 1
            drain(mute)
            await until(lambda echoed=echoed: receiver.stats.datagrams >= echoed)
            clock.now += 0.5
        assert ("a", "echo") in sched and ("a", "mute") not in sched
        assert sched.stats.replies == 4 and sched.stats.dropped == 1
        service.set_active(False)  # closes the source socket after the receiver let go of it
        assert sockets.sockets() == [] and receiver._socks == []
    finally:
        await service.stop()
        echo.close()
        mute.close()


def udp_free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


async def test_deactivating_stops_pinging_and_releases_the_proxy_port() -> None:
    proxy = udp("127.0.0.71", reuseaddr=True)
    phone = udp("127.0.0.72")
    clock = ManualClock()
    sched = KeepaliveScheduler(interval=1.0, tick=0.5)
    sender = KeepaliveSender("null", source=proxy.getsockname())
    service = KeepaliveService(sched, sender, clock=clock)
    sched.upsert(("a", "1"), phone_target(phone, None))  # no socket in the record: use source
    try:
        service.set_active(True)
        pinged = []
        for _ in range(2):  # one interval
            await service.run_once()
            pinged += [d for d, _ in drain(phone)]
            clock.now += 0.5
        assert pinged and set(pinged) == {NULL_PING}
        assert len(sender.sockets.sockets()) == 1
        service.set_active(False)
        assert sender.sockets.sockets() == []
        for _ in range(4):
            clock.now += 0.5
            assert await service.run_once() == 0
        assert drain(phone) == []
    finally:
        await service.stop()
        proxy.close()
        phone.close()


async def test_big_batches_yield_to_the_event_loop() -> None:
    phone = udp("127.0.0.73")
    phone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sender = KeepaliveSender("null", source=("127.0.0.73", udp_free_port("127.0.0.73")),
                             batch=500)
    target = phone_target(phone, None)
    pings = [Ping(i, ("a", str(i)), target) for i in range(10_000)]
    turns = 0
    stop = asyncio.Event()

    async def count_turns() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    try:
        assert await sender.send(pings) == 10_000
        stop.set()
        await counter
        assert turns >= 10_000 // 500 - 1
        assert sender.stats.sent == 10_000 and sender.stats.send_errors == 0
    finally:
        sender.close()
        phone.close()


async def test_service_loop_pings_by_itself_and_goes_quiet_when_passive() -> None:
    phone = udp("127.0.0.81")
    sched = KeepaliveScheduler(interval=0.05, tick=0.01)
    sender = KeepaliveSender("null", source=("127.0.0.81", udp_free_port("127.0.0.81")))
    service = KeepaliveService(sched, sender)
    sched.upsert(("a", "1"), phone_target(phone, None))
    loop = asyncio.get_running_loop()
    service.start()
    try:
        service.set_active(True)
        for _ in range(3):
            async with asyncio.timeout(5):
                data, _ = await loop.sock_recvfrom(phone, 100)
            assert data == NULL_PING
        service.set_active(False)
        drain(phone)  # sent before the switch
        ticks = service.ticks
        await until(lambda: service.ticks >= ticks + 10)  # ten passive ticks
        assert drain(phone) == []
        assert service.snapshot()["enabled"] is False
    finally:
        await service.stop()
        phone.close()


def test_bad_targets_are_counted_not_fatal() -> None:
    phone = udp("127.0.0.74")
    sender = KeepaliveSender("options", default_source=("127.0.0.74", 0))
    good = phone_target(phone, None)
    pings = [Ping(1, ("a", "1"), good._replace(uri="sip:bad uri")),
             Ping(2, ("a", "2"), good._replace(source=None)),
             Ping(3, ("a", "3"), good)]
    try:
        assert sender.send_now(pings) == (3, None)
        assert sender.stats.bad_target == 1 and sender.stats.sent == 2
        assert len(drain(phone)) == 2
        no_source = KeepaliveSender("null")
        assert no_source.send_now([pings[1]]) == (1, None) and no_source.stats.no_source == 1
    finally:
        sender.close()
        phone.close()


def test_measure_send_rate_counts_what_it_sent() -> None:
    raw = measure_send_rate(2000)
    assert raw.sent == 2000 and raw.per_second > 0
    full = measure_sender_rate(2000, kind="options")
    assert full.sent == 2000 and full.per_second > 0


# --- proxy pinger switches ---------------------------------------------------------------------

class FakeOpensipsMi:
    """An mi_http endpoint answering nh_enable_ping like OpenSIPS 3.6 (the read-back reply is
    the captured one, shared/opensips-samples/mi/nh_enable_ping_A.json)."""

    def __init__(self, *, state: int = 1, refuse: str | None = None) -> None:
        self.state = state
        self.refuse = refuse
        self.requests: list[dict] = []
        sample = json.loads(NH_ENABLE_PING_SAMPLE.read_text())
        assert sample["request"]["method"] == "nh_enable_ping" and "params" not in sample["request"]
        self.read_reply = sample["response"]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        reply: dict = {"jsonrpc": "2.0", "id": body["id"]}
        if self.refuse:
            reply["error"] = {"code": 400, "message": self.refuse}
        elif "params" not in body:
            reply.update(result=dict(self.read_reply["result"], Status=self.state))
        else:
            self.state = 1 if int(body["params"][0]) else 0
            reply["result"] = "OK"
        return web.json_response(reply)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/mi", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/mi"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def test_opensips_switch_sets_and_verifies_and_keeper_reasserts() -> None:
    fake = FakeOpensipsMi(state=1)
    async with fake as url, OpensipsMi(url=url) as mi:
        pinger = OpensipsPinger(mi)
        keeper = ProxyPingingKeeper(pinger, period=60)
        assert await keeper.apply(False)
        assert fake.state == 0
        assert fake.requests[0]["params"] == [0] and "params" not in fake.requests[1]
        fake.state = 1  # OpenSIPS restarted: back to its default (on)
        assert await keeper.reassert()
        assert fake.state == 0
        assert keeper.snapshot()["ok"] and keeper.status.attempts == 2
        await pinger.set_proxy_pinging(True)
        assert await pinger.pinging_state() is True


async def test_opensips_natping_disabled_is_reported_clearly() -> None:
    async with FakeOpensipsMi(refuse="NATping disabled from script") as url, \
            OpensipsMi(url=url) as mi:
        keeper = ProxyPingingKeeper(OpensipsPinger(mi))
        assert not await keeper.apply(True)
        snap = keeper.snapshot()
        assert snap["pinger_missing"] and "natping_interval" in snap["last_error"]
        assert snap["failures"] == 1 and snap["proxy"] == "opensips"


async def test_unreachable_proxy_is_an_error_not_a_crash() -> None:
    async with OpensipsMi(url=f"http://127.0.0.1:{udp_free_port('127.0.0.1')}/mi",
                          timeout=2) as mi:
        with pytest.raises(ProxyPingerError) as info:
            await OpensipsPinger(mi).set_proxy_pinging(False)
        assert not info.value.pinger_missing and "nh_enable_ping failed" in str(info.value)


# --- real Kamailio ------------------------------------------------------------------------------

@pytest.mark.slow
async def test_kamailio_pinger_switch_and_natping_disabled(tmp_path: Path) -> None:
    from tests.kamailio_fixture import KamailioInstance, require_kamailio

    require_kamailio()
    async with KamailioInstance(tmp_path, sip_ip="127.0.0.75", natping_interval=20) as kam, \
            kam.http_rpc() as rpc:
        keeper = ProxyPingingKeeper(KamailioPinger(rpc))
        assert await keeper.apply(True)
        assert await keeper.apply(False)
        assert await keeper.reassert()
    async with KamailioInstance(tmp_path, sip_ip="127.0.0.76", natping_interval=0) as kam, \
            kam.http_rpc() as rpc:
        with pytest.raises(ProxyPingerError) as info:
            await KamailioPinger(rpc).set_proxy_pinging(True)
        assert info.value.pinger_missing
        assert "NATping disabled" in str(info.value) and "natping_interval" in str(info.value)


@pytest.mark.slow
async def test_sharing_kamailios_port_keeps_kamailio_answering(tmp_path: Path) -> None:
    """The sidecar binds Kamailio's own SIP socket (Kamailio sets SO_REUSEADDR, not
    SO_REUSEPORT), pings a phone from it, and Kamailio still gets its traffic."""
    from tests.kamailio_fixture import KamailioInstance, require_kamailio

    require_kamailio()
    async with KamailioInstance(tmp_path, sip_ip="127.0.0.77") as kam:
        source = (kam.sip_ip, kam.sip_port)
        reply_sock = open_reply_socket((kam.sip_ip, 0))
        clock = ManualClock()
        sched = KeepaliveScheduler(interval=1.0, tick=1.0, reply_mode=ReplyMode.TOKEN)
        pinger = OptionsPinger(from_uri="sip:pinger@kamailio.invalid")
        sender = KeepaliveSender("options", pinger=pinger, reply_via=reply_sock.getsockname())
        receiver = ReplyReceiver(sched, pinger)
        receiver.attach(reply_sock)
        service = KeepaliveService(sched, sender, receiver=receiver, clock=clock)
        phone = udp("127.0.0.78")
        sched.upsert(("bob", "1"), phone_target(phone, source))
        try:
            service.set_active(True, sweep=False)
            await service.run_once()
            ((request, came_from),) = drain(phone)
            assert came_from == source
            reply, dest = answer_options(request)
            phone.sendto(reply, dest)
            await until(lambda: sched.stats.replies == 1)
            # Kamailio still receives on the shared port: its keepalive OPTIONS gets a 200
            phone_port = phone.getsockname()[1]
            probe = (f"OPTIONS sip:{kam.sip_ip}:{kam.sip_port} SIP/2.0\r\n"
                     f"Via: SIP/2.0/UDP 127.0.0.78:{phone_port};branch=z9hG4bKprobe1\r\n"
                     "From: <sip:probe@127.0.0.78>;tag=p1\r\n"
                     f"To: <sip:{kam.sip_ip}:{kam.sip_port}>\r\n"
                     "Call-ID: probe-1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                     "Content-Length: 0\r\n\r\n").encode()
            loop = asyncio.get_running_loop()
            phone.sendto(probe, source)
            async with asyncio.timeout(5):
                data, addr = await loop.sock_recvfrom(phone, 65535)
            assert addr == source and data.startswith(b"SIP/2.0 200")
        finally:
            await service.stop()
            reply_sock.close()
            phone.close()



@pytest.mark.slow
async def test_kamailio_switch_really_starts_and_stops_its_pings(tmp_path: Path) -> None:
    """A NATed phone registered by SIPp: Kamailio's OPTIONS pings reach it only while the
    switch is on (natping_interval 1 s; the "off" check counts pings over three intervals)."""
    from tests.kamailio_fixture import (
        KamailioInstance,
        Phone,
        free_port,
        require_kamailio,
        require_sipp,
        sipp_register,
    )

    require_kamailio()
    require_sipp()
    phone_ip = "127.0.0.79"
    port = free_port(phone_ip)
    async with KamailioInstance(tmp_path, sip_ip="127.0.0.80", natping_interval=1) as kam, \
            kam.http_rpc() as rpc:
        # RFC 1918 Contact and a Via that is not the source: nathelper marks it NATed
        await sipp_register(Phone(user="natted", port=port, ip=phone_ip,
                                  contact="<sip:natted@192.168.1.20:5060>",
                                  via_host="192.168.1.20", via_port=5060), kam)
        phone = udp(phone_ip, port)
        loop = asyncio.get_running_loop()
        pinger = KamailioPinger(rpc)
        try:
            await pinger.set_proxy_pinging(True)
            async with asyncio.timeout(10):
                data, addr = await loop.sock_recvfrom(phone, 65535)
            assert data.startswith(b"OPTIONS ") and addr == (kam.sip_ip, kam.sip_port)
            await pinger.set_proxy_pinging(False)
            with pytest.raises(TimeoutError):  # a ping already under way may still land
                async with asyncio.timeout(1.2):
                    while True:
                        await loop.sock_recvfrom(phone, 65535)
            drain(phone)
            late = 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(3.0):
                    while True:
                        await loop.sock_recvfrom(phone, 65535)
                        late += 1
            assert late == 0
        finally:
            phone.close()
