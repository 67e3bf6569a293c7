"""The packet-capture source: settings, the kernel filter, pcap replay, and live capture.

* Settings go through the real config parser (errors must name the key).
* The BPF program is checked three ways: by the kernel's verifier (attached to a plain UDP
  socket), by :func:`sidecar.sources.bpf.run_filter` against packets scapy builds, and (as
  root) by injecting those packets on ``lo`` and seeing which ones a capture socket gets.
* Replay: a capture file built here (UDP, NAT, TCP split and reordered, IPv6, IPv4 fragments,
  a 401 challenge, an unregistration, loopback copies, noise) must leave exactly the expected
  replica. ``tests/pcaps/registrations.pcap`` is the same file, committed for the CLI.
* Live (``slow``, needs root for ``AF_PACKET``): capture on ``lo`` while real Kamailio and SIPp
  register phones over UDP (NAT ones included) and TCP, then compare with ``ul.dump``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    IP,
    TCP,
    UDP,
    CookedLinux,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    fragment,
    wrpcap,
)

from sidecar.config import ConfigError, parse_config
from sidecar.model import FLAG_NAT, to_dict
from sidecar.replica import Replica
from sidecar.sources import bpf
from sidecar.sources.capture_source import (
    CaptureSettings,
    CaptureSource,
    Complaints,
    RegisterPipeline,
    open_capture_socket,
)
from sidecar.sources.packets import LINKTYPE_RAW, FlowFilter, decode_ip

REPO = Path(__file__).resolve().parents[1]
COMMITTED_PCAP = REPO / "tests" / "pcaps" / "registrations.pcap"
PROXY4, PROXY6, SIP_PORT = "127.0.0.1", "::1", 5060
T0 = 1_800_000_000.0


# --- settings ---------------------------------------------------------------------------------

def _settings(**table):
    cfg = parse_config({"node": {"id": 1}, "sources": [{"type": "capture", **table}]},
                       Path("/etc/sidecar"))
    return cfg.sources[0].settings


def test_settings_defaults_and_values():
    s = _settings()
    assert (s.interface, s.ports, s.pcap, s.use_domain) == ("any", (5060,), None, False)
    s = _settings(interface="lo", ports=[5080, 5060, 5060], proxy_addresses=["::1", "127.0.0.1"],
                  use_domain=True, rcvbuf_bytes=1 << 20, pair_timeout_s=10, max_tcp_streams=5,
                  max_fragments=7, name="cap")
    assert s.ports == (5060, 5080) and s.proxy_addresses == ("::1", "127.0.0.1")
    assert (s.max_tcp_streams, s.max_fragments, s.name, s.use_domain) == (5, 7, "cap", True)
    assert _settings(pcap="x.pcap").pcap == Path("/etc/sidecar/x.pcap")


@pytest.mark.parametrize(("table", "key"), [
    ({"ports": []}, "ports"),
    ({"ports": [0]}, "ports"),
    ({"ports": "5060"}, "ports"),
    ({"ports": [True]}, "ports"),
    ({"ports": list(range(1000, 1040))}, "ports"),
    ({"proxy_addresses": ["proxy.example"]}, "proxy_addresses"),
    ({"proxy_addresses": "127.0.0.1"}, "proxy_addresses"),
    ({"interface": "lo", "pcap": "x.pcap"}, "pcap"),
    ({"interface": "a-very-long-interface-name"}, "interface"),
    ({"rcvbuf_bytes": 10}, "rcvbuf_bytes"),
    ({"pcap_time": "later"}, "pcap_time"),
    ({"max_fragments": 0}, "max_fragments"),
    ({"snaplen": 10}, "snaplen"),
])
def test_settings_errors_name_the_key(table, key):
    with pytest.raises(ConfigError, match=rf"sources\[0\]\.{key}"):
        _settings(**table)


# --- the kernel filter ------------------------------------------------------------------------

def _udp4(sport, dport, src="127.0.0.5", dst=PROXY4, payload=b"MARK"):
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def _tcp4(sport, dport, flags="PA", payload=b"MARK", src="127.0.0.5", dst=PROXY4):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / payload)


def _filter_cases(port: int) -> list[tuple[str, bytes, bool, bool]]:
    """(name, IP packet, accepted without addresses, accepted when narrowed to 127.0.0.1/::1)."""
    big = IP(src="127.0.0.5", dst=PROXY4, id=7) / UDP(sport=40000, dport=port) / (b"F" * 300)
    frags = [bytes(f) for f in fragment(big, 128)]
    other = IP(src="127.0.0.5", dst="127.0.0.9", id=8) / UDP(sport=4, dport=9) / (b"G" * 300)
    other_frags = [bytes(f) for f in fragment(other, 128)]
    v6frag = IPv6(src="::5", dst=PROXY6) / IPv6ExtHdrFragment(id=5, m=1) / UDP(
        sport=1, dport=port) / b"MARK"
    return [
        ("udp4 to port", _udp4(40000, port), True, True),
        ("udp4 from port", _udp4(port, 40000, src=PROXY4, dst="127.0.0.5"), True, True),
        ("udp4 other port", _udp4(40000, port + 1), False, False),
        ("udp4 port but not proxy", _udp4(40000, port, dst="127.0.0.9"), True, False),
        ("proxy address, port on the other side", _udp4(port, 40000, src="127.0.0.9"),
         True, False),
        ("tcp4 data", _tcp4(40000, port), True, True),
        ("tcp4 syn", _tcp4(40000, port, flags="S", payload=b""), True, True),
        ("tcp4 fin", _tcp4(port, 40000, flags="FA", payload=b"", src=PROXY4, dst="127.0.0.5"),
         True, True),
        ("tcp4 pure ack", _tcp4(40000, port, flags="A", payload=b""), False, False),
        ("tcp4 other port", _tcp4(40000, 80), False, False),
        ("icmp", bytes(IP(src="127.0.0.5", dst=PROXY4) / b"\x08\x00\x00\x00MARK"), False, False),
        ("first fragment", frags[0], True, True),
        ("later fragment", frags[1], True, True),
        ("first fragment elsewhere", other_frags[0], False, False),
        ("later fragment elsewhere", other_frags[1], True, False),
        ("udp6 to port", bytes(IPv6(src="::5", dst=PROXY6) / UDP(sport=1, dport=port) / b"MARK"),
         True, True),
        ("udp6 other", bytes(IPv6(src="::5", dst=PROXY6) / UDP(sport=1, dport=2) / b"MARK"),
         False, False),
        ("tcp6 data", bytes(IPv6(src="::5", dst=PROXY6) / TCP(sport=1, dport=port, flags="PA")
                            / b"MARK"), True, True),
        ("tcp6 pure ack", bytes(IPv6(src="::5", dst=PROXY6) / TCP(sport=1, dport=port,
                                                                  flags="A")), False, False),
        ("udp6 first fragment", bytes(v6frag), True, True),
        ("udp6 later fragment", bytes(IPv6(src="::5", dst=PROXY6)
                                      / IPv6ExtHdrFragment(id=5, offset=2, nh=17) / b"MARKMARK"),
         True, True),
        ("udp6 after dest options", bytes(IPv6(src="::5", dst=PROXY6) / IPv6ExtHdrDestOpt()
                                          / UDP(sport=1, dport=port) / b"MARK"), True, True),
        ("udp6 not the proxy", bytes(IPv6(src="::5", dst="::9") / UDP(sport=1, dport=port)
                                     / b"MARK"), True, False),
    ]


def test_filter_passes_the_kernel_verifier():
    for ports, addrs in [([5060], ()), ([5060, 5080], ["127.0.0.1", "::1"]),
                         (list(range(5060, 5092)), ["127.0.0.1", "127.0.0.2", "::1", "fe80::1"])]:
        program = bpf.sip_filter(ports, addrs)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            bpf.attach(s, program)  # EINVAL if the kernel rejected it
    assert bpf.format_program(program).splitlines()[0] == str(len(program))
    with pytest.raises(bpf.BpfError):
        bpf.sip_filter([])
    with pytest.raises(bpf.BpfError):
        bpf.sip_filter([5060], ["nope"])
    with pytest.raises(bpf.BpfError):  # too many IPv6 addresses to jump over
        bpf.sip_filter(list(range(5000, 5032)), [f"fe80::{i}" for i in range(1, 9)])


@pytest.mark.parametrize("narrowed", [False, True])
def test_filter_program_on_built_packets(narrowed):
    program = bpf.sip_filter([SIP_PORT], [PROXY4, PROXY6] if narrowed else [])
    for name, packet, plain, narrow in _filter_cases(SIP_PORT):
        want = narrow if narrowed else plain
        assert (bpf.run_filter(program, packet) > 0) == want, name
    assert bpf.run_filter(program, b"") == 0  # loads past the end drop
    v4_only = bpf.sip_filter([SIP_PORT], [PROXY4])
    assert bpf.run_filter(v4_only, _filter_cases(SIP_PORT)[15][1]) == 0  # IPv6 not wanted


ADDRESS_POOL = ["127.0.0.1", "127.0.0.5", "::1", "::5"]


@settings(max_examples=300, deadline=None)
@given(v6=st.booleans(), tcp=st.booleans(), sport=st.sampled_from([5060, 5080, 40000, 1]),
       dport=st.sampled_from([5060, 5080, 40000, 1]), src=st.integers(0, 1),
       dst=st.integers(0, 1), flags=st.integers(0, 0x3F), size=st.integers(0, 3),
       narrowed=st.booleans())
def test_filter_agrees_with_the_user_space_flow_check(v6, tcp, sport, dport, src, dst, flags,
                                                      size, narrowed):
    """Unfragmented packets: the kernel filter accepts exactly what user space would use."""
    addrs = [PROXY4, PROXY6] if narrowed else []
    program = bpf.sip_filter([5060, 5080], addrs)
    s, d = ADDRESS_POOL[2 * v6 + src], ADDRESS_POOL[2 * v6 + dst]
    net = IPv6(src=s, dst=d) if v6 else IP(src=s, dst=d)
    l4 = TCP(sport=sport, dport=dport, flags=flags) if tcp else UDP(sport=sport, dport=dport)
    packet = bytes(net / l4 / (b"x" * size))
    ip = decode_ip(packet)
    flow = FlowFilter([5060, 5080], addrs).matches(ip.src, sport, ip.dst, dport)
    wanted = flow and (not tcp or size > 0 or bool(flags & 0x07))
    assert (bpf.run_filter(program, packet) > 0) == wanted


def test_interpreter_alu_and_misc_instructions():
    prog = [bpf.Insn(bpf.LD | bpf.IMM, k=6), bpf.Insn(bpf.MISC | bpf.TAX),
            bpf.Insn(bpf.LD | bpf.IMM, k=7), bpf.Insn(bpf.ALU | bpf.MUL | bpf.X),  # 42
            bpf.Insn(bpf.ALU | bpf.SUB | bpf.K, k=2), bpf.Insn(bpf.ALU | bpf.DIV | bpf.K, k=4),
            bpf.Insn(bpf.ALU | bpf.LSH | bpf.K, k=1), bpf.Insn(bpf.ALU | bpf.XOR | bpf.K, k=1),
            bpf.Insn(bpf.ALU | bpf.MOD | bpf.K, k=16), bpf.Insn(bpf.ST, k=3),  # M[3] = 5
            bpf.Insn(bpf.LD | bpf.IMM, k=0), bpf.Insn(bpf.LDX | bpf.MEM, k=3),
            bpf.Insn(bpf.MISC | bpf.TXA), bpf.Insn(bpf.ALU | bpf.OR | bpf.K, k=8),
            bpf.Insn(bpf.RET | bpf.RET_A)]
    assert bpf.run_filter(prog, b"") == ((((42 - 2) // 4) << 1) ^ 1) % 16 | 8
    div0 = [bpf.Insn(bpf.ALU | bpf.DIV | bpf.X), bpf.Insn(bpf.RET | bpf.K, k=1)]
    assert bpf.run_filter(div0, b"") == 0
    with pytest.raises(bpf.BpfError):
        bpf.run_filter([bpf.Insn(bpf.LD | bpf.IMM, k=1)], b"")


def _need_packet_socket() -> None:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()
    except PermissionError:
        pytest.skip("AF_PACKET capture needs root (CAP_NET_RAW)")


def _drain_markers(sock: socket.socket, deadline: float) -> list[bytes]:
    got = []
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            if got:
                # give the last injected packets a moment, then stop at the first quiet spell
                time.sleep(0.05)
                try:
                    got.append(sock.recv(70000))
                    continue
                except BlockingIOError:
                    return got
            time.sleep(0.005)
    return got


@pytest.mark.parametrize("narrowed", [False, True])
def test_kernel_applies_the_filter_like_the_interpreter(narrowed):
    """Inject each case on lo and check which ones the capture socket receives."""
    _need_packet_socket()
    port = 45060 + narrowed
    program = bpf.sip_filter([port], [PROXY4, PROXY6] if narrowed else [])
    cases = _filter_cases(port)
    cap = open_capture_socket("lo", program, 1 << 20)
    inj = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
    try:
        for _, packet, _, _ in cases:
            ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
            inj.sendto(packet, ("lo", ethertype, 0, 0, b"\x00" * 6))
        got = _drain_markers(cap, time.monotonic() + 3)
    finally:
        cap.close()
        inj.close()
    ours = [g for g in got if g in {c[1] for c in cases}]  # ignore the kernel's own replies
    expected = [c[1] for c in cases if (c[3] if narrowed else c[2])]
    assert sorted(ours) == sorted(expected)
    assert all(bpf.run_filter(program, p) > 0 for p in ours)


# --- a capture file with everything in it -----------------------------------------------------

def sip(start: str, user: str, callid: str, cseq: int, *, via: str, contact: str | None,
        expires: int | None = 600, transport: str = "UDP", extra: str = "",
        body: bytes = b"", method: str = "REGISTER") -> bytes:
    lines = [start, f"Via: SIP/2.0/{transport} {via};branch=z9hG4bK{callid}{cseq}",
             f"From: <sip:{user}@example.com>;tag=f{cseq}", f"To: <sip:{user}@example.com>",
             f"Call-ID: {callid}", f"CSeq: {cseq} {method}"]
    if contact:
        lines.append(f"Contact: {contact}")
    if expires is not None and start.startswith("REGISTER"):
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _reg(user, callid, cseq, via, contact, **kw):
    return sip("REGISTER sip:example.com SIP/2.0", user, callid, cseq, via=via,
               contact=f"<{contact}>", **kw)


def _ok(user, callid, cseq, via, contact=None, expires=600, status="200 OK", **kw):
    c = f"<{contact}>;expires={expires}" if contact else None
    return sip(f"SIP/2.0 {status}", user, callid, cseq, via=via, contact=c, **kw)


class _Capture:
    """Packets with times, written as a Linux cooked capture where every packet shows up
    twice, leaving and arriving on lo, as an ``any`` capture records it."""

    def __init__(self) -> None:
        self.packets: list = []
        self.t = T0

    def add(self, ip_pkt, gap: float = 0.01) -> None:
        self.t += gap
        for pkttype in (4, 0):  # outgoing, then host
            frame = CookedLinux(pkttype=pkttype, lladdrtype=772, lladdrlen=6,
                                src=b"\x00" * 8) / ip_pkt
            frame.time = self.t
            self.packets.append(frame)

    def udp(self, src, sport, dst, dport, payload, **ip):
        net = IPv6 if ":" in src else IP
        self.add(net(src=src, dst=dst, **ip) / UDP(sport=sport, dport=dport) / payload)

    def write(self, path: Path) -> None:
        wrpcap(str(path), self.packets, linktype=113)


def build_registration_capture(path: Path) -> None:
    """The replay scenario (times from T0, 10 ms apart); see EXPECTED for what it leaves."""
    c = _Capture()
    p = SIP_PORT
    # alice: plain UDP phone
    c.udp("127.0.0.5", 5070, PROXY4, p, _reg("alice", "a1", 1, "127.0.0.5:5070",
                                             "sip:alice@127.0.0.5:5070", extra="User-Agent: A"))
    c.udp(PROXY4, p, "127.0.0.5", 5070, _ok("alice", "a1", 1, "127.0.0.5:5070",
                                            "sip:alice@127.0.0.5:5070"))
    # bob: behind NAT (Contact names an address the packets do not come from)
    c.udp("127.0.0.6", 40000, PROXY4, p, _reg("bob", "b1", 1, "127.0.0.77:5060",
                                              "sip:bob@127.0.0.77:5060", expires=300))
    c.udp(PROXY4, p, "127.0.0.6", 40000, _ok("bob", "b1", 1, "127.0.0.77:5060",
                                             "sip:bob@127.0.0.77:5060", expires=300))
    # carol: TCP, REGISTER in three segments out of order plus a retransmission; 200 split too
    cl, sv = ("127.0.0.7", 5072), (PROXY4, p)
    reg = _reg("carol", "c1", 1, "127.0.0.7:5072", "sip:carol@127.0.0.7:5072;transport=tcp",
               transport="TCP")
    ok = _ok("carol", "c1", 1, "127.0.0.7:5072", "sip:carol@127.0.0.7:5072;transport=tcp",
             transport="TCP")

    def seg(a, b, seq, flags, payload=b"", gap=0.01):
        c.add(IP(src=a[0], dst=b[0]) / TCP(sport=a[1], dport=b[1], seq=seq, flags=flags)
              / payload, gap)

    seg(cl, sv, 1000, "S")
    seg(sv, cl, 9000, "SA")
    pieces = [reg[:100], reg[100:250], reg[250:]]
    seg(cl, sv, 1001 + 100, "PA", pieces[1])
    seg(cl, sv, 1001, "PA", pieces[0])
    seg(cl, sv, 1001 + 100, "PA", pieces[1], gap=0.3)  # retransmission (after Timer A)
    seg(cl, sv, 1001 + 250, "PA", pieces[2])
    seg(sv, cl, 9001, "PA", ok[:60])
    seg(sv, cl, 9001 + 60, "PA", ok[60:] + b"\r\n\r\n")  # with a keepalive after it
    # dave: IPv6 UDP
    c.udp("::5", 5074, PROXY6, p, _reg("dave", "d1", 1, "[::5]:5074", "sip:dave@[::5]:5074"))
    c.udp(PROXY6, p, "::5", 5074, _ok("dave", "d1", 1, "[::5]:5074", "sip:dave@[::5]:5074"))
    # erin: a REGISTER too big for one packet, fragments arriving in reverse order
    big = _reg("erin", "e1", 1, "127.0.0.8:5076", "sip:erin@127.0.0.8:5076",
               extra="User-Agent: " + "E" * 3000)
    frags = fragment(IP(src="127.0.0.8", dst=PROXY4, id=4242) / UDP(sport=5076, dport=p) / big,
                     1200)
    for f in reversed(frags):
        c.add(f)
    c.udp(PROXY4, p, "127.0.0.8", 5076, _ok("erin", "e1", 1, "127.0.0.8:5076",
                                            "sip:erin@127.0.0.8:5076"))
    # frank: challenged first, then registered
    c.udp("127.0.0.9", 5078, PROXY4, p, _reg("frank", "f1", 1, "127.0.0.9:5078",
                                             "sip:frank@127.0.0.9:5078"))
    c.udp(PROXY4, p, "127.0.0.9", 5078, sip("SIP/2.0 401 Unauthorized", "frank", "f1", 1,
                                            via="127.0.0.9:5078", contact=None))
    c.udp("127.0.0.9", 5078, PROXY4, p, _reg("frank", "f1", 2, "127.0.0.9:5078",
                                             "sip:frank@127.0.0.9:5078"))
    c.udp(PROXY4, p, "127.0.0.9", 5078, _ok("frank", "f1", 2, "127.0.0.9:5078",
                                            "sip:frank@127.0.0.9:5078"))
    # grace: registers, then unregisters (Expires 0: the 2xx lists no contact)
    c.udp("127.0.0.10", 5080, PROXY4, p, _reg("grace", "g1", 1, "127.0.0.10:5080",
                                              "sip:grace@127.0.0.10:5080"))
    c.udp(PROXY4, p, "127.0.0.10", 5080, _ok("grace", "g1", 1, "127.0.0.10:5080",
                                             "sip:grace@127.0.0.10:5080"))
    c.udp("127.0.0.10", 5080, PROXY4, p, _reg("grace", "g1", 2, "127.0.0.10:5080",
                                              "sip:grace@127.0.0.10:5080", expires=0))
    c.udp(PROXY4, p, "127.0.0.10", 5080, _ok("grace", "g1", 2, "127.0.0.10:5080"))
    # noise: an OPTIONS ping and its answer, garbage on the SIP port, another port's traffic
    c.udp("127.0.0.11", 5082, PROXY4, p, sip("OPTIONS sip:example.com SIP/2.0", "x", "o1", 1,
                                             via="127.0.0.11:5082", contact=None,
                                             method="OPTIONS"))
    c.udp(PROXY4, p, "127.0.0.11", 5082, sip("SIP/2.0 200 OK", "x", "o1", 1,
                                             via="127.0.0.11:5082", contact=None,
                                             method="OPTIONS"))
    c.udp("127.0.0.12", 5084, PROXY4, p, b"\x00\x01 definitely not SIP")
    c.udp("127.0.0.12", 5084, PROXY4, 53, b"dns?")
    c.write(path)


EXPECTED = {  # aor -> (uri, received, socket, expires granted, NAT, callid, cseq)
    "alice": ("sip:alice@127.0.0.5:5070", None, "udp:127.0.0.1:5060", 600, False, "a1", 1),
    "bob": ("sip:bob@127.0.0.77:5060", "sip:127.0.0.6:40000", "udp:127.0.0.1:5060", 300, True,
            "b1", 1),
    "carol": ("sip:carol@127.0.0.7:5072;transport=tcp", None, "tcp:127.0.0.1:5060", 600, False,
              "c1", 1),
    "dave": ("sip:dave@[::5]:5074", None, "udp:[::1]:5060", 600, False, "d1", 1),
    "erin": ("sip:erin@127.0.0.8:5076", None, "udp:127.0.0.1:5060", 600, False, "e1", 1),
    "frank": ("sip:frank@127.0.0.9:5078", None, "udp:127.0.0.1:5060", 600, False, "f1", 2),
}


def _check_replica(replica: Replica, t_base: float) -> None:
    got = {d["aor"]: d for d in map(to_dict, replica.store.records())}
    assert sorted(got) == sorted(EXPECTED)
    for aor, (uri, received, sock, granted, nat, callid, cseq) in EXPECTED.items():
        d = got[aor]
        assert (d["uri"], d["received"], d["socket"]) == (uri, received, sock), aor
        assert (d["callid"], d["cseq"], bool(d["flags"] & FLAG_NAT)) == (callid, cseq, nat), aor
        assert abs(d["expires"] - (t_base + granted)) <= 1.5, aor
    assert got["alice"]["user_agent"] == "A"


async def test_pcap_replay_builds_the_expected_replica(tmp_path):
    path = tmp_path / "reg.pcap"
    build_registration_capture(path)
    replica = Replica(1, incarnation=7)
    kicks = []
    src = CaptureSource(CaptureSettings(pcap=path, proxy_addresses=(PROXY4, PROXY6)),
                        replica=replica, kick=lambda: kicks.append(1))
    started = time.time()
    await src.start()
    await asyncio.wait_for(src.wait_replayed(), 10)
    await src.stop()
    _check_replica(replica, started)
    st = src.status()
    assert st["state"] == "stopped" and st["error"] is None and kicks
    assert st["outcomes"] == 8  # alice bob carol dave erin frank grace(2)
    assert (st["puts"], st["deletes"]) == (7, 1)
    assert st["reassembled"] == 1 and st["fragments"] == 3
    assert st["decoder"]["loopback_copies"] == st["packets"] // 2
    assert st["non_register"] == 2 and st["parse_errors"] == 1
    assert st["decoder"]["not_sip_flow"] == 1
    assert st["tracker"]["rejected"] == 1 and st["tracker"]["unmatched_responses"] == 0
    assert st["tcp"]["retransmitted"] >= 1 and st["tcp"]["out_of_order"] >= 1
    assert st["tcp"]["keepalives"] == 1


async def test_pcap_replay_with_recorded_times_and_use_domain(tmp_path):
    path = tmp_path / "reg.pcap"
    build_registration_capture(path)
    outcomes = []
    replica = Replica(1, incarnation=7)
    src = CaptureSource(CaptureSettings(pcap=path, pcap_time="file", use_domain=True),
                        replica=replica, on_outcome=outcomes.append)
    await src.start()
    await src.wait_replayed()
    await src.stop()
    assert {o.aor for o in outcomes} == {f"{a}@example.com" for a in [*EXPECTED, "grace"]}
    assert all(T0 < o.time < T0 + 5 for o in outcomes)
    # replayed as recorded in 2027, these bindings are still valid; AORs keep their domain
    assert {r[0] for r in replica.store.records()} == {f"{a}@example.com" for a in EXPECTED}


def test_committed_pcap_is_the_built_one(tmp_path):
    build_registration_capture(tmp_path / "reg.pcap")
    assert COMMITTED_PCAP.read_bytes() == (tmp_path / "reg.pcap").read_bytes(), (
        "regenerate with: python -m tests.test_capture_source")


def test_cli_prints_the_outcomes_of_a_capture_file():
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.sources.capture_source", "--pcap", str(COMMITTED_PCAP),
         "--file-time"], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    outcomes = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["aor"].split("@")[0] for o in outcomes] == [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "grace"]
    assert outcomes[1]["received"] == "sip:127.0.0.6:40000"
    assert json.loads(proc.stderr.strip().splitlines()[-1])["outcomes"] == 8


async def test_unreadable_capture_file_is_reported_not_raised(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\xd4\xc3\xb2\xa1" + b"\x00" * 20 + b"\xff" * 40)
    for path in (bad, tmp_path / "missing.pcap"):
        src = CaptureSource(CaptureSettings(pcap=path), replica=Replica(1, incarnation=7))
        await src.start()
        await asyncio.wait_for(src.wait_replayed(), 5)
        assert src.status()["state"] == "error" and str(path) in src.status()["error"]
        await src.stop()


def test_garbage_frames_are_counted_and_logged_sparingly(caplog):
    clock = [0.0]
    complaints = Complaints(__import__("logging").getLogger("capture-test"), first=3,
                            interval=60, clock=lambda: clock[0])
    pipeline = RegisterPipeline(CaptureSettings(), lambda o: None, complaints)
    with caplog.at_level("WARNING", logger="capture-test"):
        for i in range(1000):
            assert pipeline.feed(bytes([0x45, i & 255, i >> 8]), LINKTYPE_RAW, T0) == 0
        clock[0] = 61
        pipeline.feed(b"\x45", LINKTYPE_RAW, T0)
    assert pipeline.counters()["decode_errors"] == 1001
    assert len(caplog.records) == 4 and "997 more" in caplog.records[-1].getMessage()


@pytest.mark.slow
def test_daemon_runs_a_capture_source_and_replicates_what_it_learned(tmp_path):
    """``[[sources]] type = "capture"`` in a real ``sidecar run``: node A replays the capture
    file, node B (its peer) ends up with the same contacts over ZeroMQ."""
    from sidecar.lab.nodes import make_pair, wait_until
    from tests.sip_load import node_contacts

    a, b = make_pair(tmp_path)
    a.extra_toml = ("[[sources]]\ntype = \"capture\"\nname = \"wire\"\n"
                    f"pcap = \"{COMMITTED_PCAP}\"\nproxy_addresses = [\"127.0.0.1\", \"::1\"]\n")
    try:
        a.start()
        b.start()
        status = wait_until(lambda: (s := a.mi("sc_status")["sources"]["wire"])["state"]
                            == "replayed" and s, 20, what="replay finished")
        assert status["outcomes"] == 8 and status["puts"] == 7 and status["deletes"] == 1
        wait_until(lambda: len(node_contacts(b)) == len(EXPECTED), 20, what="B has them")
        got = {c["aor"]: c for c in node_contacts(b)}
        assert sorted(got) == sorted(EXPECTED)
        assert got["bob"]["received"] == "sip:127.0.0.6:40000"
        assert got["carol"]["socket"] == "tcp:127.0.0.1:5060"
        assert got["dave"]["socket"] == "udp:[::1]:5060"
    finally:
        a.stop()
        b.stop()


# --- live capture -----------------------------------------------------------------------------

async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_live_burst_on_lo_is_captured_without_loss():
    """A burst far above what Python decodes per second fits in the socket buffer."""
    _need_packet_socket()
    port = 45070
    settings = CaptureSettings(interface="lo", ports=(port,), proxy_addresses=(PROXY4,))
    src = CaptureSource(settings, replica=Replica(1, incarnation=7))
    await src.start()
    assert src.status()["state"] == "capturing"
    n = 20_000
    payload = sip("OPTIONS sip:example.com SIP/2.0", "x", "burst", 1, via="127.0.0.5:1",
                  contact=None, method="OPTIONS")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.5", 0))
        started = time.monotonic()
        for _ in range(n):
            s.sendto(payload, (PROXY4, port))
        sent_s = time.monotonic() - started
    try:
        await _wait_for(lambda: src.pipeline.non_register >= n, 30, "the burst")
        st = src.status()
    finally:
        await src.stop()
    assert st["non_register"] == n and st["drops"] == 0 and st["decoder"]["loopback_copies"] == 0
    print(f"burst of {n} packets sent in {sent_s:.2f}s ({n / sent_s:.0f}/s), all captured")


@pytest.mark.slow
async def test_live_capture_on_any_interface_drops_loopback_copies():
    _need_packet_socket()
    port = 45071
    src = CaptureSource(CaptureSettings(interface="any", ports=(port,)),
                        replica=Replica(1, incarnation=7))
    await src.start()
    payload = sip("OPTIONS sip:example.com SIP/2.0", "x", "any", 1, via="127.0.0.5:1",
                  contact=None, method="OPTIONS")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(50):
                s.sendto(payload + str(i).encode(), (PROXY4, port))
        await _wait_for(lambda: src.pipeline.decoder.stats.loopback_copies >= 50, 10,
                        "both copies of every packet")
        await _wait_for(lambda: src.pipeline.sip_messages >= 50, 10, "the packets")
    finally:
        await src.stop()
    assert src.pipeline.sip_messages == 50  # one of the two copies each


async def test_missing_interface_is_an_error_state_not_a_crash():
    _need_packet_socket()
    src = CaptureSource(CaptureSettings(interface="nosuchif0"), replica=Replica(1, incarnation=7))
    await src.start()
    try:
        st = src.status()
        assert st["state"] == "error" and "nosuchif0" in st["error"]
    finally:
        await src.stop()


def _require_live_parts():
    _need_packet_socket()
    from tests.kamailio_fixture import require_kamailio, require_sipp
    require_kamailio()
    require_sipp()


async def _sipp_tcp(rows, kam, workdir: Path, port: int) -> None:
    """The load scenario over one TCP connection (sip_load only runs UDP)."""
    from tests.kamailio_fixture import require_sipp
    from tests.sip_load import LOAD_SCENARIO
    csv = workdir / "tcp.csv"
    csv.write_text("SEQUENTIAL\n" + "\n".join(r.csv_line() for r in rows) + "\n")
    cmd = [require_sipp(), f"{kam.sip_ip}:{kam.sip_port}", "-sf", str(LOAD_SCENARIO),
           "-inf", str(csv), "-i", "127.0.0.1", "-p", str(port), "-t", "t1",
           "-m", str(len(rows)), "-r", "500", "-rp", "1000", "-l", str(len(rows)),
           "-timeout", "30s", "-timeout_error", "-nostdin", "-nd", "-cid_str", "tcp-%u@load",
           "-trace_err", "-error_file", str(workdir / "tcp_errors.log")]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=workdir)
    try:
        async with asyncio.timeout(45):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("sipp over TCP did not finish") from None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


async def _live_compare(tmp_path: Path, n_udp: int, n_tcp: int, timeout: float) -> dict:
    from tests.kamailio_fixture import KamailioInstance, free_port
    from tests.sip_load import LoadRow, compare, plan_load, proxy_dump, run_load

    async with KamailioInstance(tmp_path, sip_ip=PROXY4, extra_defines=("WITH_SIP_TCP",),
                                pkg_mb=64) as kam:  # ul.dump of 10k contacts needs the pkg
        replica = Replica(1, incarnation=7)
        settings = CaptureSettings(interface="lo", ports=(kam.sip_port,),
                                   proxy_addresses=(kam.sip_ip,))
        src = CaptureSource(settings, replica=replica)
        await src.start()
        try:
            assert src.status()["state"] == "capturing", src.status()
            plan = plan_load(n_udp, phone_port=free_port(PROXY4))
            report = await run_load(plan, kam, workdir=tmp_path)
            if n_tcp:
                port = free_port(PROXY4, socket.SOCK_STREAM)
                here = f"127.0.0.1:{port}"
                rows = [LoadRow(f"t{i}", f"<sip:t{i}@{here}>", here, 300 + i) for i in
                        range(n_tcp // 2)]
                nat = "127.0.0.9:5099"
                rows += [LoadRow(f"tn{i}", f"<sip:tn{i}@{nat}>", nat, 600) for i in
                         range(n_tcp - n_tcp // 2)]
                await _sipp_tcp(rows, kam, tmp_path, port)
            load_done = time.monotonic()
            dump = await proxy_dump(kam)
            assert plan.check_proxy([c for c in dump if c["socket"].startswith("udp")],
                                    kam.sip_socket) == []
            assert len(dump) == len(plan.expected()) + n_tcp
            diffs: list[str] = []

            def converged() -> bool:
                diffs[:] = compare(replica.store.records(), dump)
                return not diffs

            try:
                await _wait_for(converged, timeout, "the replica to match ul.dump")
            except AssertionError:
                raise AssertionError(f"{len(diffs)} differences, e.g. {diffs[:10]}; "
                                     f"status {src.status()}") from None
            print(f"\nSIPp+Kamailio: {report.register.rate:.0f} REGISTER/s over UDP "
                  f"({report.register.rows}), replica equal to ul.dump "
                  f"{time.monotonic() - load_done:.2f} s after the load ended")
            return {"status": src.status(), "dump": dump, "plan": plan}
        finally:
            await src.stop()


@pytest.mark.slow
async def test_live_capture_matches_kamailio_udp_nat_and_tcp(tmp_path):
    _require_live_parts()
    result = await _live_compare(tmp_path, n_udp=300, n_tcp=60, timeout=20)
    st, dump = result["status"], result["dump"]
    assert st["drops"] == 0 and st["parse_errors"] == 0 and st["decode_errors"] == 0
    assert st["decoder"]["loopback_copies"] == 0  # PACKET_IGNORE_OUTGOING did its job
    tcp = [c for c in dump if c["socket"].startswith("tcp:")]
    assert len(tcp) == 60 and any(c["received"] for c in tcp)
    assert any(c["received"] for c in dump if c["socket"].startswith("udp:"))
    assert st["deletes"] > 0  # the load's second phase unregistered some


@pytest.mark.slow
async def test_live_capture_of_ten_thousand_phones(tmp_path):
    _require_live_parts()
    result = await _live_compare(tmp_path, n_udp=10_000, n_tcp=0, timeout=60)
    st = result["status"]
    assert st["outcomes"] >= len(result["plan"].register) + len(result["plan"].unregister)
    assert st["drops"] == 0 and st["parse_errors"] == 0


if __name__ == "__main__":  # regenerate tests/pcaps/registrations.pcap
    COMMITTED_PCAP.parent.mkdir(exist_ok=True)
    build_registration_capture(COMMITTED_PCAP)
    print(f"wrote {COMMITTED_PCAP} ({os.path.getsize(COMMITTED_PCAP)} bytes)")
