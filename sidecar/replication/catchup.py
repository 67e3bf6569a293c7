"""Sans-I/O answer to a SYNC request: the frames to send back, in order.

A replay of the ring when it still covers the requested sequence (same publisher incarnation),
otherwise a snapshot in chunks cut at the current sequence number. The publisher's asyncio
adapter only sends what this generator yields; tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..model import now_ms
from ..replica import Replica
from . import wire


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
