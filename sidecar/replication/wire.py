"""Sans-I/O codec for the replication protocol (proto/PROTOCOL.md is the normative text).

Every ZeroMQ message is two frames: a short ASCII *kind* frame and one msgpack payload whose
first element is the protocol version. Payloads are positional arrays: smaller and faster than
maps, which matters at hundreds of thousands of changes per second.

Nothing here touches a socket; the asyncio adapters in publisher.py / subscriber.py call these
functions with bytes and get Python values (or :class:`WireError`) back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..model import DELETE_LEN, RECORD_LEN, REFRESH_LEN

VERSION = 1
"""Major protocol version. A receiver rejects any other major; newer minor revisions may only
append trailing array elements, which older receivers ignore."""

MAX_MESSAGE = 64 << 20  # also set as ZMQ_MAXMSGSIZE on every socket

# kind frames
BATCH = b"B"  # PUB: a batch of changes
HEARTBEAT = b"H"  # PUB: liveness + latest sequence number
SYNC = b"SYNC"  # DEALER -> ROUTER: catch-up request
REPLAY = b"REPLAY"  # ROUTER -> DEALER: a past batch from the ring (same payload as BATCH)
SNAP = b"SNAP"  # ROUTER -> DEALER: a chunk of a snapshot
END = b"END"  # ROUTER -> DEALER: catch-up finished
ERROR = b"ERR"  # ROUTER -> DEALER: request refused

MODE_REPLAY = 1
MODE_SNAPSHOT = 2

# error codes in ERR payloads
ERR_VERSION = 1
ERR_MALFORMED = 2
ERR_BUSY = 3


class WireError(ValueError):
    """A frame that does not follow the protocol. ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True, frozen=True)
class BatchHeader:
    node_id: int
    incarnation: int
    epoch: int
    seq_first: int
    count: int
    base_ms: int


@dataclass(slots=True, frozen=True)
class Heartbeat:
    node_id: int
    incarnation: int
    epoch: int
    last_seq: int
    sent_ms: int
    role: str


@dataclass(slots=True, frozen=True)
class SyncRequest:
    node_id: int
    incarnation: int  # publisher incarnation the requester last followed (0 = none)
    from_seq: int  # first sequence number wanted (0 = full snapshot)


@dataclass(slots=True, frozen=True)
class SnapshotChunk:
    incarnation: int
    snap_seq: int
    index: int
    cut_ms: int
    records: list


@dataclass(slots=True, frozen=True)
class SyncEnd:
    incarnation: int
    upto_seq: int
    mode: int
    records: int
    cut_ms: int


