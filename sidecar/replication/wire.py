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
    req_id: int  # echoed in SNAP and END so answers to older requests can be told apart


@dataclass(slots=True, frozen=True)
class SnapshotChunk:
    incarnation: int
    snap_seq: int
    req_id: int
    index: int
    cut_ms: int
    records: tuple


@dataclass(slots=True, frozen=True)
class SyncEnd:
    incarnation: int
    upto_seq: int
    req_id: int
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
    """Check the version first (so a future major with another layout is reported as a version
    mismatch, not as garbage), then the length. Extra trailing elements are ignored."""
    if type(obj) is not tuple or not obj:
        raise WireError("malformed", f"{what}: expected an array")
    if type(obj[0]) is not int or obj[0] != VERSION:
        raise WireError("version", f"{what}: protocol version {obj[0]!r}, want {VERSION}")
    if len(obj) < min_len:
        raise WireError("malformed", f"{what}: expected array of >= {min_len} items")
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


def _signatures(fields: list[tuple[type, ...]]) -> frozenset[tuple[type, ...]]:
    """Every exact type tuple a change may have (nullable fields give several)."""
    out: list[tuple[type, ...]] = [()]
    for choices in fields:
        out = [sig + (t,) for sig in out for t in choices]
    return frozenset(out)


_N = type(None)
_OPT_S = (str, _N)
# positions: see sidecar.model (AOR .. HANDLE)
_RECORD_TYPES = _signatures([
    (str,), (str,), _OPT_S, _OPT_S, _OPT_S, (int,), (int,), (str,), (int,), _OPT_S, (int,),
    (int,), (int, _N), _OPT_S, (int,), _OPT_S, (int,), (int,)])
_REFRESH_TYPES = (int, int, int, int)
_DELETE_TYPES = (str, str, str, int, int, int)


def check_change(c: Any, unstamped_ok: bool = False) -> int:
    """Return the change's length class (RECORD_LEN, REFRESH_LEN, DELETE_LEN) or raise.

    ``unstamped_ok`` accepts records whose handle is still 0 (local ingestion stamps them).
    This runs once per replicated change, so the type check is one C-level ``map(type, c)``
    looked up in the precomputed set of valid signatures (exact types: a bool is no int).
    """
    if type(c) is not tuple:
        raise WireError("bad_change", "not an array")
    n = len(c)
    sig = tuple(map(type, c))
    if n == RECORD_LEN:
        if (sig in _RECORD_TYPES and c[0] and c[1] and c[5] >= 0 and c[8] >= 0 and c[13] != ""
                and (c[17] > 0 or (unstamped_ok and c[17] == 0))):
            return n
        raise WireError("bad_change", "contact record with wrong field types or values")
    if n == REFRESH_LEN:
        if sig == _REFRESH_TYPES and c[0] > 0 and c[1] >= 0 and c[2] >= 0:
            return n
        raise WireError("bad_change", "refresh with wrong field types")
    if n == DELETE_LEN:
        if sig == _DELETE_TYPES and c[5] > 0:
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
def encode_sync_request(node_id: int, incarnation: int, from_seq: int, req_id: int) -> bytes:
    return _packb((VERSION, node_id, incarnation, from_seq, req_id))


def decode_sync_request(payload: bytes) -> SyncRequest:
    obj = _array(_unpack(payload), 5, "sync request")
    _ints(obj[1:5], "sync request")
    return SyncRequest(*obj[1:5])


def encode_snapshot_chunk(incarnation: int, snap_seq: int, req_id: int, index: int,
                          cut_ms: int, records: list) -> bytes:
    return _packb((VERSION, incarnation, snap_seq, req_id, index, cut_ms, records))


def decode_snapshot_chunk(payload: bytes) -> SnapshotChunk:
    obj = _array(_unpack(payload), 7, "snapshot chunk")
    _ints(obj[1:6], "snapshot chunk")
    if type(obj[6]) is not tuple:
        raise WireError("malformed", "snapshot chunk: records must be an array")
    return SnapshotChunk(*obj[1:7])


def encode_sync_end(incarnation: int, upto_seq: int, req_id: int, mode: int, records: int,
                    cut_ms: int) -> bytes:
    return _packb((VERSION, incarnation, upto_seq, req_id, mode, records, cut_ms))


def decode_sync_end(payload: bytes) -> SyncEnd:
    obj = _array(_unpack(payload), 7, "sync end")
    _ints(obj[1:7], "sync end")
    if obj[4] not in (MODE_REPLAY, MODE_SNAPSHOT):
        raise WireError("malformed", f"sync end: unknown mode {obj[4]}")
    return SyncEnd(*obj[1:7])


def encode_error(code: int, message: str) -> bytes:
    return _packb((VERSION, code, message))


def decode_error(payload: bytes) -> tuple[int, str]:
    obj = _unpack(payload)
    if type(obj) is not tuple or len(obj) < 3 or type(obj[1]) is not int:
        raise WireError("malformed", "error frame")
    return obj[1], str(obj[2])


# ---------------------------------------------------------------- anti-entropy (PROTOCOL §15)
DIGEST_REQUEST = b"DIGREQ"  # DEALER -> ROUTER: per-bucket digest of the peer's own contacts
BUCKET_REQUEST = b"BKTREQ"  # DEALER -> ROUTER: the peer's own contacts in some buckets
CUT = b"CUT"  # ROUTER -> DEALER: the sequence number the answer that follows describes
DIGEST = b"DIGEST"  # ROUTER -> DEALER: per-bucket record counts and hash sums
BUCKETS = b"BUCKETS"  # ROUTER -> DEALER: the records of the requested buckets

ERR_TOO_LARGE = 4  # the answer would exceed MAX_MESSAGE (ask for fewer buckets)

