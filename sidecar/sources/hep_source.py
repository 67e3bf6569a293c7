"""HEP collector source (``type = "hep"``): learn registrations from the proxy's HEP mirror.

Kamailio ``siptrace`` (kamailio-cfg with ``WITH_HEP``) and OpenSIPS ``tracer`` copy every
REGISTER and its reply to a collector as HEP v3. This source is that collector: it listens on
UDP and/or TCP, decodes frames with :mod:`sidecar.sources.hep`, parses the SIP payload with
:mod:`sidecar.sip.parser`, pairs request and final reply with
:class:`~sidecar.sip.registration.RegistrationTracker` and hands each 2xx to
:func:`~sidecar.sources.registrations.apply_outcome`, which changes the replica. Working from
the mirror instead of the wire means no root, no packet capture and TLS phones work too.

Everything that arrives is untrusted: a frame that does not decode, carries the wrong auth key,
is not SIP or is not a REGISTER transaction is counted and dropped, never raised. A TCP peer
that sends garbage loses its connection (a HEP stream cannot resynchronise). Errors are logged
at most once per :data:`LOG_EVERY_S` seconds per kind, with how many were suppressed, so a
misconfigured agent cannot flood the log.

Settings (``[[sources]]`` table)::

    type = "hep"
    listen = "127.0.0.1:9060"      # HOST:PORT, [v6]:PORT; port 0 picks a free one (tests)
    transports = ["udp", "tcp"]
    auth_key = "secret"            # optional; frames without this key are dropped
    use_domain = false             # AOR = user part, as Kamailio/OpenSIPS usrloc by default
    max_message = 65535            # bytes per HEP frame and per SIP message
    pair_timeout_s = 32            # a REGISTER not answered within this is forgotten
    max_pending = 100000           # open REGISTER transactions kept (oldest dropped first)
    max_connections = 64           # TCP agents at once; more are refused and counted
    udp_rcvbuf = 67108864          # receive buffer: rides out bursts (SO_RCVBUFFORCE as root)
    max_clock_skew_s = 60          # capture times further off use the local clock instead
    name = "hep"                   # key in sc_status/metrics (give two HEP sources two names)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..sip.parser import SipParseError, SipRequest, parse_register_traffic
from ..sip.registration import RegistrationTracker
from .hep import (
    MAX_FRAME,
    PROTO_TCP,
    PROTO_TYPE_SIP,
    PROTO_UDP,
    HepError,
    HepStreamFramer,
    check_auth,
    decode_hep,
)
from .receive_buffer import set_receive_buffer
from .registrations import OutcomeCounts, apply_outcome
from .registry import SourceContext

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
TRANSPORTS = ("udp", "tcp")
# IP protocol numbers to the transport names usrloc uses (when the Via does not say better).
_IP_PROTO_NAMES = {PROTO_UDP: "udp", PROTO_TCP: "tcp", 132: "sctp"}
# Via transports that name a usrloc socket protocol (the top Via of a request is the transport
# of the hop that delivered it, which is the only way to tell TLS and WebSocket from TCP).
_VIA_TRANSPORTS = frozenset({"udp", "tcp", "tls", "sctp", "ws", "wss"})


@dataclass(frozen=True, slots=True)
class HepSettings:
    host: str = "127.0.0.1"
    port: int = 9060
    transports: tuple[str, ...] = TRANSPORTS
    auth_key: str | None = None
    use_domain: bool = False
    max_message: int = MAX_FRAME
    pair_timeout_s: float = 32.0
    max_pending: int = 100_000
    max_connections: int = 64
    udp_rcvbuf: int = 64 * 1024 * 1024
    max_clock_skew_s: float = 60.0
    name: str = "hep"


def parse_listen(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the error names ``key``."""
    from ..config import ConfigError

    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
    return host, int(port_text)


