"""Append-only change log segments: checksummed framing, a buffered writer and a scanner.

Why a log next to the snapshot: a full snapshot of a million contacts takes about a second to
write, so it runs every few minutes; the log carries every change in between, cheaply, so a
cold start loses at most what the fsync policy allows (DESIGN §8).

Segment file layout (format version 1, all integers little-endian)::

    header  32 bytes  magic  b"\\x89SCCLOG\\n"   8   (high bit + newline catch text-mode copies)
                      version u16                  2   (LOG_VERSION; a newer one is refused)
                      node_id u16                  2   (informational: who wrote it)
                      seq u64                      8   (segment number, strictly increasing)
                      created_ms u64               8
                      crc32 u32                    4   (zlib.crc32 of the 28 bytes above)
    frames  repeated: length u32 | crc32 u32 (of payload) | payload (msgpack)

A payload is one change exactly as the replication wire carries it (``sidecar.model``): an
18-item contact tuple for a PUT (refreshes are logged as the full record they produced) or the
6-item ``(aor, bid, callid, cseq, last_modified, handle)`` for a DELETE.

Reading is sans-I/O: :func:`scan_frames` takes bytes and returns the good payloads plus, if the
data does not end cleanly, a :class:`Damage` saying where and how much was dropped. A frame is
checked by its CRC before it is decoded, so a torn write (crash mid-append) or a flipped byte
stops replay at the last good record instead of feeding garbage to the store.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from zlib import crc32

import msgpack

LOG_MAGIC = b"\x89SCCLOG\n"
LOG_VERSION = 1
_LOG_HEAD = struct.Struct("<8sHHQQ")
_LOG_HEAD_CRC = struct.Struct("<I")
LOG_HEADER_SIZE = _LOG_HEAD.size + _LOG_HEAD_CRC.size  # 32

FRAME = struct.Struct("<II")  # length, crc32(payload)
MAX_FRAME = 16 << 20  # a frame claiming more is corrupt (a contact is well under 64 KiB)


class PersistError(ValueError):
    """A snapshot or log file that cannot be used: foreign, newer format, corrupt, or an
    I/O failure. ``reason`` is a short label for metrics and reports ("version", "magic",
    "crc", "truncated", "io", ...); the message says which file and where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True, frozen=True)
class LogHeader:
    version: int
    node_id: int
    seq: int
    created_ms: int


@dataclass(slots=True, frozen=True)
class Damage:
    """Where a file stopped being readable and what that cost.

    ``kind`` is "truncated" (the data ends inside a frame: a torn last write), "crc" (a
    complete frame whose checksum does not match: corruption) or "length" (a frame header with
    an impossible length). ``records_dropped`` is a lower bound for "crc"/"length": frames after
    the damage that still look intact are counted, the damaged one is counted as one.
    """

    path: str
    offset: int  # file offset of the first byte not replayed
    kind: str
    bytes_dropped: int
    records_dropped: int
    detail: str = ""


# ------------------------------------------------------------------ header codec (sans-I/O)
def encode_log_header(node_id: int, seq: int, created_ms: int) -> bytes:
    head = _LOG_HEAD.pack(LOG_MAGIC, LOG_VERSION, node_id, seq, created_ms)
    return head + _LOG_HEAD_CRC.pack(crc32(head))


def decode_log_header(data: bytes, where: str = "log") -> LogHeader:
    """Parse a segment header; raises :class:`PersistError` for anything but version 1."""
    if len(data) < len(LOG_MAGIC) + 2:
        raise PersistError("truncated", f"{where}: {len(data)} bytes is no log header")
    if data[:8] != LOG_MAGIC:
        raise PersistError("magic", f"{where}: not a change log segment (bad magic)")
    (version,) = struct.unpack_from("<H", data, 8)
    if version != LOG_VERSION:
        raise PersistError("version", f"{where}: log format version {version} is not "
                                      f"supported (this build reads version {LOG_VERSION})")
    if len(data) < LOG_HEADER_SIZE:
        raise PersistError("truncated", f"{where}: header cut short")
    (stored,) = _LOG_HEAD_CRC.unpack_from(data, _LOG_HEAD.size)
    if crc32(data[:_LOG_HEAD.size]) != stored:
        raise PersistError("crc", f"{where}: header checksum mismatch")
    _, version, node_id, seq, created_ms = _LOG_HEAD.unpack_from(data)
    return LogHeader(version, node_id, seq, created_ms)


# ------------------------------------------------------------------ frames (sans-I/O)
def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), crc32(payload)) + payload