MAX_BUCKETS = 65536
"""Largest bucket count a digest may use (counts are powers of two, 1..MAX_BUCKETS)."""

_U64 = (1 << 64) - 1


@dataclass(slots=True, frozen=True)
class DigestRequest:
    node_id: int  # requester (informative)
    incarnation: int  # publisher incarnation the requester follows (informative)
    req_id: int  # echoed in CUT and DIGEST
    buckets: int  # power of two


@dataclass(slots=True, frozen=True)
class BucketRequest:
    node_id: int
    incarnation: int
    req_id: int  # echoed in CUT and BUCKETS
    buckets: int  # the bucket count the indices refer to
    indices: tuple[int, ...]  # distinct bucket numbers, each < buckets


@dataclass(slots=True, frozen=True)
class Cut:
    incarnation: int  # answering publisher's incarnation
    cut_seq: int  # its last_seq when the answer's records were copied
    req_id: int
    cut_ms: int  # its clock at the cut (informative)
    horizon_s: int  # records with 0 < expires <= horizon_s are left out of the comparison


@dataclass(slots=True, frozen=True)
class DigestAnswer:
    incarnation: int
    cut_seq: int
    req_id: int
    counts: tuple[int, ...]  # records per bucket
    sums: tuple[int, ...]  # per bucket: sum of record hashes mod 2**64

    @property
    def buckets(self) -> int:
        return len(self.counts)


@dataclass(slots=True, frozen=True)
class BucketAnswer:
    incarnation: int
    cut_seq: int
    req_id: int
    buckets: int
    indices: tuple[int, ...]
    records: tuple  # validated one by one when the repair is planned


def _bucket_count(n: int, what: str) -> None:
    if not 1 <= n <= MAX_BUCKETS or n & (n - 1):
        raise WireError("malformed", f"{what}: bucket count {n} is not a power of two in "
                                     f"1..{MAX_BUCKETS}")


def _bucket_indices(obj: Any, buckets: int, what: str) -> tuple[int, ...]:
    if type(obj) is not tuple or not 1 <= len(obj) <= buckets:
        raise WireError("malformed", f"{what}: bucket list must be an array of 1..{buckets}")
    for i in obj:
        if type(i) is not int or not 0 <= i < buckets:
            raise WireError("malformed", f"{what}: bucket {i!r} is not in 0..{buckets - 1}")
    if len(set(obj)) != len(obj):
        raise WireError("malformed", f"{what}: bucket listed twice")
    return obj


def encode_digest_request(node_id: int, incarnation: int, req_id: int, buckets: int) -> bytes:
    return _packb((VERSION, node_id, incarnation, req_id, buckets))


def decode_digest_request(payload: bytes) -> DigestRequest:
    obj = _array(_unpack(payload), 5, "digest request")
    _ints(obj[1:5], "digest request")
    _bucket_count(obj[4], "digest request")
    return DigestRequest(*obj[1:5])


def encode_bucket_request(node_id: int, incarnation: int, req_id: int, buckets: int,
                          indices: list[int] | tuple[int, ...]) -> bytes:
    return _packb((VERSION, node_id, incarnation, req_id, buckets, indices))


def decode_bucket_request(payload: bytes) -> BucketRequest:
    obj = _array(_unpack(payload), 6, "bucket request")
    _ints(obj[1:5], "bucket request")
    _bucket_count(obj[4], "bucket request")
    return BucketRequest(*obj[1:5], _bucket_indices(obj[5], obj[4], "bucket request"))


def encode_cut(incarnation: int, cut_seq: int, req_id: int, cut_ms: int, horizon_s: int
               ) -> bytes:
    return _packb((VERSION, incarnation, cut_seq, req_id, cut_ms, horizon_s))


def decode_cut(payload: bytes) -> Cut:
    obj = _array(_unpack(payload), 6, "cut")
    _ints(obj[1:6], "cut")
    return Cut(*obj[1:6])


def encode_digest(incarnation: int, cut_seq: int, req_id: int,
                  counts: list[int] | tuple[int, ...], sums: list[int] | tuple[int, ...]
                  ) -> bytes:
    return _packb((VERSION, incarnation, cut_seq, req_id, len(counts), counts, sums))


def decode_digest(payload: bytes) -> DigestAnswer:
    obj = _array(_unpack(payload), 7, "digest")
    _ints(obj[1:5], "digest")
    n = obj[4]
    _bucket_count(n, "digest")
    counts, sums = obj[5], obj[6]
    if type(counts) is not tuple or type(sums) is not tuple or len(counts) != n \
            or len(sums) != n:
        raise WireError("malformed", "digest: counts and sums must be arrays of `buckets` items")
    _ints(counts, "digest counts")
    _ints(sums, "digest sums")
    if n and max(sums) > _U64:
        raise WireError("malformed", "digest: a sum does not fit in 64 bits")
    return DigestAnswer(obj[1], obj[2], obj[3], counts, sums)


def encode_buckets(incarnation: int, cut_seq: int, req_id: int, buckets: int,
                   indices: list[int] | tuple[int, ...], records: list | tuple) -> bytes:
    return _packb((VERSION, incarnation, cut_seq, req_id, buckets, indices, records))


def decode_buckets(payload: bytes) -> BucketAnswer:
    obj = _array(_unpack(payload), 7, "buckets")
    _ints(obj[1:5], "buckets")
    _bucket_count(obj[4], "buckets")
    indices = _bucket_indices(obj[5], obj[4], "buckets")
    if type(obj[6]) is not tuple:
        raise WireError("malformed", "buckets: records must be an array")
    return BucketAnswer(*obj[1:5], indices, obj[6])
