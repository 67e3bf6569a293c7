"""HEP3 codec and TCP framer: hand-built frames, round trips, every error path, fuzzing."""

from __future__ import annotations

import contextlib
import gzip
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.sources.hep import (
    FAMILY_IPV4,
    FAMILY_IPV6,
    MAX_FRAME,
    PROTO_TCP,
    PROTO_TYPE_SIP,
    PROTO_UDP,
    HepError,
    HepPacket,
    HepStreamFramer,
    check_auth,
    decode_hep,
    encode_hep,
)

REGISTER = (
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bK-1\r\n"
    b"From: <sip:bob@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>\r\n"
    b"Call-ID: bob-cid-1@test\r\nCSeq: 1 REGISTER\r\n"
    b"Contact: <sip:bob@127.0.0.9:5070>\r\nExpires: 120\r\nContent-Length: 0\r\n\r\n"
)


def chunk(ctype: int, body: bytes, vendor: int = 0) -> bytes:
    return struct.pack("!HHH", vendor, ctype, 6 + len(body)) + body


def frame(*chunks: bytes) -> bytes:
    body = b"".join(chunks)
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


def v4_chunks(payload_chunk: bytes | None = None, *, skip: tuple[int, ...] = ()) -> list[bytes]:
    """Chunks of a typical OpenSIPS/Kamailio frame, written out by hand (not via encode_hep)."""
    parts = {
        1: chunk(1, b"\x02"),
        2: chunk(2, b"\x11"),
        3: chunk(3, bytes([127, 0, 0, 9])),
        4: chunk(4, bytes([127, 0, 0, 1])),
        7: chunk(7, struct.pack("!H", 5070)),
        8: chunk(8, struct.pack("!H", 5060)),
        9: chunk(9, struct.pack("!I", 1_795_389_736)),
        10: chunk(10, struct.pack("!I", 250_000)),
        11: chunk(11, b"\x01"),
        12: chunk(12, struct.pack("!I", 2001)),
        15: payload_chunk if payload_chunk is not None else chunk(15, REGISTER),
    }
    return [c for t, c in parts.items() if t not in skip]


def sample_packet(**changes: object) -> HepPacket:
    pkt = HepPacket(
        family=FAMILY_IPV4, proto=PROTO_UDP, src_ip="127.0.0.9", dst_ip="127.0.0.1",
        src_port=5070, dst_port=5060, ts=1_795_389_736.25, proto_type=PROTO_TYPE_SIP,
        capture_id=2001, auth_key=None, payload=REGISTER, correlation_id=None,
    )
    for name, value in changes.items():
        setattr(pkt, name, value)
    return pkt


# --- decoding hand-built frames -----------------------------------------------------------------


def test_decode_hand_built_ipv4_frame() -> None:
    pkt = decode_hep(frame(*v4_chunks()))
    assert pkt == sample_packet()
    assert pkt.ts == 1_795_389_736.25


def test_decode_ipv6_with_auth_key_correlation_and_extra_chunks() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    data = frame(
        chunk(1, b"\x0a"), chunk(2, b"\x06"),
        chunk(5, src), chunk(6, dst),
        chunk(0x1234, b"vendor stuff", vendor=0x0003),  # vendor chunk: skipped
        chunk(7, struct.pack("!H", 40000)), chunk(8, struct.pack("!H", 5061)),
        chunk(9, struct.pack("!I", 1_700_000_000)),
        chunk(11, b"\x01"),
        chunk(12, struct.pack("!H", 7)),  # 16-bit capture id from an old agent
        chunk(14, b"s3cret\x00"),  # C agents may send the terminating NUL
        chunk(17, b"bob-cid-1@test"),
        chunk(99, b"future generic chunk"),  # unknown generic type: skipped
        chunk(15, REGISTER),
    )
    pkt = decode_hep(data)
    assert (pkt.family, pkt.proto) == (FAMILY_IPV6, PROTO_TCP)
    assert (pkt.src_ip, pkt.dst_ip) == ("2001:db8::1", "2001:db8::2")
    assert (pkt.src_port, pkt.dst_port) == (40000, 5061)
    assert pkt.ts == 1_700_000_000.0  # microseconds chunk is optional
    assert pkt.capture_id == 7
    assert pkt.auth_key == "s3cret"
    assert pkt.correlation_id == "bob-cid-1@test"
    assert pkt.payload == REGISTER


@pytest.mark.parametrize("compress", [gzip.compress, zlib.compress], ids=["gzip", "zlib"])
def test_decode_compressed_payload(compress) -> None:
    pkt = decode_hep(frame(*v4_chunks(chunk(16, compress(REGISTER)))))
    assert pkt.payload == REGISTER


