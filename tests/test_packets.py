"""Sans-I/O packet decoding: link layers, IPv4/IPv6, fragments, TCP streams, duplicates, files.

Packets are built with scapy (a real, independent encoder), then fed byte by byte through
:mod:`sidecar.sources.packets`. Fuzz tests check that arbitrary bytes only ever raise
``PacketError``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    IP,
    TCP,
    UDP,
    CookedLinux,
    Dot1Q,
    Ether,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    Loopback,
    Raw,
    fragment,
    fragment6,
)
from scapy.utils import PcapNgWriter, PcapWriter

from sidecar.sources.packets import (
    ARPHRD_LOOPBACK,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    PACKET_OUTGOING,
    CaptureFileReader,
    DuplicateFilter,
    FlowFilter,
    FragmentReassembler,
    PacketDecoder,
    PacketError,
    TcpReassembler,
    decode_ip,
    decode_tcp,
    decode_udp,
    link_offset,
)

NOW = 1_800_000_000.0
SYN, FIN, RST, ACK, PSH = 0x02, 0x01, 0x04, 0x10, 0x08
ETH = Ether(src="00:00:00:00:00:00", dst="00:00:00:00:00:00")  # as on lo (no MAC lookup)


def register(user: str = "alice", callid: str = "c1", cseq: int = 1, body: bytes = b"") -> bytes:
    head = (f"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.5:5070;branch=z9hG4bK{callid}{cseq}\r\n"
            f"From: <sip:{user}@127.0.0.1>;tag=1\r\nTo: <sip:{user}@127.0.0.1>\r\n"
            f"Call-ID: {callid}\r\nCSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@127.0.0.5:5070>\r\nExpires: 600\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def ip_bytes(pkt) -> bytes:
    return bytes(pkt)


# --- link layer -------------------------------------------------------------------------------

def test_link_layers_find_the_ip_header():
    ip = IP(src="127.0.0.5", dst="127.0.0.1") / UDP(sport=5070, dport=5060) / b"x"
    assert link_offset(bytes(ETH / ip), LINKTYPE_ETHERNET).offset == 14
    assert link_offset(bytes(ETH / Dot1Q(vlan=7) / ip), LINKTYPE_ETHERNET).offset == 18
    assert link_offset(bytes(ETH / Dot1Q() / Dot1Q() / ip), LINKTYPE_ETHERNET).offset == 22
    assert link_offset(bytes(ip), LINKTYPE_RAW).offset == 0
    assert link_offset(bytes(Loopback(type=2) / ip), LINKTYPE_NULL).offset == 4
    sll = link_offset(bytes(CookedLinux(pkttype=4, lladdrtype=772) / ip), LINKTYPE_LINUX_SLL)
    assert (sll.offset, sll.pkttype, sll.hatype) == (16, PACKET_OUTGOING, ARPHRD_LOOPBACK)
    sll2 = (struct.pack("!HHIHBB8s", 0x0800, 0, 1, 772, 4, 6, b"") + bytes(ip))
    info = link_offset(sll2, LINKTYPE_LINUX_SLL2)
    assert (info.offset, info.pkttype, info.hatype) == (20, PACKET_OUTGOING, ARPHRD_LOOPBACK)
    arp = Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / Raw(b"\x00" * 28)
    assert link_offset(bytes(arp), LINKTYPE_ETHERNET) is None
    with pytest.raises(PacketError):
        link_offset(b"\x00" * 5, LINKTYPE_ETHERNET)
    with pytest.raises(PacketError):
        link_offset(b"\x00" * 40, 9999)


def test_ipv4_and_ipv6_headers_udp_and_tcp():
    p4 = decode_ip(bytes(IP(src="127.0.0.5", dst="127.0.0.1") / UDP(sport=5070, dport=5060)
                         / b"hello") + b"\x00" * 6)  # Ethernet padding is cut
    assert (p4.version, p4.src, p4.dst, p4.proto, p4.frag_id) == (
        4, bytes([127, 0, 0, 5]), bytes([127, 0, 0, 1]), 17, -1)
    assert decode_udp(p4.payload) == (5070, 5060, b"hello")
    p6 = decode_ip(bytes(IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                         / TCP(sport=40000, dport=5060, seq=7, flags="PA") / b"data"))
    assert p6.version == 6 and p6.proto == 6 and p6.dst[-1] == 2
    assert decode_tcp(p6.payload) == (40000, 5060, 7, PSH | ACK, b"data")
    atomic = decode_ip(bytes(IPv6(src="::1", dst="::1") / IPv6ExtHdrFragment(offset=0, m=0)
                             / UDP(sport=1, dport=5060) / b"a"))
    assert atomic.frag_id == -1 and atomic.proto == 17  # RFC 6946: not really a fragment


@pytest.mark.parametrize("data", [
    b"", b"\x45", b"\x45" + b"\x00" * 10, b"\x40" + b"\x00" * 19, b"\x75" + b"\x00" * 30,
    bytes(IP() / UDP() / b"abc")[:-2],  # truncated: shorter than the total length
    b"\x60" + b"\x00" * 20,
    bytes(IPv6() / UDP() / b"abc")[:-1],
])
def test_bad_ip_headers_raise_packet_error(data):
    with pytest.raises(PacketError):
        decode_ip(data)


def test_bad_transport_headers_raise_packet_error():
    with pytest.raises(PacketError):
        decode_udp(b"\x00" * 7)
    with pytest.raises(PacketError):
        decode_udp(struct.pack("!HHHH", 1, 2, 100, 0))  # length beyond the datagram
    with pytest.raises(PacketError):
        decode_tcp(b"\x00" * 19)
    with pytest.raises(PacketError):
        decode_tcp(b"\x00" * 12 + b"\xf0" + b"\x00" * 7)  # data offset past the end


def test_flow_filter_ports_and_proxy_addresses():
    lo, other = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 9])
    any_addr = FlowFilter([5060, 5080])
    assert any_addr.matches(other, 40000, lo, 5080)
    assert any_addr.matches(lo, 5060, other, 40000)
    assert not any_addr.matches(lo, 5061, other, 40000)
    narrowed = FlowFilter([5060], ["127.0.0.1"])
    assert narrowed.matches(other, 40000, lo, 5060)
    assert not narrowed.matches(lo, 40000, other, 5060)  # port 5060 is not the proxy's side
    with pytest.raises(ValueError):
        FlowFilter([])


# --- fragments --------------------------------------------------------------------------------

def _fragments4(payload: bytes, size: int = 64, ident: int = 99) -> list:
    pkt = IP(src="127.0.0.5", dst="127.0.0.1", id=ident) / UDP(sport=5070, dport=5060) / payload
    return [decode_ip(bytes(f)) for f in fragment(pkt, size)]


def _fragments6(payload: bytes, ident: int = 77) -> list:
    pkt = (IPv6(src="::5", dst="::1") / IPv6ExtHdrFragment(id=ident)
           / UDP(sport=5070, dport=5060) / payload)
    return [decode_ip(bytes(f)) for f in fragment6(pkt, 200)]


def _whole(result) -> bytes:
    assert result is not None
    return decode_udp(result.payload)[2]


@pytest.mark.parametrize("order", ["in", "reversed", "shuffled"])
def test_ipv4_fragments_reassemble_in_any_order(order):
    payload = bytes(range(256)) * 3
    frags = _fragments4(payload)
    assert len(frags) > 5
    if order == "reversed":
        frags.reverse()
    elif order == "shuffled":
        random.Random(4).shuffle(frags)
    r = FragmentReassembler()
    results = [r.feed(f, NOW) for f in frags]
    assert all(x is None for x in results[:-1])
    assert _whole(results[-1]) == payload
    assert r.stats.reassembled == 1 and r.held_fragments == 0 and len(r) == 0


def test_ipv6_fragments_reassemble_out_of_order():
    payload = b"v6" * 400
    frags = _fragments6(payload)
    assert len(frags) >= 4 and frags[1].frag_id == 77
    r = FragmentReassembler()
    results = [r.feed(f, NOW) for f in reversed(frags)]
    whole = results[-1]
    assert whole.proto == 17 and whole.version == 6 and _whole(whole) == payload


def test_duplicated_fragments_are_ignored():
    payload = b"d" * 500
    frags = _fragments4(payload)
    r = FragmentReassembler()
    out = [r.feed(f, NOW) for f in [frags[0], frags[0], *frags[1:-1], frags[1], frags[-1]]]
    assert _whole(out[-1]) == payload
    assert r.stats.duplicates == 2
    assert r.feed(frags[2], NOW) is None  # a late copy after completion starts a new datagram
    r.expire(NOW + 60)
    assert len(r) == 0 and r.stats.timeouts == 1


def test_overlapping_fragments_discard_the_whole_datagram():
    payload = b"o" * 400
    frags = _fragments4(payload)
    r = FragmentReassembler()
    assert r.feed(frags[0], NOW) is None
    f1 = frags[1]
    # Same datagram, starting 8 bytes before fragment 1 with a different length: overlap.
    evil = type(f1)(f1.version, f1.src, f1.dst, f1.proto, b"X" * 16, f1.frag_id,
                    f1.frag_offset - 8, True)
    assert r.feed(evil, NOW) is None
    assert r.stats.overlaps == 1 and r.held_fragments == 0
    # RFC 5722: fragments arriving later for it are dropped too, nothing completes
    assert all(r.feed(f, NOW) is None for f in frags[1:])
    assert r.stats.reassembled == 0
    r.expire(NOW + 31)
    assert len(r) == 0 and r.stats.timeouts == 0  # a discarded datagram is not a timeout


def test_inconsistent_last_fragment_and_bad_lengths():
    frags = _fragments4(b"L" * 300)
    r = FragmentReassembler()
    last = frags[-1]
    r.feed(last, NOW)
    shorter_last = type(last)(4, last.src, last.dst, last.proto, last.payload[:-8],
                              last.frag_id, last.frag_offset, False)
    assert r.feed(shorter_last, NOW) is None and r.stats.overlaps == 1
    odd = type(last)(4, last.src, last.dst, last.proto, b"x" * 13, 5, 0, True)
    assert r.feed(odd, NOW) is None and r.stats.malformed == 1  # MF set, not a multiple of 8
    too_far = type(last)(4, last.src, last.dst, last.proto, b"x" * 16, 6, 65528, False)
    assert r.feed(too_far, NOW) is None


def test_fragment_timeout_and_bounded_memory():
    r = FragmentReassembler(max_fragments=10, timeout=5.0)
    for ident in range(30):  # 30 incomplete datagrams, 2 fragments each
        frags = _fragments4(b"m" * 300, ident=ident)
        r.feed(frags[0], NOW + ident * 0.01)
        r.feed(frags[1], NOW + ident * 0.01)
        assert r.held_fragments <= 10
    assert r.stats.evicted >= 25
    r.expire(NOW + 100)
    assert len(r) == 0 and r.held_fragments == 0 and r.held_bytes == 0
    # the same fragments one by one, too slowly: the first ones time out
    frags = _fragments4(b"t" * 300, ident=1000)
    for i, f in enumerate(frags):
        assert r.feed(f, NOW + 200 + i * 3.0) is None
    assert r.stats.timeouts >= 1


def test_fragment_byte_cap():
    r = FragmentReassembler(max_fragments=1000, max_bytes=1000)
    for ident in range(20):
        r.feed(_fragments4(b"b" * 600, size=400, ident=ident)[0], NOW)
        assert r.held_bytes <= 1000


# --- TCP --------------------------------------------------------------------------------------

KEY = (b"\x7f\x00\x00\x05", 40000, b"\x7f\x00\x00\x01", 5060)


def _stream(chunks, isn=1000, syn=True, r=None):
    """Feed ``chunks`` [(relative seq, bytes, flags)] to a reassembler; return messages."""
    r = r if r is not None else TcpReassembler()
    out = []
    if syn:
        out += r.feed(KEY, isn, SYN, b"", NOW)
    for rel, data, flags in chunks:
        out += r.feed(KEY, (isn + 1 + rel) % (1 << 32), flags | ACK, data, NOW)
    return out, r


def test_tcp_in_order_split_and_coalesced_messages():
    m1, m2, m3 = register(cseq=1), register(cseq=2, body=b"v=0\r\n"), register(cseq=3)
    data = m1 + b"\r\n\r\n" + m2 + m3  # a CRLFCRLF keepalive between messages
    cuts = [0, 10, 150, len(m1) + 2, len(m1) + 30, len(data) - 3, len(data)]
    chunks = [(a, data[a:b], PSH) for a, b in itertools.pairwise(cuts)]
    out, r = _stream(chunks)
    # the keepalive's first CRLF came alone and was consumed; the rest leads m2 (legal SIP)
    assert out == [m1, b"\r\n" + m2, m3]
    assert r.stats.messages == 3 and r.stats.keepalives == 1


def test_tcp_out_of_order_and_retransmitted_segments():
    m1, m2 = register(cseq=1), register(cseq=2)
    data = m1 + m2
    pieces = [(i, data[i:i + 100], PSH) for i in range(0, len(data), 100)]
    shuffled = pieces[:]
    random.Random(7).shuffle(shuffled)
    shuffled += [pieces[0], pieces[3]]  # retransmissions of data already seen
    out, r = _stream(shuffled)
    assert out == [m1, m2]
    assert r.stats.out_of_order > 0 and r.stats.retransmitted >= 2


def test_tcp_overlapping_retransmission_is_trimmed():
    m = register()
    out, r = _stream([(0, m[:100], PSH), (50, m[50:200], PSH), (200, m[200:], PSH)])
    assert out == [m] and r.stats.retransmitted == 0


def test_tcp_sequence_numbers_wrap_around():
    m = register()
    out, _ = _stream([(0, m[:60], PSH), (60, m[60:], PSH)], isn=(1 << 32) - 70)
    assert out == [m]


def test_tcp_join_mid_stream_resyncs_at_the_next_start_line():
    m1, m2 = register(cseq=1), register(cseq=2)
    # the capture starts in the middle of m1: no SYN, first bytes are a header tail
    out, r = _stream([(0, m1[40:] + m2[:30], PSH), (len(m1) - 40 + 30, m2[30:], PSH)],
                     syn=False)
    assert out == [m2]
    assert r.stats.resyncs >= 1


def test_tcp_gap_never_filled_is_skipped_after_the_timeout():
    m1, m2, m3 = register(cseq=1), register(cseq=2), register(cseq=3)
    r = TcpReassembler(gap_timeout=2.0)
    r.feed(KEY, 0, SYN, b"", NOW)
    assert r.feed(KEY, 1, PSH, m1, NOW) == [m1]
    lost = 1 + len(m1)  # m2 never shows up in the capture
    after = lost + len(m2)
    assert r.feed(KEY, after, PSH, m3[:50], NOW) == []
    assert r.feed(KEY, after + 50, PSH, m3[50:], NOW + 1) == []
    assert r.expire(NOW + 3) == [(KEY, m3)]
    assert r.stats.gaps_skipped == 1
    m4 = register(cseq=4)
    assert r.feed(KEY, after + len(m3), PSH, m4, NOW + 4) == [m4]


def test_tcp_out_of_order_budget_forces_a_gap_skip():
    r = TcpReassembler(max_out_of_order=300)
    m = register()
    r.feed(KEY, 0, SYN, b"", NOW)
    r.feed(KEY, 1 + 1000, PSH, m, NOW)  # a hole of 1000 bytes before it
    out = r.feed(KEY, 1 + 1000 + len(m), PSH, m, NOW)
    assert out == [m, m] and r.stats.gaps_skipped == 1


def test_tcp_fin_rst_and_stream_limits():
    r = TcpReassembler(max_streams=3)
    m = register()
    _, r = _stream([(0, m, PSH | FIN)], r=r)
    assert len(r) == 0 and r.stats.closed == 1
    for port in range(5):
        r.feed((b"a", port, b"b", 5060), 0, SYN, b"", NOW)
    assert len(r) == 3 and r.stats.evicted == 2
    r.feed((b"a", 4, b"b", 5060), 1, RST, b"", NOW)
    assert len(r) == 2
    r.expire(NOW + 10_000)
    assert len(r) == 0 and r.stats.idle_expired == 2


def test_tcp_garbage_in_the_stream_is_skipped():
    m = register()
    out, r = _stream([(0, b"\x16\x03\x01 not sip at all\r\n" + m, PSH)])
    assert out == [m]
    out, r = _stream([(0, b"REGISTER sip:x SIP/2.0\r\nContent-Length: zz\r\n\r\n" + m, PSH)])
    assert out == [m] and r.stats.framing_errors >= 1


# --- duplicates and the whole decoder ---------------------------------------------------------

def test_duplicate_filter_window():
    d = DuplicateFilter(window=0.05, max_entries=4)
    assert not d.seen(b"a", NOW)
    assert d.seen(b"a", NOW + 0.01)
    assert not d.seen(b"a", NOW + 0.2)
    for i in range(10):
        d.seen(bytes([i]), NOW + 0.3)
    assert len(d._seen) <= 4


def _decoder(**kw) -> PacketDecoder:
    return PacketDecoder(FlowFilter([5060]), **kw)


def test_decoder_udp_tcp_and_loopback_copies():
    dec = _decoder()
    udp = bytes(ETH / IP(src="127.0.0.5", dst="127.0.0.1") / UDP(sport=5070, dport=5060)
                / register())
    [item] = dec.feed(udp, LINKTYPE_ETHERNET, NOW)
    assert item.src == ("udp", "127.0.0.5", 5070) and item.dst == ("udp", "127.0.0.1", 5060)
    assert item.data == register()
    # the same packet again at once is a copy (bridge, "any" capture)
    assert dec.feed(udp, LINKTYPE_ETHERNET, NOW) == [] and dec.stats.duplicates == 1
    # on loopback, the outgoing copy is dropped by the packet type
    raw = bytes(IP(src="127.0.0.5", dst="127.0.0.1", id=5) / UDP(sport=5070, dport=5060) / b"x")
    assert dec.feed(raw, LINKTYPE_RAW, NOW, PACKET_OUTGOING, ARPHRD_LOOPBACK) == []
    assert dec.stats.loopback_copies == 1
    assert len(dec.feed(raw, LINKTYPE_RAW, NOW, 0, ARPHRD_LOOPBACK)) == 1
    # not the proxy's port: filtered after decoding
    other = bytes(IP() / UDP(sport=1, dport=2) / b"x")
    assert dec.feed(other, LINKTYPE_RAW, NOW) == [] and dec.stats.not_sip_flow == 1
    # TCP over IPv6
    seg = IPv6(src="::5", dst="::1") / TCP(sport=40000, dport=5060, seq=10, flags="PA")
    [msg] = dec.feed(bytes(seg / register()), LINKTYPE_RAW, NOW)
    assert msg.src == ("tcp", "::5", 40000) and msg.data == register()
    with pytest.raises(PacketError):
        dec.feed(b"\x45\x00", LINKTYPE_RAW, NOW)
    assert dec.stats.decode_errors == 1


def test_decoder_reassembles_fragments_before_the_port_filter():
    dec = _decoder()
    big = register(body=b"x" * 2000)
    pkt = IP(src="127.0.0.5", dst="127.0.0.1", id=1234) / UDP(sport=5070, dport=5060) / big
    frags = [bytes(f) for f in fragment(pkt, 500)]
    out = []
    for f in reversed(frags):
        out += dec.feed(f, LINKTYPE_RAW, NOW)
    assert [o.data for o in out] == [big]
    assert dec.fragments.stats.reassembled == 1


# --- capture files ----------------------------------------------------------------------------

def _packets():
    return [ETH / IP(src="127.0.0.5", dst="127.0.0.1", id=i) / UDP(sport=5070, dport=5060)
            / register(cseq=i) for i in range(1, 4)]


def _write(path, writer_cls, pkts, **kw) -> bytes:
    with writer_cls(str(path), **kw) as writer:
        for i, p in enumerate(pkts):
            p.time = NOW + i
            writer.write(p)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["pcap", "pcap-ns", "pcap-be", "pcapng"])
def test_capture_files_fed_in_any_chunks(kind, tmp_path):
    pkts = _packets()
    path = tmp_path / "f"
    if kind == "pcapng":
        data = _write(path, PcapNgWriter, pkts)
    else:
        data = _write(path, PcapWriter, pkts, nano=kind == "pcap-ns",
                      endianness=">" if kind == "pcap-be" else "")
    for step in (1, 7, len(data)):
        reader = CaptureFileReader()
        records = []
        for i in range(0, len(data), step):
            records += reader.feed(data[i:i + step])
        reader.close()
        assert [r.data for r in records] == [bytes(p) for p in pkts]
        assert all(r.linktype == LINKTYPE_ETHERNET for r in records)
        assert [round(r.time - NOW, 3) for r in records] == [0, 1, 2]


def test_capture_file_errors(tmp_path):
    data = _write(tmp_path / "f", PcapWriter, _packets())
    reader = CaptureFileReader()
    reader.feed(data[:-5])
    with pytest.raises(PacketError):
        reader.close()
    with pytest.raises(PacketError):
        CaptureFileReader().feed(b"not a capture file at all")
    with pytest.raises(PacketError):
        CaptureFileReader().close()
    bad_len = bytearray(data)
    struct.pack_into("<I", bad_len, 24 + 8, 1 << 30)  # first record claims 1 GiB
    with pytest.raises(PacketError):
        CaptureFileReader().feed(bytes(bad_len))


# --- fuzz -------------------------------------------------------------------------------------

LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
             LINKTYPE_NULL, 108, 228, 229, 12345]


@settings(max_examples=600, deadline=None)
@given(data=st.binary(max_size=200), linktype=st.sampled_from(LINKTYPES))
def test_fuzz_decoder_only_raises_packet_error(data, linktype):
    dec = _decoder()
    with contextlib.suppress(PacketError):
        dec.feed(data, linktype, NOW)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_packets(data):
    """Valid packets with random bytes flipped or cut exercise the deeper branches."""
    base = data.draw(st.sampled_from([
        bytes(IP(src="127.0.0.5", dst="127.0.0.1") / UDP(sport=5070, dport=5060) / register()),
        bytes(IPv6(src="::5", dst="::1") / TCP(sport=1, dport=5060, flags="PA") / register()),
        bytes(IPv6(src="::5", dst="::1") / IPv6ExtHdrFragment(offset=8, m=1, id=3) / (b"z" * 64)),
        bytes(IP(src="127.0.0.5", dst="127.0.0.1", flags=1, frag=0) / UDP(dport=5060)
              / (b"q" * 64)),
    ]))
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    dec = _decoder()
    for frame in (bytes(buf), bytes(buf[:cut])):
        with contextlib.suppress(PacketError):
            dec.feed(frame, LINKTYPE_RAW, NOW)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(st.tuples(st.integers(0, 3000), st.binary(max_size=300),
                                   st.sampled_from([0, SYN, FIN, RST, PSH])), max_size=12))
def test_fuzz_tcp_reassembler_never_fails(segments):
    r = TcpReassembler(max_out_of_order=2000)
    for seq, data, flags in segments:
        for msg in r.feed(KEY, seq, flags, data, NOW):
            assert msg
    r.expire(NOW + 100)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_capture_file_reader_only_raises_packet_error(data):
    for prefix in (b"", struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1),
                   struct.pack("<III", 0x0A0D0D0A, 28, 0x1A2B3C4D)):
        reader = CaptureFileReader()
        with contextlib.suppress(PacketError):
            reader.feed(prefix + data)
            reader.close()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_tcp_delivery_order_does_not_matter(data):
    """Messages cut anywhere, delivered shuffled with duplicates, come out whole and in order."""
    messages = [register(cseq=i, body=b"b" * data.draw(st.integers(0, 40)))
                for i in range(1, data.draw(st.integers(1, 4)) + 1)]
    stream = b"".join(messages)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=8))))
    bounds = [0, *cuts, len(stream)]
    pieces = [(a, stream[a:b], PSH) for a, b in itertools.pairwise(bounds)]
    order = data.draw(st.permutations(pieces))
    extra = data.draw(st.lists(st.sampled_from(pieces), max_size=3))
    out, r = _stream([*order, *extra], isn=data.draw(st.integers(0, (1 << 32) - 1)))
    assert out == messages
    assert r.stats.gaps_skipped == 0 and r.stats.resyncs == 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_fragments_any_order_with_duplicates(data):
    size = data.draw(st.sampled_from([32, 64, 128]))
    payload = data.draw(st.binary(min_size=size, max_size=600))  # always more than 1 fragment
    frags = _fragments4(payload, size=size)
    assert len(frags) > 1
    order = data.draw(st.permutations(frags))
    dups = data.draw(st.lists(st.sampled_from(order[:-1]), max_size=3))
    sequence = list(order[:-1])
    for d in dups:  # duplicates, all before the fragment that completes the datagram
        sequence.insert(data.draw(st.integers(0, len(sequence))), d)
    sequence.append(order[-1])
    r = FragmentReassembler()
    results = [x for x in (r.feed(f, NOW) for f in sequence) if x is not None]
    assert [_whole(x) for x in results] == [payload]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 200), st.integers(0, 300),
                          st.booleans(), st.floats(0, 100)), max_size=40))
def test_property_fragment_memory_stays_bounded(frags):
    r = FragmentReassembler(max_fragments=8, max_bytes=2000, timeout=10)
    for ident, off8, length, more, t in frags:
        pkt = decode_ip(bytes(IP(src="127.0.0.5", dst="127.0.0.1", id=ident, flags=1 if more
                                 else 0, frag=off8) / (b"p" * length)))
        r.feed(pkt, NOW + t)
        assert r.held_fragments <= 8 and r.held_bytes <= 2000 and len(r) <= 8
