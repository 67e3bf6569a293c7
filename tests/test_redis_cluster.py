"""Redis Cluster mode: the shared contact directory against a real 3-master cluster on
loopback (put/lookup/delete, keys on every master, the conflict rule in Lua against
model.wins, foreign data never overwritten, a master outage with backlog, catch-up and
re-push), and three independent `sidecar run` processes sharing contacts through it."""

from __future__ import annotations

import asyncio
import itertools
import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import ConfigError, parse_config
from sidecar.lab.nodes import MiError, NodeProcess, wait_until
from sidecar.lab.synthetic import contact, contacts
from sidecar.model import HANDLE, LAST_MODIFIED, make_record, rec_bid, wins
from sidecar.persist.directory_codec import (
    RedisDirectoryError,
    coalesce,
    decode_contact,
    encode_op,
)
from sidecar.persist.redis_directory import DirectoryJournal, RedisDirectory
from tests.redis_fixture import RedisClusterSet, distinct_ports, require_redis_cli

_names = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_redis_cli()
    with RedisClusterSet(tmp_path_factory.mktemp("cluster")) as cs:
        yield cs


def stamped(recs: list[tuple], origin: int = 1, lm: int = 1_000) -> list[tuple]:
    """Contacts as the replica stores them: handle and last_modified filled in."""
    return [(*r[:16], lm + i, (origin << 56) | (i + 1)) for i, r in enumerate(recs)]


def directory(cluster: RedisClusterSet, node_id: int = 1, **kw) -> RedisDirectory:
    return RedisDirectory(cluster.nodes, f"t{next(_names)}", node_id, **kw)


def delete_of(rec: tuple, lm: int, origin: int = 1) -> tuple:
    return (rec[0], rec_bid(rec), rec[7], rec[8] + 1, lm, origin << 56)


# ------------------------------------------------------------------ basics
async def test_put_lookup_delete_over_all_masters(cluster):
    d = directory(cluster)
    try:
        recs = stamped(contacts(0, 300))
        for r in recs:
            d.put(r)
        assert await d.flush() and d.backlog == 0
        assert d.stats.written == 300 and d.stats.errors == 0
        masters = {d.client.get_node_from_key(d.key(r[0])).name for r in recs}
        assert len(masters) == 3, "AOR keys must spread over every master"
        for r in recs[:20]:
            assert await d.lookup(r[0]) == [r]
        assert await d.lookup(recs[1][0], contact=recs[1][1]) == [recs[1]]
        assert await d.lookup(recs[1][0], contact="sip:other@x") == []
        assert await d.lookup("nobody@sip.example.com") == []

        for r in recs[:100]:
            d.delete(*delete_of(r, lm=10_000))
        assert await d.flush()
        assert d.stats.written == 400
        for r in recs[:100:7]:
            assert await d.lookup(r[0]) == []
            fields = await d.client.hgetall(d.key(r[0]))
            assert list(fields) == [b"v:" + rec_bid(r).encode()]  # only the tombstone
            assert fields[b"v:" + rec_bid(r).encode()].startswith(b"d\n10000\n")
        assert await d.lookup(recs[150][0]) == [recs[150]]
        # an older put arriving after the delete does not bring the contact back
        assert await d.write([recs[0]]) == [False]
        assert await d.lookup(recs[0][0]) == []
    finally:
        await d.aclose()


async def test_key_expiry_follows_contacts_and_expired_entries_are_pruned(cluster):
    clock = [1_700_000_000_000]
    d = directory(cluster, clock=lambda: clock[0], tombstone_ttl_s=10)
    try:
        now_s = clock[0] // 1000
        far = make_record(aor="exp@x", uri="sip:a@h", callid="c1", cseq=1,
                          expires=2_000_000_000, handle=(1 << 56) | 1, last_modified=1)
        near = make_record(aor="exp@x", uri="sip:b@h", callid="c2", cseq=1,
                           expires=1_900_000_000, handle=(1 << 56) | 2, last_modified=1)
        assert await d.write([near, far]) == [True, True]
        key = d.key("exp@x")
        assert await d.client.pexpiretime(key) == 2_000_000_000_000
        perm = make_record(aor="exp@x", uri="sip:p@h", callid="c3", cseq=1, expires=0,
                           handle=(1 << 56) | 3, last_modified=1)
        assert await d.write([perm]) == [True]
        assert await d.client.ttl(key) == -1  # a permanent contact: no expiry
        # an already expired version wins like a delete (tombstone, not shown)
        gone = make_record(aor="exp@x", uri="sip:p@h", callid="c3", cseq=2,
                           expires=now_s - 1, handle=(1 << 56) | 3, last_modified=2)
        assert await d.write([gone]) == [True]
        assert await d.client.pexpiretime(key) == 2_000_000_000_000
        assert sorted(r[1] for r in await d.lookup("exp@x")) == ["sip:a@h", "sip:b@h"]
        # later (the writer's clock): 'near' expired -> a tombstone for 10 s, then nothing
        clock[0] = 1_900_000_000_000 + 5_000
        other = make_record(aor="exp@x", uri="sip:z@h", callid="c9", cseq=1, expires=0,
                            handle=(1 << 56) | 9, last_modified=1)
        assert await d.write([other]) == [True]
        fields = await d.client.hgetall(key)
        assert b"c:sip:b@h" not in fields and fields[b"v:sip:b@h"].startswith(b"d\n")
        assert b"v:sip:p@h" not in fields  # that tombstone's 10 s are over
        clock[0] += 6_000
        await d.write([other])
        assert b"v:sip:b@h" not in await d.client.hgetall(key)
    finally:
        await d.aclose()


