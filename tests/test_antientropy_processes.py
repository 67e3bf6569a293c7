"""Anti-entropy over real ZeroMQ sockets on 127.0.0.1.

In-process (one event loop, real Publisher and Subscriber): B's store is damaged behind
replication's back and one round must find and repair exactly those buckets, also while A
keeps changing. Then real `sidecar run` processes: `sc_antientropy` on a healthy pair finds
nothing, periodic rounds run, and the counters reach sc_status, sc_counters and /metrics.
"""

import asyncio
import contextlib
import time
import urllib.request

import msgpack
import pytest
import zmq
import zmq.asyncio

from sidecar.lab.antientropy_pair import LoopbackPair, diverge, measure_repair_async
from sidecar.lab.nodes import MiError, make_pair, wait_until
from sidecar.lab.synthetic import contact, contacts
from sidecar.model import now_ms
from sidecar.replica import Replica
from sidecar.replication import subscriber as subscriber_module
from sidecar.replication import wire
from sidecar.replication.follower import LinkState
from sidecar.replication.subscriber import Subscriber


async def test_one_round_repairs_exactly_the_diverged_buckets():
    async with LoopbackPair(buckets=64) as pair:
        await pair.load(contacts(0, 3000))
        await pair.wait_in_sync()
        healthy = await pair.subscriber.antientropy_round()
        assert healthy["result"] == "ok" and healthy["differing"] == 0
        assert healthy["records_peer"] == healthy["records_local"] == 3000

        touched = diverge(pair, 6)  # 2 removed, 2 altered, 2 stale records A never had
        assert not pair.equal()
        report = await pair.subscriber.antientropy_round()
        assert report["result"] == "ok", report
        assert set(report["differing_buckets"]) == touched
        assert report["fetched"] == len(touched)  # only the differing buckets travel
        assert (report["put"], report["dropped"]) == (4, 2)
        assert pair.equal()
        assert not pair.b.outbox.pending and pair.b.outbox.last_seq == 0  # nothing republished

        again = await pair.subscriber.antientropy_round()
        assert again["differing"] == 0 and again["fetched"] == 0
        st = pair.subscriber.ae_stats
        assert (st.rounds, st.buckets_compared, st.buckets_differing) == (3, 192, 6)
        assert (st.records_put, st.records_dropped, st.errors) == (4, 2, 0)
        assert pair.publisher.stats.antientropy_digests == 3
        assert pair.publisher.stats.antientropy_fetches == 1


async def test_rounds_are_exact_while_the_origin_keeps_changing():
    """The digest is cut at a sequence number and B compares at exactly that number, so
    changes in flight never show up as differences, however busy A is."""
    async with LoopbackPair(buckets=128) as pair:
        await pair.load(contacts(0, 4000))
        await pair.wait_in_sync()
        stop = asyncio.Event()

        async def writer():
            version = 2
            while not stop.is_set():
                for i in range(version * 37 % 4000, version * 37 % 4000 + 200):
                    pair.a.local_put(contact(i % 4000, version=version))
                pair.a.local_put(contact(10_000 + version))  # new bindings too
                c = contact(20_000 + version)
                pair.a.local_put(c)
                pair.a.local_delete(c[0], c[1], c[7], c[8] + 1)
                pair.publisher.kick()
                version += 1
                await asyncio.sleep(0.002)

        task = asyncio.create_task(writer())
        try:
            reports = [await pair.subscriber.antientropy_round() for _ in range(6)]
        finally:
            stop.set()
            await task
        cuts = [r["cut_seq"] for r in reports if r["result"] == "ok"]
        assert len(set(cuts)) == len(cuts) and pair.a.outbox.last_seq > 4000 + 200 * 6
        ok = [r for r in reports if r["result"] == "ok"]
        assert len(ok) >= 3, reports
        assert all(r["differing"] == 0 and r["put"] == r["dropped"] == 0 for r in ok), reports
        await pair.wait_in_sync()
        assert pair.equal()


