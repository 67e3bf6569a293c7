"""The loss-proof follower, driven without sockets.

A real publisher-side Replica (outbox, ring, catch-up generator) talks to a real subscriber-side
Replica through a simulated channel that drops, duplicates and delays frames; whatever the
channel does, the subscriber must end with exactly the publisher's table, and must notice
every loss by sequence number.
"""

import random

from hypothesis import given
from hypothesis import strategies as st

from sidecar.lab.synthetic import contact
from sidecar.replica import Replica
from sidecar.replication import wire
from sidecar.replication.catchup import catchup_frames
from sidecar.replication.follower import (
    Apply,
    ApplySnapshot,
    Follower,
    LinkState,
    RequestSync,
    SnapshotDone,
)


class Link:
    """Publisher replica -> follower + subscriber replica, with a controllable channel."""

    def __init__(self, ring_changes=2_000_000, max_batch=50, seed=0, drop=0.0, dup=0.0):
        self.pub = Replica(1, incarnation=500, max_batch=max_batch, ring_changes=ring_changes)
        self.sub = Replica(2, incarnation=600)
        self.f = Follower(1, sync_timeout=1.0)
        self.rng = random.Random(seed)
        self.drop, self.dup = drop, dup
        self.now = 0.0
        self.seen = None
        self.requests = []

    def run(self, actions):
        for a in actions:
            if isinstance(a, Apply):
                self.sub.apply_remote(a.header, a.changes)
            elif isinstance(a, ApplySnapshot):
                if a.first or self.seen is None:
                    self.seen = set()
                self.sub.apply_snapshot(a.records, self.seen)
            elif isinstance(a, SnapshotDone):
                self.sub.prune_origin(a.origin, a.incarnation, self.seen or set(), a.cut_ms)
                self.seen = None
            elif isinstance(a, RequestSync):
                self.seen = None
                self.requests.append(a)

    def serve_requests(self, lossy=False):
        while self.requests:
            req = self.requests.pop(0)
            for kind, payload in catchup_frames(
                    self.pub, wire.SyncRequest(2, req.incarnation, req.from_seq, req.req_id), 7):
                if lossy and self.rng.random() < self.drop:
                    continue
                if kind == wire.REPLAY:
                    self.run(self.f.on_replay(*wire.decode_batch(payload), self.now))
                elif kind == wire.SNAP:
                    self.run(self.f.on_snapshot_chunk(wire.decode_snapshot_chunk(payload),
                                                      self.now))
                else:
                    self.run(self.f.on_sync_end(wire.decode_sync_end(payload), self.now))

    def publish(self, lossy=True):
        for payload in self.pub.outbox.flush():
            copies = 0 if lossy and self.rng.random() < self.drop else 1
            if lossy and self.rng.random() < self.dup:
                copies += 1
            for _ in range(copies):
                self.run(self.f.on_batch(*wire.decode_batch(payload), self.now))

    def heartbeat(self):
        ob = self.pub.outbox
        self.run(self.f.on_heartbeat(wire.Heartbeat(1, ob.incarnation, ob.epoch, ob.last_seq,
                                                    0, "active"), self.now))

    def tables_equal(self):
        return sorted(self.pub.store.records()) == sorted(self.sub.store.records())


def test_first_contact_triggers_full_snapshot_then_live():
    link = Link()
    for i in range(20):
        link.pub.local_put(contact(i))
    link.publish()
    assert link.f.state is LinkState.SYNCING and link.requests[0].from_seq == 0
    link.serve_requests()
    assert link.f.state is LinkState.LIVE and link.tables_equal()
    link.pub.local_put(contact(100))
    link.publish()
    assert link.tables_equal() and link.f.stats.batches == 1


def test_dropped_batch_is_detected_and_replayed():
    link = Link()
    link.heartbeat()
    link.serve_requests()
    for i in range(3):
        link.pub.local_put(contact(i))
        [payload] = link.pub.outbox.flush()
        if i != 1:  # the middle batch is lost
            link.run(link.f.on_batch(*wire.decode_batch(payload), 0))
    assert link.f.stats.gaps == 1 and link.requests[0].from_seq == 2
    link.serve_requests()
    assert link.tables_equal() and link.f.stats.replays == 2  # batches 2 and 3


def test_lost_last_batch_is_noticed_by_heartbeat():
    link = Link()
    link.heartbeat()
    link.serve_requests()
    link.pub.local_put(contact(1))
    link.pub.outbox.flush()  # never delivered
    assert link.f.state is LinkState.LIVE
    link.heartbeat()
    assert link.requests and link.requests[0].from_seq == 1
    link.serve_requests()
    assert link.tables_equal()


def test_ring_too_short_falls_back_to_snapshot_and_prunes_deletes():
    link = Link(ring_changes=1000, max_batch=100)
    for i in range(50):
        link.pub.local_put(contact(i))
    link.publish()
    link.serve_requests()
    assert link.tables_equal()
    # the subscriber misses a lot, including deletes, beyond what the ring holds
    for i in range(50, 3000):
        link.pub.local_put(contact(i))
        if len(link.pub.outbox.pending) >= 100:
            link.pub.outbox.flush()
    c = contact(7)
    link.pub.local_delete(c[0], c[1], c[7], c[8] + 1)
    link.pub.outbox.flush()
    link.heartbeat()
    assert link.requests[0].from_seq == 51
    link.serve_requests()
    assert link.f.stats.snapshots == 2
    assert link.tables_equal() and link.sub.stats.pruned == 1


