"""Ingest benchmark: how fast registrations get from the proxy's traffic into the replica.

Four measurements, each against the real code path and printed next to the issue's target:

* **parser** — a typical desk-phone REGISTER and Kamailio's 200 OK through ``parse_message``,
  in messages per CPU-second (median of several runs; per kind and mixed).
* **capture / HEP / OpenSIPS events, stepped** — one real ``sidecar run`` process holds the
  source; a separate sender process sends pre-built UDP datagrams to 127.0.0.1 at a paced rate
  for a bounded time (REGISTER + 200 OK pairs on the wire for capture, the same pairs as HEP v3
  frames for HEP, E_UL_CONTACT_INSERT/UPDATE JSON for OpenSIPS). After each step the node's
  ``sc_status`` counters say how many complete outcomes (or events) arrived. The rate steps up
  until a step is not lossless, i.e. something is missing, the kernel dropped a packet, or the
  backlog was not worked off within ``sustain_slack`` of the sender stopping (a large socket
  buffer must not pass a rate the source cannot sustain). A failed step is retried once,
  because the machine is shared and noisy. Each step also records the sidecar's CPU use.
* **in-process ceilings** — the same source objects fed in a loop without sockets: the CPU
  cost per message when nothing else competes, for locating bottlenecks.
* **registration storm** — SIPp sends 50,000 REGISTERs (10,000 with ``--quick``; the mix of
  ``tests.sip_load``: NAT, two contacts) to a real Kamailio, offered faster than the pair
  gets through here, so the achieved rate is the highest they sustain. The sidecar learns them
  over HEP (Kamailio's ``siptrace``) and, where AF_PACKET is permitted, in a second storm by
  packet capture. Afterwards every binding of ``ul.dump`` must be in the replica with the same
  received, socket, path, Call-ID, CSeq and expires (±1 s around the dump's own duration).

Only 127.0.0.0/8 is used. Every loop is bounded. The machine may be shared with other work:
compare the numbers of one run with each other and read the CPU column, not just the rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.config import Section
from sidecar.lab.nodes import NodeProcess, free_ports
from sidecar.replica import Replica
from sidecar.sip.parser import parse_message
from sidecar.sources import bpf
from sidecar.sources.capture_source import (
    CaptureSettings,
    RegisterPipeline,
    open_capture_socket,
)
from sidecar.sources.hep import FAMILY_IPV4, PROTO_TYPE_SIP, PROTO_UDP, HepPacket, encode_hep
from sidecar.sources.hep_source import HepSettings, HepSource
from sidecar.sources.packets import LINKTYPE_RAW
from sidecar.sources.registrations import OutcomeCounts, apply_outcome
from sidecar.sources.registry import SourceContext, parse_source

from .report import print_table, write_json

PROXY_IP = "127.0.0.1"
PHONE_IP = "127.0.0.5"
PROXY_SOCKET = "udp:127.0.0.1:5060"  # what the OpenSIPS events name as the receiving socket
USER_AGENT = "Yealink SIP-T46S 66.86.0.15"
EXPIRES = 3600
PACKET_HOST = 0  # sll_pkttype of a received packet
ARPHRD_LOOPBACK = 772

# Targets from the issue (printed next to the values).
PARSER_TARGET = 100_000
CAPTURE_TARGET = 30_000
HEP_TARGET = 30_000


# ------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """How big each part runs; ``QUICK`` and ``FULL`` are the CLI's, ``SMOKE`` the test's."""

    parser_messages: int
    parser_runs: int
    in_process_pairs: int
    rates: tuple[int, ...]  # offered packets (or events) per second, stepped up
    step_s: float
    storm_registrations: int
    storm_rates: tuple[int, ...]  # SIPp rates offered, the next one only if SIPp failed

    def sustain_slack(self) -> float:
        """Seconds after the sender stops within which the backlog must be gone."""
        return 0.3 + 0.1 * self.step_s


# The storm is offered above what SIPp and Kamailio reach here (about 6,000 REGISTER/s on the
# 2-vCPU test VM): SIPp is open-loop, so the achieved rate is what the pair sustains, and a run
# in which any REGISTER went unanswered is retried at the next lower rate.
QUICK = Sizes(parser_messages=10_000, parser_runs=5, in_process_pairs=5_000,
              rates=(5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000),
              step_s=1.5, storm_registrations=10_000, storm_rates=(8_000, 5_000, 3_000))
FULL = Sizes(parser_messages=20_000, parser_runs=5, in_process_pairs=10_000,
             rates=(5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000,
                    80_000), step_s=4.0, storm_registrations=50_000,
             storm_rates=(8_000, 5_000, 3_000))
SMOKE = Sizes(parser_messages=500, parser_runs=1, in_process_pairs=300, rates=(1_000,),
              step_s=0.4, storm_registrations=300, storm_rates=(2_000,))


# ------------------------------------------------------------------ messages
def register_message(i: int, phone_port: int, proxy: str = PROXY_IP,
                     phone: str = PHONE_IP) -> bytes:
    """A desk phone's REGISTER (RFC 5626 instance, Allow, Supported): about 600 bytes."""
    return (
        f"REGISTER sip:{proxy} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {phone}:{phone_port};branch=z9hG4bK{i:010d}bench;rport\r\n"
        f"Max-Forwards: 70\r\n"
        f'From: "Phone {i}" <sip:u{i}@{proxy}>;tag={i:x}f0a1\r\n'
        f"To: <sip:u{i}@{proxy}>\r\n"
        f"Call-ID: {i:08x}-5f1d-4c2a@{phone}\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:u{i}@{phone}:{phone_port};transport=udp>"
        f';+sip.instance="<urn:uuid:00000000-0000-1000-8000-{i:012x}>";reg-id=1\r\n'
        f"Expires: {EXPIRES}\r\n"
        f"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, OPTIONS, INFO, MESSAGE, UPDATE\r\n"
        f"Supported: path, outbound, gruu\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def ok_message(i: int, phone_port: int, proxy: str = PROXY_IP, phone: str = PHONE_IP) -> bytes:
    """Kamailio's registrar answer to :func:`register_message` (the binding, with expires)."""
    return (
        f"SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP {phone}:{phone_port};branch=z9hG4bK{i:010d}bench"
        f";rport={phone_port};received={phone}\r\n"
        f'From: "Phone {i}" <sip:u{i}@{proxy}>;tag={i:x}f0a1\r\n'
        f"To: <sip:u{i}@{proxy}>;tag=b27e1a1d33761e85846fc98f5f3a7e58.{i:x}\r\n"
        f"Call-ID: {i:08x}-5f1d-4c2a@{phone}\r\n"
        f"CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:u{i}@{phone}:{phone_port};transport=udp>;expires={EXPIRES}"
        f';+sip.instance="<urn:uuid:00000000-0000-1000-8000-{i:012x}>";reg-id=1\r\n'
        f"Require: outbound\r\n"
        f"Server: kamailio (5.6.3 (x86_64/linux))\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def usrloc_event(i: int, update: bool, now: int) -> bytes:
    """E_UL_CONTACT_INSERT of phone ``i`` (or its UPDATE by a re-REGISTER), as OpenSIPS 3.6
    prints it over event_datagram (compact JSON, the recorded parameter order)."""
    method = "E_UL_CONTACT_UPDATE" if update else "E_UL_CONTACT_INSERT"
    return (
        f'{{"jsonrpc":"2.0","method":"{method}","params":{{"domain":"location",'
        f'"aor":"u{i}","uri":"sip:u{i}@{PHONE_IP}:{5060 + i % 1000}","received":null,'
        f'"path":null,"qval":-1,"user_agent":"{USER_AGENT}","socket":"{PROXY_SOCKET}",'
        f'"bflags":0,"expires":{now + EXPIRES + (60 if update else 0)},'
        f'"callid":"{i:08x}-5f1d-4c2a@{PHONE_IP}","cseq":{2 if update else 1},"attr":"",'
        f'"latency":0,"shtag":""}}}}'
    ).encode()


class HepFramer:
    """HEP v3 frames for one direction, built with :func:`encode_hep` once and reused.

    Encoding every frame from scratch costs more than the source spends decoding it, which
    would make the sender the bottleneck; the payload chunk is last in ``encode_hep``'s
    layout, so the rest is a per-direction template (checked against the full encoder).
    """

    def __init__(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        pkt = HepPacket(family=FAMILY_IPV4, proto=PROTO_UDP, src_ip=src[0], dst_ip=dst[0],
                        src_port=src[1], dst_port=dst[1], ts=time.time(),
                        proto_type=PROTO_TYPE_SIP, capture_id=2001, auth_key=None, payload=b"")
        self._pkt = pkt
        empty = encode_hep(pkt)
        self._chunks = empty[6:-6]  # without the header and the empty payload chunk

    def frame(self, payload: bytes) -> bytes:
        body = self._chunks + struct.pack("!HHH", 0, 15, 6 + len(payload)) + payload
        return struct.pack("!4sH", b"HEP3", 6 + len(body)) + body

    def check(self, payload: bytes) -> None:
        pkt = HepPacket(**{**asdict(self._pkt), "payload": payload})
        if encode_hep(pkt) != self.frame(payload):
            raise RuntimeError("HEP template differs from encode_hep (layout changed?)")


def ipv4_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ident: int) -> bytes:
    """An IPv4/UDP packet as an ``AF_PACKET``/``SOCK_DGRAM`` socket hands it over."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0x4000, 64,
                         17, 0, socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    words = struct.unpack("!10H", header)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:] + udp


# ------------------------------------------------------------------ parser
def bench_parser(n: int, runs: int) -> dict[str, Any]:
    """Messages per CPU-second through ``parse_message``: REGISTER, 200 OK, alternating.

    CPU time (``time.process_time``), not wall time: on a shared machine this process may be
    descheduled, and what the parser costs is the question here.
    """
    reg = [register_message(i, 5062) for i in range(64)]
    ok = [ok_message(i, 5062) for i in range(64)]
    mixed = [m for pair in zip(reg, ok, strict=True) for m in pair]

    def rate(messages: list[bytes]) -> float:
        k = len(messages)
        batch = [messages[j % k] for j in range(n)]
        t0 = time.process_time()
        for m in batch:
            parse_message(m)
        return n / (time.process_time() - t0)

    for m in mixed:  # all of them must parse; also warms up the regex caches
        parse_message(m)
    runs_ = {name: [rate(messages) for _ in range(runs)]
             for name, messages in (("register", reg), ("ok", ok), ("mixed", mixed))}
    return {
        "parser_msgs_per_s": statistics.median(runs_["mixed"]),
        "parser_register_msgs_per_s": statistics.median(runs_["register"]),
        "parser_ok_msgs_per_s": statistics.median(runs_["ok"]),
        "parser_runs": runs_,
        "parser_message_bytes": {"register": len(reg[0]), "ok": len(ok[0])},
    }


# ------------------------------------------------------------------ in-process ceilings
def _ceiling(items: list[bytes], make: Callable[[], tuple[Callable[[bytes, int], None],
                                                          Callable[[], None]]],
             runs: int) -> tuple[float, list[float]]:
    """Median items per CPU-second over ``runs`` fresh consumers. ``make()`` returns
    ``(feed(item, k), check())``; ``check`` raises when something was not applied."""
    rates = []
    for _ in range(runs):
        feed, check = make()
        t0 = time.process_time()
        for k, item in enumerate(items):
            feed(item, k)
        rates.append(len(items) / (time.process_time() - t0))
        check()
    return statistics.median(rates), rates


def _expect(what: str, got: int, want: int, detail: Callable[[], Any]) -> None:
    if got != want:
        raise RuntimeError(f"in-process {what}: {got} changes for {want}: {detail()}")


def capture_in_process(pairs: int, runs: int = 3) -> dict[str, Any]:
    """Packets per CPU-second through ``RegisterPipeline`` + ``apply_outcome`` (no sockets)."""
    phone, proxy = (PHONE_IP, 5062), (PROXY_IP, 5060)
    frames = []
    for i in range(pairs):
        frames.append(ipv4_udp(phone, proxy, register_message(i, 5062), 2 * i))
        frames.append(ipv4_udp(proxy, phone, ok_message(i, 5062), 2 * i + 1))
    start = time.time()

    def make() -> tuple[Callable[[bytes, int], None], Callable[[], None]]:
        replica, counts = Replica(1), OutcomeCounts()
        pipeline = RegisterPipeline(
            CaptureSettings(interface="lo", ports=(5060,), proxy_addresses=(PROXY_IP,)),
            lambda o: apply_outcome(replica, o, counts=counts))
        feed = pipeline.feed
        return (lambda f, k: feed(f, LINKTYPE_RAW, start + k * 1e-5, PACKET_HOST,
                                  ARPHRD_LOOPBACK),
                lambda: _expect("capture", counts.puts, pairs, pipeline.counters))

    median, rates = _ceiling(frames, make, runs)
    return {"capture_in_process_pps": median, "capture_in_process_runs": rates}


def hep_in_process(pairs: int, runs: int = 3) -> dict[str, Any]:
    """HEP frames per CPU-second through ``HepSource.handle_frame`` (no sockets)."""
    up = HepFramer((PHONE_IP, 5062), (PROXY_IP, 5060))
    down = HepFramer((PROXY_IP, 5060), (PHONE_IP, 5062))
    frames = []
    for i in range(pairs):
        frames += [up.frame(register_message(i, 5062)), down.frame(ok_message(i, 5062))]

    def make() -> tuple[Callable[[bytes, int], None], Callable[[], None]]:
        ctx = SourceContext(Replica(1), lambda: None, None, 1)  # type: ignore[arg-type]
        source = HepSource(HepSettings(), ctx)
        handle = source.handle_frame
        return (lambda f, k: handle(f),
                lambda: _expect("HEP", source.counters.outcome_counts.puts, pairs,
                                source.status))

    median, rates = _ceiling(frames, make, runs)
    return {"hep_in_process_msgs_per_s": median, "hep_in_process_runs": rates}


def opensips_in_process(events: int, runs: int = 3) -> dict[str, Any]:
    """Events per CPU-second through ``OpensipsSource.feed_datagram`` (JSON, checks,
    ``local_put``), no sockets. The MI URL points at a closed port and is never called."""
    from sidecar.sources.opensips_source import OpensipsSource

    cfg = parse_source(Section("bench", {
        "type": "opensips", "mi_url": "http://127.0.0.1:9/mi",
        "events_listen": "udp:127.0.0.1:0", "local_sockets": PROXY_SOCKET}), Path("."))
    now = int(time.time())
    datagrams = [usrloc_event(k // 2, k % 2 == 1, now) for k in range(events)]
    sources: list[OpensipsSource] = []

    def make() -> tuple[Callable[[bytes, int], None], Callable[[], None]]:
        ctx = SourceContext(Replica(1), lambda: None, None, 1)  # type: ignore[arg-type]
        source = OpensipsSource(cfg.settings, ctx)
        sources.append(source)
        feed = source.feed_datagram
        return (lambda d, k: feed(d),
                lambda: _expect("OpenSIPS", source.stats.puts + source.stats.refreshes,
                                events, source.status))

    try:
        median, rates = _ceiling(datagrams, make, runs)
    finally:
        async def close() -> None:
            for source in sources:
                await source.mi.close()
        asyncio.run(close())
    return {"opensips_in_process_events_per_s": median, "opensips_in_process_runs": rates}


# ------------------------------------------------------------------ paced sender (a process)
def _sender_main(conn: Any, kind: str, port: int) -> None:
    """Child process: on ("run", rate, seconds, first) send that many datagrams, paced.

    ``kind``: "capture" (REGISTER phone -> proxy:port, 200 OK proxy:port -> phone, from two
    sockets that never read), "hep" (the same pairs as HEP frames to 127.0.0.1:port) or
    "opensips" (INSERT then UPDATE events to 127.0.0.1:port).
    """
    socks: list[socket.socket] = []

    def udp(bind: tuple[str, int]) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read: drop early
        s.bind(bind)
        socks.append(s)
        return s

    target = (PROXY_IP, port)
    if kind == "capture":
        phone = udp((PHONE_IP, 0))
        proxy = udp((PROXY_IP, port))
        phone_addr = phone.getsockname()
    else:
        phone = proxy = udp((PHONE_IP, 0))
        phone_addr = (PHONE_IP, 5062)
    HepFramer(phone_addr, (PROXY_IP, 5060)).check(register_message(0, phone_addr[1]))
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] != "prepare":
            break
        _, rate, seconds, first = cmd
        units = max(1, int(rate * seconds / 2))  # pairs (SIP, HEP) or phones (events)
        plan: list[tuple[Any, bytes, tuple[str, int]]] = []
        now = int(time.time())
        up = HepFramer(phone_addr, (PROXY_IP, 5060))  # capture time: now
        down = HepFramer((PROXY_IP, 5060), phone_addr)
        for i in range(first, first + units):
            if kind == "capture":
                plan.append((phone.sendto, register_message(i, phone_addr[1]), target))
                plan.append((proxy.sendto, ok_message(i, phone_addr[1]), phone_addr))
            elif kind == "hep":
                plan.append((phone.sendto, up.frame(register_message(i, phone_addr[1])), target))
                plan.append((phone.sendto, down.frame(ok_message(i, phone_addr[1])), target))
            else:
                plan.append((phone.sendto, usrloc_event(i, False, now), target))
                plan.append((phone.sendto, usrloc_event(i, True, now), target))
        conn.send(units)
        if conn.recv() != "go":
            break
        cpu = time.process_time()
        sent, errors, elapsed = _paced(plan, rate, seconds * 3 + 1)
        conn.send((sent, errors, elapsed, time.process_time() - cpu))
    for s in socks:
        s.close()


def _paced(plan: list[tuple[Any, bytes, tuple[str, int]]], rate: float,
           limit_s: float) -> tuple[int, int, float]:
    """Send ``plan`` at ``rate`` per second: whatever is due, then sleep about a millisecond
    (bursts of rate/1000, and the sender leaves the CPU to the receiver in between)."""
    sent = errors = 0
    total = len(plan)
    k = 0
    clock = time.perf_counter
    start = clock()
    while k < total:
        elapsed = clock() - start
        if elapsed > limit_s:
            break
        due = min(total, int(elapsed * rate) + 1)
        while k < due:
            send, data, addr = plan[k]
            try:
                send(data, addr)
                sent += 1
            except OSError:
                errors += 1
            k += 1
        if k < total:
            time.sleep(0.001)
    return sent, errors, clock() - start


class PacedSender:
    """The sender process and its pipe (start once, run several steps)."""

    def __init__(self, kind: str, port: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sender_main, args=(child, kind, port), daemon=True)
        self.proc.start()
        self._limit = 60.0
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise RuntimeError("sender process did not start")

    def prepare(self, rate: int, seconds: float, first: int) -> int:
        """Have the datagrams of one step built (phones ``first``...); returns how many
        units (pairs or phones) the step uses."""
        self._limit = seconds * 3 + 30
        self.conn.send(("prepare", rate, seconds, first))
        if not self.conn.poll(120):
            raise RuntimeError("sender did not build its datagrams")
        return self.conn.recv()

    def go(self) -> tuple[int, int, float, float]:
        """Send the prepared step: (datagrams sent, send errors, seconds spent sending, CPU
        seconds the sender used)."""
        self.conn.send("go")
        if not self.conn.poll(self._limit):
            raise RuntimeError("sender did not finish")
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# ------------------------------------------------------------------ stepping a sidecar run
@dataclass
class Step:
    offered_per_s: int
    sent_per_s: float
    sent: int  # datagrams
    expected: int  # complete outcomes (pairs) or events
    counted: int
    lost: int
    kernel_drops: int
    drain_s: float  # after the sender stopped, until everything was counted
    sidecar_cpu: float  # CPU seconds of the sidecar process / seconds it had work
    sender_cpu: float  # the same for the sender process (the machine has few cores)
    send_errors: int
    lossless: bool
    note: str = ""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Probe:
    """Reads one source's counters from a running node."""

    node: NodeProcess
    source: str
    counted_key: str  # "outcomes" or "events"
    pairs: bool  # two datagrams per counted unit
    udp_port: int | None = None  # the source's own UDP socket: its drops are the kernel's
    history: list[Step] = field(default_factory=list)

    def counters(self) -> tuple[int, int]:
        """(units counted so far, packets the kernel dropped so far)."""
        st = self.node.mi("sc_status")["sources"][self.source]
        drops = udp_drops(self.udp_port) if self.udp_port else st["drops"]
        return st[self.counted_key], drops


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to 127.0.0.1:``port`` (its receive
    buffer was full), from the ``drops`` column of /proc/net/udp."""
    want = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    return sum(int(line.split()[-1]) for line in lines if line.split()[1] == want)


def run_step(probe: Probe, sender: PacedSender, rate: int, seconds: float, first: int,
             slack: float) -> tuple[Step, int]:
    """One paced step; returns the step and how many units it used (phone numbers)."""
    assert probe.node.proc is not None
    pid = probe.node.proc.pid
    units = sender.prepare(rate, seconds, first)
    counted0, drops0 = probe.counters()
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    sent, errors, send_s, sender_cpu = sender.go()
    sent_end = time.perf_counter()
    expected = sent // 2 if probe.pairs else sent
    counted, drops = counted0, drops0
    last_value, last_change, last_cpu = counted0, sent_end, _cpu_seconds(pid)
    reached = None
    deadline = sent_end + max(10.0, 3 * seconds)
    while time.perf_counter() < deadline:
        counted, drops = probe.counters()
        now = time.perf_counter()
        if counted != last_value:
            last_value, last_change, last_cpu = counted, now, _cpu_seconds(pid)
        if counted - counted0 >= expected:
            reached = now
            break
        if now - last_change > 1.5:
            break  # no progress: the rest is lost
        time.sleep(0.02)
    # CPU share while there was work (the sender running, then the backlog), not idle polling
    busy = max(send_s, last_change - t0)
    got = counted - counted0
    drain = (reached if reached is not None else last_change) - sent_end
    lost = max(0, expected - got)
    kernel_drops = drops - drops0
    note = ""
    if sent / send_s < 0.9 * rate:
        note = "sender could not reach the rate"
    lossless = lost == 0 and kernel_drops == 0 and errors == 0 and drain <= slack
    if lost == 0 and drain > slack:
        note = note or f"backlog took {drain:.2f} s (> {slack:.2f} s)"
    step = Step(offered_per_s=rate, sent_per_s=sent / send_s, sent=sent, expected=expected,
                counted=got, lost=lost, kernel_drops=kernel_drops, drain_s=max(0.0, drain),
                sidecar_cpu=(last_cpu - cpu0) / busy, sender_cpu=sender_cpu / send_s,
                send_errors=errors, lossless=lossless, note=note)
    probe.history.append(step)
    return step, units


def step_up(probe: Probe, sender: PacedSender, sizes: Sizes) -> int | None:
    """Raise the rate until a step (and its retry) is not lossless; the last lossless rate."""
    best = None
    first = 0
    for rate in sizes.rates:
        ok = False
        for _attempt in range(2):
            step, used = run_step(probe, sender, rate, sizes.step_s, first,
                                  sizes.sustain_slack())
            first += used
            if step.lossless:
                ok = True
                break
        if not ok:
            break
        best = rate
    return best


def _steps_json(probe: Probe) -> list[dict[str, Any]]:
    return [asdict(s) for s in probe.history]


def _node(work: Path, name: str, source_toml: str) -> NodeProcess:
    node = NodeProcess(1, work / name, extra_toml=source_toml)
    node.start()
    return node


def capture_permitted() -> str | None:
    """``None`` when an AF_PACKET socket can be opened on ``lo``, else the reason."""
    try:
        open_capture_socket("lo", bpf.sip_filter([5060], [PROXY_IP]), 1 << 16).close()
    except OSError as exc:
        return f"capture skipped: cannot open an AF_PACKET socket on lo ({exc}); needs root " \
               "or CAP_NET_RAW"
    return None


def run_capture(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Stepped REGISTER + 200 OK pairs on ``lo`` into a ``sidecar run`` capture source."""
    reason = capture_permitted()
    if reason is not None:
        return {"capture_max_lossless_pps": None, "capture_steps": [], "capture_note": reason}
    (port,) = free_ports(1)
    node = _node(work, "capture", (
        f'[[sources]]\ntype = "capture"\nname = "capture"\ninterface = "lo"\n'
        f'ports = [{port}]\nproxy_addresses = ["{PROXY_IP}"]\n'))
    sender = None
    try:
        state = node.mi("sc_status")["sources"]["capture"]["state"]
        if state != "capturing":
            return {"capture_max_lossless_pps": None, "capture_steps": [],
                    "capture_note": f"capture skipped: source state {state!r}"}
        sender = PacedSender("capture", port)
        probe = Probe(node, "capture", "outcomes", pairs=True)
        best = step_up(probe, sender, sizes)
        return {"capture_max_lossless_pps": best, "capture_steps": _steps_json(probe),
                "capture_note": "REGISTER+200 OK pairs on lo (UDP), AF_PACKET + BPF in a "
                                "`sidecar run` process; rate = packets/s, lost = outcomes"}
    finally:
        if sender is not None:
            sender.close()
        node.kill()


def run_hep(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Stepped HEP v3 frames (REGISTER and 200 OK) into a ``sidecar run`` HEP source."""
    (port,) = free_ports(1)
    node = _node(work, "hep", (
        f'[[sources]]\ntype = "hep"\nname = "hep"\nlisten = "{PROXY_IP}:{port}"\n'
        f'transports = ["udp"]\n'))
    sender = PacedSender("hep", port)
    try:
        probe = Probe(node, "hep", "outcomes", pairs=True, udp_port=port)
        best = step_up(probe, sender, sizes)
        return {"hep_max_lossless_msgs_per_s": best, "hep_steps": _steps_json(probe),
                "hep_note": "HEP v3 over UDP into a `sidecar run` process; rate = frames/s, "
                            "lost = outcomes (REGISTER+200 OK pairs)"}
    finally:
        sender.close()
        node.kill()


def run_opensips(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Stepped E_UL_CONTACT_INSERT/UPDATE datagrams into a ``sidecar run`` OpenSIPS source.

    No OpenSIPS runs here: MI points at a closed port, so subscribing and reconciling fail
    (counted as mi_errors) while the event path is measured as it runs in production.
    """
    udp_port, closed = free_ports(2)
    node = _node(work, "opensips", (
        f'[[sources]]\ntype = "opensips"\nname = "opensips"\n'
        f'mi_url = "http://127.0.0.1:{closed}/mi"\nevents_listen = "udp:127.0.0.1:{udp_port}"\n'
        f'local_sockets = ["{PROXY_SOCKET}"]\n'))
    sender = PacedSender("opensips", udp_port)
    try:
        probe = Probe(node, "opensips", "events", pairs=False, udp_port=udp_port)
        best = step_up(probe, sender, sizes)
        st = node.mi("sc_status")["sources"]["opensips"]
        return {"opensips_events_per_s": best, "opensips_steps": _steps_json(probe),
                "opensips_note": "event_datagram JSON (INSERT then UPDATE per phone) into a "
                                 "`sidecar run` process; MI unreachable (no OpenSIPS here)",
                "opensips_changes": st["puts"] + st["refreshes"],
                "opensips_parse_errors": st["parse_errors"]}
    finally:
        sender.close()
        node.kill()


# ------------------------------------------------------------------ registration storm
STORM_FIELDS = ("received", "socket", "path", "callid", "cseq")


def storm_available() -> str | None:
    """``None`` when Kamailio and SIPp are installed, else the reason."""
    from tests.kamailio_fixture import KAMAILIO_BIN

    if not KAMAILIO_BIN.exists():
        return f"storm skipped: {KAMAILIO_BIN} not installed"
    if shutil.which("sipp") is None:
        return "storm skipped: sipp not installed"
    return None


@dataclass
class TimedDump:
    """``ul.dump`` contacts with expires as seconds *remaining*, and when the call ran.

    Kamailio computes each remaining time with its own clock while it builds the reply,
    somewhere between ``started`` and ``finished``; a dump of 50,000 contacts takes seconds
    here, so the absolute expiry is only known to lie in that window.
    """

    contacts: list[dict[str, Any]]
    started: float
    finished: float


async def timed_dump(proxy: Any, timeout: float = 120.0) -> TimedDump:
    from sidecar.proxy.kamailio_dump import parse_ul_dump

    async with proxy.http_rpc(timeout) as rpc:
        started = time.time()
        result = await rpc.call("ul.dump")
        finished = time.time()
    return TimedDump(parse_ul_dump(result, now=0), started, finished)


def storm_differences(replica: list[dict[str, Any]], dump: TimedDump,
                      tolerance_s: int = 1) -> tuple[int, int, list[str]]:
    """(bindings of the dump missing or different in the replica, extra in the replica,
    a few examples). Expires must fall in the dump's window, ± ``tolerance_s``."""
    ours = {(c["aor"], c["uri"]): c for c in replica}
    lo_clock, hi_clock = math.floor(dump.started), math.floor(dump.finished)
    lost, examples = 0, []
    theirs = set()
    for c in dump.contacts:
        key = (c["aor"], c["uri"])
        theirs.add(key)
        o = ours.get(key)
        if o is None:
            bad = ["missing"]
        else:
            bad = [f for f in STORM_FIELDS if o.get(f) != c.get(f)]
            remaining, mine = c["expires"], o["expires"]
            if remaining == 0 or mine == 0:  # permanent
                ok = remaining == mine
            else:
                ok = (lo_clock + remaining - tolerance_s <= mine
                      <= hi_clock + remaining + tolerance_s)
            if not ok:
                bad.append(f"expires {mine} not in {lo_clock + remaining}..{hi_clock + remaining}")
        if bad:
            lost += 1
            if len(examples) < 5:
                examples.append(f"{key}: {','.join(bad)}")
    return lost, len(ours.keys() - theirs), examples


def expiry_outliers(replica: list[dict[str, Any]], dump: TimedDump, tolerance_s: int = 1,
                    half_window: int = 50) -> int:
    """Bindings whose expiry disagrees with their neighbours in the dump.

    The window check of :func:`storm_differences` is as wide as the dump is long (seconds
    for 50,000 contacts). Kamailio writes the contacts one after the other, so
    ``replica expires - remaining`` (the moment it wrote that contact, give or take a second)
    must agree with the median of the contacts around it to within ``tolerance_s``.
    """
    ours = {(c["aor"], c["uri"]): c["expires"] for c in replica}
    implied = [ours[key] - c["expires"] for c in dump.contacts
               if c["expires"] and ours.get(key := (c["aor"], c["uri"]))]
    outliers = 0
    for i, t in enumerate(implied):
        around = implied[max(0, i - half_window):i + half_window + 1]
        if abs(t - statistics.median_low(around)) > tolerance_s:
            outliers += 1
    return outliers


async def _storm(work: Path, sizes: Sizes, source: str) -> dict[str, Any]:
    """One storm: Kamailio + SIPp, with the sidecar learning through ``source`` ("hep":
    Kamailio's siptrace mirror; "capture": AF_PACKET on lo, no siptrace)."""
    from tests.kamailio_fixture import KamailioInstance, free_port
    from tests.sip_load import node_contacts, plan_load, run_rows

    work = work / f"storm-{source}"
    (hep_port,) = free_ports(1)
    kam = KamailioInstance(work / "kam", sip_ip="127.0.0.2", workers=2, pkg_mb=256,
                           shm_mb=512, debug_level=1,
                           hep_dst=(PROXY_IP, hep_port) if source == "hep" else None)
    if source == "hep":
        toml = (f'[[sources]]\ntype = "hep"\nname = "storm"\nlisten = "{PROXY_IP}:{hep_port}"\n'
                f'transports = ["udp"]\n')
    else:
        toml = (f'[[sources]]\ntype = "capture"\nname = "storm"\ninterface = "lo"\n'
                f'ports = [{kam.sip_port}]\nproxy_addresses = ["{kam.sip_ip}"]\n')
    node = _node(work, "node", toml)
    try:
        async with kam:
            attempts: list[dict[str, Any]] = []
            for k, rate in enumerate(sizes.storm_rates):
                n = sizes.storm_registrations
                users = math.ceil(n / 1.2) + 1  # a fifth of the phones register two contacts
                plan = plan_load(users, phone_port=free_port(PROXY_IP), prefix=f"s{k}-",
                                 tag=f"storm{k}")
                plan.register = plan.register[:n]
                try:
                    run = await run_rows(plan.register, kam, phone_ip=PROXY_IP,
                                         phone_port=plan.phone_port,
                                         callid_pattern=plan.callid_pattern("r"),
                                         workdir=work / "sipp", rate=rate, name=f"storm{k}")
                except AssertionError as exc:  # some REGISTER unanswered: try a lower rate
                    attempts.append({"offered_per_s": rate, "error": str(exc).splitlines()[0]})
                    continue
                attempts.append({"offered_per_s": rate, "achieved_per_s": run.rate,
                                 "seconds": run.elapsed_s})
                break
            dump = await timed_dump(kam)
        # Kamailio is stopped; its table is in `dump`. Wait for the sidecar to agree, or for
        # the differences to stop shrinking (what is still missing then is lost).
        dumped = time.monotonic()
        deadline = dumped + 60
        best, best_at = None, time.monotonic()
        while True:
            replica = await asyncio.to_thread(node_contacts, node)
            lost, extra, examples = storm_differences(replica, dump)
            now = time.monotonic()
            if best is None or lost + extra < best:
                best, best_at = lost + extra, now
            if best == 0 or now > deadline or now - best_at > 3.0:
                break
            await asyncio.sleep(0.5)
        converged = time.monotonic() - dumped
        st = node.mi("sc_status")["sources"]["storm"]
        kernel_drops = udp_drops(hep_port) if source == "hep" else st["drops"]
        counters = ("messages", "bad_hep") if source == "hep" else ("sip_messages", "packets")
        done = attempts[-1] if attempts and "achieved_per_s" in attempts[-1] else None
        return {
            "registrations": sizes.storm_registrations if done else 0,
            "rate_per_s": done["achieved_per_s"] if done else None,
            "offered_rate_per_s": done["offered_per_s"] if done else None,
            "attempts": attempts,
            "error": None if done else "SIPp failed at every offered rate",
            "lost": lost,
            "extra_in_replica": extra,
            "expires_outliers": expiry_outliers(replica, dump),
            "examples": examples,
            "dump_bindings": len(dump.contacts),
            "dump_s": dump.finished - dump.started,
            "converged_after_dump_s": converged if lost == 0 and extra == 0 else None,
            "kernel_drops": kernel_drops,
            "source_counters": {k: st[k] for k in (*counters, "outcomes", "puts",
                                                   "parse_errors", "drops")},
        }
    finally:
        node.kill()


STORM_NOTE = ("SIPp -> Kamailio (2 UDP workers) -> `sidecar run` with the {source} source; "
              "lost = ul.dump bindings missing or different in the replica: received, socket, "
              "path, Call-ID, CSeq, expires ±1 s around the dump's own duration")


def run_storm(work: Path, sizes: Sizes) -> dict[str, Any]:
    """The storm through HEP (``storm_*``) and, where capture is permitted, through packet
    capture (``storm_capture_*``)."""
    reason = storm_available()
    if reason is not None:
        return {"storm_registrations": 0, "storm_rate_per_s": None, "storm_lost": None,
                "storm_note": reason}
    out: dict[str, Any] = {}
    hep = asyncio.run(_storm(work, sizes, "hep"))
    out.update({f"storm_{k}": v for k, v in hep.items()})
    out["storm_note"] = STORM_NOTE.format(source="HEP (siptrace HEP v3 over UDP)")
    reason = capture_permitted()
    if reason is None:
        cap = asyncio.run(_storm(work, sizes, "capture"))
        out.update({f"storm_capture_{k}": v for k, v in cap.items()})
        out["storm_capture_note"] = STORM_NOTE.format(source="capture (AF_PACKET on lo)")
    else:
        out["storm_capture_note"] = reason
    return out


# ------------------------------------------------------------------ the whole run
def collect(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Every measurement at ``sizes``; the JSON document without the machine description."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    parts: dict[str, float] = {}
    for name, part in (
        ("parser", lambda: bench_parser(sizes.parser_messages, sizes.parser_runs)),
        ("in_process", lambda: {**capture_in_process(sizes.in_process_pairs),
                                **hep_in_process(sizes.in_process_pairs),
                                **opensips_in_process(2 * sizes.in_process_pairs)}),
        ("capture", lambda: run_capture(work, sizes)),
        ("hep", lambda: run_hep(work, sizes)),
        ("opensips", lambda: run_opensips(work, sizes)),
        ("storm", lambda: run_storm(work, sizes)),
    ):
        started = time.perf_counter()
        results.update(part())
        parts[name] = time.perf_counter() - started
    results["part_wall_s"] = parts
    results["step_s"] = sizes.step_s
    results["sustain_slack_s"] = sizes.sustain_slack()
    results["wall_s"] = time.perf_counter() - t0
    return results


def _step_rows(name: str, steps: list[dict[str, Any]]) -> list[tuple[str, Any, str]]:
    rows = []
    for s in steps:
        rows.append((
            f"  {name} @ {s['offered_per_s']:,}/s", s["sent_per_s"],
            f"{'ok  ' if s['lossless'] else 'FAIL'} lost {s['lost']}, kernel drops "
            f"{s['kernel_drops']}, backlog {s['drain_s']:.2f} s, CPU sidecar "
            f"{100 * s['sidecar_cpu']:.0f}% sender {100 * s['sender_cpu']:.0f}%"
            f"{'; ' + s['note'] if s['note'] else ''}"))
    return rows


def _storm_detail(r: dict[str, Any], prefix: str) -> str:
    if r.get(f"{prefix}lost") is None:
        return ""
    error = r.get(f"{prefix}error")
    offered = r.get(f"{prefix}offered_rate_per_s")
    return ((f" SIPp failed: {error};" if error else "")
            + f" (of {r[f'{prefix}dump_bindings']:,} bindings; kernel drops "
            f"{r[f'{prefix}kernel_drops']}, expiry outliers {r[f'{prefix}expires_outliers']}"
            + (f", offered {offered:,}/s)" if offered else ")"))


def _fmt_rate(v: Any) -> Any:
    return "n/a" if v is None else v


def main(quick: bool, json_path: str | None, sizes: Sizes | None = None) -> int:
    """Run, print the table, write the JSON (``sizes`` overrides quick/full: the smoke test)."""
    sizes = sizes or (QUICK if quick else FULL)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        r = collect(sizes, Path(tmp))
    rows: list[tuple[str, Any, str]] = [
        ("parser_msgs_per_s", r["parser_msgs_per_s"],
         f">= {PARSER_TARGET:,} (REGISTER/200 OK alternating; median, per CPU-second)"),
        ("parser_register_msgs_per_s", r["parser_register_msgs_per_s"],
         f"{r['parser_message_bytes']['register']} bytes"),
        ("parser_ok_msgs_per_s", r["parser_ok_msgs_per_s"],
         f"{r['parser_message_bytes']['ok']} bytes"),
        ("capture_in_process_pps", r["capture_in_process_pps"],
         "ceiling: same objects, no sockets, per CPU-second"),
        ("hep_in_process_msgs_per_s", r["hep_in_process_msgs_per_s"],
         "ceiling: same objects, no sockets, per CPU-second"),
        ("opensips_in_process_events_per_s", r["opensips_in_process_events_per_s"],
         "ceiling: same objects, no sockets, per CPU-second"),
        ("capture_max_lossless_pps", _fmt_rate(r["capture_max_lossless_pps"]),
         f">= {CAPTURE_TARGET:,} packets/s" + (f" ({r['capture_note']})"
                                               if r["capture_max_lossless_pps"] is None
                                               else "")),
        *_step_rows("capture", r["capture_steps"]),
        ("hep_max_lossless_msgs_per_s", _fmt_rate(r["hep_max_lossless_msgs_per_s"]),
         f">= {HEP_TARGET:,} msgs/s"),
        *_step_rows("hep", r["hep_steps"]),
        ("opensips_events_per_s", _fmt_rate(r["opensips_events_per_s"]),
         "lossless event_datagram rate"),
        *_step_rows("opensips", r["opensips_steps"]),
        ("storm_registrations", r["storm_registrations"], r["storm_note"]),
        ("storm_rate_per_s", _fmt_rate(r["storm_rate_per_s"]),
         "REGISTER/s achieved by SIPp -> Kamailio"),
        ("storm_lost", _fmt_rate(r["storm_lost"]), "= 0" + _storm_detail(r, "storm_")),
        *([("storm_capture_rate_per_s", _fmt_rate(r["storm_capture_rate_per_s"]),
            "the same storm learned by packet capture (no siptrace)"),
           ("storm_capture_lost", _fmt_rate(r["storm_capture_lost"]),
            "= 0" + _storm_detail(r, "storm_capture_"))]
          if "storm_capture_lost" in r else []),
        ("wall_s", r["wall_s"], "quick: ~90 s, full: ~5 min"),
    ]
    print_table(f"ingest benchmark ({'quick' if quick else 'full'}; shared machine: compare "
                "within one run)", rows)
    write_json("ingest", quick, r, json_path)
    return 0
