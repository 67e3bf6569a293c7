"""Sans-I/O answers to the requests a ROUTER serves: the frames to send back, in order.

SYNC: a replay of the ring when it still covers the requested sequence (same publisher
incarnation), otherwise a snapshot in chunks cut at the current sequence number.
DIGREQ / BKTREQ (anti-entropy): a CUT, then the digest or the buckets' records.
The publisher's asyncio adapter only sends what these generators yield; tests drive them
directly.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..model import now_ms
from ..replica import Replica
from . import wire
from .antientropy import EXPIRY_MARGIN_S, SLICE, BucketCollector, DigestBuilder


def catchup_frames(replica: Replica, req: wire.SyncRequest, chunk: int
                   ) -> Iterator[tuple[bytes, bytes]]:
    ob = replica.outbox
    batches = None
    if req.from_seq and req.incarnation == ob.incarnation:
        batches = ob.replay_from(req.from_seq)
    if batches is not None:
        upto = ob.last_seq
        for payload in batches:
            yield wire.REPLAY, payload
        yield wire.END, wire.encode_sync_end(ob.incarnation, upto, req.req_id, wire.MODE_REPLAY,
                                             0, now_ms())
        return
    snap_seq = ob.last_seq
    cut_ms = now_ms()
    records = replica.store.records()  # immutable tuples: copying the list is a consistent cut
    for index, start in enumerate(range(0, len(records), chunk)):
        yield wire.SNAP, wire.encode_snapshot_chunk(ob.incarnation, snap_seq, req.req_id, index,
                                                    cut_ms, records[start:start + chunk])
    yield wire.END, wire.encode_sync_end(ob.incarnation, snap_seq, req.req_id,
                                         wire.MODE_SNAPSHOT, len(records), cut_ms)


def antientropy_frames(replica: Replica, req: wire.DigestRequest | wire.BucketRequest,
                       slice_size: int = SLICE) -> Iterator[tuple[bytes, bytes] | None]:
    """Sans-I/O answer to DIGREQ / BKTREQ (PROTOCOL §15): CUT first, then DIGEST or BUCKETS.

    The cut (sequence number, clock, copy of the record list) happens at the first
    ``next()``, so the caller flushes the outbox right before iterating, with no ``await``
    in between, exactly as for a snapshot. The CUT frame leaves before any hashing so the
    requester learns the sequence number it must stop at while we are still working.
    ``None`` items mark the end of a slice of work: the adapter yields to the event loop
    there, which keeps a million-contact digest from stalling replication.
    """
    ob = replica.outbox
    cut_seq = ob.last_seq
    cut_ms = now_ms()
    horizon_s = cut_ms // 1000 + EXPIRY_MARGIN_S
    records = replica.store.records()
    yield wire.CUT, wire.encode_cut(ob.incarnation, cut_seq, req.req_id, cut_ms, horizon_s)
    acc: DigestBuilder | BucketCollector
    if isinstance(req, wire.DigestRequest):
        acc = DigestBuilder(replica.node_id, req.buckets, horizon_s)
    else:
        acc = BucketCollector(replica.node_id, req.buckets, req.indices, horizon_s)
    for start in range(0, len(records), slice_size):
        acc.add(records[start:start + slice_size])
        yield None
    if isinstance(acc, DigestBuilder):
        d = acc.digest()
        yield wire.DIGEST, wire.encode_digest(ob.incarnation, cut_seq, req.req_id, d.counts,
                                              d.sums)
        return
    payload = wire.encode_buckets(ob.incarnation, cut_seq, req.req_id, req.buckets,
                                  req.indices, acc.records)
    if len(payload) > wire.MAX_MESSAGE:
        yield wire.ERROR, wire.encode_error(
            wire.ERR_TOO_LARGE, f"buckets: {len(acc.records)} records do not fit in one "
                                "message; ask for fewer buckets")
        return
    yield wire.BUCKETS, payload
