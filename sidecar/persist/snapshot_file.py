"""Full snapshot files: every contact of the store, chunked and checksummed.

Why chunks with their own CRC: a million contacts are ~130 MB; a bad sector or a torn copy
must be detected (and reported with its offset) before any of it reaches the store, and the
check should not need the whole file in memory.

Layout (format version 1, little-endian)::

    header  44 bytes  magic b"\\x89SCSNAP\\n"  8   (high bit + newline catch text-mode copies)
                      version u16               2   (SNAPSHOT_VERSION; newer is refused)
                      node_id u16               2   (node that wrote it; informational)
                      reserved u32              4   (0)
                      created_ms u64            8
                      log_seq u64               8   (the change log segment that starts at
                                                     this snapshot: replay seq >= log_seq)
                      record_count u64          8
                      crc32 u32                 4   (of the 40 bytes above)
    chunks  frames as in the change log: length u32 | crc32 u32 | msgpack array of records
            (at most CHUNK_RECORDS contact tuples each, model.py layout)
    end     one frame of length 0 and crc 0: the end marker; a file without it is truncated

The version is read right after the magic and checked before anything else, so a file from
a newer build is refused with a clear :class:`PersistError` ("version"), never misread.
Writing goes to ``<name>.tmp`` which is fsynced and then renamed (see durability.py), so a
crash leaves either the old set of snapshots or the new one, plus a temp file to ignore.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from zlib import crc32

import msgpack

from ..model import RECORD_LEN
from ..replication.wire import WireError, check_change
from .change_log import FRAME, MAX_FRAME, PersistError

SNAP_MAGIC = b"\x89SCSNAP\n"
SNAPSHOT_VERSION = 1
_HEAD = struct.Struct("<8sHHIQQQ")
_HEAD_CRC = struct.Struct("<I")
SNAP_HEADER_SIZE = _HEAD.size + _HEAD_CRC.size  # 44
CHUNK_RECORDS = 4096
END_MARKER = FRAME.pack(0, 0)


@dataclass(slots=True, frozen=True)
class SnapshotHeader:
    version: int
    node_id: int
    created_ms: int
    log_seq: int
    record_count: int


# ------------------------------------------------------------------ codec (sans-I/O)
def encode_snapshot_header(node_id: int, created_ms: int, log_seq: int,
                           record_count: int) -> bytes:
    head = _HEAD.pack(SNAP_MAGIC, SNAPSHOT_VERSION, node_id, 0, created_ms, log_seq,
                      record_count)
    return head + _HEAD_CRC.pack(crc32(head))


def decode_snapshot_header(data: bytes, where: str = "snapshot") -> SnapshotHeader:
    if len(data) < len(SNAP_MAGIC) + 2:
        raise PersistError("truncated", f"{where}: {len(data)} bytes is no snapshot header")
    if data[:8] != SNAP_MAGIC:
        raise PersistError("magic", f"{where}: not a contact snapshot (bad magic)")
    (version,) = struct.unpack_from("<H", data, 8)
    if version != SNAPSHOT_VERSION:
        raise PersistError("version", f"{where}: snapshot format version {version} is not "
                                      f"supported (this build reads version "
                                      f"{SNAPSHOT_VERSION}); refusing to guess its layout")
    if len(data) < SNAP_HEADER_SIZE:
        raise PersistError("truncated", f"{where}: header cut short")
    (stored,) = _HEAD_CRC.unpack_from(data, _HEAD.size)
    if crc32(data[:_HEAD.size]) != stored:
        raise PersistError("crc", f"{where}: header checksum mismatch")
    _, version, node_id, _, created_ms, log_seq, count = _HEAD.unpack_from(data)
    return SnapshotHeader(version, node_id, created_ms, log_seq, count)


def encode_chunks(records: list[tuple], chunk_records: int = CHUNK_RECORDS) -> Iterator[bytes]:
    """Framed chunks for *records*, followed by the end marker. A generator so the writer can
    yield to the event loop between chunks."""
    pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
    for i in range(0, len(records), chunk_records):
        payload = pack(records[i:i + chunk_records])
        yield FRAME.pack(len(payload), crc32(payload)) + payload
    yield END_MARKER


# ------------------------------------------------------------------ reader (thin I/O)
def read_snapshot(f: BinaryIO, where: str = "snapshot",
                  decode: bool = True) -> Iterator[SnapshotHeader | tuple]:
    """Yield the header, then each chunk's records (a tuple of contact tuples).

    Raises :class:`PersistError` at the first problem: bad magic, newer version, checksum
    mismatch (with the file offset), truncation, a record that is not a valid contact, or a
    record count that differs from the header. With ``decode=False`` only the framing and
    checksums are verified (fast pre-check before touching the store) and chunks are not
    yielded.
    """
    head = f.read(SNAP_HEADER_SIZE)
    header = decode_snapshot_header(head, where)
    yield header
    offset = SNAP_HEADER_SIZE
    seen = 0
    while True:
        fh = f.read(FRAME.size)
        if len(fh) < FRAME.size:
            raise PersistError("truncated", f"{where}: ends at offset {offset + len(fh)} "
                                            f"without the end marker")
        length, stored = FRAME.unpack(fh)
        if length == 0:
            if stored != 0:
                raise PersistError("crc", f"{where}: bad end marker at offset {offset}")
            break
        if length > MAX_FRAME:
            raise PersistError("length", f"{where}: impossible chunk length {length} at "
                                         f"offset {offset}")
        payload = f.read(length)
        if len(payload) < length:
            raise PersistError("truncated", f"{where}: chunk at offset {offset} cut short "
                                            f"({len(payload)} of {length} bytes)")
        if crc32(payload) != stored:
            raise PersistError("crc", f"{where}: chunk checksum mismatch at offset {offset}")
        if decode:
            records = _decode_chunk(payload, where, offset)
            seen += len(records)
            yield records
        else:
            seen += _count_chunk(payload, where, offset)
        offset += FRAME.size + length
    if f.read(1):
        raise PersistError("trailing", f"{where}: data after the end marker at offset "
                                       f"{offset + FRAME.size}")
    if seen != header.record_count:
        raise PersistError("count", f"{where}: header says {header.record_count} records, "
                                    f"file holds {seen}")


def _decode_chunk(payload: bytes, where: str, offset: int) -> tuple:
    try:
        records = msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise PersistError("malformed", f"{where}: chunk at offset {offset}: {exc}") from None
    if type(records) is not tuple:
        raise PersistError("malformed", f"{where}: chunk at offset {offset} is no array")
    try:
        for r in records:
            if check_change(r) != RECORD_LEN:
                raise WireError("bad_change", "not a contact record")
    except WireError as exc:
        raise PersistError("malformed", f"{where}: chunk at offset {offset}: {exc}") from None
    return records


def _count_chunk(payload: bytes, where: str, offset: int) -> int:
    """Number of records in a chunk without decoding them (msgpack array header only)."""
    first = payload[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(payload) >= 3:
        return int.from_bytes(payload[1:3], "big")
    if first == 0xDD and len(payload) >= 5:
        return int.from_bytes(payload[1:5], "big")
    raise PersistError("malformed", f"{where}: chunk at offset {offset} is no array")