def test_peer_restart_resyncs_without_pruning_what_it_forgot():
    link = Link()
    for i in range(10):
        link.pub.local_put(contact(i))
    link.publish()
    link.serve_requests()
    # the publisher restarts empty (new incarnation)
    link.pub = Replica(1, incarnation=501)
    link.pub.local_put(contact(99))
    link.publish()
    assert link.f.stats.peer_restarts == 1
    link.serve_requests()
    assert len(link.sub.store) == 11  # nothing the old incarnation published is pruned


def test_stale_epoch_frames_are_dropped():
    f = Follower(1)
    f.on_heartbeat(wire.Heartbeat(1, 5, 3, 0, 0, "active"), 0)
    assert f.on_heartbeat(wire.Heartbeat(1, 5, 2, 0, 0, "active"), 0) == []
    assert f.stats.stale_epoch == 1


def test_frames_from_another_node_are_ignored():
    f = Follower(1)
    assert f.on_batch(wire.BatchHeader(3, 1, 0, 1, 0, 0), (), 0) == []
    assert f.stats.foreign == 1


def test_buffer_overflow_forces_another_catchup_instead_of_losing():
    link = Link(max_batch=10)
    link.f.max_buffered_changes = 25
    link.heartbeat()  # -> SYNCING, request pending but not served yet
    for i in range(60):
        link.pub.local_put(contact(i))
        if len(link.pub.outbox.pending) == 10:
            link.publish(lossy=False)
    assert link.f.stats.buffer_overflows >= 1
    link.serve_requests()
    link.serve_requests()
    link.heartbeat()
    link.serve_requests()
    assert link.tables_equal()


def test_sync_timeout_asks_again():
    f = Follower(1, sync_timeout=1.0)
    [req] = f.on_heartbeat(wire.Heartbeat(1, 5, 0, 0, 0, "active"), 0.0)
    assert f.tick(0.5) == []
    [again] = f.tick(1.5)
    assert again.from_seq == req.from_seq == 0


def test_snapshot_end_skips_buffered_batches_already_in_the_snapshot():
    link = Link()
    link.heartbeat()
    link.pub.local_put(contact(1))
    link.publish(lossy=False)  # buffered while syncing; also inside the snapshot
    link.serve_requests()
    assert link.f.stats.duplicates == 1 and link.tables_equal()


@given(st.integers(0, 2**32), st.floats(0, 0.5), st.floats(0, 0.3),
       st.integers(10, 400), st.integers(1000, 50_000))
def test_lossy_channel_never_loses_a_change(seed, drop, dup, n, ring):
    link = Link(ring_changes=ring, max_batch=17, seed=seed, drop=drop, dup=dup)
    rng = random.Random(seed)
    for step in range(n):
        i = rng.randrange(200)
        r = rng.random()
        if r < 0.75:
            link.pub.local_put(contact(i, version=step + 1))
        else:
            c = contact(i)
            link.pub.local_delete(c[0], c[1], c[7], step + 1)
        if rng.random() < 0.3:
            link.publish()
        if rng.random() < 0.05:
            link.heartbeat()
        if rng.random() < 0.1:
            link.now += 0.6
            link.run(link.f.tick(link.now))
            link.serve_requests(lossy=True)
    # the channel heals: heartbeats and timeouts drive the follower to the end
    link.publish(lossy=False)
    for _ in range(20):
        link.heartbeat()
        link.now += 1.1
        link.run(link.f.tick(link.now))
        link.serve_requests()
        if link.f.state is LinkState.LIVE and link.f.lag == 0:
            break
    assert link.tables_equal()


def test_burst_larger_than_a_batch_keeps_refresh_time_base():
    """A burst split into several batches: every batch carries the base the refresh deltas
    were computed against (regression: later batches used to carry base 0)."""
    link = Link(max_batch=2)
    link.heartbeat()
    link.serve_requests()
    for i in range(4):
        link.pub.local_put(contact(i))
    link.publish(lossy=False)
    for i in range(4):
        link.pub.local_put(contact(i, version=2))  # 4 refreshes -> 2 batches
    payloads = link.pub.outbox.flush()
    assert len(payloads) == 2
    for p in payloads:
        hdr, changes = wire.decode_batch(p)
        assert hdr.base_ms > 0 and all(len(c) == 4 for c in changes)
        link.run(link.f.on_batch(hdr, changes, 0))
    assert link.tables_equal()
    assert all(r[16] > 1_600_000_000_000 for r in link.sub.store.records())


def test_answers_to_an_older_request_are_ignored():
    link = Link()
    for i in range(20):
        link.pub.local_put(contact(i))
    link.publish()
    [first] = link.requests
    link.now += 5  # the first answer is late: the follower asks again
    link.run(link.f.tick(link.now))
    assert len(link.requests) == 2 and link.requests[1].req_id != first.req_id
    old = list(catchup_frames(link.pub, wire.SyncRequest(2, first.incarnation, 0,
                                                         first.req_id), 7))
    for kind, payload in old:  # stale chunks and END change nothing
        if kind == wire.SNAP:
            assert link.f.on_snapshot_chunk(wire.decode_snapshot_chunk(payload), link.now) == []
        else:
            assert link.f.on_sync_end(wire.decode_sync_end(payload), link.now) == []
    link.requests.pop(0)
    link.serve_requests()
    assert link.f.state is LinkState.LIVE and link.tables_equal()