def test_decompressed_size_is_capped() -> None:
    bomb = zlib.compress(b"\x00" * 1_000_000, 9)
    data = frame(*v4_chunks(chunk(16, bomb)))
    assert len(data) < 2000
    with pytest.raises(HepError, match="inflates beyond"):
        decode_hep(data)
    # the same cap applies with a caller-chosen limit
    payload = REGISTER * 8  # repetitive, so the frame is much smaller than the payload
    small = frame(*v4_chunks(chunk(16, zlib.compress(payload))))
    assert len(small) < len(payload)
    with pytest.raises(HepError, match="inflates beyond"):
        decode_hep(small, max_size=len(payload) - 1)
    assert decode_hep(small, max_size=len(payload)).payload == payload


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"not compressed at all", "corrupt"),
        (zlib.compress(REGISTER)[:-6], "truncated"),
        (zlib.compress(REGISTER) + b"junk", "trailing"),
    ],
)
def test_bad_compressed_payload(blob: bytes, message: str) -> None:
    with pytest.raises(HepError, match=message):
        decode_hep(frame(*v4_chunks(chunk(16, blob))))


# --- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_ipv4(compress: bool) -> None:
    pkt = sample_packet(auth_key="key", correlation_id="corr-1")
    assert decode_hep(encode_hep(pkt, compress=compress)) == pkt


def test_round_trip_ipv6() -> None:
    pkt = sample_packet(family=FAMILY_IPV6, src_ip="::1", dst_ip="fe80::1", proto=PROTO_TCP)
    assert decode_hep(encode_hep(pkt)) == pkt


def test_encode_matches_hand_built_frame() -> None:
    pkt = sample_packet()
    assert encode_hep(pkt) == frame(*v4_chunks())


@pytest.mark.parametrize(
    "changes",
    [
        {"family": 99},
        {"src_ip": "not-an-ip"},
        {"family": FAMILY_IPV6},  # IPv4 addresses with the IPv6 family
        {"src_port": 70000},
        {"proto": -1},
        {"payload": b"x" * MAX_FRAME},
    ],
)
def test_encode_rejects_unrepresentable_packets(changes: dict) -> None:
    with pytest.raises(HepError):
        encode_hep(sample_packet(**changes))


# --- malformed frames -------------------------------------------------------------------------


def test_bad_magic() -> None:
    data = bytearray(frame(*v4_chunks()))
    data[3:4] = b"2"
    with pytest.raises(HepError, match="magic"):
        decode_hep(bytes(data))


def test_length_field_mismatch() -> None:
    data = frame(*v4_chunks())
    with pytest.raises(HepError, match="length field"):
        decode_hep(data + b"\x00")
    with pytest.raises(HepError, match="length field"):
        decode_hep(data[:-1])


@pytest.mark.parametrize("data", [b"", b"HEP", b"HEP3\x00"])
def test_shorter_than_header(data: bytes) -> None:
    with pytest.raises(HepError, match="header"):
        decode_hep(data)


def test_truncated_chunk_header() -> None:
    with pytest.raises(HepError, match="truncated chunk header"):
        decode_hep(frame(*v4_chunks(), b"\x00\x00\x00"))


def test_chunk_length_below_six() -> None:
    with pytest.raises(HepError, match="< 6"):
        decode_hep(frame(*v4_chunks(), struct.pack("!HHH", 0, 15, 5)))


def test_chunk_running_past_frame_end() -> None:
    with pytest.raises(HepError, match="past the frame end"):
        decode_hep(frame(*v4_chunks(), struct.pack("!HHH", 0, 15, 60) + b"abc"))


@pytest.mark.parametrize("missing", [1, 2, 3, 4, 7, 8, 9, 11, 15])
def test_missing_mandatory_chunk(missing: int) -> None:
    with pytest.raises(HepError, match="lacks"):
        decode_hep(frame(*v4_chunks(skip=(missing,))))


@pytest.mark.parametrize(
    "bad_chunk",
    [
        chunk(3, b"\x7f\x00\x00"),  # 3-byte IPv4 address
        chunk(7, b"\x13"),  # 1-byte port
        chunk(1, b"\x00\x02"),  # 2-byte family
        chunk(10, struct.pack("!I", 1_000_000)),  # microseconds out of range
        chunk(14, b"\xff\xfe"),  # auth key not UTF-8
    ],
)
def test_ill_typed_chunks(bad_chunk: bytes) -> None:
    with pytest.raises(HepError):
        decode_hep(frame(*v4_chunks(), bad_chunk))


def test_unsupported_family() -> None:
    with pytest.raises(HepError, match="family"):
        decode_hep(frame(chunk(1, b"\x07"), *v4_chunks(skip=(1,))))


def test_oversize_frame() -> None:
    data = frame(*v4_chunks())
    with pytest.raises(HepError, match="exceeds"):
        decode_hep(data, max_size=len(data) - 1)


def test_non_bytes_input() -> None:
    with pytest.raises(HepError):
        decode_hep("HEP3")  # type: ignore[arg-type]


# --- auth ------------------------------------------------------------------------------------