async def test_a_round_is_skipped_while_the_link_catches_up():
    async with LoopbackPair(buckets=16) as pair:
        await pair.load(contacts(0, 100))
        await pair.wait_in_sync()
        pair.subscriber.resync()  # a snapshot is now running
        report = await pair.subscriber.antientropy_round()
        assert report["result"] == "skipped" and "syncing" in report["reason"]
        assert pair.subscriber.ae_stats.rounds_skipped == 1
        await pair.wait_in_sync()
        assert (await pair.subscriber.antientropy_round())["result"] == "ok"


async def test_periodic_rounds_run_on_their_own():
    async with LoopbackPair(buckets=16, interval_s=0.1) as pair:
        await pair.load(contacts(0, 500))
        deadline = time.monotonic() + 20
        while pair.subscriber.ae_stats.rounds < 2:
            assert time.monotonic() < deadline, pair.subscriber.status()
            await asyncio.sleep(0.02)
        diverge(pair, 1)
        while not pair.equal():
            assert time.monotonic() < deadline, pair.subscriber.status()
            await asyncio.sleep(0.02)
        assert pair.subscriber.ae_stats.records_put + \
            pair.subscriber.ae_stats.records_dropped == 1
        assert pair.subscriber.status()["antientropy"]["buckets_differing"] == 1


INC = 1795000000


