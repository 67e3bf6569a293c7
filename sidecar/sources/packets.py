"""Sans-I/O packet decoding for the capture source: frames in, SIP payloads out.

The capture source reads raw frames (from an ``AF_PACKET`` socket or a capture file) and needs
the SIP messages inside them, with the addresses they travelled between. Everything on the way
is here, free of sockets and clocks (callers pass ``now``), so tests drive it byte by byte:

* the link layer (Ethernet with VLAN tags, Linux cooked SLL/SLL2, BSD loopback, raw IP);
* IPv4 and IPv6 (extension headers walked), UDP and TCP headers;
* IP fragment reassembly with bounded memory and a timeout. Overlapping fragments discard the
  whole datagram, as RFC 5722 requires for IPv6 and as Linux does for IPv4 since 4.19: the
  capture must see what the proxy's kernel delivered, not a guess;
* TCP stream reassembly per direction (4-tuple) with SIP framing by Content-Length
  (:func:`sidecar.sip.parser.message_length`), retransmissions trimmed, out-of-order segments
  held until the gap fills (or skipped after ``gap_timeout``: a segment the capture lost is
  never retransmitted), and a resync to the next SIP start line after joining mid-stream;
* duplicate suppression: the loopback copy rule (on ``lo`` every packet is seen leaving and
  arriving) and a short window of recently seen identical IP packets (bridges and ``any``
  captures see one packet on several interfaces; parsing a REGISTER twice is the expensive
  part, so dropping the copy early pays for the hash);
* classic pcap and pcapng files, fed in chunks.

Checksums are not verified: on ``lo`` and with offloading NICs the captured copy carries none.

Public API
----------
``PacketError(ValueError)``
    The only exception raised on bad input (fuzzed with hypothesis).
``FlowFilter(ports, addresses=())``
    Which packets belong to the proxy: a SIP port on the proxy's side, narrowed to the proxy's
    addresses when given. ``matches(src, sport, dst, dport)`` with raw address bytes.
``PacketDecoder(flow, *, max_fragments, fragment_timeout, max_tcp_streams, dedup_window,
max_message)``
    ``feed(frame, linktype, now, pkttype=-1, hatype=-1) -> list[SipData]`` (``pkttype`` and
    ``hatype`` as the capture socket reports them, for the loopback copy rule);
    ``expire(now) -> list[SipData]`` (messages freed by skipping a TCP gap); ``stats``
    (:class:`DecoderStats`); ``fragments`` and ``tcp`` expose the reassemblers.
``SipData(transport, src_ip, src_port, dst_ip, dst_port, data)``
    One SIP datagram or TCP-framed message; ``src``/``dst`` are ``(transport, ip, port)`` as
    :class:`sidecar.sip.registration.RegistrationTracker` wants them.
``decode_ip(data) -> IpPacket``, ``decode_udp(payload)``, ``decode_tcp(payload)``,
``link_offset(frame, linktype) -> LinkInfo | None``, ``ip_text(raw) -> str``
    The layers one by one.
``FragmentReassembler``, ``TcpReassembler``, ``DuplicateFilter``
    The stateful parts, usable alone.
``CaptureFileReader``
    ``feed(chunk) -> list[CaptureRecord]`` for classic pcap and pcapng; ``close()`` checks
    that the file did not end inside a record.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from struct import error as StructError
from struct import unpack_from

from ..sip.parser import DEFAULT_MAX_MESSAGE, SipParseError, is_keepalive, message_length

__all__ = [
    "ARPHRD_LOOPBACK",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_LINUX_SLL",
    "LINKTYPE_LINUX_SLL2",
    "LINKTYPE_NULL",
    "LINKTYPE_RAW",
    "PACKET_OUTGOING",
    "CaptureFileReader",
    "CaptureRecord",
    "DecoderStats",
    "DuplicateFilter",
    "FlowFilter",
    "FragmentReassembler",
    "FragmentStats",
    "IpPacket",
    "LinkInfo",
    "PacketDecoder",
    "PacketError",
    "SipData",
    "TcpReassembler",
    "TcpStats",
    "decode_ip",
    "decode_tcp",
    "decode_udp",
    "ip_text",
    "link_offset",
]


class PacketError(ValueError):
    """A frame, packet or capture file that cannot be decoded (the only error raised here)."""


# --- link layer -------------------------------------------------------------------------------
# pcap LINKTYPE_* values (https://www.tcpdump.org/linktypes.html).
LINKTYPE_NULL = 0  # BSD loopback: 4-byte address family in host byte order
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # the frame is an IPv4 or IPv6 packet
LINKTYPE_LOOP = 108  # like NULL, family in network byte order
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_RAW_LINKTYPES = frozenset({LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6})

# Linux packet types (sll_pkttype) and the loopback hardware type (sll_hatype).
PACKET_HOST = 0
PACKET_OUTGOING = 4
ARPHRD_LOOPBACK = 772

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
_VLAN_ETHERTYPES = frozenset({0x8100, 0x88A8, 0x9100})
_NULL_FAMILIES_V6 = frozenset({24, 28, 30, 10})  # AF_INET6 on NetBSD/OpenBSD, FreeBSD, macOS, Linux


@dataclass(slots=True, frozen=True)
class LinkInfo:
    """Where the IP packet starts in a frame, and what the link header said about direction."""

    offset: int
    pkttype: int = -1  # PACKET_* when the link header records it (SLL, SLL2), else -1
    hatype: int = -1  # ARPHRD_* when recorded, else -1


def link_offset(frame: bytes, linktype: int) -> LinkInfo | None:
    """Locate the IP packet in ``frame``; ``None`` when the frame carries something else (ARP)."""
    try:
        if linktype in _RAW_LINKTYPES:
            return LinkInfo(0)
        if linktype == LINKTYPE_ETHERNET:
            off = 12
            ethertype = unpack_from("!H", frame, off)[0]
            for _ in range(3):  # 802.1Q, 802.1ad, QinQ stacks
                if ethertype not in _VLAN_ETHERTYPES:
                    break
                off += 4
                ethertype = unpack_from("!H", frame, off)[0]
            return _ip_or_none(ethertype, off + 2)
        if linktype == LINKTYPE_LINUX_SLL:
            pkttype, hatype = unpack_from("!HH", frame, 0)
            ethertype = unpack_from("!H", frame, 14)[0]
            info = _ip_or_none(ethertype, 16)
            return None if info is None else LinkInfo(16, pkttype, hatype)
        if linktype == LINKTYPE_LINUX_SLL2:
            ethertype = unpack_from("!H", frame, 0)[0]
            hatype, pkttype = unpack_from("!HB", frame, 8)
            info = _ip_or_none(ethertype, 20)
            return None if info is None else LinkInfo(20, pkttype, hatype)
        if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
            raw = frame[:4]
            if len(raw) < 4:
                raise PacketError("truncated loopback header")
            family = int.from_bytes(raw, "big" if linktype == LINKTYPE_LOOP else "little")
            if family > 0xFFFF:  # written on a host of the other byte order
                family = int.from_bytes(raw, "big")
            if family == socket.AF_INET:
                return LinkInfo(4)
            return LinkInfo(4) if family in _NULL_FAMILIES_V6 else None
    except StructError:
        raise PacketError(f"truncated link header ({len(frame)} bytes)") from None
    raise PacketError(f"unsupported link type {linktype}")


def _ip_or_none(ethertype: int, offset: int) -> LinkInfo | None:
    return LinkInfo(offset) if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) else None


# --- IP -----------------------------------------------------------------------------------------
PROTO_TCP = 6
PROTO_UDP = 17
_IPV6_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_AH = 51
_IPV6_FRAGMENT = 44
_MAX_IPV6_EXT_HEADERS = 8
MAX_DATAGRAM = 65535


@dataclass(slots=True)
class IpPacket:
    """One IP packet or fragment. Addresses are raw bytes (4 or 16); text only when needed."""

    version: int
    src: bytes
    dst: bytes
    proto: int  # upper-layer protocol; for an IPv6 fragment, the Fragment header's next header
    payload: bytes
    frag_id: int = -1  # -1: not a fragment
    frag_offset: int = 0  # bytes
    more_fragments: bool = False


def decode_ip(data: bytes) -> IpPacket:
    """Decode an IPv4 or IPv6 header; trailing link padding is cut, truncation is an error."""
    if not data:
        raise PacketError("empty IP packet")
    version = data[0] >> 4
    if version == 4:
        return _decode_ipv4(data)
    if version == 6:
        return _decode_ipv6(data)
    raise PacketError(f"IP version {version}")


def _decode_ipv4(data: bytes) -> IpPacket:
    n = len(data)
    if n < 20:
        raise PacketError("truncated IPv4 header")
    ihl = (data[0] & 15) << 2
    total, ident, frag, _ttl, proto = unpack_from("!HHHBB", data, 2)
    if total == 0 and n > MAX_DATAGRAM:  # a segmentation-offload super-packet (BIG TCP)
        total = n
    if ihl < 20 or total < ihl:
        raise PacketError(f"bad IPv4 header length {ihl}/{total}")
    if total > n:
        raise PacketError(f"truncated IPv4 packet ({n} of {total} bytes)")
    offset = (frag & 0x1FFF) << 3
    more = bool(frag & 0x2000)
    if offset or more:
        return IpPacket(4, data[12:16], data[16:20], proto, data[ihl:total], ident, offset, more)
    return IpPacket(4, data[12:16], data[16:20], proto, data[ihl:total])


def _decode_ipv6(data: bytes) -> IpPacket:
    n = len(data)
    if n < 40:
        raise PacketError("truncated IPv6 header")
    plen = unpack_from("!H", data, 4)[0]
    end = 40 + plen
    if plen == 0 and n > 40 + MAX_DATAGRAM:  # jumbogram or offload super-packet
        end = n
    if end > n:
        raise PacketError(f"truncated IPv6 packet ({n} of {end} bytes)")
    return _walk_ipv6(data[6], data, 40, end, data[8:24], data[24:40], True)


def _walk_ipv6(nh: int, data: bytes, off: int, end: int, src: bytes, dst: bytes,
               fragments_allowed: bool) -> IpPacket:
    """Skip extension headers to the upper-layer header (or stop at a Fragment header)."""
    for _ in range(_MAX_IPV6_EXT_HEADERS):
        if nh in _IPV6_EXT_HEADERS or nh == _IPV6_AH:
            if off + 8 > end:
                raise PacketError("truncated IPv6 extension header")
            length = (data[off + 1] + 2) * 4 if nh == _IPV6_AH else (data[off + 1] + 1) * 8
            nh = data[off]
            off += length
            if off > end:
                raise PacketError("IPv6 extension header past the end of the packet")
            continue
        if nh == _IPV6_FRAGMENT:
            if not fragments_allowed:
                raise PacketError("Fragment header inside a reassembled IPv6 packet")
            if off + 8 > end:
                raise PacketError("truncated IPv6 Fragment header")
            inner = data[off]
            field, ident = unpack_from("!HI", data, off + 2)
            offset = field & 0xFFF8
            more = bool(field & 1)
            if offset == 0 and not more:  # atomic fragment (RFC 6946): not fragmented at all
                nh = inner
                off += 8
                continue
            return IpPacket(6, src, dst, inner, data[off + 8:end], ident, offset, more)
        return IpPacket(6, src, dst, nh, data[off:end])
    raise PacketError("too many IPv6 extension headers")


def ip_text(raw: bytes) -> str:
    """Text form of a raw 4- or 16-byte address (IPv6 compressed, as the proxies print it)."""
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


# --- UDP and TCP --------------------------------------------------------------------------------
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04


def decode_udp(payload: bytes) -> tuple[int, int, bytes]:
    """``(source port, destination port, data)`` of a UDP datagram."""
    if len(payload) < 8:
        raise PacketError("truncated UDP header")
    sport, dport, length = unpack_from("!HHH", payload, 0)
    if length == 0 and len(payload) > MAX_DATAGRAM:  # jumbo/offload: length not representable
        length = len(payload)
    if length < 8 or length > len(payload):
        raise PacketError(f"bad UDP length {length} for {len(payload)} bytes")
    return sport, dport, payload[8:length]


def decode_tcp(payload: bytes) -> tuple[int, int, int, int, bytes]:
    """``(source port, destination port, sequence number, flags, data)`` of a TCP segment."""
    if len(payload) < 20:
        raise PacketError("truncated TCP header")
    sport, dport, seq = unpack_from("!HHI", payload, 0)
    doff = (payload[12] >> 4) << 2
    if doff < 20 or doff > len(payload):
        raise PacketError(f"bad TCP data offset {doff}")
    return sport, dport, seq, payload[13], payload[doff:]


# --- which packets are the proxy's --------------------------------------------------------------
class FlowFilter:
    """A SIP port on the proxy's side of the packet, and the proxy's address if any are given.

    The kernel filter (:mod:`sidecar.sources.bpf`) lets through every fragment, since only the
    first one carries ports; this check runs again after reassembly, and for capture files.
    """

    def __init__(self, ports: Iterable[int], addresses: Iterable[str] = ()) -> None:
        self.ports = frozenset(ports)
        if not self.ports or not all(0 < p < 65536 for p in self.ports):
            raise ValueError("ports must be a non-empty set of numbers 1..65535")
        self.addresses = frozenset(ipaddress.ip_address(a).packed for a in addresses)

    def matches(self, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
        ports, addresses = self.ports, self.addresses
        if not addresses:
            return sport in ports or dport in ports
        return (sport in ports and src in addresses) or (dport in ports and dst in addresses)


# --- IP fragments -------------------------------------------------------------------------------
DEFAULT_MAX_FRAGMENTS = 2000
DEFAULT_FRAGMENT_TIMEOUT = 30.0  # Linux net.ipv4.ipfrag_time
DEFAULT_MAX_FRAGMENT_BYTES = 16 << 20


@dataclass(slots=True)
class FragmentStats:
    fragments: int = 0  # fragments fed
    reassembled: int = 0  # datagrams completed
    duplicates: int = 0  # the same fragment again (same offset and length): ignored
    overlaps: int = 0  # datagrams discarded for overlapping or inconsistent fragments
    malformed: int = 0  # fragments that break the rules (length not a multiple of 8, ...)
    timeouts: int = 0  # datagrams never completed within the timeout
    evicted: int = 0  # datagrams dropped to stay within max_fragments / max_bytes


class _Datagram:
    __slots__ = ("dead", "frags", "have", "proto", "started", "total")

    def __init__(self, started: float) -> None:
        self.started = started
        self.frags: dict[int, bytes] = {}
        self.total = -1  # length of the whole payload once the last fragment is seen
        self.have = 0
        self.proto = -1  # IPv6: next header from the first fragment
        self.dead = False  # discarded (overlap): later fragments are dropped until timeout


class FragmentReassembler:
    """Collects IPv4/IPv6 fragments into datagrams, in bounded memory.

    Datagrams are kept in arrival order of their first fragment, so the timeout and the size
    caps evict from the front in O(1). ``max_fragments`` caps the fragments held (and the
    number of datagrams under reassembly), ``max_bytes`` their payload bytes.
    """

    def __init__(self, *, max_fragments: int = DEFAULT_MAX_FRAGMENTS,
                 timeout: float = DEFAULT_FRAGMENT_TIMEOUT,
                 max_bytes: int = DEFAULT_MAX_FRAGMENT_BYTES) -> None:
        if max_fragments < 1 or timeout <= 0 or max_bytes < 1:
            raise ValueError("max_fragments, timeout and max_bytes must be positive")
        self.max_fragments = max_fragments
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.stats = FragmentStats()
        self._pending: OrderedDict[tuple, _Datagram] = OrderedDict()
        self._count = 0
        self._bytes = 0

    @property
    def held_fragments(self) -> int:
        return self._count

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._pending)

    def feed(self, pkt: IpPacket, now: float) -> IpPacket | None:
        """Account one fragment; return the whole datagram when this one completes it."""
        self.expire(now)
        stats = self.stats
        stats.fragments += 1
        key = (pkt.src, pkt.dst, pkt.proto if pkt.version == 4 else 0, pkt.frag_id)
        data = pkt.payload
        start = pkt.frag_offset
        end = start + len(data)
        if not data or (pkt.more_fragments and len(data) & 7):
            stats.malformed += 1
            return None
        pending = self._pending
        dg = pending.get(key)
        if dg is None:
            while len(pending) >= self.max_fragments:
                self._evict_oldest()
            dg = pending[key] = _Datagram(now)
        if dg.dead:
            return None
        if end > MAX_DATAGRAM or (not pkt.more_fragments and 0 <= dg.total != end) or (
                0 <= dg.total < end):
            self._discard(dg)
            return None
        for s, d in dg.frags.items():
            e = s + len(d)
            if start < e and s < end:
                if s == start and e == end:
                    stats.duplicates += 1
                    return None
                self._discard(dg)
                return None
        if not pkt.more_fragments:
            if any(s + len(d) > end for s, d in dg.frags.items()):
                self._discard(dg)
                return None
            dg.total = end
        dg.frags[start] = data
        dg.have += len(data)
        if start == 0:
            dg.proto = pkt.proto
        self._count += 1
        self._bytes += len(data)
        while self._count > self.max_fragments or self._bytes > self.max_bytes:
            self._evict_oldest()
        if dg.total < 0 or dg.have != dg.total or pending.get(key) is not dg:
            return None
        del pending[key]
        self._release(dg)
        payload = b"".join(dg.frags[s] for s in sorted(dg.frags))
        stats.reassembled += 1
        if pkt.version == 4:
            return IpPacket(4, pkt.src, pkt.dst, pkt.proto, payload)
        return _walk_ipv6(dg.proto, payload, 0, len(payload), pkt.src, pkt.dst, False)

    def expire(self, now: float) -> None:
        """Drop datagrams whose first fragment came more than ``timeout`` seconds ago."""
        pending = self._pending
        deadline = now - self.timeout
        while pending:
            dg = next(iter(pending.values()))
            if dg.started > deadline:
                break
            pending.popitem(last=False)
            if not dg.dead:
                self.stats.timeouts += 1
            self._release(dg)

    def _evict_oldest(self) -> None:
        _, dg = self._pending.popitem(last=False)
        if not dg.dead:
            self.stats.evicted += 1
        self._release(dg)

    def _discard(self, dg: _Datagram) -> None:
        """Overlap or inconsistency: drop what we hold, and what comes later (RFC 5722)."""
        self.stats.overlaps += 1
        self._release(dg)
        dg.frags = {}
        dg.dead = True

    def _release(self, dg: _Datagram) -> None:
        self._count -= len(dg.frags)
        self._bytes -= dg.have
        dg.have = 0


# --- TCP streams --------------------------------------------------------------------------------
DEFAULT_MAX_TCP_STREAMS = 20_000
DEFAULT_MAX_OUT_OF_ORDER = 256 * 1024
DEFAULT_GAP_TIMEOUT = 2.0  # a retransmission fills a real gap well within this
DEFAULT_IDLE_TIMEOUT = 900.0
_SEQ_MOD = 1 << 32
_SEQ_HALF = 1 << 31
_RESYNC_TAIL = 512  # bytes kept while hunting for a start line that may straddle segments
# A SIP start line at the buffer's start or right after a line break.
_START_LINE = re.compile(
    rb"(?:^|(?<=\n))(?:[A-Za-z][A-Za-z0-9.!%*_+`'~-]* [^ \r\n]+ SIP/2\.0\r?\n"
    rb"|SIP/2\.0 [1-6][0-9][0-9][ \r\n])"
)


@dataclass(slots=True)
class TcpStats:
    opened: int = 0  # streams created (SYN seen, or joined mid-stream)
    closed: int = 0  # FIN or RST
    evicted: int = 0  # dropped to stay within max_streams
    idle_expired: int = 0
    messages: int = 0  # SIP messages framed (keepalives not counted)
    keepalives: int = 0
    retransmitted: int = 0  # segments (or parts) we already had
    out_of_order: int = 0  # segments held until an earlier one arrived
    gaps_skipped: int = 0  # holes never filled (the capture lost a segment)
    resyncs: int = 0  # bytes skipped to find the next start line
    framing_errors: int = 0  # message_length rejected the buffer


class _Stream:
    __slots__ = ("buf", "gap_since", "last", "next_seq", "ooo", "ooo_bytes", "synced")

    def __init__(self, next_seq: int, synced: bool, now: float) -> None:
        self.next_seq = next_seq
        self.synced = synced  # True when buf starts at a message boundary
        self.buf = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.ooo_bytes = 0
        self.gap_since = 0.0
        self.last = now


class TcpReassembler:
    """Per-direction byte streams cut into SIP messages.

    Keyed by ``(src, sport, dst, dport)``; streams live in an LRU dict so ``max_streams`` and
    the idle timeout evict the least recently active in O(1). A stream first seen without its
    SYN (the capture started later, or the state was evicted) resyncs at the next start line.
    """

    def __init__(self, *, max_streams: int = DEFAULT_MAX_TCP_STREAMS,
                 max_message: int = DEFAULT_MAX_MESSAGE,
                 max_out_of_order: int = DEFAULT_MAX_OUT_OF_ORDER,
                 gap_timeout: float = DEFAULT_GAP_TIMEOUT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if max_streams < 1 or max_message < 1 or max_out_of_order < 1:
            raise ValueError("max_streams, max_message and max_out_of_order must be positive")
        self.max_streams = max_streams
        self.max_message = max_message
        self.max_out_of_order = max_out_of_order
        self.gap_timeout = gap_timeout
        self.idle_timeout = idle_timeout
        self.stats = TcpStats()
        self._streams: OrderedDict[tuple, _Stream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def feed(self, key: tuple, seq: int, flags: int, data: bytes, now: float) -> list[bytes]:
        """Account one segment of the stream ``key``; return the SIP messages it completes."""
        streams = self._streams
        stats = self.stats
        if flags & TCP_RST:
            if streams.pop(key, None) is not None:
                stats.closed += 1
            return []
        st = streams.get(key)
        if flags & TCP_SYN:
            seq = (seq + 1) % _SEQ_MOD
            if st is None or st.next_seq != seq:  # new connection (or port reuse)
                if st is not None:
                    del streams[key]
                st = self._open(key, seq, True, now)
        elif st is None:
            if not data:
                return []
            st = self._open(key, seq, False, now)
        else:
            streams.move_to_end(key)
            st.last = now
        out: list[bytes] = []
        if data:
            self._segment(st, seq, data, now, out)
        elif st.ooo and now - st.gap_since > self.gap_timeout:
            self._skip_gap(st, out)
        if flags & TCP_FIN:
            del streams[key]
            stats.closed += 1
        return out

    def expire(self, now: float) -> list[tuple[tuple, bytes]]:
        """Skip gaps older than ``gap_timeout`` and drop streams idle past ``idle_timeout``.

        Returns ``(key, message)`` for messages that skipping a gap made complete.
        """
        out: list[tuple[tuple, bytes]] = []
        streams = self._streams
        deadline = now - self.idle_timeout
        while streams:
            key, st = next(iter(streams.items()))
            if st.last > deadline:
                break
            del streams[key]
            self.stats.idle_expired += 1
        for key, st in streams.items():
            if st.ooo and now - st.gap_since > self.gap_timeout:
                messages: list[bytes] = []
                self._skip_gap(st, messages)
                out.extend((key, m) for m in messages)
        return out

    def _open(self, key: tuple, next_seq: int, synced: bool, now: float) -> _Stream:
        streams = self._streams
        while len(streams) >= self.max_streams:
            streams.popitem(last=False)
            self.stats.evicted += 1
        st = streams[key] = _Stream(next_seq, synced, now)
        self.stats.opened += 1
        return st

    def _segment(self, st: _Stream, seq: int, data: bytes, now: float, out: list[bytes]) -> None:
        rel = (seq - st.next_seq) % _SEQ_MOD
        if rel >= _SEQ_HALF:  # starts before what we expect: retransmission or overlap
            rel -= _SEQ_MOD
            if rel + len(data) <= 0:
                self.stats.retransmitted += 1
                return
            data = data[-rel:]
            rel = 0
        if rel > 0:
            self._hold(st, seq, data, now, out)
            return
        if not st.buf and st.synced and not st.ooo:
            # Fast path: one whole message in one segment, nothing buffered.
            try:
                n = message_length(data, max_size=self.max_message)
            except SipParseError:
                n = -1
            if n == len(data):
                st.next_seq = (st.next_seq + n) % _SEQ_MOD
                self._emit(data, out)
                return
        st.buf += data
        st.next_seq = (st.next_seq + len(data)) % _SEQ_MOD
        if st.ooo:
            self._drain(st)
        self._frame(st, out)

    def _hold(self, st: _Stream, seq: int, data: bytes, now: float, out: list[bytes]) -> None:
        """Keep a segment that arrived before an earlier one; skip the gap if it never fills."""
        if not st.ooo:
            st.gap_since = now
        old = st.ooo.get(seq)
        if old is not None and len(old) >= len(data):
            self.stats.retransmitted += 1
            return
        st.ooo[seq] = data
        st.ooo_bytes += len(data) - (len(old) if old is not None else 0)
        self.stats.out_of_order += 1
        if st.ooo_bytes > self.max_out_of_order or now - st.gap_since > self.gap_timeout:
            self._skip_gap(st, out)

    def _drain(self, st: _Stream) -> None:
        """Append held segments that now continue the stream."""
        ooo = st.ooo
        progress = True
        while ooo and progress:
            progress = False
            for seq in list(ooo):
                rel = (seq - st.next_seq) % _SEQ_MOD
                if rel != 0 and rel < _SEQ_HALF:
                    continue  # still beyond a gap
                data = ooo.pop(seq)
                st.ooo_bytes -= len(data)
                if rel >= _SEQ_HALF:
                    rel -= _SEQ_MOD
                    if rel + len(data) <= 0:
                        self.stats.retransmitted += 1
                        continue
                    data = data[-rel:]
                st.buf += data
                st.next_seq = (st.next_seq + len(data)) % _SEQ_MOD
                progress = True

    def _skip_gap(self, st: _Stream, out: list[bytes]) -> None:
        """Give up on missing bytes: frame what we have, jump to the held data, resync."""
        self.stats.gaps_skipped += 1
        self._frame(st, out)
        st.buf.clear()
        first = min(st.ooo, key=lambda s: (s - st.next_seq) % _SEQ_MOD)
        st.next_seq = first
        st.synced = False
        self._drain(st)
        st.gap_since = 0.0
        self._frame(st, out)

    def _frame(self, st: _Stream, out: list[bytes]) -> None:
        buf = st.buf
        while buf:
            if not st.synced:
                m = _START_LINE.search(buf)
                if m is None:
                    cut = buf.rfind(b"\n") + 1
                    tail = len(buf) - cut
                    if cut or tail > _RESYNC_TAIL:
                        self.stats.resyncs += 1
                        del buf[:cut if tail <= _RESYNC_TAIL else len(buf)]
                    return
                if m.start():
                    self.stats.resyncs += 1
                    del buf[:m.start()]
                st.synced = True
            try:
                n = message_length(buf, max_size=self.max_message)
            except SipParseError:
                self.stats.framing_errors += 1
                st.synced = False
                del buf[:1]
                continue
            if n is None:
                return
            msg = bytes(buf[:n])
            del buf[:n]
            self._emit(msg, out)

    def _emit(self, msg: bytes, out: list[bytes]) -> None:
        if is_keepalive(msg):
            self.stats.keepalives += 1
        else:
            self.stats.messages += 1
            out.append(msg)


# --- duplicates ---------------------------------------------------------------------------------
DEFAULT_DEDUP_WINDOW = 0.05
DEFAULT_DEDUP_ENTRIES = 65536


class DuplicateFilter:
    """Remembers hashes of IP packets seen in the last ``window`` seconds.

    Identical copies of one packet seen on several interfaces arrive microseconds apart; a
    phone's own retransmission comes 500 ms later (Timer A) and is left to the transaction
    layer, so the window is short and the table small.
    """

    def __init__(self, window: float = DEFAULT_DEDUP_WINDOW,
                 max_entries: int = DEFAULT_DEDUP_ENTRIES) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[int, float] = OrderedDict()

    def seen(self, packet: bytes, now: float) -> bool:
        """True if the same bytes were seen within the window (and remember them if not)."""
        seen = self._seen
        deadline = now - self.window
        while seen:
            first = next(iter(seen))
            if seen[first] > deadline and len(seen) < self.max_entries:
                break
            del seen[first]
        digest = hash(packet)
        if digest in seen:
            return True
        seen[digest] = now
        return False


# --- the whole path -----------------------------------------------------------------------------
@dataclass(slots=True)
class SipData:
    """One SIP datagram (UDP) or framed message (TCP) with the addresses it went between."""

    transport: str  # "udp" or "tcp"
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    data: bytes

    @property
    def src(self) -> tuple[str, str, int]:
        return self.transport, self.src_ip, self.src_port

    @property
    def dst(self) -> tuple[str, str, int]:
        return self.transport, self.dst_ip, self.dst_port


@dataclass(slots=True)
class DecoderStats:
    packets: int = 0  # frames fed
    bytes: int = 0
    decode_errors: int = 0  # PacketError raised by feed
    non_ip: int = 0  # ARP and friends (capture files only: the kernel filter drops them)
    loopback_copies: int = 0  # the outgoing copy of a loopback packet
    duplicates: int = 0  # identical IP packets within the dedup window
    other_transport: int = 0  # neither UDP nor TCP
    not_sip_flow: int = 0  # no SIP port on the proxy's side
    udp: int = 0  # UDP datagrams handed on
    tcp_segments: int = 0


class PacketDecoder:
    """Frames in, :class:`SipData` out: link, dedup, IP, fragments, flow filter, UDP/TCP."""

    def __init__(self, flow: FlowFilter, *, max_fragments: int = DEFAULT_MAX_FRAGMENTS,
                 fragment_timeout: float = DEFAULT_FRAGMENT_TIMEOUT,
                 max_tcp_streams: int = DEFAULT_MAX_TCP_STREAMS,
                 dedup_window: float = DEFAULT_DEDUP_WINDOW,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.flow = flow
        self.stats = DecoderStats()
        self.fragments = FragmentReassembler(max_fragments=max_fragments,
                                             timeout=fragment_timeout)
        self.tcp = TcpReassembler(max_streams=max_tcp_streams, max_message=max_message)
        self.dedup = DuplicateFilter(dedup_window) if dedup_window > 0 else None

    def feed(self, frame: bytes, linktype: int, now: float, pkttype: int = -1,
             hatype: int = -1) -> list[SipData]:
        """Decode one captured frame. ``pkttype``/``hatype`` come from the capture socket.

        Raises :class:`PacketError` (after counting it in ``decode_errors``) for a frame that
        cannot be decoded.
        """
        stats = self.stats
        stats.packets += 1
        stats.bytes += len(frame)
        try:
            return self._feed(frame, linktype, now, pkttype, hatype)
        except PacketError:
            stats.decode_errors += 1
            raise

    def _feed(self, frame: bytes, linktype: int, now: float, pkttype: int,
              hatype: int) -> list[SipData]:
        stats = self.stats
        if linktype == LINKTYPE_RAW:
            packet = frame
        else:
            info = link_offset(frame, linktype)
            if info is None:
                stats.non_ip += 1
                return []
            if info.pkttype >= 0:
                pkttype, hatype = info.pkttype, info.hatype
            packet = frame[info.offset:]
        if pkttype == PACKET_OUTGOING and hatype == ARPHRD_LOOPBACK:
            stats.loopback_copies += 1
            return []
        if self.dedup is not None and self.dedup.seen(packet, now):
            stats.duplicates += 1
            return []
        ip = decode_ip(packet)
        if ip.frag_id >= 0:
            whole = self.fragments.feed(ip, now)
            if whole is None:
                return []
            ip = whole
        if ip.proto == PROTO_UDP:
            sport, dport, data = decode_udp(ip.payload)
            if not self.flow.matches(ip.src, sport, ip.dst, dport):
                stats.not_sip_flow += 1
                return []
            stats.udp += 1
            return [SipData("udp", ip_text(ip.src), sport, ip_text(ip.dst), dport, data)]
        if ip.proto == PROTO_TCP:
            sport, dport, seq, flags, data = decode_tcp(ip.payload)
            if not self.flow.matches(ip.src, sport, ip.dst, dport):
                stats.not_sip_flow += 1
                return []
            stats.tcp_segments += 1
            messages = self.tcp.feed((ip.src, sport, ip.dst, dport), seq, flags, data, now)
            if not messages:
                return []
            src, dst = ip_text(ip.src), ip_text(ip.dst)
            return [SipData("tcp", src, sport, dst, dport, m) for m in messages]
        stats.other_transport += 1
        return []

    def expire(self, now: float) -> list[SipData]:
        """Time out fragments and TCP gaps/streams (call about once a second).

        Returns the TCP messages that became complete by giving up on a gap.
        """
        self.fragments.expire(now)
        return [SipData("tcp", ip_text(src), sport, ip_text(dst), dport, msg)
                for (src, sport, dst, dport), msg in self.tcp.expire(now)]


# --- capture files ------------------------------------------------------------------------------
_PCAP_MAGIC_US = 0xA1B2C3D4
_PCAP_MAGIC_NS = 0xA1B23C4D
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BOM = 0x1A2B3C4D
_PCAPNG_IDB = 1
_PCAPNG_SPB = 3
_PCAPNG_EPB = 6
_PCAPNG_OBSOLETE_PB = 2
MAX_CAPTURE_RECORD = 1 << 20  # no sane frame is larger; a bigger length means a corrupt file
MAX_PCAPNG_BLOCK = 16 << 20


@dataclass(slots=True)
class CaptureRecord:
    time: float  # UNIX seconds
    linktype: int
    data: bytes
    pkttype: int = -1  # PACKET_OUTGOING / PACKET_HOST when the file records the direction


class CaptureFileReader:
    """Classic pcap (either byte order, micro- or nanosecond) and pcapng, fed in chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._format: str | None = None  # "pcap" or "pcapng"
        self._endian = "<"
        self._linktype = 0
        self._tsdiv = 1e6
        self._interfaces: list[tuple[int, float, int]] = []  # (linktype, ticks per second, snap)
        self.records = 0

    def feed(self, chunk: bytes) -> list[CaptureRecord]:
        self._buf += chunk
        out: list[CaptureRecord] = []
        try:
            if self._format is None and not self._header():
                return out
            if self._format == "pcap":
                self._pcap_records(out)
            else:
                self._pcapng_blocks(out)
        except StructError as exc:
            raise PacketError(f"corrupt capture file: {exc}") from None
        self.records += len(out)
        return out

    def close(self) -> None:
        """Raise :class:`PacketError` if the file ended inside a header or record."""
        if self._format is None:
            raise PacketError("not a pcap or pcapng file (too short)")
        if self._buf:
            raise PacketError(f"capture file ends inside a record ({len(self._buf)} bytes)")

    def _header(self) -> bool:
        buf = self._buf
        if len(buf) < 4:
            return False
        magic_le = unpack_from("<I", buf, 0)[0]
        if magic_le == _PCAPNG_SHB:
            self._format = "pcapng"
            return True
        if len(buf) < 24:
            return False
        for endian in "<>":
            magic = unpack_from(endian + "I", buf, 0)[0]
            if magic in (_PCAP_MAGIC_US, _PCAP_MAGIC_NS):
                self._endian = endian
                self._tsdiv = 1e6 if magic == _PCAP_MAGIC_US else 1e9
                self._linktype = unpack_from(endian + "I", buf, 20)[0] & 0xFFFF
                del buf[:24]
                self._format = "pcap"
                return True
        raise PacketError("not a pcap or pcapng file (bad magic number)")

    def _pcap_records(self, out: list[CaptureRecord]) -> None:
        buf = self._buf
        fmt = self._endian + "IIII"
        pos = 0
        n = len(buf)
        while n - pos >= 16:
            sec, frac, incl, _orig = unpack_from(fmt, buf, pos)
            if incl > MAX_CAPTURE_RECORD:
                raise PacketError(f"pcap record of {incl} bytes")
            if n - pos - 16 < incl:
                break
            start = pos + 16
            out.append(CaptureRecord(sec + frac / self._tsdiv, self._linktype,
                                     bytes(buf[start:start + incl])))
            pos = start + incl
        del buf[:pos]

    def _pcapng_blocks(self, out: list[CaptureRecord]) -> None:
        buf = self._buf
        while len(buf) >= 12:
            if unpack_from("<I", buf, 0)[0] == _PCAPNG_SHB:
                bom = unpack_from("<I", buf, 8)[0]
                if bom == _PCAPNG_BOM:
                    self._endian = "<"
                elif bom == int.from_bytes(_PCAPNG_BOM.to_bytes(4, "little"), "big"):
                    self._endian = ">"
                else:
                    raise PacketError("pcapng section header with a bad byte-order magic")
            e = self._endian
            btype, blen = unpack_from(e + "II", buf, 0)
            if blen < 12 or blen % 4 or blen > MAX_PCAPNG_BLOCK:
                raise PacketError(f"pcapng block of bad length {blen}")
            if len(buf) < blen:
                return
            if unpack_from(e + "I", buf, blen - 4)[0] != blen:
                raise PacketError("pcapng block lengths disagree")
            body = bytes(buf[8:blen - 4])
            del buf[:blen]
            if btype == _PCAPNG_SHB:
                self._interfaces = []  # interface ids are per section
            elif btype == _PCAPNG_IDB:
                self._interface(body)
            elif btype in (_PCAPNG_EPB, _PCAPNG_OBSOLETE_PB):
                self._enhanced_packet(body, btype, out)
            elif btype == _PCAPNG_SPB:
                self._simple_packet(body, out)

    def _interface(self, body: bytes) -> None:
        e = self._endian
        linktype, _reserved, snaplen = unpack_from(e + "HHI", body, 0)
        ticks = 1e6
        for code, value in _pcapng_options(body, 8, e):
            if code == 9 and value:  # if_tsresol
                r = value[0]
                ticks = float(2 ** (r & 0x7F)) if r & 0x80 else float(10 ** min(r, 18))
        self._interfaces.append((linktype, ticks, snaplen))

    def _enhanced_packet(self, body: bytes, btype: int, out: list[CaptureRecord]) -> None:
        e = self._endian
        if btype == _PCAPNG_EPB:
            ifid, hi, lo, caplen, _orig = unpack_from(e + "IIIII", body, 0)
        else:  # obsolete Packet Block: 16-bit interface id and drops count
            ifid, _drops, hi, lo, caplen, _orig = unpack_from(e + "HHIIII", body, 0)
        if ifid >= len(self._interfaces):
            raise PacketError(f"pcapng packet for undeclared interface {ifid}")
        if 20 + caplen > len(body):
            raise PacketError("pcapng packet longer than its block")
        linktype, ticks, _ = self._interfaces[ifid]
        data = body[20:20 + caplen]
        pkttype = -1
        for code, value in _pcapng_options(body, 20 + ((caplen + 3) & ~3), e):
            if code == 2 and len(value) >= 4:  # epb_flags: bits 0-1 direction
                direction = unpack_from(e + "I", value, 0)[0] & 3
                pkttype = {1: PACKET_HOST, 2: PACKET_OUTGOING}.get(direction, -1)
        out.append(CaptureRecord(((hi << 32) | lo) / ticks, linktype, data, pkttype))

    def _simple_packet(self, body: bytes, out: list[CaptureRecord]) -> None:
        if not self._interfaces:
            raise PacketError("pcapng simple packet before any interface")
        linktype, _ticks, snaplen = self._interfaces[0]
        orig = unpack_from(self._endian + "I", body, 0)[0]
        caplen = min(orig, snaplen or orig, len(body) - 4)
        out.append(CaptureRecord(0.0, linktype, body[4:4 + caplen]))


def _pcapng_options(body: bytes, off: int, e: str) -> Iterable[tuple[int, bytes]]:
    n = len(body)
    while off + 4 <= n:
        code, length = unpack_from(e + "HH", body, off)
        if code == 0:
            return
        value = body[off + 4:off + 4 + length]
        off += 4 + ((length + 3) & ~3)
        yield code, value