def scan_frames(data: bytes | memoryview, base_offset: int = 0,
                path: str = "") -> tuple[list[bytes], Damage | None]:
    """Split *data* into verified payloads, stopping at the first bad or incomplete frame.

    ``base_offset`` is the file offset of ``data[0]`` so the damage report names real file
    positions. Never raises: every malformed input ends in a :class:`Damage`.
    """
    view = memoryview(data)
    end = len(view)
    pos = 0
    out: list[bytes] = []
    unpack_from = FRAME.unpack_from
    while pos < end:
        if end - pos < FRAME.size:
            return out, Damage(path, base_offset + pos, "truncated", end - pos, 1,
                               "frame header cut short")
        length, stored = unpack_from(view, pos)
        if length == 0 or length > MAX_FRAME:
            return out, Damage(path, base_offset + pos, "length", end - pos,
                               1 + _count_intact(view, pos + FRAME.size),
                               f"impossible frame length {length}")
        stop = pos + FRAME.size + length
        if stop > end:
            return out, Damage(path, base_offset + pos, "truncated", end - pos, 1,
                               f"frame of {length} bytes, {end - pos - FRAME.size} present")
        payload = view[pos + FRAME.size:stop]
        if crc32(payload) != stored:
            return out, Damage(path, base_offset + pos, "crc", end - pos,
                               1 + _count_intact(view, stop), "frame checksum mismatch")
        out.append(payload.tobytes())
        pos = stop
    return out, None


def _count_intact(view: memoryview, pos: int) -> int:
    """Best-effort count of intact frames from *pos* on (for the damage report only)."""
    n = 0
    end = len(view)
    while end - pos >= FRAME.size:
        length, stored = FRAME.unpack_from(view, pos)
        stop = pos + FRAME.size + length
        if length == 0 or length > MAX_FRAME or stop > end:
            break
        if crc32(view[pos + FRAME.size:stop]) != stored:
            break
        n += 1
        pos = stop
    return n


def decode_change(payload: bytes) -> object:
    """msgpack -> the change tuple (or raise PersistError; the caller validates the shape)."""
    try:
        return msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise PersistError("malformed", f"undecodable change: {exc}") from None


# ------------------------------------------------------------------ writer (thin I/O)
class ChangeLogWriter:
    """Appends framed changes to one segment through an in-memory buffer.

    ``append`` only packs into a bytearray (a few microseconds), so the store's hot path is
    not slowed by system calls; :meth:`write_out` hands the buffer to the OS and :meth:`sync`
    makes it durable. *When* to call them is the fsync policy, which the owner
    (:class:`~sidecar.persist.durability.Durability`) decides.
    """

    def __init__(self, path: Path, node_id: int, seq: int, created_ms: int,
                 buffer_limit: int = 4 << 20) -> None:
        self.path = path
        self.seq = seq
        self.buffer_limit = buffer_limit
        self.appended = 0  # changes appended since open
        self.pending_changes = 0  # appended but not yet handed to the OS
        self.bytes_written = LOG_HEADER_SIZE
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._buf = bytearray()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
            os.write(self._fd, encode_log_header(node_id, seq, created_ms))
        except OSError as exc:
            raise PersistError("io", f"cannot create log segment {path}: {exc}") from None
        self._dirty = True  # header not yet fsynced

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def append(self, change: tuple) -> None:
        payload = self._pack(change)
        buf = self._buf
        buf += FRAME.pack(len(payload), crc32(payload))
        buf += payload
        self.appended += 1
        self.pending_changes += 1
        if len(buf) >= self.buffer_limit:
            self.write_out()

    def write_out(self) -> None:
        """Give buffered frames to the OS (survives a process crash, not a power cut)."""
        if not self._buf:
            return
        data = self._buf
        try:
            written = 0
            view = memoryview(data)
            while written < len(data):
                written += os.write(self._fd, view[written:])
            view.release()
        except OSError as exc:
            raise PersistError("io", f"cannot append to {self.path}: {exc}") from None
        self.bytes_written += len(data)
        self._buf = bytearray()
        self.pending_changes = 0
        self._dirty = True

    def sync(self) -> None:
        """write_out + fsync: everything appended so far survives a power cut."""
        self.write_out()
        if self._dirty:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise PersistError("io", f"cannot fsync {self.path}: {exc}") from None
            self._dirty = False

    def close(self, sync: bool = True, discard: bool = False) -> None:
        """Close the segment; ``discard`` drops the buffer (after a failed write)."""
        if self._fd < 0:
            return
        try:
            if discard:
                self._buf = bytearray()
            elif sync:
                self.sync()
            else:
                self.write_out()
        finally:
            os.close(self._fd)
            self._fd = -1