@contextlib.asynccontextmanager
async def raw_peer(answer):
    """A hand-driven peer 9 on raw sockets: heartbeats until B's link is live, an empty
    snapshot for any SYNC, and ``answer(router, ident, kind, payload)`` for anything else
    (to play an older node, or a broken one)."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    pub.bind("tcp://127.0.0.1:*")
    router.bind("tcp://127.0.0.1:*")
    sub = Subscriber(ctx, Replica(2), 9, pub.getsockopt_string(zmq.LAST_ENDPOINT),
                     router.getsockopt_string(zmq.LAST_ENDPOINT), sync_timeout=2.0,
                     antientropy_buckets=8)
    await sub.start()

    async def serve():
        while True:
            ident, kind, payload = await router.recv_multipart()
            if kind == wire.SYNC:
                req = wire.decode_sync_request(payload)
                await router.send_multipart([ident, wire.END, wire.encode_sync_end(
                    INC, 0, req.req_id, wire.MODE_SNAPSHOT, 0, now_ms())])
            else:
                await answer(router, ident, kind, payload)

    server = asyncio.create_task(serve())
    try:
        deadline = time.monotonic() + 10
        while sub.follower.state is not LinkState.LIVE:
            assert time.monotonic() < deadline
            await pub.send_multipart([wire.HEARTBEAT, wire.encode_heartbeat(
                9, INC, 0, 0, now_ms(), "active")])
            await asyncio.sleep(0.05)
        yield sub, pub
    finally:
        server.cancel()
        await sub.stop()
        pub.close(0)
        router.close(0)
        ctx.term()


async def test_a_peer_that_does_not_answer_costs_an_error_not_a_stalled_stream(monkeypatch):
    """A peer that ignores DIGREQ (an older version): the round fails after its timeout,
    and the live stream held while waiting for the CUT flows again after AE_HOLD_MAX_S."""
    monkeypatch.setattr(subscriber_module, "AE_HOLD_MAX_S", 0.2)
    monkeypatch.setattr(subscriber_module, "AE_CUT_TIMEOUT_S", 1.5)
    ignored: list[bytes] = []

    async def ignore(router, ident, kind, payload):
        ignored.append(kind)

    async with raw_peer(ignore) as (sub, pub):
        round_task = asyncio.create_task(sub.antientropy_round())
        while not ignored:
            await asyncio.sleep(0.01)
        rec = (*contact(1)[:17], (9 << 56) | (INC << 24) | 1)
        await pub.send_multipart([wire.BATCH, wire.encode_batch(9, INC, 0, 1, 0, [rec])])
        sent = time.monotonic()
        while len(sub.replica.store) == 0:
            assert time.monotonic() - sent < 1.0, "live stream stalled by the round"
            await asyncio.sleep(0.01)
        report = await round_task
        assert report["result"] == "error" and "CUT" in report["reason"]
        assert ignored == [wire.DIGEST_REQUEST] and sub.ae_stats.errors == 1
        assert sub.follower.state is LinkState.LIVE and sub.follower.next_seq == 2


async def test_a_bad_answer_is_counted_and_fails_the_round_at_once():
    async def garbage(router, ident, kind, payload):
        req = wire.decode_digest_request(payload)
        await router.send_multipart([ident, wire.CUT, wire.encode_cut(
            INC, 0, req.req_id, now_ms(), 0)])
        await router.send_multipart([ident, wire.DIGEST, msgpack.packb(
            [1, INC, 0, req.req_id, 8, [1, 2], [3]])])

    async with raw_peer(garbage) as (sub, _):
        t0 = time.monotonic()
        report = await sub.antientropy_round()
        assert report["result"] == "error" and "bad answer" in report["reason"]
        assert time.monotonic() - t0 < 2 and sub.errors["malformed"] == 1


async def test_a_cut_from_a_restarted_peer_skips_the_round():
    async def restarted(router, ident, kind, payload):
        req = wire.decode_digest_request(payload)
        await router.send_multipart([ident, wire.CUT, wire.encode_cut(
            INC + 5, 0, req.req_id, now_ms(), 0)])

    async with raw_peer(restarted) as (sub, _):
        report = await sub.antientropy_round()
        assert report["result"] == "skipped" and "restarted" in report["reason"]
        assert sub.ae_stats.rounds_skipped == 1 and sub.ae_stats.errors == 0


# ------------------------------------------------------------------ real processes
@pytest.mark.slow
def test_sc_antientropy_on_a_healthy_pair_of_processes(tmp_path):
    extra = {"antientropy_interval_s": 0.5, "antientropy_buckets": 256}
    a, b = make_pair(tmp_path, extra, extra)
    try:
        a.start()
        b.start()
        a.push(contacts(0, 5000))
        wait_until(lambda: b.mi("sc_digest") == a.mi("sc_digest")
                   and b.mi("sc_digest")["count"] == 5000, 30, what="B equals A")
        wait_until(lambda: all(n.mi("sc_peers")[0]["state"] == "live" for n in (a, b)), 30,
                   what="both links live")
        [round_b] = b.mi("sc_antientropy")["rounds"]
        assert round_b["result"] == "ok", round_b
        assert (round_b["peer"], round_b["buckets"], round_b["differing"]) == (1, 256, 0)
        assert round_b["records_peer"] == round_b["records_local"] == 5000
        [round_a] = a.mi("sc_antientropy", {"peer": 2})["rounds"]
        assert round_a["result"] == "ok" and round_a["records_peer"] == 0, round_a
        with pytest.raises(MiError):
            a.mi("sc_antientropy", {"peer": 42})
        wait_until(lambda: b.mi("sc_status")["peers"][0]["antientropy"]["rounds"] >= 3, 20,
                   what="periodic rounds")
        counters = b.mi("sc_counters")
        assert counters["antientropy_rounds"] >= 3 and counters["antientropy_errors"] == 0
        assert counters["antientropy_buckets_differing"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{b.admin_port}/metrics") as r:
            text = r.read().decode()
        assert 'sidecar_antientropy_total{event="rounds",peer="1"}' in text
        assert "sidecar_antientropy_last_round_seconds" in text
        assert a.mi("sc_status")["publisher"]["antientropy_digests"] >= 3
    finally:
        a.kill()
        b.kill()


async def test_measure_repair_for_the_benchmarks():
    result = await measure_repair_async(2000, diverged_buckets=4, buckets=64)
    assert result["equal_after"] and result["result"] == "ok"
    assert (result["healthy_differing"], result["found_differing"]) == (0, 4)
    assert result["antientropy_repair_s"] > 0
