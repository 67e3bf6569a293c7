"""Anti-entropy, sans-I/O: digests, comparison, repair planning and applying, wire codec.

The I/O round (real ZeroMQ sockets) is in tests/test_antientropy_processes.py.
"""

import contextlib
import json
import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model import (
    ATTR,
    EXPIRES,
    HANDLE,
    LAST_MODIFIED,
    RECEIVED,
    make_record,
    rec_bid,
)
from sidecar.replica import Replica
from sidecar.replication import antientropy as ae
from sidecar.replication import wire
from sidecar.replication.catchup import antientropy_frames

VECTORS = Path(__file__).resolve().parents[1] / "proto" / "vectors"
INC = 1795000000  # origin A's current incarnation
FUTURE = 4_000_000_000  # expires: far away
A, B, C = 1, 2, 3


def handle(origin: int, counter: int, inc: int = INC) -> int:
    return (origin << 56) | (inc << 24) | counter


def rec(i: int, *, origin: int = A, inc: int = INC, counter: int | None = None,
        outbound: bool = False, lm: int = 1_700_000_000_000, cseq: int = 1,
        expires: int = FUTURE, attr: str | None = None) -> tuple:
    return make_record(
        aor=f"u{i}@example.com", uri=f"sip:u{i}@10.0.0.{i % 250}:5060",
        instance=f"<urn:uuid:{i:08d}>" if outbound else None, reg_id=1 if outbound else 0,
        callid=f"call-{i}", cseq=cseq, expires=expires, attr=attr,
        handle=handle(origin, counter if counter is not None else i + 1, inc),
        last_modified=lm + i)


def replica_with(records, node_id: int = B) -> Replica:
    r = Replica(node_id, incarnation=INC + 100)
    for x in records:
        assert r.store.put(x)
    return r


def a_subset(records, origin: int = A) -> set:
    return {r for r in records if r[HANDLE] >> 56 == origin}


def run_round(origin_records, follower: Replica, buckets: int, horizon_s: int = 0,
              origin_incarnation: int = INC):
    """One complete anti-entropy round without sockets: what the subscriber and the
    publisher do, minus the bytes. Returns (differing buckets, fetched buckets, result)."""
    theirs = ae.compute_digest(origin_records, A, buckets, horizon_s)
    mine = ae.compute_digest(follower.store.records(), A, buckets, horizon_s)
    diff = ae.differing_buckets(mine, theirs)
    fetched: list[int] = []
    total = ae.RepairResult()
    for group in ae.fetch_groups(diff, theirs.counts, max_records=7):
        fetched.extend(group)
        served = ae.BucketCollector(A, buckets, group, horizon_s)
        served.add(origin_records)
        local = ae.BucketCollector(A, buckets, group)
        local.add(follower.store.records())
        plan = ae.plan_repair(served.records, local.records, origin=A,
                              origin_incarnation=origin_incarnation, buckets=buckets,
                              indices=group, horizon_s=horizon_s)
        total.add(follower.repair_origin(A, plan))
    return diff, fetched, total


# ------------------------------------------------------------------ digests
@given(st.lists(st.integers(0, 400), unique=True, max_size=60), st.randoms(),
       st.sampled_from([1, 2, 16, 256]))
def test_digest_is_order_independent_and_only_counts_the_origin(ids, rnd, buckets):
    records = [rec(i, outbound=i % 3 == 0) for i in ids]
    others = [rec(i, origin=C) for i in ids[:10]]
    d = ae.compute_digest(records, A, buckets)
    mixed = records + others
    rnd.shuffle(mixed)
    assert ae.compute_digest(mixed, A, buckets) == d
    assert d.records == len(records) and d.buckets == buckets
    assert all(0 <= s < 2**64 for s in d.sums)
    # one pass in slices gives the same as one go
    builder = ae.DigestBuilder(A, buckets)
    for start in range(0, len(mixed), 7):
        builder.add(mixed[start:start + 7])
    assert builder.digest() == d


@pytest.mark.parametrize("field,value", [
    (0, "other@example.com"), (1, "sip:x@h"), (2, "sip:1.2.3.4:5"), (3, "<sip:p;lr>"),
    (4, "tcp:1.1.1.1:5060"), (5, FUTURE + 1), (6, 100), (7, "other-call"), (8, 9),
    (9, "UA/2"), (10, 1), (11, 4), (12, 31), (14, 2), (15, "a=b"), (16, 5), (17, 6),
])
def test_every_field_is_covered_by_the_record_hash(field, value):
    r = rec(7)
    changed = (*r[:field], value, *r[field + 1:])
    assert ae.record_hash(changed) != ae.record_hash(r)


