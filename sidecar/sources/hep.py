"""HEP version 3 (EEP) codec and TCP framer, sans-I/O.

Proxies (OpenSIPS ``proto_hep``/``tracer``, Kamailio ``siptrace``) can mirror every SIP message
they handle as HEP3 to a collector. The sidecar is such a collector: it reads the REGISTER
transactions out of the mirror instead of sniffing the wire, which also works with TLS and
without root. This module only turns bytes into :class:`HepPacket` and back; the UDP/TCP
listeners are thin adapters elsewhere.

Frame layout (all integers big-endian)::

    "HEP3" | u16 total length (including these 6 bytes) | chunk*
    chunk = u16 vendor id | u16 type id | u16 length (including this 6-byte header) | body

Generic chunks (vendor id 0) used here, as in the HEP3 specification (sipcapture/HEP)::

    1 IP family u8 (2 = IPv4, 10 = IPv6)      2 IP protocol u8 (17 UDP, 6 TCP, 132 SCTP)
    3/4 IPv4 src/dst (4 bytes)                5/6 IPv6 src/dst (16 bytes)
    7/8 src/dst port u16                      9/10 timestamp seconds / microseconds u32
    11 protocol type u8 (1 = SIP)             12 capture agent id u32 (u16 also accepted)
    14 auth key (string)                      15 payload    16 compressed payload (gzip/zlib)
    17 internal correlation id (string)

Chunks from other vendors and unknown generic types are skipped, so newer agents keep working.
If a chunk type repeats, the last one wins. Everything malformed raises :class:`HepError` (a
``ValueError``) and nothing else, because the input comes straight off the network.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"HEP3"
HEADER_LEN = 6  # magic + u16 total length
CHUNK_HEADER_LEN = 6  # vendor id + type id + length
MAX_FRAME = 0xFFFF  # the total-length field is 16 bits

FAMILY_IPV4 = 2
FAMILY_IPV6 = 10
PROTO_UDP = 17
PROTO_TCP = 6
PROTO_TYPE_SIP = 1

# generic chunk type ids
CHUNK_FAMILY = 1
CHUNK_IP_PROTO = 2
CHUNK_SRC_IPV4 = 3
CHUNK_DST_IPV4 = 4
CHUNK_SRC_IPV6 = 5
CHUNK_DST_IPV6 = 6
CHUNK_SRC_PORT = 7
CHUNK_DST_PORT = 8
CHUNK_TS_SEC = 9
CHUNK_TS_USEC = 10
CHUNK_PROTO_TYPE = 11
CHUNK_CAPTURE_ID = 12
CHUNK_AUTH_KEY = 14
CHUNK_PAYLOAD = 15
CHUNK_COMPRESSED_PAYLOAD = 16
CHUNK_CORRELATION_ID = 17

_HEADER = struct.Struct("!4sH")
_CHUNK_HEADER = struct.Struct("!HHH")

# Integer chunks and the body sizes they may have. Capture id was 16 bits in older agents.
_INT_CHUNK_SIZES: dict[int, tuple[int, ...]] = {
    CHUNK_FAMILY: (1,),
    CHUNK_IP_PROTO: (1,),
    CHUNK_SRC_PORT: (2,),
    CHUNK_DST_PORT: (2,),
    CHUNK_TS_SEC: (4,),
    CHUNK_TS_USEC: (4,),
    CHUNK_PROTO_TYPE: (1,),
    CHUNK_CAPTURE_ID: (4, 2),
}
_MANDATORY = (
    (CHUNK_FAMILY, "IP family"),
    (CHUNK_IP_PROTO, "IP protocol"),
    (CHUNK_SRC_PORT, "source port"),
    (CHUNK_DST_PORT, "destination port"),
    (CHUNK_TS_SEC, "timestamp"),
    (CHUNK_PROTO_TYPE, "protocol type"),
)


class HepError(ValueError):
    """A HEP frame that cannot be decoded (or a packet that cannot be encoded)."""


@dataclass(slots=True)
class HepPacket:
    """One captured message plus where and when it was seen.

    ``ts`` is float seconds since the UNIX epoch (seconds + microseconds chunks). ``auth_key``
    and ``correlation_id`` are ``None`` when the agent did not send them.
    """

    family: int
    proto: int
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    ts: float
    proto_type: int
    capture_id: int
    auth_key: str | None
    payload: bytes
    correlation_id: str | None = None


def decode_hep(data: bytes, max_size: int = MAX_FRAME) -> HepPacket:
    """Decode one complete HEP3 frame (a UDP datagram, or a frame from :class:`HepStreamFramer`).

    ``max_size`` caps both the frame and a decompressed payload, so a small compressed chunk
    cannot expand into a memory bomb.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise HepError("HEP frame must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise HepError(f"HEP frame of {len(data)} bytes exceeds the {max_size}-byte limit")
    if len(data) < HEADER_LEN:
        raise HepError("HEP frame shorter than its 6-byte header")
    magic, total = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise HepError(f"not a HEP3 frame (magic {magic!r})")
    if total != len(data):
        raise HepError(f"HEP3 length field says {total} bytes, frame has {len(data)}")
    ints, blobs = _read_chunks(data)
    return _build_packet(ints, blobs, max_size)


def _read_chunks(data: bytes) -> tuple[dict[int, int], dict[int, bytes]]:
    """Split the frame into generic integer chunks and byte chunks, skipping unknown ones."""
    ints: dict[int, int] = {}
    blobs: dict[int, bytes] = {}
    pos = HEADER_LEN
    end = len(data)
    while pos < end:
        if end - pos < CHUNK_HEADER_LEN:
            raise HepError(f"truncated chunk header at offset {pos}")
        vendor, ctype, clen = _CHUNK_HEADER.unpack_from(data, pos)
        if clen < CHUNK_HEADER_LEN:
            raise HepError(f"chunk {vendor}:{ctype} at offset {pos} has length {clen} < 6")
        if pos + clen > end:
            raise HepError(f"chunk {vendor}:{ctype} at offset {pos} runs past the frame end")
        body = data[pos + CHUNK_HEADER_LEN : pos + clen]
        pos += clen
        if vendor != 0:
            continue  # vendor-specific chunk: not ours to interpret
        sizes = _INT_CHUNK_SIZES.get(ctype)
        if sizes is not None:
            if len(body) not in sizes:
                raise HepError(f"chunk type {ctype} has a {len(body)}-byte body, want {sizes}")
            ints[ctype] = int.from_bytes(body, "big")
        else:
            blobs[ctype] = body
    return ints, blobs


def _build_packet(ints: dict[int, int], blobs: dict[int, bytes], max_size: int) -> HepPacket:
    for ctype, what in _MANDATORY:
        if ctype not in ints:
            raise HepError(f"HEP3 frame lacks the {what} chunk")
    family = ints[CHUNK_FAMILY]
    if family == FAMILY_IPV4:
        src_ip = _address(blobs, CHUNK_SRC_IPV4, 4, "source IPv4")
        dst_ip = _address(blobs, CHUNK_DST_IPV4, 4, "destination IPv4")
    elif family == FAMILY_IPV6:
        src_ip = _address(blobs, CHUNK_SRC_IPV6, 16, "source IPv6")
        dst_ip = _address(blobs, CHUNK_DST_IPV6, 16, "destination IPv6")
    else:
        raise HepError(f"unsupported IP family {family}")
    if CHUNK_PAYLOAD in blobs:
        payload = blobs[CHUNK_PAYLOAD]
    elif CHUNK_COMPRESSED_PAYLOAD in blobs:
        payload = _decompress(blobs[CHUNK_COMPRESSED_PAYLOAD], max_size)
    else:
        raise HepError("HEP3 frame lacks a payload chunk")
    usec = ints.get(CHUNK_TS_USEC, 0)
    if usec >= 1_000_000:
        raise HepError(f"timestamp microseconds {usec} out of range")
    return HepPacket(
        family=family,
        proto=ints[CHUNK_IP_PROTO],
        src_ip=src_ip,
        dst_ip=dst_ip,
        src_port=ints[CHUNK_SRC_PORT],
        dst_port=ints[CHUNK_DST_PORT],
        ts=ints[CHUNK_TS_SEC] + usec / 1_000_000,
        proto_type=ints[CHUNK_PROTO_TYPE],
        capture_id=ints.get(CHUNK_CAPTURE_ID, 0),
        auth_key=_text(blobs, CHUNK_AUTH_KEY, "auth key"),
        payload=payload,
        correlation_id=_text(blobs, CHUNK_CORRELATION_ID, "correlation id"),
    )


def _address(blobs: dict[int, bytes], ctype: int, size: int, what: str) -> str:
    raw = blobs.get(ctype)
    if raw is None:
        raise HepError(f"HEP3 frame lacks the {what} address chunk")
    if len(raw) != size:
        raise HepError(f"{what} address chunk has {len(raw)} bytes, want {size}")
    if size == 4:  # dotted quad, as ipaddress writes it, at a fifth of the cost
        return socket.inet_ntop(socket.AF_INET, raw)
    return str(ipaddress.IPv6Address(raw))


def _text(blobs: dict[int, bytes], ctype: int, what: str) -> str | None:
    """String chunk; C agents sometimes include the terminating NUL, which is dropped."""
    raw = blobs.get(ctype)
    if raw is None:
        return None
    try:
        return raw.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise HepError(f"{what} chunk is not UTF-8") from None


def _decompress(blob: bytes, max_size: int) -> bytes:
    """Inflate a gzip or zlib payload (auto-detected), refusing output beyond ``max_size``."""
    inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(blob, max_size + 1)
    except zlib.error as exc:
        raise HepError(f"compressed payload is corrupt: {exc}") from None
    if len(out) > max_size:
        raise HepError(f"compressed payload inflates beyond {max_size} bytes")
    if not inflater.eof:
        raise HepError("compressed payload is truncated")
    if inflater.unused_data:
        raise HepError("trailing bytes after the compressed payload")
    return out


def encode_hep(pkt: HepPacket, *, compress: bool = False) -> bytes:
    """Encode ``pkt`` as one HEP3 frame (``compress`` sends the payload as a zlib chunk 16)."""
    try:
        if pkt.family == FAMILY_IPV4:
            src_type, dst_type = CHUNK_SRC_IPV4, CHUNK_DST_IPV4
            src = ipaddress.IPv4Address(pkt.src_ip).packed
            dst = ipaddress.IPv4Address(pkt.dst_ip).packed
        elif pkt.family == FAMILY_IPV6:
            src_type, dst_type = CHUNK_SRC_IPV6, CHUNK_DST_IPV6
            src = ipaddress.IPv6Address(pkt.src_ip).packed
            dst = ipaddress.IPv6Address(pkt.dst_ip).packed
        else:
            raise HepError(f"unsupported IP family {pkt.family}")
        sec = int(pkt.ts)
        usec = min(round((pkt.ts - sec) * 1_000_000), 999_999)
        chunks = [
            _chunk(CHUNK_FAMILY, pkt.family.to_bytes(1, "big")),
            _chunk(CHUNK_IP_PROTO, pkt.proto.to_bytes(1, "big")),
            _chunk(src_type, src),
            _chunk(dst_type, dst),
            _chunk(CHUNK_SRC_PORT, pkt.src_port.to_bytes(2, "big")),
            _chunk(CHUNK_DST_PORT, pkt.dst_port.to_bytes(2, "big")),
            _chunk(CHUNK_TS_SEC, sec.to_bytes(4, "big")),
            _chunk(CHUNK_TS_USEC, usec.to_bytes(4, "big")),
            _chunk(CHUNK_PROTO_TYPE, pkt.proto_type.to_bytes(1, "big")),
            _chunk(CHUNK_CAPTURE_ID, pkt.capture_id.to_bytes(4, "big")),
        ]
        if pkt.auth_key is not None:
            chunks.append(_chunk(CHUNK_AUTH_KEY, pkt.auth_key.encode("utf-8")))
        if pkt.correlation_id is not None:
            chunks.append(_chunk(CHUNK_CORRELATION_ID, pkt.correlation_id.encode("utf-8")))
        if compress:
            chunks.append(_chunk(CHUNK_COMPRESSED_PAYLOAD, zlib.compress(bytes(pkt.payload))))
        else:
            chunks.append(_chunk(CHUNK_PAYLOAD, bytes(pkt.payload)))
    except (ValueError, OverflowError, TypeError, AttributeError) as exc:
        if isinstance(exc, HepError):
            raise
        raise HepError(f"cannot encode HEP packet: {exc}") from None
    body = b"".join(chunks)
    total = HEADER_LEN + len(body)
    if total > MAX_FRAME:
        raise HepError(f"HEP3 frame would be {total} bytes, over the 16-bit length field")
    return _HEADER.pack(MAGIC, total) + body


def _chunk(ctype: int, body: bytes, vendor: int = 0) -> bytes:
    length = CHUNK_HEADER_LEN + len(body)
    if length > MAX_FRAME:
        raise HepError(f"chunk type {ctype} too large ({length} bytes)")
    return _CHUNK_HEADER.pack(vendor, ctype, length) + body


def check_auth(pkt: HepPacket, expected_key: str | None) -> bool:
    """True when the packet may be accepted: no key configured, or the agent's key matches.

    Constant-time comparison, so the key cannot be guessed byte by byte from response timing.
    """
    if expected_key is None:
        return True
    if pkt.auth_key is None:
        return False
    return hmac.compare_digest(pkt.auth_key.encode("utf-8"), expected_key.encode("utf-8"))


class HepStreamFramer:
    """Cuts a HEP3-over-TCP byte stream into frames using each frame's total-length field.

    ``feed`` returns the complete frames (undecoded bytes; pass each to :func:`decode_hep`).
    At most one partial frame is kept, and a frame cannot exceed ``max_frame`` bytes, so the
    buffer stays bounded whatever the peer sends. There is no way to resynchronise inside a
    stream without delimiters, so garbage (bad magic, impossible length) raises
    :class:`HepError` and every later ``feed`` raises again: the caller drops the connection.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if not HEADER_LEN <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be {HEADER_LEN}..{MAX_FRAME}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: HepError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame waiting for more data."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        pos = 0
        try:
            while True:
                avail = len(buf) - pos
                if avail == 0:
                    break
                head = bytes(buf[pos : pos + 4])
                if not MAGIC.startswith(head):
                    raise HepError(f"HEP3 stream out of sync at {head!r}")
                if avail < HEADER_LEN:
                    break
                total = int.from_bytes(buf[pos + 4 : pos + 6], "big")
                if total < HEADER_LEN or total > self.max_frame:
                    raise HepError(
                        f"HEP3 frame length {total} outside {HEADER_LEN}..{self.max_frame}"
                    )
                if avail < total:
                    break
                frames.append(bytes(buf[pos : pos + total]))
                pos += total
        except HepError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        del buf[:pos]
        return frames