def parse_settings(section: Any, base: Path) -> HepSettings:
    """Validate a ``[[sources]]`` table of type "hep" (every error names the key)."""
    from ..config import ConfigError

    d = HepSettings()
    listen = section.str("listen", f"{d.host}:{d.port}")
    host, port = parse_listen(listen, f"{section.name}.listen")
    section.used.add("transports")
    raw = section.data.get("transports", list(d.transports))
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(t, str) and t in TRANSPORTS for t in raw)):
        raise ConfigError(f"{section.name}.transports: must be a non-empty list of "
                          f"{', '.join(repr(t) for t in TRANSPORTS)}, got {raw!r}")
    auth_key = section.str("auth_key")
    if auth_key == "":
        raise ConfigError(f"{section.name}.auth_key: must not be empty (leave it out instead)")
    return HepSettings(
        host=host, port=port, transports=tuple(dict.fromkeys(raw)), auth_key=auth_key,
        use_domain=section.bool("use_domain", d.use_domain),
        max_message=section.int("max_message", d.max_message, lo=512, hi=MAX_FRAME),
        pair_timeout_s=section.num("pair_timeout_s", d.pair_timeout_s, lo=0.5, hi=3600),
        max_pending=section.int("max_pending", d.max_pending, lo=1, hi=10_000_000),
        max_connections=section.int("max_connections", d.max_connections, lo=1, hi=65_536),
        udp_rcvbuf=section.int("udp_rcvbuf", d.udp_rcvbuf, lo=0, hi=1 << 30),
        max_clock_skew_s=section.num("max_clock_skew_s", d.max_clock_skew_s, lo=1, hi=86_400),
        name=section.str("name", d.name) or d.name,
    )


def build(settings: HepSettings, ctx: SourceContext) -> HepSource:
    return HepSource(settings, ctx)


@dataclass(slots=True)
class HepCounters:
    """What the collector saw; exported by ``status()``."""

    messages: int = 0  # HEP frames received (UDP datagrams + TCP frames)
    bad_hep: int = 0  # frames that did not decode
    auth_failures: int = 0  # wrong or missing auth key
    non_sip: int = 0  # HEP payloads that are not SIP (RTCP, logs, ...)
    parse_errors: int = 0  # SIP payloads the parser refused
    non_register: int = 0  # SIP that is not a REGISTER transaction (or a keepalive)
    ts_skew: int = 0  # frames whose capture time was too far off: the local clock was used
    tcp_connections: int = 0
    tcp_dropped: int = 0  # connections closed because their stream was garbage
    tcp_refused: int = 0  # connections beyond max_connections
    outcome_counts: OutcomeCounts = field(default_factory=OutcomeCounts)


