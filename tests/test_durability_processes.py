"""Durability with real processes: kill -9 both sidecars, restart, contacts come back."""

import signal

import pytest

from sidecar.lab.nodes import make_pair, wait_until
from sidecar.lab.synthetic import contacts

pytestmark = pytest.mark.slow

DURABLE = '[durability]\nfsync = "always"\nsnapshot_interval_s = 2\n'


def test_kill_both_mid_load_then_restart_restores_every_acknowledged_contact(tmp_path):
    a, b = make_pair(tmp_path)
    a.extra_toml = b.extra_toml = DURABLE
    a.start()
    b.start()
    try:
        a.push(contacts(0, 20_000))
        wait_until(lambda: b.mi("sc_counters")["contacts"] == 20_000, 30, what="first load")
        b.mi("sc_snapshot")  # a snapshot plus a log tail after it
        a.push(contacts(20_000, 20_000), chunk=500)  # keep loading ...
        acknowledged_a = a.mi("sc_counters")["contacts"]
        acknowledged_b = b.mi("sc_counters")["contacts"]
        a.kill(signal.SIGKILL)  # ... and kill both in the middle of it
        b.kill(signal.SIGKILL)
        a.start()
        b.start()
        after_a = a.mi("sc_status")
        assert after_a["durability"]["restore"]["contacts"] >= acknowledged_a
        assert b.mi("sc_status")["durability"]["restore"]["contacts"] >= acknowledged_b
        # and the two nodes converge again on everything either of them kept
        wait_until(lambda: a.mi("sc_digest") == b.mi("sc_digest"), 30, what="converged")
        assert a.mi("sc_digest")["count"] >= max(acknowledged_a, acknowledged_b)
    finally:
        a.kill()
        b.kill()


def test_snapshot_export_and_restore_commands(tmp_path):
    a, _ = make_pair(tmp_path)
    a.peers = []
    a.extra_toml = DURABLE
    a.start()
    try:
        a.push(contacts(0, 1000))
        wait_until(lambda: a.mi("sc_counters")["contacts"] == 1000, 10, what="loaded")
        out = tmp_path / "export.snap"
        res = a.mi("sc_snapshot", {"path": str(out)})
        assert res["records"] == 1000 and out.exists()
        report = a.mi("sc_restore", {"path": str(out)})
        assert report["snapshot_records"] == 1000
        from sidecar.lab.nodes import MiError

        out.write_bytes(b"garbage" * 10)
        with pytest.raises(MiError) as e:
            a.mi("sc_restore", {"path": str(out)})
        assert e.value.error["code"] == 500 and "refused" in e.value.error["message"]
    finally:
        a.kill()
