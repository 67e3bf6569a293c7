"""An in-process replication pair on loopback for anti-entropy tests and the repair benchmark.

Node A (a real :class:`Publisher`) and node B (a real :class:`Subscriber` following A) share
one event loop and one ZeroMQ context, talking over TCP on 127.0.0.1 with kernel-chosen
ports. Nothing is mocked: the point is to diverge B's store *behind replication's back*
(:func:`diverge`) and watch one anti-entropy round find and repair exactly that.

For a benchmark, :func:`measure_repair` returns ``antientropy_repair_s``: the time from the
start of a round to B's copy of A's contacts being equal to A's again, after K buckets were
silently diverged on B (plus the cost of a round that finds nothing, for comparison).
"""

from __future__ import annotations

import asyncio
import random
import time

import zmq
import zmq.asyncio

from ..model import ATTR, HANDLE, LAST_MODIFIED, handle_origin
from ..replica import Replica
from ..replication.antientropy import DEFAULT_BUCKETS, record_bucket
from ..replication.follower import LinkState
from ..replication.publisher import Publisher
from ..replication.subscriber import Subscriber
from .synthetic import contacts

LOOPBACK = "tcp://127.0.0.1:*"


class LoopbackPair:
    """``async with LoopbackPair() as pair``: ``pair.a`` / ``pair.b`` are the replicas,
    ``pair.publisher`` is A's, ``pair.subscriber`` is B's link to A."""

    def __init__(self, *, buckets: int = DEFAULT_BUCKETS, interval_s: float = 0.0,
                 heartbeat_s: float = 0.05) -> None:
        self.buckets = buckets
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.ctx = zmq.asyncio.Context()
        self.a = Replica(1)
        self.b = Replica(2)
        self.publisher: Publisher | None = None
        self.subscriber: Subscriber | None = None

    async def __aenter__(self) -> LoopbackPair:
        self.publisher = Publisher(self.ctx, self.a, LOOPBACK, LOOPBACK,
                                   heartbeat_s=self.heartbeat_s)
        await self.publisher.start()
        self.subscriber = Subscriber(self.ctx, self.b, 1, self.publisher.pub_endpoint,
                                     self.publisher.sync_endpoint, sync_timeout=2.0,
                                     tick_s=0.05, antientropy_interval_s=self.interval_s,
                                     antientropy_buckets=self.buckets)
        await self.subscriber.start()
        return self

    async def __aexit__(self, *exc) -> None:
        if self.subscriber is not None:
            await self.subscriber.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        self.ctx.term()

    async def load(self, records: list[tuple], chunk: int = 20_000) -> None:
        """Store *records* on A as local registrations (published as usual)."""
        assert self.publisher is not None
        for start in range(0, len(records), chunk):
            for rec in records[start:start + chunk]:
                self.a.local_put(rec)
            self.publisher.flush()
            await asyncio.sleep(0)

    def in_sync(self) -> bool:
        """B follows A live and has applied everything A has published."""
        f = self.subscriber.follower
        return (f.state is LinkState.LIVE and not self.a.outbox.pending
                and f.next_seq - 1 == self.a.outbox.last_seq)

    async def wait_in_sync(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.in_sync():
            if time.monotonic() > deadline:
                raise TimeoutError(f"B not in sync with A after {timeout}s: "
                                   f"{self.subscriber.status()}")
            await asyncio.sleep(0.01)

    def a_origin(self, replica: Replica) -> set[tuple]:
        """The records of A's origin that *replica* holds."""
        return {r for r in replica.store if handle_origin(r[HANDLE]) == 1}

    def equal(self) -> bool:
        """B's copy of A's contacts is exactly A's own."""
        return self.a_origin(self.a) == self.a_origin(self.b)


def diverge(pair: LoopbackPair, k: int, seed: int = 1) -> set[int]:
    """Silently damage B's copy of A's contacts in *k* buckets, bypassing replication.

    Each chosen bucket gets one of: a record removed, a record altered (its ``attr``; same
    version, so no conflict rule would ever replace it), or a stale record of A's current
    incarnation that A never had. Returns the buckets touched.
    """
    rng = random.Random(seed)
    by_bucket: dict[int, list[tuple]] = {}
    for r in pair.a_origin(pair.b):
        by_bucket.setdefault(record_bucket(r, pair.buckets), []).append(r)
    chosen = rng.sample(sorted(by_bucket), min(k, len(by_bucket)))
    store = pair.b.store
    inc_prefix = (1 << 56) | (pair.a.incarnation << 24)
    for i, bucket in enumerate(chosen):
        rec = rng.choice(sorted(by_bucket[bucket]))
        kind = i % 3
        if kind == 0:
            store.drop(rec)
        elif kind == 1:
            store.drop(rec)
            store.put((*rec[:ATTR], f"damaged-{i}", *rec[ATTR + 1:]))
        else:
            # a binding A never had, in the same bucket: try AORs until one lands there
            n = 0
            while True:
                n += 1
                aor = f"ghost-{bucket}-{n}@sip.example.com"
                stale = (aor, *rec[1:LAST_MODIFIED], rec[LAST_MODIFIED],
                         inc_prefix | (0xFFFFFF - i))
                if record_bucket(stale, pair.buckets) == bucket:
                    break
            store.put(stale)
    return set(chosen)


async def measure_repair_async(contacts_n: int = 100_000, diverged_buckets: int = 16,
                               buckets: int = DEFAULT_BUCKETS) -> dict:
    async with LoopbackPair(buckets=buckets) as pair:
        await pair.load(contacts(0, contacts_n))
        await pair.wait_in_sync(max(30.0, contacts_n / 10_000))
        t0 = time.perf_counter()
        healthy = await pair.subscriber.antientropy_round()
        healthy_s = time.perf_counter() - t0
        touched = diverge(pair, diverged_buckets)
        t0 = time.perf_counter()
        report = await pair.subscriber.antientropy_round()
        repair_s = time.perf_counter() - t0
        equal = pair.equal()
    return {
        "contacts": contacts_n,
        "buckets": buckets,
        "diverged_buckets": len(touched),
        "antientropy_repair_s": round(repair_s, 4),
        "antientropy_round_healthy_s": round(healthy_s, 4),
        "healthy_differing": healthy["differing"],
        "found_differing": report["differing"],
        "records_put": report["put"],
        "records_dropped": report["dropped"],
        "equal_after": equal,
        "result": report["result"],
    }


def measure_repair(contacts_n: int = 100_000, diverged_buckets: int = 16,
                   buckets: int = DEFAULT_BUCKETS) -> dict:
    """Time one anti-entropy repair in-process (blocking; runs its own event loop).

    Loads ``contacts_n`` synthetic contacts on A, waits until B follows live, runs one
    round on the healthy pair, silently diverges ``diverged_buckets`` buckets of B, and
    times the round that repairs them. ``antientropy_repair_s`` is that round's wall time:
    its end is the moment the last repair was applied, and ``equal_after`` confirms B's
    copy of A's contacts then equals A's.
    """
    return asyncio.run(measure_repair_async(contacts_n, diverged_buckets, buckets))