# ------------------------------------------------------------------ the conflict rule
_callids = st.one_of(st.sampled_from(["a", "b", "ab", "a\u00e9", "\u00e9", "\U0001f600", "z"]),
                     st.text(min_size=1, max_size=3))
_small_or_big = st.one_of(st.integers(-2, 3), st.integers(0, 2**63))
_version = st.tuples(st.sampled_from(["put", "delete"]), _callids,
                     st.one_of(st.integers(0, 3), st.integers(0, 2**63)), _small_or_big,
                     st.integers(1, 3))


def _change(aor: str, v: tuple) -> tuple:
    kind, callid, cseq, lm, origin = v
    if kind == "delete":
        return (aor, "sip:x@h", callid, cseq, lm, origin << 56)
    return make_record(aor=aor, uri="sip:x@h", callid=callid, cseq=cseq, expires=0,
                       handle=(origin << 56) | 7, last_modified=lm)


def test_lua_conflict_rule_matches_model_wins(cluster):
    loop = asyncio.new_event_loop()
    d = directory(cluster)
    counter = itertools.count()
    try:
        @settings(max_examples=100, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(_version, _version)
        def check(old: tuple, new: tuple) -> None:
            aor = f"w{next(counter)}@x"
            o, n = _change(aor, old), _change(aor, new)
            first, second = loop.run_until_complete(d.write([o, n]))
            assert first is True
            expected = wins(new[1], new[2], new[3], new[4] << 56,
                            old[1], old[2], old[3], old[4] << 56)
            assert second is expected, (old, new)
            shown = loop.run_until_complete(d.lookup(aor))
            survivor = n if expected else o
            assert shown == ([survivor] if len(survivor) == 18 else [])

        check()
    finally:
        loop.run_until_complete(d.aclose())
        loop.close()


# ------------------------------------------------------------------ bad data in Redis
async def test_foreign_data_is_refused_with_clear_errors_and_never_overwritten(cluster):
    d = directory(cluster)
    try:
        a, b, c, e = stamped(contacts(500, 4))
        await d.client.set(d.key(a[0]), b"not ours")
        await d.client.hset(d.key(b[0]), mapping={b"x:field": b"someone else's"})
        await d.client.hset(d.key(c[0]), mapping={b"v:" + rec_bid(c).encode(): b"garbage"})
        for r in (a, b, c, e):
            d.put(r)
        assert await d.flush()  # refused changes are dropped, not retried forever
        assert d.stats.rejected == 3 and d.stats.written == 1 and not d.degraded
        assert await d.client.get(d.key(a[0])) == b"not ours"
        assert await d.client.hgetall(d.key(b[0])) == {b"x:field": b"someone else's"}
        assert await d.client.hgetall(d.key(c[0])) == {b"v:" + rec_bid(c).encode(): b"garbage"}
        assert "wrongtype" in d.status()["last_error"] or "SCDIR" in d.status()["last_error"]
        with pytest.raises(RedisDirectoryError) as exc:
            await d.write([a])
        assert exc.value.reason == "wrongtype" and d.key(a[0]) in str(exc.value)
        with pytest.raises(RedisDirectoryError) as exc:
            await d.write([b])
        assert exc.value.reason == "error" and "foreign field" in str(exc.value)
        with pytest.raises(RedisDirectoryError) as exc:
            await d.lookup(a[0])
        assert exc.value.reason == "wrongtype"
        # an undecodable contact field is skipped, counted and named
        await d.client.hset(d.key(e[0]), b"c:sip:junk@h", b"\xc1\xc1")
        assert await d.lookup(e[0]) == [e]
        assert d.stats.bad_entries == 1 and "c:sip:junk@h" in d.stats.last_error
    finally:
        await d.aclose()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_contact_fuzz(data):
    try:
        rec = decode_contact(data, "fuzz")
    except RedisDirectoryError as exc:
        assert exc.reason == "malformed"
    else:
        assert len(rec) == 18


@settings(max_examples=300, deadline=None)
@given(st.tuples(*[st.one_of(st.none(), st.integers(-5, 2**70), st.text(max_size=5))] * 6)
       | st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3)),
                  max_size=20).map(tuple))