def test_bucket_depends_on_the_binding_key_only():
    r = rec(11, outbound=True)
    newer = (*r[:EXPIRES], FUTURE + 60, *r[EXPIRES + 1:LAST_MODIFIED], r[LAST_MODIFIED] + 1,
             handle(B, 5))
    for n in (2, 64, 65536):
        assert ae.record_bucket(r, n) == ae.record_bucket(newer, n)
        assert ae.record_bucket(r, n) == ae.binding_bucket(r[0], rec_bid(r), n)


def test_a_record_msgpack_cannot_encode_is_still_compared_not_fatal():
    odd = (*rec(1)[:9], "UA\udc80", *rec(1)[10:])  # lone surrogate from a local source
    d = ae.compute_digest([odd, rec(2)], A, 4)
    assert d.records == 2 and ae.record_hash(odd) != ae.record_hash(rec(1))
    assert ae.compute_digest([rec(2)], A, 4) != d


def test_near_expiry_records_are_left_out_of_the_comparison():
    live, ending = rec(1), rec(2, expires=1000)
    permanent = rec(3, expires=0)
    d = ae.compute_digest([live, ending, permanent], A, 16, horizon_s=1000)
    assert d.records == 2
    assert d == ae.compute_digest([live, permanent], A, 16, horizon_s=1000)


def test_differing_buckets_needs_one_bucket_count():
    with pytest.raises(ValueError):
        ae.differing_buckets(ae.compute_digest([], A, 8), ae.compute_digest([], A, 16))
    with pytest.raises(ValueError):
        ae.DigestBuilder(A, 12)


def test_golden_digest_vector_pins_the_bucket_and_hash_functions():
    """A digest is only comparable across implementations if both compute CRC-32 buckets
    and blake2b-8 record hashes the same way: the vector fixes the numbers."""
    answer = wire.decode_digest((VECTORS / "digest.bin").read_bytes())
    [alice] = wire.decode_buckets((VECTORS / "buckets.bin").read_bytes()).records
    assert answer.counts == (0, 0, 1, 1, 0, 0, 0, 0)
    assert ae.record_bucket(alice, 8) == 2
    assert answer.sums[2] == ae.record_hash(alice)
    hb = msgpack.packb(json.loads((VECTORS / "buckets.json").read_text())["decoded"][6][0])
    assert hb == msgpack.packb(alice)  # the hash input is the record's wire encoding


def test_fetch_groups_bound_the_records_per_request():
    counts = [5, 0, 30, 2, 2, 2, 9]
    assert ae.fetch_groups([0, 2, 3, 4, 5, 6], counts, max_records=10) == [
        [0], [2], [3, 4, 5], [6]]
    assert ae.fetch_groups([], counts) == []


# ------------------------------------------------------------------ repair
op = st.tuples(st.sampled_from(["drop", "alter", "ghost", "ghost_old", "other", "stale"]),
               st.integers(0, 10_000))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), unique=True, max_size=50), st.lists(op, max_size=25),
       st.sampled_from([1, 4, 32, 1024]))
def test_repair_makes_the_origin_subset_equal_and_fetches_only_differing_buckets(
        ids, ops, buckets):
    origin = [rec(i, outbound=i % 4 == 0) for i in ids]
    follower = replica_with(origin)
    others = []
    for kind, n in ops:
        held = sorted(a_subset(follower.store))
        if kind in ("drop", "alter", "stale") and held:
            r = held[n % len(held)]
            follower.store.drop(r)
            if kind == "alter":
                follower.store.put((*r[:RECEIVED], f"sip:9.9.9.{n % 250}:1", *r[RECEIVED + 1:]))
            elif kind == "stale":  # an older version of the binding, as if a delete was missed
                follower.store.put((*r[:LAST_MODIFIED], r[LAST_MODIFIED] - 1,
                                    handle(A, 900_000 + n)))
        elif kind == "ghost":  # a binding the origin made in this incarnation and deleted
            follower.store.put(rec(1000 + n, counter=500_000 + n))
        elif kind == "ghost_old":  # made by an earlier incarnation of the origin: kept
            follower.store.put(rec(20_000 + n, inc=INC - 7))
        elif kind == "other":  # another origin's binding: never touched by this repair
            o = rec(40_000 + n, origin=C)
            if follower.store.put(o):
                others.append(o)
    kept = {r for r in a_subset(follower.store) if (r[HANDLE] >> 24) & 0xFFFFFFFF < INC}
    # which buckets really differ, computed independently of the digests
    def contents(records):
        out: dict[int, set] = {}
        for r in a_subset(records):
            out.setdefault(ae.record_bucket(r, buckets), set()).add(r)
        return out

    want, have = contents(origin), contents(follower.store)
    truly_differing = sorted(b for b in set(want) | set(have) if want.get(b) != have.get(b))

    diff, fetched, result = run_round(origin, follower, buckets)
    assert diff == truly_differing
    assert sorted(fetched) == diff  # only the differing buckets are fetched
    assert a_subset(follower.store) == set(origin) | kept
    assert set(others) <= set(follower.store)
    assert result.refused == result.changed == 0
    # a second round finds only the kept earlier-incarnation records
    again, _, result2 = run_round(origin, follower, buckets)
    assert result2.put == result2.dropped == 0
    assert set(again) == {ae.record_bucket(g, buckets) for g in kept}


