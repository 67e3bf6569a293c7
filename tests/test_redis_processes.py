"""A real `sidecar run` with [redis]: changes reach the Redis stream, a node that lost its
memory and its local files gets every contact back from Redis, and Redis going away degrades
the node without stopping replication."""

import shutil

import pytest

from sidecar.lab.nodes import NodeProcess, make_pair, wait_until
from sidecar.lab.synthetic import contacts
from tests.redis_fixture import RedisServer, require_redis

pytestmark = pytest.mark.slow


def redis_toml(url: str) -> str:
    return f'[redis]\nurl = "{url}"\ncluster = "test"\nsnapshot_interval_s = 1\n'


def test_contacts_come_back_from_redis_and_redis_outage_degrades_only(tmp_path):
    require_redis()
    with RedisServer(tmp_path / "redis") as redis:
        a, b = make_pair(tmp_path / "nodes")
        a.extra_toml = b.extra_toml = redis_toml(redis.url)
        a.start()
        b.start()
        try:
            a.push(contacts(0, 3000))
            wait_until(lambda: b.mi("sc_counters")["contacts"] == 3000, 20, what="replicated")
            wait_until(lambda: a.mi("sc_status")["redis"]["backlog"] == 0, 20,
                       what="stream flushed")
            a.kill()
            b.kill()
            # a brand-new node (no memory, no local state) restores the table from Redis
            shutil.rmtree(a.workdir / "state", ignore_errors=True)
            fresh = NodeProcess(1, tmp_path / "fresh", extra_toml=redis_toml(redis.url))
            fresh.start()
            try:
                assert fresh.mi("sc_counters")["contacts"] == 3000
            finally:
                fresh.kill()

            # Redis down: replication between the nodes goes on, the node reports degraded
            a.start()
            b.start()
            wait_until(lambda: b.mi("sc_counters")["contacts"] == 3000, 20, what="resynced")
            redis.stop()
            a.push(contacts(3000, 500))
            wait_until(lambda: b.mi("sc_counters")["contacts"] == 3500, 20,
                       what="replication without Redis")
            wait_until(lambda: a.mi("sc_status")["redis"]["degraded"], 20, what="degraded")
            redis.start()
            wait_until(lambda: not a.mi("sc_status")["redis"]["degraded"]
                       and a.mi("sc_status")["redis"]["backlog"] == 0, 30,
                       what="caught up after Redis returned")
        finally:
            a.kill()
            b.kill()


def test_role_lease_follows_the_active_node(tmp_path):
    import signal

    require_redis()
    with RedisServer(tmp_path / "redis") as redis:
        a, b = make_pair(tmp_path / "nodes")
        role = ("[role]\nprimary = {p}\nwait_s = 1.0\nstartup_wait_s = 1.0\n"
                "peer_timeout_s = 1.0\nheartbeat_max_age_s = 0.5\nbackoff_initial_s = 0.5\n"
                "redis_lease = true\nlease_ttl_ms = 1500\n")
        a.extra_toml = redis_toml(redis.url) + role.format(p="true")
        b.extra_toml = redis_toml(redis.url) + role.format(p="false")
        import redis as redis_py

        with redis_py.Redis.from_url(redis.url) as r:  # the fencing counter is ahead of the
            r.set("sc:{test}:lease:epoch", 40)           # nodes' own epochs (fresh state dirs)
        a.start()
        b.start()
        try:
            wait_until(lambda: a.mi("sc_role")["state"] == "active"
                       and not a.mi("sc_role")["failover_pending"]
                       and b.mi("sc_role")["state"] == "passive", 15, what="settled")
            role_a = a.mi("sc_role")
            # the lease's INCR is the fencing token: the arbiter adopted it as its epoch
            assert role_a["lease"]["held_epoch"] == 41 and role_a["epoch"] == 41
            wait_until(lambda: b.mi("sc_role")["checkpoints"]["redis_lease"]["ok"] is True, 5,
                       what="B's lease checkpoint sees A holding the lease")
            a.kill(signal.SIGKILL)
            # B may promote only once the heartbeat AND the lease say A is gone (ttl 1.5 s)
            wait_until(lambda: b.mi("sc_role")["state"] == "active"
                       and not b.mi("sc_role")["failover_pending"], 20, what="B took over")
            role_b = b.mi("sc_role")
            assert role_b["lease"]["held_epoch"] == role_b["epoch"] == 42
        finally:
            a.kill()
            b.kill()