_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _unpack(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE:
        raise WireError("oversize", f"{len(payload)} bytes")
    try:
        return msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise WireError("malformed", f"msgpack: {exc}") from None


def _array(obj: Any, min_len: int, what: str) -> tuple:
    if type(obj) is not tuple or len(obj) < min_len:
        raise WireError("malformed", f"{what}: expected array of >= {min_len} items")
    if obj[0] != VERSION:
        raise WireError("version", f"{what}: protocol version {obj[0]!r}, want {VERSION}")
    return obj


def _ints(values: tuple, what: str) -> None:
    for v in values:
        if type(v) is not int or v < 0:
            raise WireError("malformed", f"{what}: expected unsigned integers")


# ---------------------------------------------------------------- batches
def encode_batch(node_id: int, incarnation: int, epoch: int, seq_first: int, base_ms: int,
                 changes: list) -> bytes:
    return _packb((VERSION, node_id, incarnation, epoch, seq_first, len(changes), base_ms,
                   changes))


def decode_batch(payload: bytes) -> tuple[BatchHeader, tuple]:
    """Decode a BATCH/REPLAY payload. Changes are validated one by one by :func:`check_change`
    at apply time, so one bad change costs one change, not the batch."""
    obj = _array(_unpack(payload), 8, "batch")
    head = obj[1:7]
    _ints(head, "batch header")
    changes = obj[7]
    if type(changes) is not tuple or len(changes) != obj[5]:
        raise WireError("malformed", "batch: change count does not match header")
    if obj[1] == 0 or obj[4] == 0:
        raise WireError("malformed", "batch: node id and sequence start at 1")
    return BatchHeader(*head), changes


_S = str
_I = int
_N = type(None)


def check_change(c: Any, unstamped_ok: bool = False) -> int:
    """Return the change's length class (RECORD_LEN, REFRESH_LEN, DELETE_LEN) or raise.

    ``unstamped_ok`` accepts records whose handle is still 0 (local ingestion stamps them).
    Type checks are unrolled by hand: this runs once per replicated change.
    """
    if type(c) is not tuple:
        raise WireError("bad_change", "not an array")
    n = len(c)
    if n == RECORD_LEN:
        t = type
        if (t(c[0]) is _S and t(c[1]) is _S and t(c[7]) is _S and t(c[5]) is _I
                and t(c[6]) is _I and t(c[8]) is _I and t(c[10]) is _I and t(c[11]) is _I
                and t(c[14]) is _I and t(c[16]) is _I and t(c[17]) is _I
                and (c[2] is None or t(c[2]) is _S) and (c[3] is None or t(c[3]) is _S)
                and (c[4] is None or t(c[4]) is _S) and (c[9] is None or t(c[9]) is _S)
                and (c[12] is None or t(c[12]) is _I) and (c[13] is None or t(c[13]) is _S)
                and (c[15] is None or t(c[15]) is _S)
                and c[0] and c[1] and c[5] >= 0 and c[8] >= 0
                and (c[17] > 0 or (unstamped_ok and c[17] == 0))):
            return n
        raise WireError("bad_change", "contact record with wrong field types")
    if n == REFRESH_LEN:
        if (type(c[0]) is _I and type(c[1]) is _I and type(c[2]) is _I and type(c[3]) is _I
                and c[0] > 0 and c[1] >= 0 and c[2] >= 0):
            return n
        raise WireError("bad_change", "refresh with wrong field types")
    if n == DELETE_LEN:
        if (type(c[0]) is _S and type(c[1]) is _S and type(c[2]) is _S and type(c[3]) is _I
                and type(c[4]) is _I and type(c[5]) is _I and c[5] > 0):
            return n
        raise WireError("bad_change", "delete with wrong field types")
    raise WireError("bad_change", f"array of {n} items is no known change")


# ---------------------------------------------------------------- heartbeats
def encode_heartbeat(node_id: int, incarnation: int, epoch: int, last_seq: int, sent_ms: int,
                     role: str) -> bytes:
    return _packb((VERSION, node_id, incarnation, epoch, last_seq, sent_ms, role))


def decode_heartbeat(payload: bytes) -> Heartbeat:
    obj = _array(_unpack(payload), 7, "heartbeat")
    _ints(obj[1:6], "heartbeat")
    if type(obj[6]) is not str:
        raise WireError("malformed", "heartbeat: role must be a string")
    return Heartbeat(*obj[1:7])


# ---------------------------------------------------------------- catch-up
def encode_sync_request(node_id: int, incarnation: int, from_seq: int) -> bytes:
    return _packb((VERSION, node_id, incarnation, from_seq))


def decode_sync_request(payload: bytes) -> SyncRequest:
    obj = _array(_unpack(payload), 4, "sync request")
    _ints(obj[1:4], "sync request")
    return SyncRequest(*obj[1:4])


def encode_snapshot_chunk(incarnation: int, snap_seq: int, index: int, cut_ms: int,
                          records: list) -> bytes:
    return _packb((VERSION, incarnation, snap_seq, index, cut_ms, records))


def decode_snapshot_chunk(payload: bytes) -> SnapshotChunk:
    obj = _array(_unpack(payload), 6, "snapshot chunk")
    _ints(obj[1:5], "snapshot chunk")
    if type(obj[5]) is not tuple:
        raise WireError("malformed", "snapshot chunk: records must be an array")
    return SnapshotChunk(*obj[1:6])


def encode_sync_end(incarnation: int, upto_seq: int, mode: int, records: int,
                    cut_ms: int) -> bytes:
    return _packb((VERSION, incarnation, upto_seq, mode, records, cut_ms))


def decode_sync_end(payload: bytes) -> SyncEnd:
    obj = _array(_unpack(payload), 6, "sync end")
    _ints(obj[1:6], "sync end")
    if obj[3] not in (MODE_REPLAY, MODE_SNAPSHOT):
        raise WireError("malformed", f"sync end: unknown mode {obj[3]}")
    return SyncEnd(*obj[1:6])


def encode_error(code: int, message: str) -> bytes:
    return _packb((VERSION, code, message))


def decode_error(payload: bytes) -> tuple[int, str]:
    obj = _unpack(payload)
    if type(obj) is not tuple or len(obj) < 3 or type(obj[1]) is not int:
        raise WireError("malformed", "error frame")
    return obj[1], str(obj[2])