def test_check_auth() -> None:
    assert check_auth(sample_packet(), None)
    assert check_auth(sample_packet(auth_key="anything"), None)
    assert check_auth(sample_packet(auth_key="s3cret"), "s3cret")
    assert not check_auth(sample_packet(auth_key="wrong"), "s3cret")
    assert not check_auth(sample_packet(auth_key=None), "s3cret")
    assert not check_auth(sample_packet(auth_key=""), "s3cret")


# --- TCP framing -----------------------------------------------------------------------------


def three_frames() -> list[bytes]:
    return [
        encode_hep(sample_packet()),
        encode_hep(sample_packet(payload=b"OPTIONS x SIP/2.0\r\n\r\n", src_port=1)),
        encode_hep(sample_packet(payload=b"", src_port=2)),
    ]


def test_framer_returns_frames_fed_together() -> None:
    frames = three_frames()
    framer = HepStreamFramer()
    assert framer.feed(b"".join(frames)) == frames
    assert framer.buffered == 0


def test_framer_every_split_point() -> None:
    frames = three_frames()
    stream = b"".join(frames)
    for cut in range(len(stream) + 1):
        framer = HepStreamFramer()
        got = framer.feed(stream[:cut]) + framer.feed(stream[cut:])
        assert got == frames, cut


def test_framer_byte_by_byte() -> None:
    frames = three_frames()
    framer = HepStreamFramer()
    got: list[bytes] = []
    for byte in b"".join(frames):
        got += framer.feed(bytes([byte]))
    assert got == frames
    assert [decode_hep(f).src_port for f in got] == [5070, 1, 2]


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n",  # wrong protocol: caught on the first byte
        b"HEX",  # caught before the magic is complete
        b"HEP3\x00\x03",  # total length below the header size
        b"HEP2\x00\x20",
    ],
)
def test_framer_rejects_garbage_and_stays_failed(garbage: bytes) -> None:
    framer = HepStreamFramer()
    with pytest.raises(HepError):
        framer.feed(garbage)
    with pytest.raises(HepError):
        framer.feed(three_frames()[0])  # the stream cannot be trusted any more
    assert framer.buffered == 0


def test_framer_garbage_after_good_frame() -> None:
    framer = HepStreamFramer()
    good = three_frames()[0]
    assert framer.feed(good) == [good]
    with pytest.raises(HepError, match="out of sync"):
        framer.feed(b"\r\n\r\n")


def test_framer_frame_size_cap() -> None:
    framer = HepStreamFramer(max_frame=100)
    with pytest.raises(HepError, match="outside"):
        framer.feed(b"HEP3\x00\x65")  # 101 bytes announced
    framer = HepStreamFramer(max_frame=100)
    assert framer.feed(b"HEP3\x00\x64" + b"\x00" * 50) == []
    assert framer.buffered == 56


def test_framer_bad_cap_configuration() -> None:
    with pytest.raises(ValueError):
        HepStreamFramer(max_frame=MAX_FRAME + 1)


# --- fuzzing ---------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        pkt = decode_hep(data)
    except HepError:
        return
    assert isinstance(pkt.payload, bytes)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_behind_magic(tail: bytes) -> None:
    data = b"HEP3" + struct.pack("!H", 6 + len(tail)) + tail
    try:
        pkt = decode_hep(data)
    except HepError:
        return
    assert pkt.family in (FAMILY_IPV4, FAMILY_IPV6)


_VALID = [
    frame(*v4_chunks()),
    frame(*v4_chunks(chunk(16, zlib.compress(REGISTER)))),
    encode_hep(sample_packet(family=FAMILY_IPV6, src_ip="::1", dst_ip="::2", auth_key="k")),
]


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 2000),
    st.booleans(),
)
def test_fuzz_mutated_valid_frames(base: bytes, flips: list, cut: int, fix_length: bool) -> None:
    data = bytearray(base)
    for offset, value in flips:
        data[offset % len(data)] = value
    data = data[: max(cut, 6)]
    if fix_length:  # keep the outer length right so the chunk parser gets exercised
        data[4:6] = struct.pack("!H", len(data))
    try:
        pkt = decode_hep(bytes(data))
    except HepError:
        return
    assert 0 <= pkt.src_port <= 0xFFFF and 0 <= pkt.dst_port <= 0xFFFF


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_framer(pieces: list[bytes]) -> None:
    framer = HepStreamFramer()
    stream = _VALID[0] + b"".join(pieces)
    got: list[bytes] = []
    try:
        for piece in (stream[:10], stream[10:]):
            got += framer.feed(piece)
    except HepError:
        return
    assert b"".join(got) + stream[len(stream) - framer.buffered :] == stream
    for f in got:
        with contextlib.suppress(HepError):
            decode_hep(f)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=4, max_size=4))
def test_ipv4_address_text_is_what_ipaddress_writes(raw: bytes) -> None:
    import ipaddress

    from sidecar.sources.hep import _address

    assert _address({1: raw}, 1, 4, "source IPv4") == str(ipaddress.IPv4Address(raw))
