"""Role arbitration between two real `sidecar run` processes on loopback.

Heartbeats over the replication link are the checkpoint here (the network-namespace lab adds
VIP and NAT); hooks are real commands writing what they were told into files.
"""

import json
import signal
import sys

import pytest

from sidecar.lab.nodes import MiError, make_pair, wait_until
from sidecar.lab.synthetic import contacts

pytestmark = pytest.mark.slow

HOOK_SCRIPT = """import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: v for k, v in os.environ.items() if k.startswith("SIDECAR_")}) + "\\n")
"""


def role_toml(primary: bool, hook_file) -> str:
    script = hook_file.with_suffix(".py")
    script.write_text(HOOK_SCRIPT)
    cmd = json.dumps([sys.executable, str(script), str(hook_file)])
    return (f"[role]\nprimary = {'true' if primary else 'false'}\nwait_s = 1.0\n"
            f"startup_wait_s = 1.0\npeer_timeout_s = 1.0\nheartbeat_max_age_s = 0.5\n"
            f"backoff_initial_s = 1.0\n"
            f"[role.hooks]\nbefore_failover = [{cmd}]\nafter_failover = [{cmd}]\n"
            f"on_demote = [{cmd}]\n")


def role(node) -> dict:
    return node.mi("sc_role")


def settled(active, passive) -> bool:
    ra, rp = role(active), role(passive)
    return (ra["state"] == "active" and not ra["failover_pending"]
            and rp["state"] == "passive" and rp["peer_state"]["role"] == "active"
            and ra["peer_state"]["role"] in ("passive", "yielding"))


def hooks_seen(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def pair(tmp_path):
    a, b = make_pair(tmp_path)
    a.extra_toml = role_toml(True, tmp_path / "hooks-a.jsonl")
    b.extra_toml = role_toml(False, tmp_path / "hooks-b.jsonl")
    a.start()
    b.start()
    yield a, b
    a.kill()
    b.kill()


def test_primary_active_backup_passive_then_failover_and_no_failback(pair, tmp_path):
    a, b = pair
    wait_until(lambda: settled(a, b), 15, what="primary active, backup passive")
    epoch1 = role(a)["epoch"]
    assert epoch1 >= 1
    a.push(contacts(0, 500))
    wait_until(lambda: b.mi("sc_counters")["contacts"] == 500, 10, what="replicated")

    a.kill(signal.SIGKILL)
    wait_until(lambda: role(b)["state"] == "active" and not role(b)["failover_pending"], 10,
               what="backup took over (hooks and all)")
    assert role(b)["epoch"] > epoch1
    assert b.mi("sc_status")["epoch"] == role(b)["epoch"]  # frames carry the new epoch
    hooks_b = tmp_path / "hooks-b.jsonl"
    wait_until(lambda: "after_failover" in [h["SIDECAR_STAGE"] for h in hooks_seen(hooks_b)],
               10, what="after_failover hook ran")
    seen = [h for h in hooks_seen(hooks_b) if h["SIDECAR_STAGE"] != "on_demote"]
    assert [h["SIDECAR_STAGE"] for h in seen] == ["before_failover", "after_failover"]
    assert seen[0]["SIDECAR_EPOCH"] == str(role(b)["epoch"]) and seen[0]["SIDECAR_PEER"] == "1"

    a.start()  # the old primary returns: it sees the higher epoch and stays passive
    wait_until(lambda: role(a)["state"] == "passive" and role(a)["epoch"] == role(b)["epoch"],
               15, what="old primary passive with the new epoch")
    assert role(b)["state"] == "active"
    wait_until(lambda: a.mi("sc_digest") == b.mi("sc_digest"), 15, what="resynced")


def test_check_only_changes_nothing_and_manual_failover_moves_the_role(pair):
    a, b = pair
    wait_until(lambda: settled(a, b), 15, what="settled")
    epoch = role(a)["epoch"]
    report = a.mi("sc_failover", {"check_only": 1})
    assert report["ok"] is True and report["command"] == "failover"
    assert role(a)["state"] == "active" and role(a)["epoch"] == epoch
    assert role(b)["state"] == "passive"

    a.mi("sc_failover")  # hand the role to the peer
    wait_until(lambda: settled(b, a), 10, what="role moved to B")
    assert role(b)["epoch"] > epoch
    b.mi("sc_failover", {"target": 1})  # and back, by target
    wait_until(lambda: settled(a, b), 10, what="role moved back to A")


def test_promote_refused_while_peer_active_and_role_commands_need_role(pair, tmp_path):
    a, b = pair
    wait_until(lambda: settled(a, b), 15, what="settled")
    res = b.mi("sc_promote")
    assert res["ok"] is False and role(b)["state"] == "passive"
    from sidecar.lab.nodes import NodeProcess

    plain = NodeProcess(5, tmp_path / "plain").start()
    try:
        with pytest.raises(MiError) as e:
            plain.mi("sc_role")
        assert e.value.error["code"] == 404
    finally:
        plain.kill()
