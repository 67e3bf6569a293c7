"""Checkpoint probes against real servers the tests start on 127.0.0.1."""

import asyncio

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from sidecar.lab.nodes import free_ports
from sidecar.role.checkpoints import (
    CheckpointConfigError,
    CheckpointRunner,
    CommandCheckpoint,
    HeartbeatCheckpoint,
    HttpCheckpoint,
    SipOptionsCheckpoint,
    TcpCheckpoint,
    build_checkpoint,
    build_options,
    response_status,
)
from sidecar.sip.parser import SipRequest, parse_message

LOOP = "127.0.0.1"


# ---------------------------------------------------------------- SIP OPTIONS (sans-I/O)
def test_options_request_is_valid_sip():
    raw = build_options("127.0.0.1", 5060, "127.0.0.1", 40000, call_id="abc@sidecar",
                        branch="1234", tag="t1")
    msg = parse_message(raw)
    assert isinstance(msg, SipRequest)
    assert msg.method == "OPTIONS" and msg.uri == "sip:127.0.0.1:5060"
    assert msg.call_id == "abc@sidecar" and msg.cseq == 1 and msg.via_branch == "z9hG4bK1234"
    v6 = build_options("::1", 5060, "::1", 1, call_id="x", branch="b", tag="t")
    assert parse_message(v6).uri == "sip:[::1]:5060"


