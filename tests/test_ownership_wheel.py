"""The keepalive wheel follows the table on the passive node too, so a promotion sweeps at
once; a snapshot that arrived after the last rebuild makes the promotion rebuild first (those
contacts may have old pinholes and must be in the sweep). No sockets: the keepalive service
task is never started, the scheduler's state is what is checked."""

from __future__ import annotations

import time

from sidecar.keepalive.scheduler import KeepaliveScheduler
from sidecar.model import FLAG_NAT, make_record
from sidecar.ownership import KeepaliveSettings, Ownership
from sidecar.replica import Replica
from sidecar.replication.wire import BatchHeader


def nat_contact(i: int, origin: int = 1) -> tuple:
    return make_record(aor=f"sip:u{i}@example.com", uri=f"sip:u{i}@10.0.0.{i % 250 + 1}:5060",
                       callid=f"c{i}", cseq=1, expires=int(time.time()) + 3600,
                       handle=(origin << 56) | (1 << 24) | (i + 1), last_modified=1000 + i,
                       received=f"sip:127.0.0.1:{20000 + i}", socket="udp:127.0.0.1:5060",
                       flags=FLAG_NAT)


def ownership() -> tuple[Ownership, Replica]:
    replica = Replica(2)
    own = Ownership(replica, lambda: None, None,
                    KeepaliveSettings(mode="sidecar", interval_s=10.0, kind="crlf"))
    return own, replica


def header(seq: int, n: int) -> BatchHeader:
    return BatchHeader(1, 1, 0, seq, n, 0)


async def test_rebuild_in_slices_ends_where_a_whole_rebuild_ends() -> None:
    records = [nat_contact(i) for i in range(1000)]
    whole = KeepaliveScheduler(10.0)
    whole.rebuild(records)
    sliced = KeepaliveScheduler(10.0)
    steps = list(sliced.rebuild_in_slices(records, slice_size=100))
    assert len(steps) >= 10 and steps == sorted(steps)
    assert sliced.snapshot()["contacts"] == whole.snapshot()["contacts"] == 1000
    assert sorted(sliced.slot_loads()) == sorted(whole.slot_loads())
    # removals are sliced too: a table that lost half its contacts
    list(sliced.rebuild_in_slices(records[:500], slice_size=100))
    assert sliced.snapshot()["contacts"] == 500


async def test_warm_wheel_sweeps_at_once_and_live_additions_follow() -> None:
    own, replica = ownership()
    replica.apply_remote(header(1, 300), tuple(nat_contact(i) for i in range(300)))
    await own.refresh_wheel()  # the passive node's periodic rebuild
    replica.apply_remote(header(301, 5), tuple(nat_contact(i) for i in range(300, 305)))
    scheduler = own.service.scheduler
    await own.switch(True)
    # swept at once with what the wheel held: the 5 newest came over the live stream
    # (registered just now, fresh pinholes) and join at the next rebuild
    assert scheduler.snapshot()["enabled"] and scheduler.stats.sweep_total == 300
    assert own._refresh_now.is_set()
    await own.refresh_wheel()
    assert scheduler.snapshot()["contacts"] == 305


async def test_snapshot_after_the_last_rebuild_is_swept_too() -> None:
    own, replica = ownership()
    replica.apply_remote(header(1, 10), tuple(nat_contact(i) for i in range(10)))
    await own.refresh_wheel()
    # a catch-up snapshot brings contacts that may have registered an hour ago
    replica.apply_snapshot(tuple(nat_contact(i) for i in range(10, 400)), None)
    scheduler = own.service.scheduler
    await own.switch(True)
    assert scheduler.stats.sweep_total == 400
    assert own._wheel_is_current()


async def test_never_rebuilt_wheel_is_rebuilt_before_the_sweep() -> None:
    own, replica = ownership()
    replica.apply_remote(header(1, 50), tuple(nat_contact(i) for i in range(50)))
    await own.switch(True)
    assert own.service.scheduler.stats.sweep_total == 50
    await own.switch(False)
    assert not own.service.scheduler.snapshot()["enabled"]