def test_repair_respects_the_conflict_rule_against_another_origins_newer_version():
    theirs = rec(5)
    mine = (*theirs[:LAST_MODIFIED], theirs[LAST_MODIFIED] + 10, handle(B, 1))  # B's newer
    follower = replica_with([mine])
    diff, fetched, result = run_round([theirs], follower, 8)
    assert diff == fetched and result.refused == 1 and result.put == 0
    assert follower.store.get(theirs[0], rec_bid(theirs)) == mine


def test_origin_is_authoritative_for_its_own_versions():
    """A version of the origin held here that the origin no longer has is replaced even
    when the conflict rule alone would keep it (it cannot be newer than the origin)."""
    theirs = rec(5, lm=1_700_000_000_000)
    bogus = (*theirs[:LAST_MODIFIED], theirs[LAST_MODIFIED] + 99_999, theirs[HANDLE])
    follower = replica_with([bogus])
    _, _, result = run_round([theirs], follower, 8)
    assert result.put == 1
    assert follower.store.get(theirs[0], rec_bid(theirs)) == theirs
    assert follower.stats.repaired == 1 and not follower.outbox.pending  # never published


def test_bindings_changed_after_the_cut_are_left_to_the_stream():
    theirs = [rec(1), rec(2)]
    follower = replica_with([(*rec(1)[:ATTR], "damaged", *rec(1)[ATTR + 1:]), rec(3)])
    local = ae.BucketCollector(A, 1, [0])
    local.add(follower.store.records())
    plan = ae.plan_repair(theirs, local.records, origin=A, origin_incarnation=INC, buckets=1,
                          indices=[0], horizon_s=0)
    assert len(plan.puts) == 2 and len(plan.drops) == 1
    # after the cut, the stream brought a newer version of u1 and deleted u3
    newer = rec(1, lm=1_700_000_000_500, cseq=2)
    assert follower.store.put(newer)
    assert follower.store.delete(rec(3)[0], rec_bid(rec(3)), "call-3", 2, 1_800_000_000_000,
                                 handle(A, 0))
    result = follower.repair_origin(A, plan)
    assert (result.put, result.changed, result.dropped) == (1, 2, 0)
    assert follower.store.get(newer[0], rec_bid(newer)) == newer


def test_a_peer_cannot_repair_records_of_another_origin_or_other_buckets():
    follower = replica_with([rec(1, origin=C)])
    foreign = rec(1, origin=C, lm=1_900_000_000_000)
    elsewhere = next(rec(i) for i in range(100) if ae.record_bucket(rec(i), 4) != 0)
    garbage = [foreign, elsewhere, ("not", "a", "record"), rec(2)[:10], 5]
    plan = ae.plan_repair(garbage, [], origin=A, origin_incarnation=INC, buckets=4,
                          indices=[0], horizon_s=0)
    assert plan.bad == 5 and not plan.puts and not plan.drops
    follower.repair_origin(A, plan)
    assert set(follower.store) == {rec(1, origin=C)}


def test_earlier_incarnation_records_absent_at_the_origin_are_kept():
    old = rec(1, inc=INC - 1)
    follower = replica_with([old])
    diff, _, result = run_round([], follower, 4)
    assert diff == [ae.record_bucket(old, 4)] and result.dropped == 0
    assert set(follower.store) == {old}


@given(st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none(),
                          st.lists(st.integers(), max_size=20).map(tuple)), max_size=10))