def _response(call_id: str, status: int = 200) -> bytes:
    return (f"SIP/2.0 {status} Whatever\r\nVia: SIP/2.0/UDP 127.0.0.1:1;branch=z9hG4bKx\r\n"
            f"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: {call_id}\r\n"
            f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()


def test_response_status_matches_only_our_call_id():
    assert response_status(_response("mine"), "mine") == 200
    assert response_status(_response("mine", 503), "mine") == 503
    assert response_status(_response("other"), "mine") is None
    assert response_status(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "mine") is None
    assert response_status(b"\r\n\r\n", "mine") is None


@given(st.binary(max_size=600))
def test_response_status_never_raises_on_garbage(data):
    assert response_status(data, "mine") in (None, *range(100, 700))


# ---------------------------------------------------------------- SIP OPTIONS (UDP)
class FakeProxy(asyncio.DatagramProtocol):
    """Answers OPTIONS like a proxy would: same Call-ID, chosen status, or garbage."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.requests = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.requests += 1
        req = parse_message(data)
        if self.mode == "drop_first" and self.requests == 1:
            return
        if self.mode == "garbage":
            self.transport.sendto(b"hello there\r\n\r\n", addr)
            return
        if self.mode == "wrong_callid":
            self.transport.sendto(_response("not-yours"), addr)
            return
        self.transport.sendto(_response(req.call_id, 404 if self.mode == "404" else 200), addr)


async def _udp_server(mode):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: FakeProxy(mode),
                                                           local_addr=(LOOP, 0))
    return transport, proto, transport.get_extra_info("sockname")[1]


@pytest.mark.parametrize("mode,ok", [("ok", True), ("404", True), ("drop_first", True),
                                     ("garbage", False), ("wrong_callid", False)])
async def test_sip_options_checkpoint(mode, ok):
    transport, proto, port = await _udp_server(mode)
    try:
        cp = SipOptionsCheckpoint("sip", LOOP, port, timeout=0.6, retransmit=0.1)
        res = await cp.check()
        assert res.ok is ok, res.detail
        if ok:
            assert res.detail.startswith("SIP ") and f"{LOOP}:{port}" in res.detail
        else:
            assert "no answer" in res.detail
            assert proto.requests >= 2  # retransmitted while waiting
    finally:
        transport.close()


async def test_sip_options_to_a_closed_port_is_gone():
    (port,) = free_ports(1)
    res = await SipOptionsCheckpoint("sip", LOOP, port, timeout=1.0).check()
    assert not res.ok
    assert "ConnectionRefused" in res.detail or "no answer" in res.detail  # ICMP or silence


# ---------------------------------------------------------------- TCP
async def test_tcp_checkpoint_alive_and_gone():
    server = await asyncio.start_server(lambda r, w: w.close(), LOOP, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        res = await TcpCheckpoint("tcp", LOOP, port, timeout=1.0).check()
        assert res.ok and f"{LOOP}:{port}" in res.detail
    finally:
        server.close()
        await server.wait_closed()
    res = await TcpCheckpoint("tcp", LOOP, port, timeout=1.0).check()
    assert not res.ok and "ConnectionRefusedError" in res.detail


# ---------------------------------------------------------------- HTTP
@pytest.fixture
async def http_server():
    never = asyncio.Event()

    async def ok(_):
        return web.Response(text="fine")

    async def redirect(_):
        raise web.HTTPFound("/ok")

    async def broken(_):
        return web.Response(status=503)

    async def hang(_):
        await never.wait()
        return web.Response()

    app = web.Application()
    app.add_routes([web.get("/ok", ok), web.get("/redir", redirect), web.get("/bad", broken),
                    web.get("/hang", hang)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOP, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://{LOOP}:{port}"
    never.set()
    await runner.cleanup()


@pytest.mark.parametrize("path,ok,detail", [("/ok", True, "HTTP 200"),
                                            ("/redir", True, "HTTP 302"),
                                            ("/bad", False, "HTTP 503"),
                                            ("/hang", False, "no answer within 0.3s")])
async def test_http_checkpoint(http_server, path, ok, detail):
    res = await HttpCheckpoint("http", http_server + path, timeout=0.3).check()
    assert res.ok is ok and res.detail.startswith(detail), res.detail


async def test_http_checkpoint_connection_refused():
    (port,) = free_ports(1)
    res = await HttpCheckpoint("http", f"http://{LOOP}:{port}/", timeout=1.0).check()
    assert not res.ok and "Error" in res.detail


# ---------------------------------------------------------------- command
async def test_command_checkpoint():
    ok = await CommandCheckpoint("cmd", "echo peer fine", timeout=5).check()
    assert ok.ok and ok.detail == "exit 0: peer fine"
    bad = await CommandCheckpoint("cmd", ["sh", "-c", "echo down >&2; exit 3"], timeout=5).check()
    assert not bad.ok and bad.detail == "exit 3: down"
    missing = await CommandCheckpoint("cmd", ["/nonexistent/probe"], timeout=5).check()
    assert not missing.ok and "cannot run" in missing.detail
    slow = await CommandCheckpoint("cmd", "sleep 30", timeout=0.3).check()
    assert not slow.ok and "timed out after 0.3s" in slow.detail
    chatty = await CommandCheckpoint("cmd", "yes | head -c 100000", timeout=5,
                                     max_output=20).check()
    assert chatty.ok and "more bytes]" in chatty.detail and len(chatty.detail) < 80


# ---------------------------------------------------------------- heartbeat
async def test_heartbeat_checkpoint_age():
    now = [100.0]
    cp = HeartbeatCheckpoint(max_age=3.0, clock=lambda: now[0])
    res = await cp.check()
    assert not res.ok and "no heartbeat heard yet" in res.detail
    cp.heard()
    now[0] = 102.9
    assert (await cp.check()).ok
    now[0] = 103.5
    res = await cp.check()
    assert not res.ok and "no heartbeat for 3.5s" in res.detail
    cp.heard(103.6)
    assert (await cp.check()).ok


# ---------------------------------------------------------------- config + runner
def test_build_checkpoint_from_config():
    cp = build_checkpoint({"type": "tcp", "name": "proxy", "host": LOOP, "port": 5060,
                           "interval": 2, "timeout": 0.5})
    assert isinstance(cp, TcpCheckpoint) and cp.name == "proxy" and cp.interval == 2.0
    assert build_checkpoint({"type": "heartbeat", "max_age": 4}).max_age == 4.0
    assert build_checkpoint({"type": "sip_options", "host": LOOP}).port == 5060
    assert build_checkpoint({"type": "http", "url": "http://127.0.0.1/"}).kind == "http"
    assert build_checkpoint({"type": "command", "command": ["true"]}).kind == "command"


@pytest.mark.parametrize("spec", [
    {"type": "ping"}, {}, {"type": "tcp", "host": LOOP}, {"type": "tcp", "host": LOOP,
                                                          "port": 0},
    {"type": "tcp", "host": LOOP, "port": "x"}, {"type": "http", "url": "ftp://x"},
    {"type": "command", "command": ""}, {"type": "tcp", "host": LOOP, "port": 1,
                                         "interval": 0},
    {"type": "heartbeat", "max_age": -1},
])
def test_build_checkpoint_rejects_bad_config(spec):
    with pytest.raises(CheckpointConfigError):
        build_checkpoint(spec)


async def test_runner_reports_every_probe_and_survives_a_failing_callback():
    server = await asyncio.start_server(lambda r, w: w.close(), LOOP, 0)
    port = server.sockets[0].getsockname()[1]
    (dead,) = free_ports(1)
    reports = []
    enough = asyncio.Event()

    def report(name, ok, detail, now):
        reports.append((name, ok))
        if len(reports) == 1:
            raise RuntimeError("arbiter bug")  # must not stop the probe loop
        if sum(n == "up" for n, _ in reports) >= 3 and any(n == "down" for n, _ in reports):
            enough.set()

    runner = CheckpointRunner([TcpCheckpoint("up", LOOP, port, interval=0.05, timeout=1),
                               TcpCheckpoint("down", LOOP, dead, interval=0.05, timeout=1)],
                              report)
    await runner.start()
    try:
        await asyncio.wait_for(enough.wait(), 10)
    finally:
        await runner.stop()
        server.close()
        await server.wait_closed()
    assert ("up", True) in reports and ("down", False) in reports
    st_ = runner.status()
    assert st_["up"]["ok"] is True and st_["down"]["ok"] is False
    got = await runner.probe_all()
    assert got["up"].ok is False  # the server is closed now
    with pytest.raises(CheckpointConfigError):
        CheckpointRunner([TcpCheckpoint("a", LOOP, 1), TcpCheckpoint("a", LOOP, 2)], report)

