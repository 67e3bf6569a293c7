"""Redis backend (stream, snapshots, degraded mode) and role lease against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgpack
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from sidecar.model import rec_bid
from sidecar.persist.durability import synthetic_records
from sidecar.persist.redis_backend import (
    RedisBackend,
    RedisBackendError,
    RedisSettings,
    connect_redis,
    decode_chunk,
    decode_pointer,
    encode_pointer,
    measure_redis_rate,
)
from sidecar.role.redis_lease import LeaseCheckpoint, LeaseError, RedisLease, parse_lease_value
from sidecar.store import ContactStore
from tests.redis_fixture import RedisServer, SentinelSet, require_redis

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
async def client(server):
    c = aioredis.Redis.from_url(server.url)
    await c.flushdb()
    yield c
    await c.aclose()


async def poll(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = await pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def deletes_for(recs):
    """Wire DELETEs that win over *recs* (same Call-ID, higher CSeq)."""
    return [(r[0], rec_bid(r), r[7], r[8] + 1, r[16] + 1, r[17]) for r in recs]


def store_of(changes) -> ContactStore:
    s = ContactStore()
    for c in changes:
        s.put(c) if len(c) == 18 else s.delete(*c)
    return s


# ---------------------------------------------------------------- stream + snapshots
async def test_stream_publish_restore_round_trip(server, client):
    recs = synthetic_records(3000)
    dels = deletes_for(recs[:100])
    b = RedisBackend(server.url, "rt", node_id=1, stream_maxlen=100_000)
    try:
        b.publish(recs)
        b.publish(dels)
        assert await b.flush()
        assert b.stats.changes_published == 3100 and not b.degraded
        fresh = ContactStore()
        rep = await b.restore(fresh)
        assert rep.clean and rep.generation == 0  # no snapshot yet: the whole stream
        assert rep.stream_changes == 3100 and rep.deletes_applied == 100
        assert sorted(fresh.records()) == sorted(store_of(recs + dels).records())
        assert len(fresh) == 2900
    finally:
        await b.aclose()


async def test_snapshot_generations_switch_and_cut(server, client):
    recs = synthetic_records(10_000)
    now = int(time.time())
    expired = [r[:5] + (now - 10,) + r[6:] for r in synthetic_records(50, node_id=2)]
    b = RedisBackend(server.url, "gen", node_id=1, stream_maxlen=100_000)
    try:
        b.publish(recs[:6000])  # queued, not yet flushed: the snapshot must flush them first
        info1 = await b.write_snapshot(recs[:6000])
        assert info1.ok and info1.generation == 1 and info1.records == 6000
        assert info1.cut_id == b.last_id
        b.publish(recs[6000:])
        info2 = await b.write_snapshot(recs + expired)
        assert info2.ok and info2.generation == 2
        b.publish(deletes_for(recs[:10]))  # after the second cut: only in the stream
        assert await b.flush()
        # the pointer names gen 2, gen 1 is kept one switch longer, then dropped
        assert decode_pointer(await client.get("sc:{gen}:snap:current"))[0] == 2
        assert await client.exists("sc:{gen}:snap:1")
        assert (await b.write_snapshot(recs[10:])).generation == 3
        assert not await client.exists("sc:{gen}:snap:1")
        assert await client.exists("sc:{gen}:snap:2") and await client.ttl("sc:{gen}:snap:3") == -1
        b.publish(recs[:5])  # after the third cut: replayed from the stream
        assert await b.flush()
        fresh = ContactStore()
        rep = await b.restore(fresh)
        assert rep.clean, rep.as_dict()
        assert rep.generation == 3 and rep.snapshot_records == 9990
        assert rep.stream_changes == 5  # only entries after the cut are replayed
        assert len(fresh) == 9995  # snapshot 3 lacks recs[:10]; 5 of them come back
    finally:
        await b.aclose()


async def test_restore_drops_expired_and_reports_trim_gap(server, client):
    now = int(time.time())
    recs = synthetic_records(200)
    expired = [r[:5] + (now - 1,) + r[6:] for r in synthetic_records(30, node_id=3)]
    b = RedisBackend(server.url, "gap", node_id=1, stream_maxlen=128, entry_changes=1)
    try:
        assert (await b.write_snapshot([])).ok  # cut at the (empty) stream start
        b.publish(recs + expired)
        assert await b.flush()
        await client.xtrim(b.stream_key, maxlen=10, approximate=False)  # past the cut
        fresh = ContactStore()
        rep = await b.restore(fresh)
        assert rep.gap and "past the snapshot cut" in rep.gap and not rep.clean
        assert len(fresh) == 0 and rep.expired_dropped == 10  # the last 10 are the expired
    finally:
        await b.aclose()


# ---------------------------------------------------------------- bad answers from Redis
async def test_wrong_types_and_bad_snapshots_are_clear_errors(server, client):
    b = RedisBackend(server.url, "bad", node_id=1, stream_maxlen=10_000)
    try:
        await client.set(b.stream_key, b"not a stream")
        b.publish(synthetic_records(10))
        assert await b.flush() is False
        assert b.degraded and "wrongtype" in b.stats.last_error and b.backlog == 10
        assert await client.get(b.stream_key) == b"not a stream"  # nothing overwritten
        info = await b.write_snapshot(synthetic_records(10))
        assert not info.ok and "wrongtype" in info.error
        await client.delete(b.stream_key)
        assert await b.catch_up() and not b.degraded and b.backlog == 0

        await client.hset("sc:{bad}:snap:current", "x", "y")
        rep = await b.restore(ContactStore())
        assert any("wrongtype" in e for e in rep.errors)
        assert (await b.write_snapshot([])).ok is False  # the switch refuses too
        assert await client.type("sc:{bad}:snap:current") == b"hash"

        newer = msgpack.packb((99, 1, "0-0", 0, 0, 0, 1))
        await client.delete("sc:{bad}:snap:current")
        await client.set("sc:{bad}:snap:current", newer)
        store = ContactStore()
        rep = await b.restore(store)
        assert any("version" in e for e in rep.errors) and rep.generation == 0
        assert len(store) == 10  # the stream still replays; the snapshot is not guessed at

        await client.delete("sc:{bad}:snap:current")
        info = await b.write_snapshot(synthetic_records(20))
        assert info.ok
        raw = bytearray(await client.hget(f"sc:{{bad}}:snap:{info.generation}", "0"))
        raw[-1] ^= 0xFF
        await client.hset(f"sc:{{bad}}:snap:{info.generation}", "0", bytes(raw))
        rep = await b.restore(ContactStore())
        assert any("checksum" in e for e in rep.errors) and rep.snapshot_records == 0
    finally:
        await b.aclose()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_decoders_raise_only_documented_errors(data):
    for fn in (decode_pointer, lambda d: decode_chunk(d, "fuzz")):
        with contextlib.suppress(RedisBackendError):
            fn(data)
    with contextlib.suppress(LeaseError):
        parse_lease_value(data)


def test_pointer_round_trip():
    assert decode_pointer(encode_pointer(7, "12-3", 5, 1, 99, 2)) == (7, "12-3", 5, 1)


# ---------------------------------------------------------------- degraded mode
async def test_degraded_while_redis_down_then_catch_up(tmp_path):
    require_redis()
    recs = synthetic_records(6000)
    with RedisServer(tmp_path) as srv:
        b = RedisBackend(RedisSettings(url=srv.url, socket_timeout=0.5), "deg", node_id=1,
                         stream_maxlen=100_000, backlog_limit=4000, flush_interval_s=0.01,
                         retry_interval_s=0.05)
        c = aioredis.Redis.from_url(srv.url)
        try:
            await b.start(records=lambda: recs)
            b.publish(recs[:1000])
            await poll(lambda: _async(b.backlog == 0 and b.stats.changes_published == 1000),
                       what="first batch flushed")
            srv.stop()
            for i in range(1000, 4000, 500):  # keeps publishing: never raises
                b.publish(recs[i:i + 500])
                await asyncio.sleep(0.01)
            await poll(lambda: _async(b.degraded), what="degraded")
            assert b.backlog == 3000 and b.stats.errors >= 1 and b.status()["degraded"]
            srv.start()  # same port, empty data (persistence off)
            await poll(lambda: _async(not b.degraded and b.backlog == 0), what="catch-up")
            assert b.stats.lost_changes == 0 and b.stats.catch_ups >= 1
            store = ContactStore()
            rep = await b.restore(store)
            assert rep.stream_changes == 3000 and len(store) == 3000  # whole backlog arrived

            # beyond the bound: counted, reported, and a snapshot is requested and written
            srv.stop()
            b.publish(recs)  # 6000 more than the 4000 bound allows
            assert b.stats.lost_changes > 0 and b.snapshot_wanted
            assert b.status()["lost_changes"] == b.stats.lost_changes
            srv.start()
            await poll(lambda: _async(not b.degraded and not b.snapshot_wanted and
                                      b.backlog == 0), what="covering snapshot")
            store = ContactStore()
            rep = await b.restore(store)
            assert rep.generation >= 1 and len(store) == 6000
        finally:
            await b.aclose()
            await c.aclose()


async def _async(v):
    return v


# ---------------------------------------------------------------- role lease
async def test_lease_acquire_renew_expire_steal_and_stale_holder(server, client):
    a = RedisLease(client, "{sc}:lease", node_id=1, ttl_ms=150)
    b = RedisLease(client, "{sc}:lease", node_id=2, ttl_ms=150)
    cp_b = LeaseCheckpoint("lease", b, interval=0.1)
    cp_a = LeaseCheckpoint("lease", a, interval=0.1)
    assert (await cp_b.check()).ok is False  # free: the active is gone
    assert await a.acquire() == 1
    assert await a.acquire() == 1  # already ours: extended, same epoch
    assert await b.acquire() is None and b.highest_seen == 1
    res = await cp_b.check()
    assert res.ok and "node 1 epoch 1" in res.detail
    assert (await cp_a.check()).ok is False  # held by this node itself
    assert await a.renew()
    h = await b.holder()
    assert h is not None and (h.node, h.epoch) == ("1", 1) and 0 < h.ttl_ms <= 150
    # a stalls past its TTL; b takes over with a higher epoch
    await poll(lambda: _none(b.holder()), what="lease expiry")
    assert (await cp_b.check()).ok is False
    assert await b.acquire() == 2
    assert await a.renew() is False  # stale holder cannot renew ...
    assert a.epoch is None and a.highest_seen == 2  # ... and sees the newer epoch
    assert await a.release() is False
    assert (await b.holder()).node == "2"
    assert await b.release() and await b.holder() is None
    epochs = []
    for lease in (a, b, a, b):
        epochs.append(await lease.acquire())
        assert await lease.release()
    assert epochs == [3, 4, 5, 6] and await a.current_epoch() == 6
    # a node whose arbiter epoch is ahead of the counter lifts it (never reuses an epoch)
    assert await a.acquire(min_epoch=20) == 20 and await a.current_epoch() == 20
    assert await a.release()
    assert await b.acquire(min_epoch=3) == 21  # a floor below the counter changes nothing


async def _none(coro):
    return await coro is None


async def test_lease_bad_answers(server, client):
    lease = RedisLease(client, "{sc}:lease2", node_id="n1", ttl_ms=1000)
    await client.hset("{sc}:lease2", "x", "1")
    with pytest.raises(LeaseError) as err:
        await lease.acquire()
    assert err.value.reason == "wrongtype"
    assert await client.type("{sc}:lease2") == b"hash"  # not overwritten
    res = await LeaseCheckpoint("l", lease).check()
    assert res.ok is False and "wrongtype" in res.detail
    await client.delete("{sc}:lease2")
    await client.set("{sc}:lease2", "garbage")
    with pytest.raises(LeaseError) as err:
        await lease.holder()
    assert err.value.reason == "malformed"
    with pytest.raises(LeaseError):
        RedisLease(client, "k", node_id="a:b")
    down = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                         retry=Retry(NoBackoff(), 0))
    try:
        res = await LeaseCheckpoint("l", RedisLease(down, "k", 1)).check()
        assert res.ok is False and "unreachable" in res.detail
        res = await LeaseCheckpoint("l", RedisLease(down, "k", 1),
                                    unreachable_is_gone=False).check()
        assert res.ok is True
    finally:
        await down.aclose()


# ---------------------------------------------------------------- rate
async def test_measure_redis_rate(server, client):
    rate = await measure_redis_rate(100_000, server.url)
    print(f"redis_changes_per_s={rate:,.0f}")
    assert rate > 20_000  # target 100k/s; the bound is loose for a busy shared machine


# ---------------------------------------------------------------- Sentinel failover
async def test_sentinel_failover_lease_and_stream_keep_working(tmp_path):
    with SentinelSet(tmp_path) as ss:
        cfg = RedisSettings(sentinels=ss.addresses, master_name="mymaster", socket_timeout=1.0)
        b = RedisBackend(cfg, "sent", node_id=1, stream_maxlen=100_000)
        lease = RedisLease(connect_redis(cfg), "{sc}:lease", node_id=1, ttl_ms=30_000)
        recs = synthetic_records(2000)
        try:
            assert await lease.acquire() == 1
            b.publish(recs[:1000])
            assert await b.flush()
            await poll(lambda: _replicated(ss.replica.port, b.stream_key, 8),
                       what="replica to hold the stream")
            new_port = ss.failover()
            assert new_port == ss.replica.port
            b.publish(recs[1000:])

            async def flushed():
                return await b.catch_up()
            await poll(flushed, 20, "stream writes on the new master")

            async def renewed():
                try:
                    return await lease.renew()
                except LeaseError:
                    return False
            await poll(renewed, 20, "lease renewal on the new master")
            h = await lease.holder()
            assert (h.node, h.epoch) == ("1", 1)  # the lease survived the failover
            store = ContactStore()
            rep = await b.restore(store)
            assert len(store) == 2000 and not rep.errors
            direct = aioredis.Redis(host="127.0.0.1", port=new_port)
            try:
                assert await direct.xlen(b.stream_key) >= 16
            finally:
                await direct.aclose()
        finally:
            await b.aclose()
            await lease.client.aclose()


async def _replicated(port: int, key: str, entries: int) -> bool:
    c = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        return await c.xlen(key) >= entries
    finally:
        await c.aclose()