def test_plan_repair_never_raises_on_garbage(entries):
    plan = ae.plan_repair(entries, [rec(1)], origin=A, origin_incarnation=INC, buckets=2,
                          indices=[0, 1], horizon_s=0)
    assert plan.bad == len(entries)


# ------------------------------------------------------------------ the ROUTER's answer
def test_answer_starts_with_the_cut_then_hashes_in_slices():
    a = Replica(A, incarnation=INC)
    for i in range(25):
        a.local_put(rec(i)[:HANDLE] + (0,))
    a.store.put(rec(100, origin=C))  # held but not A's: not in A's digest
    a.outbox.flush()
    req = wire.DigestRequest(B, INC, 4, 16)
    items = list(antientropy_frames(a, req, slice_size=10))
    kind, payload = items[0]
    cut = wire.decode_cut(payload)
    assert kind == wire.CUT and cut.cut_seq == 25 and cut.req_id == 4
    assert items[1:-1] == [None] * 3  # 26 records in slices of 10
    kind, payload = items[-1]
    d = wire.decode_digest(payload)
    assert kind == wire.DIGEST and (d.cut_seq, d.req_id) == (25, 4)
    assert (d.counts, d.sums) == (lambda x: (x.counts, x.sums))(
        ae.compute_digest(a.store, A, 16, cut.horizon_s))
    # and the buckets answer carries exactly A's records of those buckets
    want = [b for b, c in enumerate(d.counts) if c][:3]
    items = list(antientropy_frames(a, wire.BucketRequest(B, INC, 5, 16, tuple(want))))
    kind, payload = items[-1]
    got = wire.decode_buckets(payload)
    assert kind == wire.BUCKETS and got.indices == tuple(want)
    assert {ae.record_bucket(r, 16) for r in got.records} == set(want)
    assert len(got.records) == sum(d.counts[b] for b in want)


def test_a_buckets_answer_too_large_for_one_message_is_refused(monkeypatch):
    a = Replica(A, incarnation=INC)
    a.local_put(rec(1)[:HANDLE] + (0,))
    monkeypatch.setattr(wire, "MAX_MESSAGE", 40)
    items = [x for x in antientropy_frames(a, wire.BucketRequest(B, INC, 1, 1, (0,)))
             if x is not None]
    assert items[-1][0] == wire.ERROR
    monkeypatch.undo()
    assert wire.decode_error(items[-1][1])[0] == wire.ERR_TOO_LARGE


# ------------------------------------------------------------------ wire codec
def test_round_trip_of_every_message():
    assert wire.decode_digest_request(wire.encode_digest_request(2, 7, 3, 1024)) == \
        wire.DigestRequest(2, 7, 3, 1024)
    assert wire.decode_bucket_request(wire.encode_bucket_request(2, 7, 4, 8, [7, 0])) == \
        wire.BucketRequest(2, 7, 4, 8, (7, 0))
    assert wire.decode_cut(wire.encode_cut(7, 99, 3, 1234, 5)) == wire.Cut(7, 99, 3, 1234, 5)
    d = wire.decode_digest(wire.encode_digest(7, 99, 3, [1, 0], [2**64 - 1, 0]))
    assert d == wire.DigestAnswer(7, 99, 3, (1, 0), (2**64 - 1, 0)) and d.buckets == 2
    r = rec(1)
    assert wire.decode_buckets(wire.encode_buckets(7, 99, 4, 8, [3], [r])) == \
        wire.BucketAnswer(7, 99, 4, 8, (3,), (r,))


P = msgpack.packb


