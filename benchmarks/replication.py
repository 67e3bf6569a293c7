"""Replication benchmark: two real `sidecar run` processes over tcp loopback.

Measures end-to-end throughput (submitted at A's ingest socket -> applied in B's store) against
a bare pyzmq+msgpack PUB/SUB loop with the same batch size in the same run, loss (by digest of
every contact), lag at a paced 20k changes/s, snapshot sync of a fresh node, bytes on the wire
and memory per contact. All traffic stays on 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

from sidecar.lab.nodes import NodeProcess, free_ports, make_pair, wait_until
from sidecar.lab.synthetic import contact, contacts
from sidecar.sources.ingest import encode_ingest

from .report import print_table, write_json

BATCH = 2000  # the sidecar's default max_batch; the raw loop uses the same


# ------------------------------------------------------------------ raw pyzmq + msgpack limit
def _raw_sub(endpoint: str, total: int, out: mp.Queue) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    got = 0
    first = None
    while got < total:
        if not sub.poll(10_000):
            break
        frames = sub.recv_multipart()
        if frames[0] == b"ready":
            out.put("ready")
            continue
        if first is None:
            first = time.perf_counter()
        batch = msgpack.unpackb(frames[1], use_list=False)
        got += len(batch[7])
    out.put((got, time.perf_counter() - (first or time.perf_counter())))
    sub.close(0)
    ctx.term()


def raw_limit(records: list[tuple]) -> float:
    """Changes/s of pack -> PUB -> SUB -> unpack for the same records and batch size."""
    port = free_ports(1)[0]
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    q: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_raw_sub, args=(endpoint, len(records), q))
    proc.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait for the subscription to be in place
        pub.send_multipart([b"ready", b""])
        try:
            if q.get(timeout=0.05) == "ready":
                break
        except Exception:
            continue
    packer = msgpack.Packer(use_bin_type=True)
    seq = 1
    for i in range(0, len(records), BATCH):
        chunk = records[i:i + BATCH]
        pub.send_multipart([b"B", packer.pack((1, 1, 1, 0, seq, len(chunk), 0, chunk))])
        seq += len(chunk)
    got, elapsed = q.get(timeout=120)
    proc.join(10)
    pub.close(0)
    ctx.term()
    if got != len(records):
        raise RuntimeError(f"raw loop lost changes: {got}/{len(records)}")
    return got / elapsed


# ------------------------------------------------------------------ helpers
def stamped(records: list[tuple]) -> list[tuple]:
    """Records as they travel between sidecars (handle and last_modified set)."""
    base = (1 << 56) | (1_795_000_000 << 24)
    return [r[:16] + (1_795_000_000_000 + i, base | (i + 1)) for i, r in enumerate(records)]


def status(node: NodeProcess) -> dict:
    return node.mi("sc_status")


def push_frames(node: NodeProcess, frames: list[bytes]) -> None:
    node.push([])  # opens the socket
    sock = node._push
    for f in frames:
        sock.send(f)


def applied(node: NodeProcess) -> int:
    """Changes applied from the peer (cheap to ask: polled while measuring)."""
    return node.mi("sc_counters")["remote_changes"]


def lost_between(a: NodeProcess, b: NodeProcess, expected: int) -> int:
    da, db = a.mi("sc_digest"), b.mi("sc_digest")
    if da == db and da["count"] == expected:
        return 0
    # find the difference exactly (slow path, only when something is wrong)
    def table(n):
        out, off = set(), 0
        while off is not None:
            page = n.mi("ul_dump", {"offset": off, "limit": 10_000})
            for aor in page["AORs"]:
                for c in aor["Contacts"]:
                    out.add((c["aor"], c["uri"], c["callid"], c["cseq"], c["expires"]))
            off = page["next_offset"]
        return out
    ta, tb = table(a), table(b)
    return len(ta - tb) + max(0, expected - len(ta))


def rss_per_contact(n: int, gc_on: bool = True) -> tuple[float, float]:
    """(RSS bytes per contact, contacts/s loaded) for a store of n replicated contacts."""
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_rss_child, args=(n, q, gc_on))
    p.start()
    value = q.get(timeout=300)
    p.join(10)
    return value


def _rss_child(n: int, q: mp.Queue, gc_on: bool) -> None:
    import gc

    from sidecar.daemon import GC_THRESHOLDS
    from sidecar.store import ContactStore

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    payloads = [msgpack.packb(stamped(contacts(i, min(50_000, n - i))))
                for i in range(0, n, 50_000)]
    gc.collect()
    gc.set_threshold(*GC_THRESHOLDS)  # what the daemon runs with
    if not gc_on:
        gc.disable()
    before = rss()
    store = ContactStore()
    t0 = time.process_time()
    for p in payloads:  # decoded exactly like replicated batches
        for r in msgpack.unpackb(p, use_list=False):
            store.put(r)
    rate = len(store) / (time.process_time() - t0)
    del payloads
    gc.collect()
    q.put(((rss() - before) / len(store), rate))


# ------------------------------------------------------------------ scenarios
def run_throughput(work: Path, n: int) -> dict:
    a, b = make_pair(work / "tp")
    a.start()
    b.start()
    try:
        recs = contacts(0, n)
        frames = [encode_ingest(recs[i:i + BATCH]) for i in range(0, n, BATCH)]
        wait_until(lambda: status(b)["peers"][0]["state"] == "live", 20, what="link live")
        t0 = time.perf_counter()
        push_frames(a, frames)
        wait_until(lambda: applied(b) >= n, 120, interval=0.01, what="B applied all")
        elapsed = time.perf_counter() - t0
        st = status(a)["publisher"]
        put_bytes = st["bytes"] / max(1, st["changes"])
        lost = lost_between(a, b, n)
        # refreshes: same Call-ID, CSeq + 1, new expiry
        before_bytes, before_changes = st["bytes"], st["changes"]
        refreshed = [contact(i, version=2) for i in range(min(n, 100_000))]
        refresh_frames = [encode_ingest(refreshed[s:s + BATCH])
                          for s in range(0, len(refreshed), BATCH)]
        target = applied(b) + len(refreshed)
        t1 = time.perf_counter()
        push_frames(a, refresh_frames)
        wait_until(lambda: applied(b) >= target, 120, interval=0.01, what="refreshes applied")
        refresh_elapsed = time.perf_counter() - t1
        st2 = status(a)["publisher"]
        refresh_bytes = (st2["bytes"] - before_bytes) / max(1, st2["changes"] - before_changes)
        lost += lost_between(a, b, n)
        return {
            "throughput_changes_per_s": n / elapsed,
            "refresh_throughput_changes_per_s": len(refreshed) / refresh_elapsed,
            "bytes_per_contact_on_wire": put_bytes,
            "bytes_per_refresh_on_wire": refresh_bytes,
            "lost_changes": lost,
        }
    finally:
        a.kill()
        b.kill()


def run_lag(work: Path, seconds: float, rate: int = 20_000) -> dict:
    a, b = make_pair(work / "lag")
    a.start()
    b.start()
    try:
        wait_until(lambda: status(b)["peers"][0]["state"] == "live", 20, what="link live")
        step = 0.005
        per_step = int(rate * step)
        total = int(rate * seconds)
        recs = contacts(0, total)
        frames = [encode_ingest(recs[i:i + per_step]) for i in range(0, total, per_step)]
        push_frames(a, frames[:1])
        start = time.perf_counter()
        for k, f in enumerate(frames[1:], 1):
            due = start + k * step
            while (now := time.perf_counter()) < due:
                time.sleep(min(0.001, due - now))
            a._push.send(f)
        wait_until(lambda: applied(b) >= total, 60, what="paced load applied")
        lag = status(b)["lag_ms"]
        return {"lag_p50_ms": lag["p50"], "lag_p99_ms": lag["p99"], "lag_samples": lag["samples"],
                "lag_offered_changes_per_s": rate,
                "lag_lost_changes": lost_between(a, b, total)}
    finally:
        a.kill()
        b.kill()


def run_snapshot(work: Path, n: int) -> dict:
    a, b = make_pair(work / "snap")
    a.peers = []  # A alone first; B joins later as a fresh node
    a.start()
    try:
        push_frames(a, [encode_ingest(contacts(i, min(BATCH, n - i))) for i in range(0, n, BATCH)])
        wait_until(lambda: status(a)["contacts"] >= n, 120, interval=0.05, what="A loaded")
        t0 = time.perf_counter()
        b.start()
        wait_until(lambda: status(b)["contacts"] >= n, 120, interval=0.02, what="B synced")
        with_start = time.perf_counter() - t0
        # B's own measure: from its catch-up request to the last snapshot record applied
        elapsed = status(b)["peers"][0]["stats"]["last_snapshot_s"]
        return {"snapshot_contacts": n, "snapshot_s": elapsed,
                "snapshot_with_process_start_s": with_start,
                "snapshot_lost_changes": lost_between(a, b, n)}
    finally:
        a.kill()
        b.kill()


def run_slow_subscriber(work: Path, n: int) -> dict:
    tiny = {"sndhwm": 2, "rcvhwm": 2, "tcp_buffer": 16384, "max_batch": 100}
    a, b = make_pair(work / "slow", tiny, {**tiny, "apply_delay_ms": 5})
    a.start()
    b.start()
    try:
        wait_until(lambda: status(b)["peers"][0]["state"] == "live", 20, what="link live")
        push_frames(a, [encode_ingest(contacts(i, min(500, n - i))) for i in range(0, n, 500)])
        wait_until(lambda: status(a)["contacts"] >= n, 60, what="A loaded")
        wait_until(lambda: status(b)["contacts"] >= n, 120, interval=0.1, what="slow B done")
        peer = status(b)["peers"][0]["stats"]
        return {"slow_subscriber_changes": n,
                "slow_subscriber_lost_changes": lost_between(a, b, n),
                "slow_subscriber_gaps_repaired": peer["gaps"],
                "slow_subscriber_syncs": peer["syncs"]}
    finally:
        a.kill()
        b.kill()


def main(quick: bool, json_path: str | None) -> int:
    n = 200_000 if quick else 1_000_000
    snap_n = 200_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="bench-repl-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        raw_runs = [raw_limit(stamped(contacts(0, min(n, 200_000)))) for _ in range(3)]
        raw = statistics.median(raw_runs)
        results: dict = {"changes": n, "raw_limit_changes_per_s": raw,
                         "raw_limit_runs": raw_runs}
        results.update(run_throughput(work, n))
        results["throughput_ratio"] = results["throughput_changes_per_s"] / raw
        results.update(run_lag(work, 2.0 if quick else 5.0))
        results.update(run_snapshot(work, snap_n))
        results.update(run_slow_subscriber(work, 20_000 if quick else 100_000))
        results["rss_contacts"] = n
        results["rss_bytes_per_contact"], with_gc = rss_per_contact(n)
        _, without_gc = rss_per_contact(n, gc_on=False)
        results["store_load_per_s_gc_on"] = with_gc
        results["store_load_per_s_gc_off"] = without_gc
        results["gc_throughput_ratio"] = with_gc / without_gc
        results["lost_changes"] += (results["lag_lost_changes"]
                                    + results["snapshot_lost_changes"]
                                    + results["slow_subscriber_lost_changes"])
        results["wall_s"] = time.perf_counter() - t0
    r = results
    print_table(f"replication benchmark ({'quick' if quick else 'full'}, {n:,} changes)", [
        ("throughput_changes_per_s", r["throughput_changes_per_s"], ">= 300,000"),
        ("raw_limit_changes_per_s", r["raw_limit_changes_per_s"], "bare pyzmq+msgpack, same run"),
        ("throughput_ratio", r["throughput_ratio"], ">= 0.5"),
        ("refresh_throughput_changes_per_s", r["refresh_throughput_changes_per_s"], ""),
        ("lost_changes", r["lost_changes"], "= 0 (all scenarios)"),
        ("slow_subscriber_lost_changes", r["slow_subscriber_lost_changes"],
         f"= 0 ({r['slow_subscriber_gaps_repaired']} gaps repaired)"),
        ("lag_p50_ms", r["lag_p50_ms"], "at 20k changes/s offered"),
        ("lag_p99_ms", r["lag_p99_ms"], "<= 5"),
        ("snapshot_contacts", r["snapshot_contacts"], ""),
        ("snapshot_s", r["snapshot_s"], "<= 3 s at 1M"),
        ("bytes_per_contact_on_wire", r["bytes_per_contact_on_wire"], ""),
        ("bytes_per_refresh_on_wire", r["bytes_per_refresh_on_wire"], "<= 24"),
        ("rss_bytes_per_contact", r["rss_bytes_per_contact"], f"<= 700 at 1M ({n:,} here)"),
        ("gc_throughput_ratio", r["gc_throughput_ratio"],
         f"store load with GC on / off, {n:,} contacts (> 0.5)"),
        ("wall_s", r["wall_s"], "quick: < 60"),
    ])
    write_json("replication", quick, results, json_path)
    return 0
