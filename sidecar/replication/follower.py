"""Sans-I/O state machine that follows one peer's change stream without ever losing a change.

The subscriber adapter feeds it what arrives (live batches, heartbeats, catch-up replies, and
a clock tick) and executes the actions it returns. All the loss-proofing lives here, so it is
tested exhaustively with no sockets:

* every batch carries ``seq_first`` and ``count``; the next expected sequence is tracked, so a
  batch dropped anywhere (PUB high-water mark, reconnect, slow consumer) shows up as a gap;
* a heartbeat carries the publisher's latest sequence, so a dropped *last* batch is noticed too;
* on a gap (or at start, or when the peer restarted with a new incarnation) it asks for a
  catch-up from the first missing sequence, buffers live batches meanwhile (bounded), and
  applies the buffer after the catch-up ends; whatever the buffer cannot cover triggers
  another catch-up instead of being dropped silently.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from .wire import MODE_SNAPSHOT, BatchHeader, Heartbeat, SnapshotChunk, SyncEnd


class LinkState(Enum):
    WAITING = "waiting"  # nothing heard from the peer yet
    SYNCING = "syncing"  # catch-up requested, live batches buffered
    LIVE = "live"  # applying live batches in sequence


# ----- actions returned to the adapter
@dataclass(slots=True)
class Apply:
    """Apply these changes (all of origin ``node_id``) with this time base."""

    header: BatchHeader
    changes: tuple


@dataclass(slots=True)
class RequestSync:
    incarnation: int  # the publisher incarnation we follow (0 = none yet)
    from_seq: int  # 0 = full snapshot
    req_id: int  # answers (SNAP, END) to any other request id are ignored


@dataclass(slots=True)
class ApplySnapshot:
    """Apply snapshot records; ``first`` starts a new set of seen handles for pruning."""

    records: tuple
    first: bool


@dataclass(slots=True)
class SnapshotDone:
    """Snapshot finished: local records created by this incarnation of the peer that were not
    in the snapshot and are older than ``cut_ms`` were deleted at the peer meanwhile.

    Records of the peer's *earlier* incarnations are kept: a restarted peer may have forgotten
    contacts we still hold, and those must flow back to it, not be pruned here.
    """

    origin: int
    incarnation: int
    cut_ms: int


@dataclass(slots=True)
class FollowerStats:
    batches: int = 0
    changes: int = 0
    duplicates: int = 0
    gaps: int = 0
    syncs: int = 0
    replays: int = 0
    snapshots: int = 0
    snapshot_records: int = 0
    buffer_overflows: int = 0
    peer_restarts: int = 0
    stale_epoch: int = 0
    foreign: int = 0
    last_snapshot_s: float = 0.0  # request -> last record applied, of the last snapshot


@dataclass
class Follower:
    """Follows the stream of one peer node (``peer_id``)."""

    peer_id: int
    sync_timeout: float = 5.0
    max_buffered_changes: int = 2_000_000
    state: LinkState = LinkState.WAITING
    incarnation: int = 0  # publisher incarnation being followed
    next_seq: int = 1
    last_epoch: int = 0
    peer_last_seq: int = 0
    last_heard: float = 0.0
    stats: FollowerStats = field(default_factory=FollowerStats)
    _buffer: deque = field(default_factory=deque)
    _buffered: int = 0
    _overflowed: bool = False
    _sync_deadline: float = 0.0
    _sync_mode: int = 0
    _sync_from: int = 0
    _snap_next_chunk: int = 0
    _snap_records: int = 0
    _req_id: int = 0
    _sync_started: float = 0.0

    # ------------------------------------------------------------ inputs
    def on_batch(self, hdr: BatchHeader, changes: tuple, now: float) -> list:
        if hdr.node_id != self.peer_id:
            self.stats.foreign += 1
            return []
        self.last_heard = now
        if self._check_epoch(hdr.incarnation, hdr.epoch):
            return []
        if hdr.incarnation != self.incarnation:
            return self._peer_restarted(hdr.incarnation, hdr.seq_first + hdr.count - 1, now,
                                        (hdr, changes))
        self.peer_last_seq = max(self.peer_last_seq, hdr.seq_first + hdr.count - 1)
        if self.state is not LinkState.LIVE:
            self._buffer_batch(hdr, changes)
            return self._resync_if_late(now)
        return self._take(hdr, changes, now)

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list:
        if hb.node_id != self.peer_id:
            self.stats.foreign += 1
            return []
        self.last_heard = now
        if self._check_epoch(hb.incarnation, hb.epoch):
            return []
        if hb.incarnation != self.incarnation:
            return self._peer_restarted(hb.incarnation, hb.last_seq, now, None)
        self.peer_last_seq = max(self.peer_last_seq, hb.last_seq)
        if self.state is LinkState.LIVE and hb.last_seq >= self.next_seq:
            # Batches up to last_seq left the publisher before this heartbeat on the same
            # socket; ZeroMQ keeps order, so the missing ones were dropped.
            self.stats.gaps += 1
            return self._request(now, self.next_seq)
        return self._resync_if_late(now)

    def on_replay(self, hdr: BatchHeader, changes: tuple, now: float) -> list:
        """A past batch sent in answer to our SYNC (contiguous from from_seq)."""
        if self.state is not LinkState.SYNCING or hdr.incarnation != self.incarnation:
            return []
        self._sync_deadline = now + self.sync_timeout
        self._sync_mode = 1
        self.stats.replays += 1
        return self._take(hdr, changes, now, replay=True)

    def on_snapshot_chunk(self, chunk: SnapshotChunk, now: float) -> list:
        if (self.state is not LinkState.SYNCING or chunk.incarnation != self.incarnation
                or chunk.req_id != self._req_id):
            return []
        self._sync_deadline = now + self.sync_timeout
        if chunk.index != self._snap_next_chunk:
            # A chunk went missing (connection reset mid-snapshot): start over at once.
            self.stats.gaps += 1
            return self._request(now, 0)
        self._sync_mode = MODE_SNAPSHOT
        self._snap_next_chunk += 1
        self._snap_records += len(chunk.records)
        self.stats.snapshot_records += len(chunk.records)
        return [ApplySnapshot(chunk.records, chunk.index == 0)]

    def on_sync_end(self, end: SyncEnd, now: float) -> list:
        if (self.state is not LinkState.SYNCING or end.incarnation != self.incarnation
                or end.req_id != self._req_id):
            return []
        actions: list = []
        if end.mode == MODE_SNAPSHOT:
            if end.records != self._snap_records:
                self.stats.gaps += 1
                return self._request(now, 0)  # lost chunks at the tail: start over
            self.stats.snapshots += 1
            self.stats.last_snapshot_s = round(now - self._sync_started, 6)
            actions.append(SnapshotDone(self.peer_id, self.incarnation, end.cut_ms))
        if end.mode == MODE_SNAPSHOT:
            self.next_seq = end.upto_seq + 1
        # After a replay next_seq already stands after the last replayed batch; if the replay
        # fell short of upto_seq the drain below notices the hole and asks again.
        self.peer_last_seq = max(self.peer_last_seq, end.upto_seq)
        self.state = LinkState.LIVE
        self._sync_mode = 0
        return actions + self._drain(now)

    def on_sync_error(self, now: float) -> list:
        """The peer refused the request (busy, version): try again after the timeout."""
        self._sync_deadline = now + self.sync_timeout
        return []

    def force_resync(self, now: float) -> list:
        """Operator asked for a full snapshot (sc_resync)."""
        if not self.incarnation:
            return []  # nothing heard yet: the first heartbeat triggers a snapshot anyway
        self._buffer.clear()
        self._buffered = 0
        self._overflowed = False
        return self._request(now, 0)

    def tick(self, now: float) -> list:
        return self._resync_if_late(now)

    # ------------------------------------------------------------ helpers
    @property
    def lag(self) -> int:
        """Changes the peer has published that we have not applied yet."""
        return max(0, self.peer_last_seq - (self.next_seq - 1))

    def _check_epoch(self, incarnation: int, epoch: int) -> bool:
        """True (drop) when a frame from the followed incarnation goes back in epoch."""
        if incarnation == self.incarnation and epoch < self.last_epoch:
            self.stats.stale_epoch += 1
            return True
        if incarnation == self.incarnation or incarnation > self.incarnation:
            self.last_epoch = epoch
        return False

    def _peer_restarted(self, incarnation: int, last_seq: int, now: float, batch) -> list:
        if incarnation < self.incarnation:
            # A frame from an older incarnation still in flight: ignore it.
            self.stats.foreign += 1
            return []
        if self.incarnation:
            self.stats.peer_restarts += 1
        self.incarnation = incarnation
        self.next_seq = 1
        self.peer_last_seq = last_seq
        self._buffer.clear()
        self._buffered = 0
        self._overflowed = False
        if batch is not None:
            self._buffer_batch(*batch)
        return self._request(now, 0)

    def _request(self, now: float, from_seq: int) -> list:
        self.state = LinkState.SYNCING
        self._sync_deadline = now + self.sync_timeout
        self._sync_mode = 0
        self._sync_from = from_seq
        self._sync_started = now
        self._snap_next_chunk = 0
        self._snap_records = 0
        self.stats.syncs += 1
        self._req_id += 1
        return [RequestSync(self.incarnation, from_seq, self._req_id)]

    def _resync_if_late(self, now: float) -> list:
        if self.state is LinkState.SYNCING and now >= self._sync_deadline:
            # Ask again for what is still missing: a replay that got partway continues from
            # next_seq; a snapshot (or a first sync) starts over.
            full = self._sync_mode == MODE_SNAPSHOT or self._sync_from == 0
            return self._request(now, 0 if full else self.next_seq)
        return []

    def _buffer_batch(self, hdr: BatchHeader, changes: tuple) -> None:
        if self._buffered + hdr.count > self.max_buffered_changes:
            # Never drop silently: forget the buffer and remember that the catch-up that is
            # running cannot close the gap on its own, so another one follows it.
            self.stats.buffer_overflows += 1
            self._buffer.clear()
            self._buffered = 0
            self._overflowed = True
            return
        self._buffer.append((hdr, changes))
        self._buffered += hdr.count

    def _drain(self, now: float) -> list:
        actions: list = []
        if self._overflowed:
            self._overflowed = False
            self._buffer.clear()
            self._buffered = 0
            self.stats.gaps += 1
            return actions + self._request(now, self.next_seq)
        while self._buffer:
            hdr, changes = self._buffer[0]
            if hdr.seq_first > self.next_seq:
                # A hole before the next buffered batch: catch up again, keep the rest buffered.
                self.stats.gaps += 1
                return actions + self._request(now, self.next_seq)
            self._buffer.popleft()
            self._buffered -= hdr.count
            actions.extend(self._take(hdr, changes, now))
        if self.peer_last_seq >= self.next_seq and self.state is LinkState.LIVE \
                and not self._buffer:
            self.stats.gaps += 1
            actions.extend(self._request(now, self.next_seq))
        return actions

    def _take(self, hdr: BatchHeader, changes: tuple, now: float, replay: bool = False) -> list:
        first, end = hdr.seq_first, hdr.seq_first + hdr.count
        if end <= self.next_seq:
            self.stats.duplicates += 1
            return []
        if first > self.next_seq:
            if replay:
                return []  # replies are contiguous; a hole means the ring moved: timeout resyncs
            self.stats.gaps += 1
            self._buffer_batch(hdr, changes)
            return self._request(now, self.next_seq)
        if first < self.next_seq:
            skip = self.next_seq - first
            changes = changes[skip:]
            hdr = BatchHeader(hdr.node_id, hdr.incarnation, hdr.epoch, self.next_seq,
                              len(changes), hdr.base_ms)
        self.next_seq = end
        self.stats.batches += 1
        self.stats.changes += len(changes)
        return [Apply(hdr, changes)]
