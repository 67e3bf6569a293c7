"""Packet-capture source: learn registrations by watching the proxy's SIP traffic.

No change to the proxy at all: the sidecar sees every REGISTER and its final response on the
wire, pairs them (:class:`sidecar.sip.registration.RegistrationTracker`) and applies each 2xx
to the replica (:func:`sidecar.sources.registrations.apply_outcome`). The REGISTER's source
address gives ``received`` when it differs from the Contact, its destination the ``socket``.

Live capture uses an ``AF_PACKET`` socket, not libpcap or scapy (scapy's ``sniff`` decodes about
5k packets/s; this path keeps up with far more):

* ``SOCK_DGRAM``, so the kernel strips the link header and one filter program serves every
  interface type (Ethernet, loopback, tun, or ``any``); ``sll_pkttype``/``sll_hatype`` come
  with each packet. The socket is created with protocol 0 (nothing queued yet), the classic
  BPF filter of :mod:`sidecar.sources.bpf` is attached, and only then is it bound with
  ``ETH_P_ALL``, so no unfiltered packet slips in between;
* a large receive buffer (``SO_RCVBUFFORCE``, falling back to ``SO_RCVBUF``);
* on a loopback interface ``PACKET_IGNORE_OUTGOING``, because there every packet is seen once
  leaving and once arriving; the decoder also drops outgoing loopback copies itself (for
  ``any`` and older kernels);
* non-blocking ``recvmsg_into`` into one preallocated buffer from ``loop.add_reader``, many
  packets per wakeup; each packet carries its kernel receive time (``SO_TIMESTAMPNS``, under a
  microsecond per packet), so a backlog drained late still gets the right registration times
  and expiries; kernel drops are read with ``PACKET_STATISTICS``.

Offline, ``pcap = "file"`` replays a pcap/pcapng file through the same pipeline, shifted so its
first packet happens now (``pcap_time = "file"`` keeps the recorded times). From a shell:
``python -m sidecar.sources.capture_source --pcap FILE [--port 5060 ...]`` prints each outcome as
a JSON line.

Only cleartext SIP over UDP and TCP can be read; TLS and WebSocket traffic needs the HEP source
or the proxy's own events.

Public API
----------
``parse_settings(section, base) -> CaptureSettings`` and ``build(settings, ctx) -> CaptureSource``
    The source contract of :mod:`sidecar.sources.registry` (``type = "capture"``).
``CaptureSource(settings, *, replica=None, kick=None, on_outcome=None)``
    ``start()``, ``stop()``, ``status()``, ``wait_replayed()`` (pcap mode).
``RegisterPipeline(settings, on_outcome)``
    Sans-I/O glue: ``feed(frame, linktype, now, pkttype=-1, hatype=-1) -> int`` (outcomes),
    ``expire(now)``, ``counters()``.
``open_capture_socket(interface, program, rcvbuf) -> socket.socket``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..replica import Replica
from ..sip.parser import SipParseError, parse_register_traffic
from ..sip.registration import RegistrationOutcome, RegistrationTracker
from . import bpf
from .packets import (
    LINKTYPE_RAW,
    CaptureFileReader,
    FlowFilter,
    PacketDecoder,
    PacketError,
    SipData,
)
from .receive_buffer import set_receive_buffer
from .registrations import OutcomeCounts, apply_outcome

if TYPE_CHECKING:
    from .registry import SourceContext

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")  # struct timespec on 64-bit Linux
ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
ARPHRD_LOOPBACK = 772

READ_BATCH = 2000  # packets per wakeup before yielding to the event loop
RECV_BUFFER = bpf.SNAPLEN
HOUSEKEEPING_S = 1.0
REOPEN_S = 5.0
PCAP_CHUNK = 1 << 20
MAX_PORTS = 32
MAX_ADDRESSES = 8


# --- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CaptureSettings:
    name: str = "capture"
    interface: str = "any"  # "any": every interface
    ports: tuple[int, ...] = (5060,)
    proxy_addresses: tuple[str, ...] = ()
    use_domain: bool = False
    pcap: Path | None = None
    pcap_time: str = "shift"  # "shift": first packet = now; "file": recorded times
    rcvbuf_bytes: int = 64 << 20
    pair_timeout_s: float = 32.0
    max_pending: int = 100_000
    default_expires: int = 3600
    max_tcp_streams: int = 20_000
    max_fragments: int = 2000
    fragment_timeout_s: float = 30.0
    dedup_window_ms: float = 50.0


def parse_settings(section: Any, base: Path) -> CaptureSettings:
    """Read a ``[[sources]]`` table with ``type = "capture"``; errors name the key."""
    from ..config import ConfigError

    d = CaptureSettings()
    name = section.str("name", d.name)
    interface = section.str("interface")
    pcap = section.path("pcap", base)
    if interface is not None and pcap is not None:
        raise ConfigError(f"{section.name}.pcap: set either interface (live) or pcap (replay)")
    interface = interface or d.interface
    if not interface or len(interface) > 15 or "/" in interface or interface.strip() != interface:
        raise ConfigError(f"{section.name}.interface: {interface!r} is not an interface name")
    ports = _list(section, "ports", list(d.ports))
    if not ports or len(ports) > MAX_PORTS or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise ConfigError(f"{section.name}.ports: expected 1..{MAX_PORTS} port numbers "
                          f"(1..65535), got {ports!r}")
    addresses = _list(section, "proxy_addresses", [])
    if len(addresses) > MAX_ADDRESSES:
        raise ConfigError(f"{section.name}.proxy_addresses: at most {MAX_ADDRESSES} addresses")
    canonical = []
    for a in addresses:
        try:
            canonical.append(str(ipaddress.ip_address(a)))
        except (ValueError, TypeError):
            raise ConfigError(f"{section.name}.proxy_addresses: {a!r} is not an IP address"
                              ) from None
    try:
        bpf.sip_filter(ports, canonical)
    except bpf.BpfError as exc:
        raise ConfigError(f"{section.name}.ports: {exc}") from None
    settings = CaptureSettings(
        name=name,
        interface=interface,
        ports=tuple(sorted(set(ports))),
        proxy_addresses=tuple(canonical),
        use_domain=section.bool("use_domain", d.use_domain),
        pcap=pcap,
        pcap_time=section.str("pcap_time", d.pcap_time, choices=("shift", "file")),
        rcvbuf_bytes=section.int("rcvbuf_bytes", d.rcvbuf_bytes, lo=65536, hi=1 << 30),
        pair_timeout_s=section.num("pair_timeout_s", d.pair_timeout_s, lo=0.1, hi=3600),
        max_pending=section.int("max_pending", d.max_pending, lo=1, hi=10_000_000),
        default_expires=section.int("default_expires", d.default_expires, lo=0, hi=1 << 31),
        max_tcp_streams=section.int("max_tcp_streams", d.max_tcp_streams, lo=1, hi=10_000_000),
        max_fragments=section.int("max_fragments", d.max_fragments, lo=1, hi=1_000_000),
        fragment_timeout_s=section.num("fragment_timeout_s", d.fragment_timeout_s, lo=0.1,
                                       hi=3600),
        dedup_window_ms=section.num("dedup_window_ms", d.dedup_window_ms, lo=0, hi=10_000),
    )
    return settings


def _list(section: Any, key: str, default: list) -> list:
    # Section has typed getters for scalars only; _get still records the key as used.
    return list(section._get(key, (list,), default, False))


# --- rate-limited complaints --------------------------------------------------------------------
class Complaints:
    """Logs the first few problems of each kind, then at most one line per interval.

    A capture on a busy network can see thousands of malformed packets a second; the log
    must stay readable and cheap, while the counters in ``status()`` keep the full tally.
    """

    def __init__(self, logger: logging.Logger, *, first: int = 5, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.first = first
        self.interval = interval
        self.clock = clock
        self._seen: dict[str, int] = {}
        self._next: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def report(self, kind: str, message: str) -> None:
        n = self._seen[kind] = self._seen.get(kind, 0) + 1
        if n <= self.first:
            self.logger.warning("%s: %s", kind, message)
            if n == self.first:
                self._next[kind] = self.clock() + self.interval
            return
        now = self.clock()
        if now < self._next.get(kind, 0.0):
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return
        quiet = self._quiet.pop(kind, 0)
        self._next[kind] = now + self.interval
        self.logger.warning("%s: %s (%d more since the last report)", kind, message, quiet)


# --- the pipeline -------------------------------------------------------------------------------
class RegisterPipeline:
    """Frames in, registration outcomes out: decode, reassemble, parse, pair.

    No sockets and no clock: the source passes each frame with its capture time, so the same
    object serves live capture, pcap replay and the tests.
    """

    def __init__(self, settings: CaptureSettings,
                 on_outcome: Callable[[RegistrationOutcome], None],
                 complaints: Complaints | None = None) -> None:
        self.settings = settings
        self.on_outcome = on_outcome
        self.complaints = complaints or Complaints(log)
        self.decoder = PacketDecoder(
            FlowFilter(settings.ports, settings.proxy_addresses),
            max_fragments=settings.max_fragments,
            fragment_timeout=settings.fragment_timeout_s,
            max_tcp_streams=settings.max_tcp_streams,
            dedup_window=settings.dedup_window_ms / 1000)
        self.tracker = RegistrationTracker(timeout=settings.pair_timeout_s,
                                           max_pending=settings.max_pending,
                                           default_expires=settings.default_expires)
        self.sip_messages = 0
        self.parse_errors = 0
        self.non_register = 0
        self.outcomes = 0
        self.internal_errors = 0

    def feed(self, frame: bytes, linktype: int, now: float, pkttype: int = -1,
             hatype: int = -1) -> int:
        """Process one captured frame; returns how many outcomes it produced. Never raises."""
        try:
            items = self.decoder.feed(frame, linktype, now, pkttype, hatype)
        except PacketError as exc:
            self.complaints.report("undecodable packet", str(exc))
            return 0
        except Exception as exc:  # a bug must not stop the capture
            self.internal_errors += 1
            self.complaints.report("internal error while decoding", repr(exc))
            return 0
        return self._messages(items, now) if items else 0

    def expire(self, now: float) -> int:
        """Time out fragments, TCP gaps and unanswered REGISTERs (about once a second)."""
        try:
            items = self.decoder.expire(now)
            self.tracker.expire(now)
        except Exception as exc:
            self.internal_errors += 1
            self.complaints.report("internal error while expiring", repr(exc))
            return 0
        return self._messages(items, now) if items else 0

    def _messages(self, items: list[SipData], now: float) -> int:
        produced = 0
        for item in items:
            self.sip_messages += 1
            try:
                msg = parse_register_traffic(item.data)
            except SipParseError as exc:
                self.parse_errors += 1
                self.complaints.report(
                    "unparsable SIP", f"{exc} ({item.transport} {item.src_ip}:{item.src_port} "
                    f"-> {item.dst_ip}:{item.dst_port})")
                continue
            if msg is None:
                self.non_register += 1
                continue
            try:
                outcomes = self.tracker.feed(msg, item.src, item.dst, now)
                for outcome in outcomes:
                    self.outcomes += 1
                    produced += 1
                    self.on_outcome(outcome)
            except Exception as exc:
                self.internal_errors += 1
                self.complaints.report("internal error while applying", repr(exc))
        return produced

    def counters(self) -> dict[str, Any]:
        d = self.decoder
        ds, fs, ts = d.stats, d.fragments.stats, d.tcp.stats
        tr = self.tracker.stats
        return {
            "packets": ds.packets,
            "bytes": ds.bytes,
            "decode_errors": ds.decode_errors,
            "fragments": fs.fragments,
            "reassembled": fs.reassembled,
            "tcp_streams": len(d.tcp),
            "sip_messages": self.sip_messages,
            "parse_errors": self.parse_errors,
            "non_register": self.non_register,
            "outcomes": self.outcomes,
            "internal_errors": self.internal_errors,
            "decoder": dataclasses.asdict(ds),
            "ip_fragments": {**dataclasses.asdict(fs), "held": d.fragments.held_fragments},
            "tcp": {**dataclasses.asdict(ts), "streams": len(d.tcp)},
            "tracker": {**dataclasses.asdict(tr), "pending": self.tracker.pending},
        }


# --- the kernel socket --------------------------------------------------------------------------
def open_capture_socket(interface: str, program: list[bpf.Insn], rcvbuf: int) -> socket.socket:
    """A non-blocking ``AF_PACKET``/``SOCK_DGRAM`` socket with ``program`` attached.

    Raises ``OSError`` (``PermissionError`` without CAP_NET_RAW, ``ENODEV`` for an unknown
    interface).
    """
    ifname = "" if interface == "any" else interface
    # With protocol 0 nothing is queued until bind(), so no packet escapes the filter. Python
    # cannot bind to "every interface" (it looks the empty name up), so for "any" the socket
    # listens from creation and whatever it queued before the filter was attached is drained.
    proto = 0 if ifname else socket.htons(ETH_P_ALL)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, proto)
    try:
        bpf.attach(sock, program)
        set_receive_buffer(sock, rcvbuf)
        if ifname and _is_loopback(ifname):
            with contextlib.suppress(OSError):
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        with contextlib.suppress(OSError):  # without it, packets get the time they are read
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        if ifname:
            sock.bind((ifname, ETH_P_ALL))
        else:
            _drain(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _drain(sock: socket.socket) -> None:
    for _ in range(1_000_000):
        try:
            sock.recv(1, socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            return


def _is_loopback(ifname: str) -> bool:
    try:
        return Path(f"/sys/class/net/{ifname}/type").read_text().strip() == str(ARPHRD_LOOPBACK)
    except OSError:
        return False


# --- the source ---------------------------------------------------------------------------------
class CaptureSource:
    """Live capture on an interface, or replay of a capture file, into the replica."""

    def __init__(self, settings: CaptureSettings, *, replica: Replica | None = None,
                 kick: Callable[[], None] | None = None,
                 on_outcome: Callable[[RegistrationOutcome], None] | None = None) -> None:
        self.name = settings.name
        self.settings = settings
        self.replica = replica
        self.kick = kick
        self.extra_sink = on_outcome
        self.counts = OutcomeCounts()
        self.complaints = Complaints(log)
        self.pipeline = RegisterPipeline(settings, self._on_outcome, self.complaints)
        self.program = bpf.sip_filter(settings.ports, settings.proxy_addresses)
        self.state = "stopped"
        self.error: str | None = None
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.truncated = 0
        self.socket_errors = 0
        self.replayed_records = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray(RECV_BUFFER)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)
        self._dirty = False
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replayed = asyncio.Event()
        self._next_open = 0.0

    # --- outcomes ---------------------------------------------------------------------------
    def _on_outcome(self, outcome: RegistrationOutcome) -> None:
        if self.replica is not None:
            apply_outcome(self.replica, outcome, use_domain=self.settings.use_domain,
                          counts=self.counts)
        if self.extra_sink is not None:
            self.extra_sink(outcome)
        self._dirty = True

    def _flush(self) -> None:
        if self._dirty:
            self._dirty = False
            if self.kick is not None:
                self.kick()

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.pcap is not None:
            self.state = "replaying"
            self._tasks.append(asyncio.create_task(self._replay(), name=f"{self.name}-replay"))
            return
        self._open()
        self._tasks.append(asyncio.create_task(self._housekeeping(),
                                               name=f"{self.name}-housekeeping"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._close()
        self.state = "stopped"

    async def wait_replayed(self) -> None:
        """Return once a pcap replay has gone through the whole file (or failed)."""
        await self._replayed.wait()

    # --- live capture -----------------------------------------------------------------------
    def _open(self) -> None:
        self._next_open = time.monotonic() + REOPEN_S
        try:
            sock = open_capture_socket(self.settings.interface, self.program,
                                       self.settings.rcvbuf_bytes)
        except OSError as exc:
            self.state = "error"
            self.error = f"cannot capture on {self.settings.interface}: {exc}"
            self.complaints.report("capture socket", self.error)
            return
        assert self._loop is not None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self.state = "capturing"
        self.error = None
        log.info("%s: capturing SIP on %s, ports %s%s", self.name, self.settings.interface,
                 ",".join(map(str, self.settings.ports)),
                 f", proxy {','.join(self.settings.proxy_addresses)}"
                 if self.settings.proxy_addresses else "")

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._read_kernel_stats(sock)
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        bufs, view = self._bufs, self._view
        feed = self.pipeline.feed
        unpack = _TIMESPEC.unpack
        read_time = time.time()
        for _ in range(READ_BATCH):
            try:
                n, ancillary, flags, addr = sock.recvmsg_into(bufs, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._socket_failed(exc)
                break
            if flags & socket.MSG_TRUNC:
                self.truncated += 1
            now = read_time
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS:
                    sec, nsec = unpack(data)
                    now = sec + nsec * 1e-9
            feed(view[:n].tobytes(), LINKTYPE_RAW, now, addr[2], addr[3])
        self._flush()

    def _socket_failed(self, exc: OSError) -> None:
        """Close and let housekeeping reopen: after ``ENETDOWN`` (interface down or deleted)
        the kernel may have unhooked the socket for good, and a recreated interface has a new
        index, so only a fresh bind is sure to capture again."""
        self.socket_errors += 1
        self.error = f"capture socket failed: {exc}"
        self.complaints.report("capture socket", f"{self.settings.interface}: {exc}")
        self._close()
        self.state = "error"
        self._next_open = time.monotonic() + (1.0 if exc.errno == errno.ENETDOWN else REOPEN_S)

    def _read_kernel_stats(self, sock: socket.socket) -> None:
        """``PACKET_STATISTICS`` counts since the last read (the kernel resets them)."""
        try:
            raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return
        packets, drops = struct.unpack("II", raw)
        self.kernel_packets += packets
        self.kernel_drops += drops

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            if self._sock is None:
                if time.monotonic() >= self._next_open:
                    self._open()
                continue
            self._read_kernel_stats(self._sock)
            self.pipeline.expire(time.time())
            self._flush()

    # --- replay -----------------------------------------------------------------------------
    async def _replay(self) -> None:
        path = self.settings.pcap
        assert path is not None
        reader = CaptureFileReader()
        shift: float | None = None
        feed = self.pipeline.feed
        try:
            with open(path, "rb") as f:
                while chunk := f.read(PCAP_CHUNK):
                    for rec in reader.feed(chunk):
                        if shift is None:
                            shift = time.time() - rec.time if self.settings.pcap_time == "shift" \
                                else 0.0
                        feed(rec.data, rec.linktype, rec.time + shift, rec.pkttype)
                        self.replayed_records += 1
                    self._flush()
                    await asyncio.sleep(0)  # let the publisher run between chunks
            reader.close()
            self.state = "replayed"
            log.info("%s: replayed %d packets from %s: %d outcomes", self.name,
                     self.replayed_records, path, self.pipeline.outcomes)
        except (OSError, PacketError) as exc:
            self.state = "error"
            self.error = f"replay of {path} failed: {exc}"
            self.complaints.report("capture file", self.error)
        finally:
            self._flush()
            self._replayed.set()

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self._sock is not None:
            self._read_kernel_stats(self._sock)
        c = self.counts
        return {
            "type": "capture",
            "state": self.state,
            "error": self.error,
            "interface": None if self.settings.pcap else self.settings.interface,
            "pcap": str(self.settings.pcap) if self.settings.pcap else None,
            **self.pipeline.counters(),
            "puts": c.puts,
            "refreshes": c.refreshes,
            "deletes": c.deletes,
            "stale": c.stale,
            "invalid": c.invalid,
            "unknown_other_bindings": c.unknown_other_bindings,
            "drops": self.kernel_drops,
            "kernel_packets": self.kernel_packets,
            "truncated": self.truncated,
            "socket_errors": self.socket_errors,
            "replayed_records": self.replayed_records,
        }


def build(settings: CaptureSettings, ctx: SourceContext) -> CaptureSource:
    """Registry entry point: a source applying outcomes to ``ctx.replica``."""
    return CaptureSource(settings, replica=ctx.replica, kick=ctx.kick)


# --- command line -------------------------------------------------------------------------------
def _outcome_json(outcome: RegistrationOutcome) -> str:
    return json.dumps(dataclasses.asdict(outcome), sort_keys=True)


async def _run_cli(settings: CaptureSettings, seconds: float | None) -> dict[str, Any]:
    source = CaptureSource(settings, on_outcome=lambda o: print(_outcome_json(o), flush=True))
    await source.start()
    try:
        if settings.pcap is not None:
            await source.wait_replayed()
        elif seconds is not None:
            await asyncio.sleep(seconds)
        else:
            await asyncio.Event().wait()
    finally:
        await source.stop()
    return source.status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.sources.capture_source",
        description="Print the registrations seen in a capture file (or live) as JSON lines.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pcap", type=Path, help="pcap or pcapng file to replay")
    where.add_argument("--interface", help="capture live on this interface (needs CAP_NET_RAW)")
    parser.add_argument("--port", type=int, action="append", help="SIP port (default 5060)")
    parser.add_argument("--proxy-address", action="append", default=[],
                        help="the proxy's address (narrows the capture)")
    parser.add_argument("--seconds", type=float, help="live capture duration")
    parser.add_argument("--file-time", action="store_true",
                        help="keep the recorded packet times instead of replaying them as now")
    args = parser.parse_args(argv)
    try:
        settings = CaptureSettings(
            interface=args.interface or "any", pcap=args.pcap,
            ports=tuple(args.port or (5060,)),
            proxy_addresses=tuple(str(ipaddress.ip_address(a)) for a in args.proxy_address),
            pcap_time="file" if args.file_time else "shift")
        bpf.sip_filter(settings.ports, settings.proxy_addresses)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        status = asyncio.run(_run_cli(settings, args.seconds))
        print(json.dumps(status, sort_keys=True), file=sys.stderr)
        return 1 if status["state"] == "error" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