@pytest.mark.parametrize("decode,payload,reason", [
    (wire.decode_digest_request, P([1, 2, 7, 3]), "malformed"),  # too short
    (wire.decode_digest_request, P([2, 2, 7, 3]), "version"),
    (wire.decode_digest_request, P([1, 2, 7, 3, 1000]), "malformed"),  # not a power of two
    (wire.decode_digest_request, P([1, 2, 7, 3, 0]), "malformed"),
    (wire.decode_digest_request, P([1, 2, 7, 3, 131072]), "malformed"),  # above MAX_BUCKETS
    (wire.decode_digest_request, P([1, 2, -7, 3, 8]), "malformed"),
    (wire.decode_digest_request, P([1, 2, 7, 3, True]), "malformed"),
    (wire.decode_bucket_request, P([1, 2, 7, 3, 8, [8]]), "malformed"),  # bucket out of range
    (wire.decode_bucket_request, P([1, 2, 7, 3, 8, [1, 1]]), "malformed"),  # twice
    (wire.decode_bucket_request, P([1, 2, 7, 3, 8, []]), "malformed"),  # none
    (wire.decode_bucket_request, P([1, 2, 7, 3, 8, 5]), "malformed"),
    (wire.decode_bucket_request, P([1, 2, 7, 3, 8, ["1"]]), "malformed"),
    (wire.decode_cut, P([1, 7, 99, 3, 1234]), "malformed"),
    (wire.decode_cut, P([1, 7, 99, 3, 1234, None]), "malformed"),
    (wire.decode_digest, P([1, 7, 99, 3, 2, [1], [1]]), "malformed"),  # fewer than buckets
    (wire.decode_digest, P([1, 7, 99, 3, 2, [1, 1], [1, -1]]), "malformed"),
    (wire.decode_digest, P([1, 7, 99, 3, 2, [1, 1], [1, 1.5]]), "malformed"),
    (wire.decode_digest, P([1, 7, 99, 3, 3, [1, 1, 1], [1, 1, 1]]), "malformed"),
    (wire.decode_digest, P([1.0, 7, 99, 3, 1, [1], [1]]), "version"),
    (wire.decode_buckets, P([1, 7, 99, 3, 8, [1], {"a": 1}]), "malformed"),
    (wire.decode_buckets, P([1, 7, 99, 3, 8, [9], []]), "malformed"),
    (wire.decode_buckets, b"\xc1", "malformed"),
])
def test_bad_messages_raise_wire_error(decode, payload, reason):
    with pytest.raises(wire.WireError) as e:
        decode(payload)
    assert e.value.reason == reason


AE_DECODERS = [wire.decode_digest_request, wire.decode_bucket_request, wire.decode_cut,
               wire.decode_digest, wire.decode_buckets]
small = st.one_of(st.integers(-3, 70_000), st.sampled_from([2**64 - 1, 2**63]), st.none(),
                  st.booleans(), st.text(max_size=3), st.floats(allow_nan=False))
fields = st.one_of(small, st.lists(small, max_size=9))


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 1, 1, 2, True]), st.lists(fields, max_size=8))
def test_fuzz_near_valid_messages_raise_only_wire_error(version, rest):
    payload = msgpack.packb([version, *rest], use_bin_type=True)
    for decode in AE_DECODERS:
        with contextlib.suppress(wire.WireError):
            decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["digest_request", "bucket_request", "cut", "digest", "buckets"]),
       st.binary(min_size=1, max_size=12), st.integers(0, 250))
def test_fuzz_mutated_golden_vectors(name, junk, at):
    raw = bytearray((VECTORS / f"{name}.bin").read_bytes())
    at %= len(raw)
    raw[at:at + len(junk)] = junk
    for decode in AE_DECODERS:
        try:
            got = decode(bytes(raw))
        except wire.WireError:
            continue
        if isinstance(got, wire.BucketAnswer):  # records are checked when planning
            ae.plan_repair(got.records, [], origin=A, origin_incarnation=INC,
                           buckets=got.buckets, indices=got.indices, horizon_s=0)


def test_random_rounds_with_many_buckets_stay_cheap_and_exact():
    rng = random.Random(7)
    origin = [rec(i) for i in range(3000)]
    follower = replica_with(origin)
    damaged = rng.sample(origin, 5)
    for r in damaged:
        follower.store.drop(r)
    diff, fetched, result = run_round(origin, follower, 1024)
    assert diff == fetched == sorted({ae.record_bucket(r, 1024) for r in damaged})
    assert result.put == 5 and a_subset(follower.store) == set(origin)


# ------------------------------------------------------------------ configuration
def test_config_keys_defaults_and_validation():
    from sidecar.config import ConfigError, parse_config

    cfg = parse_config({"node": {"id": 1}})
    assert cfg.replication.antientropy_interval_s == 30.0
    assert cfg.replication.antientropy_buckets == ae.DEFAULT_BUCKETS
    cfg = parse_config({"node": {"id": 1}, "replication": {"antientropy_interval_s": 0,
                                                           "antientropy_buckets": 65536}})
    assert (cfg.replication.antientropy_interval_s, cfg.replication.antientropy_buckets) == \
        (0.0, 65536)
    for bad in ({"antientropy_buckets": 1000}, {"antientropy_buckets": 0},
                {"antientropy_buckets": 131072}, {"antientropy_interval_s": -1},
                {"antientropy_interval_s": "30"}):
        with pytest.raises(ConfigError, match=r"replication\.antientropy_"):
            parse_config({"node": {"id": 1}, "replication": bad})