def test_encode_op_rejects_bad_changes_with_one_error_type(change):
    try:
        _aor, args = encode_op(change)
    except RedisDirectoryError as exc:
        assert exc.reason == "encode"
    else:
        assert len(args) == 8 and all(type(a) is bytes for a in args)


def test_coalesce_keeps_the_last_change_per_binding_and_journal_keeps_own_origin():
    r1, r2 = stamped(contacts(0, 2))
    r1b = (*r1[:8], 2, *r1[9:])
    groups = coalesce([r1, r2, r1b, delete_of(r2, 99)])
    assert groups == {r1[0]: [r1b], r2[0]: [delete_of(r2, 99)]}

    class Sink:
        def __init__(self) -> None:
            self.seen: list = []

        def put(self, rec):
            self.seen.append(rec)

        def delete(self, *c):
            self.seen.append(c)

    sink = Sink()
    j = DirectoryJournal(sink, node_id=1)  # type: ignore[arg-type]
    j.record_put(r1)
    j.record_put((*r2[:17], (2 << 56) | 5))  # replicated from node 2: not ours to write
    j.record_delete(*delete_of(r1, 5, origin=1))
    j.record_delete(*delete_of(r2, 5, origin=2))
    assert sink.seen == [r1, delete_of(r1, 5, origin=1)]


# ------------------------------------------------------------------ outage
async def test_master_outage_degrades_then_catches_up_and_repushes(tmp_path):
    require_redis_cli()
    with RedisClusterSet(tmp_path / "outage") as cs:
        d = RedisDirectory(cs.nodes, "outage", 1, backlog_limit=150, retry_interval_s=0.1,
                           flush_interval_s=0.02)
        recs = stamped(contacts(1000, 300))
        store = list(recs[:100])
        try:
            await d.start(lambda: store)
            for r in recs[:100]:
                d.put(r)
            await _until(lambda: d.backlog == 0 and d.stats.written == 100, "first flush")
            cs.stop_master(0)
            for r in recs[100:]:  # 200 changes into a backlog of 150
                d.put(r)
                store.append(r)
            await _until(lambda: d.degraded, "degraded")
            status = d.status()
            assert status["backlog"] > 0 and status["lost"] == 50 and status["repush_wanted"]
            assert status["errors"] >= 1 and status["last_error"]
            assert status["queued"] == 250
            await asyncio.to_thread(cs.start_master, 0)
            await asyncio.to_thread(cs.wait_ok)
            await _until(lambda: not d.degraded and d.backlog == 0 and not d.repush_wanted,
                         "caught up and re-pushed", timeout=30)
            assert d.stats.catch_ups >= 1 and d.stats.repushes == 1
            # the restarted master came back empty (no persistence): the re-push refilled it,
            # and the 50 changes that did not fit in the backlog are there too
            for r in recs[::7]:
                assert await d.lookup(r[0]) == [r], r[0]
        finally:
            await d.aclose()