class _RateLimitedLog:
    """One warning per kind per ``every`` seconds, saying how many were suppressed."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        log.warning(fmt + more, *args)


class HepSource:
    """The collector: sockets in, replica changes out."""

    def __init__(self, settings: HepSettings, ctx: SourceContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.name = settings.name
        self.tracker = RegistrationTracker(timeout=settings.pair_timeout_s,
                                           max_pending=settings.max_pending)
        self.counters = HepCounters()
        self._log = _RateLimitedLog()
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._streams: set[_HepStream] = set()
        self._timer: asyncio.Task | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        try:
            if "udp" in s.transports:
                family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _HepDatagram(self), local_addr=(s.host, s.port), family=family)
                self._udp = transport  # type: ignore[assignment]
                self._grow_receive_buffer()
            if "tcp" in s.transports:
                # Same port for both transports, as collectors do; resolve port 0 from UDP.
                port = self.udp_address[1] if self._udp is not None and s.port == 0 else s.port
                self._server = await loop.create_server(
                    lambda: _HepStream(self), s.host, port, reuse_address=True)
        except OSError:
            await self.stop()
            raise
        self._timer = asyncio.create_task(self._expire_loop(), name=f"{self.name}-expire")
        log.info("HEP source %s listening on %s (%s)", self.name,
                 self.udp_address or self.tcp_address, "+".join(s.transports))

    def _grow_receive_buffer(self) -> None:
        """A proxy mirrors bursts (thousands of REGISTERs per second after a restart): a big
        receive buffer rides out event-loop pauses instead of dropping datagrams. The kernel
        caps the value at net.core.rmem_max without an error."""
        if self._udp is None or not self.settings.udp_rcvbuf:
            return
        set_receive_buffer(self._udp.get_extra_info("socket"), self.settings.udp_rcvbuf)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            for stream in list(self._streams):
                stream.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None

    async def _expire_loop(self) -> None:
        """Forget REGISTERs that never got a final answer (the tracker needs a clock tick even
        when no traffic arrives)."""
        while True:
            await asyncio.sleep(1.0)
            self.tracker.expire(time.time())

    @property
    def udp_address(self) -> tuple[str, int] | None:
        if self._udp is None:
            return None
        return self._udp.get_extra_info("sockname")[:2]

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[:2]

    # --- the work ----------------------------------------------------------------------

    def handle_frame(self, data: bytes) -> None:
        """Account one HEP frame; never raises for bad input."""
        c = self.counters
        c.messages += 1
        s = self.settings
        try:
            pkt = decode_hep(data, s.max_message)
        except HepError as exc:
            c.bad_hep += 1
            self._log.warn("bad_hep", "HEP source %s: undecodable frame: %s", self.name, exc)
            return
        if not check_auth(pkt, s.auth_key):
            c.auth_failures += 1
            self._log.warn("auth", "HEP source %s: frame from %s:%d (capture id %d) has a "
                           "wrong or missing auth key", self.name, pkt.src_ip, pkt.src_port,
                           pkt.capture_id)
            return
        if pkt.proto_type != PROTO_TYPE_SIP:
            c.non_sip += 1
            return
        try:
            msg = parse_register_traffic(pkt.payload, max_size=s.max_message)
        except SipParseError as exc:
            c.parse_errors += 1
            self._log.warn("parse", "HEP source %s: unparsable SIP from %s:%d: %s",
                           self.name, pkt.src_ip, pkt.src_port, exc)
            return
        if msg is None:
            c.non_register += 1
            return
        now = time.time()
        ts = pkt.ts
        if abs(ts - now) > s.max_clock_skew_s:
            # A capture time far off would stamp contacts already expired or from the future.
            c.ts_skew += 1
            self._log.warn("skew", "HEP source %s: capture time %.0f is %.0f s off the local "
                           "clock; using the local clock", self.name, ts, ts - now)
            ts = now
        proto = _IP_PROTO_NAMES.get(pkt.proto, "udp")
        if isinstance(msg, SipRequest):
            via = msg.via_transport.lower()
            if via in _VIA_TRANSPORTS:
                proto = via
        src = (proto, pkt.src_ip, pkt.src_port)
        dst = (proto, pkt.dst_ip, pkt.dst_port)
        outcomes = self.tracker.feed(msg, src, dst, ts)
        if not outcomes:
            return
        counts = c.outcome_counts
        changed_before = counts.puts + counts.refreshes + counts.deletes
        for outcome in outcomes:
            apply_outcome(self.ctx.replica, outcome, use_domain=s.use_domain, counts=counts)
        if counts.puts + counts.refreshes + counts.deletes != changed_before:
            self.ctx.kick()

    def status(self) -> dict[str, Any]:
        c = self.counters
        o = c.outcome_counts
        t = self.tracker.stats
        return {
            "messages": c.messages, "bad_hep": c.bad_hep, "auth_failures": c.auth_failures,
            "non_sip": c.non_sip, "parse_errors": c.parse_errors,
            "non_register": c.non_register, "ts_skew": c.ts_skew,
            "outcomes": t.outcomes, "puts": o.puts, "refreshes": o.refreshes,
            "deletes": o.deletes, "stale": o.stale, "invalid": o.invalid,
            "unknown_other_bindings": o.unknown_other_bindings,
            "rejected": t.rejected, "duplicates": t.duplicates,
            "unmatched_responses": t.unmatched_responses,
            "replayed_ignored": t.replayed_ignored,
            "drops": t.dropped_timeout + t.dropped_overflow, "pending": self.tracker.pending,
            "tcp_connections": c.tcp_connections, "tcp_open": len(self._streams),
            "tcp_dropped": c.tcp_dropped, "tcp_refused": c.tcp_refused,
        }

    # --- callbacks from the protocol objects -------------------------------------------

    def _accept(self, stream: _HepStream) -> bool:
        if len(self._streams) >= self.settings.max_connections:
            self.counters.tcp_refused += 1
            self._log.warn("tcp_refused", "HEP source %s: refusing a TCP connection beyond "
                           "max_connections=%d", self.name, self.settings.max_connections)
            return False
        self._streams.add(stream)
        self.counters.tcp_connections += 1
        return True

    def _garbage(self, peer: object, exc: HepError) -> None:
        self.counters.bad_hep += 1
        self.counters.tcp_dropped += 1
        self._log.warn("tcp_garbage", "HEP source %s: dropping TCP connection from %s: %s",
                       self.name, peer, exc)


class _HepDatagram(asyncio.DatagramProtocol):
    """One datagram = one HEP frame."""

    def __init__(self, source: HepSource) -> None:
        self.source = source

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.source.handle_frame(data)

    def error_received(self, exc: Exception) -> None:
        self.source._log.warn("udp_error", "HEP source %s: UDP error: %s", self.source.name, exc)


class _HepStream(asyncio.Protocol):
    """A TCP connection carrying back-to-back HEP frames."""

    def __init__(self, source: HepSource) -> None:
        self.source = source
        self.framer = HepStreamFramer(source.settings.max_message)
        self.transport: asyncio.Transport | None = None
        self.peer: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        if not self.source._accept(self):
            transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except HepError as exc:
            self.source._garbage(self.peer, exc)
            self.close()
            return
        for frame in frames:
            self.source.handle_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.source._streams.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