async def _until(pred, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ three real nodes
def _show(node: NodeProcess, aor: str) -> dict | None:
    try:
        return node.mi("ul_show_contact", {"aor": aor})
    except MiError as exc:
        if exc.error["code"] == 404:
            return None
        raise


@pytest.mark.slow
def test_three_independent_nodes_share_contacts_through_the_cluster(cluster, tmp_path):
    toml = (f'[redis]\nmode = "cluster"\ncluster = "proc{next(_names)}"\n'
            f"cluster_nodes = {json.dumps(cluster.node_strings)}\n")
    nodes = [NodeProcess(i, tmp_path / f"n{i}", extra_toml=toml) for i in (1, 2, 3)]
    try:
        for n in nodes:
            n.start()
        rec = contact(4242)
        aor = rec[0]
        nodes[0].push([rec])
        for n in nodes[1:]:
            found = wait_until(lambda n=n: _show(n, aor), 20, what=f"node {n.node_id} sees it")
            assert found["source"] == "redis-cluster"
            [c] = found["Contacts"]
            assert c["uri"] == rec[1] and c["origin"] == 1 and c["callid"] == rec[7]
        assert _show(nodes[0], aor)["source"] == "local"
        status = nodes[0].mi("sc_status")["directory"]
        assert status["written"] == 1 and not status["degraded"]
        assert nodes[1].mi("sc_status")["directory"]["written"] == 0  # nothing of its own
        with pytest.raises(MiError) as exc:
            nodes[1].mi("ul_show_contact", {"aor": aor, "contact": "sip:nope@x"})
        assert exc.value.error["message"] == "Contact not found"

        nodes[0].push([(aor, rec[1], rec[7], rec[8] + 1)])  # de-REGISTER on node 1
        for n in nodes:
            wait_until(lambda n=n: _show(n, aor) is None, 20,
                       what=f"gone on node {n.node_id}")
        assert nodes[0].mi("sc_status")["directory"]["written"] == 2
    finally:
        for n in nodes:
            n.kill()


@pytest.mark.slow
def test_node_without_its_cluster_runs_degraded_and_says_why(tmp_path):
    dead = distinct_ports(1)[0]  # nothing listens there
    toml = f'[redis]\nmode = "cluster"\ncluster_nodes = ["127.0.0.1:{dead}"]\n'
    node = NodeProcess(1, tmp_path / "lonely", extra_toml=toml)
    try:
        node.start()
        node.push(contacts(0, 5))
        wait_until(lambda: node.mi("sc_counters")["contacts"] == 5, 10, what="stored locally")
        status = wait_until(lambda: (s := node.mi("sc_status")["directory"])["degraded"] and s,
                            20, what="degraded")
        assert status["backlog"] == 5 and status["errors"] >= 1 and status["last_error"]
        assert node.mi("ul_show_contact", {"aor": contact(1)[0]})["source"] == "local"
        with pytest.raises(MiError) as exc:
            node.mi("ul_show_contact", {"aor": "elsewhere@x"})
        assert exc.value.error["code"] == 500
        assert exc.value.error["message"] == "directory lookup failed"
        assert "unavailable" in exc.value.error["data"]
    finally:
        node.kill()


@pytest.mark.parametrize("redis, error", [
    ({"mode": "cluster"}, "redis.cluster_nodes: required"),
    ({"mode": "cluster", "cluster_nodes": []}, "redis.cluster_nodes: give at least one"),
    ({"mode": "cluster", "cluster_nodes": ["nohost"]}, "redis.cluster_nodes[0]: 'nohost'"),
    ({"mode": "cluster", "cluster_nodes": ["h:1"], "url": "redis://h:1/0"},
     'redis.url: not used with redis.mode = "cluster"'),
    ({"mode": "cluster", "cluster_nodes": ["h:1"], "snapshot_interval_s": 5},
     "redis.snapshot_interval_s: not used"),
    ({"mode": "cluster", "cluster_nodes": ["h:1"], "cluster": "a}b"}, "redis.cluster: 'a}b'"),
    ({"cluster_nodes": ["h:1"]}, 'redis.cluster_nodes: only used with redis.mode = "cluster"'),
    ({"url": "redis://h:1/0", "directory": True}, "redis.directory: only used"),
    ({"mode": "sentinel"}, "redis.sentinels: required"),
    ({"mode": "single", "sentinels": ["h:1"]}, "redis.sentinels: not used"),
    ({"mode": "shard"}, "redis.mode: 'shard' is not one of"),
])
def test_cluster_config_errors_name_the_key(redis, error):
    with pytest.raises(ConfigError) as exc:
        parse_config({"node": {"id": 1}, "redis": redis})
    assert str(exc.value).startswith(error), str(exc.value)


def test_cluster_config_parses_and_rejects_the_redis_lease():
    cfg = parse_config({"node": {"id": 1}, "redis": {
        "mode": "cluster", "cluster": "east", "cluster_nodes": ["10.0.0.1:7000", "[::1]:7001"],
        "directory_backlog": 5000, "directory_tombstone_ttl_s": 60}}).redis
    assert (cfg.mode, cfg.cluster, cfg.cluster_nodes, cfg.directory, cfg.directory_backlog,
            cfg.directory_tombstone_ttl_s) == ("cluster", "east", (("10.0.0.1", 7000),
                                                                   ("::1", 7001)),
                                               True, 5000, 60.0)
    assert parse_config({"node": {"id": 1}, "redis": {"sentinels": ["h:1"]}}).redis.mode \
        == "sentinel"
    with pytest.raises(ConfigError, match=r"role\.redis_lease: not available"):
        parse_config({"node": {"id": 1}, "peers": [{"id": 2, "pub": "tcp://127.0.0.1:1",
                                                    "sync": "tcp://127.0.0.1:2"}],
                      "role": {"primary": True, "redis_lease": True},
                      "redis": {"mode": "cluster", "cluster_nodes": ["h:1"]}})


def test_encoded_put_carries_the_whole_contact():
    (r,) = stamped(contacts(7, 1), origin=9, lm=123)
    aor, args = encode_op(r)
    assert aor == r[0] and args[0] == b"p" and args[4] == b"9" and args[2] == b"123"
    assert msgpack.unpackb(args[7], use_list=False) == r
    assert r[HANDLE] >> 56 == 9 and r[LAST_MODIFIED] == 123
