"""The node's MI commands, /metrics and /health on a real `sidecar run` process."""

import json
import subprocess
import sys
import urllib.request

import pytest

from sidecar.lab.nodes import MiError, make_pair, wait_until
from sidecar.lab.synthetic import contacts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    a, b = make_pair(tmp_path_factory.mktemp("admin"))
    a.start()
    b.start()
    a.push(contacts(0, 2500))
    wait_until(lambda: b.mi("sc_counters")["contacts"] == 2500, 20, what="loaded")
    yield a, b
    a.kill()
    b.kill()


def test_which_lists_the_commands(nodes):
    a, _ = nodes
    names = a.mi("which")
    for cmd in ("sc_status", "ul_dump", "ul_show_contact", "sc_resync", "sc_digest",
                "sc_peers"):
        assert cmd in names


def test_sc_status_fields(nodes):
    a, b = nodes
    st = b.mi("sc_status")
    for key in ("node_id", "epoch", "incarnation", "uptime_s", "contacts", "aors",
                "last_seq_sent", "peers", "lag_ms"):
        assert key in st
    [peer] = st["peers"]
    assert peer["peer"] == 1 and peer["state"] == "live"
    assert peer["last_seq_applied"] == a.mi("sc_status")["last_seq_sent"] == 2500


def test_sc_peers_lists_the_link(nodes):
    _, b = nodes
    [peer] = b.mi("sc_peers")
    assert peer["peer"] == 1 and peer["state"] == "live" and peer["lag_changes"] == 0


def test_ul_dump_pages_through_everything(nodes):
    _, b = nodes
    seen, offset = [], 0
    while offset is not None:
        page = b.mi("ul_dump", {"offset": offset, "limit": 1000})
        seen += [c["aor"] for aor in page["AORs"] for c in aor["Contacts"]]
        offset = page["next_offset"]
    assert len(seen) == len(set(seen)) == 2500
    one = b.mi("ul_dump", {"aor": "u0000042@sip.example.com"})
    assert [a["AOR"] for a in one["AORs"]] == ["u0000042@sip.example.com"]


def test_ul_show_contact_and_not_found(nodes):
    _, b = nodes
    res = b.mi("ul_show_contact", ["u0000001@sip.example.com"])
    [c] = res["Contacts"]
    assert c["uri"].startswith("sip:u0000001@") and c["origin"] == 1 and c["expires_in"] > 3000
    with pytest.raises(MiError) as e:
        b.mi("ul_show_contact", {"aor": "nobody@x"})
    assert e.value.error["code"] == 404 and e.value.error["message"] == "AOR not found"


def test_bad_params_are_jsonrpc_errors(nodes):
    _, b = nodes
    for params in ({"limit": 0}, {"offset": "x"}, {"bogus": 1}):
        with pytest.raises(MiError) as e:
            b.mi("ul_dump", params)
        assert e.value.error["code"] == -32602
    with pytest.raises(MiError) as e:
        b.mi("no_such_command")
    assert e.value.error["code"] == -32601


def test_sc_resync_repairs_from_a_snapshot(nodes):
    a, b = nodes
    before = b.mi("sc_status")["peers"][0]["stats"]["snapshots"]
    assert b.mi("sc_resync") == {"requested": [1]}
    wait_until(lambda: b.mi("sc_status")["peers"][0]["stats"]["snapshots"] > before, 10,
               what="snapshot done")
    assert a.mi("sc_digest") == b.mi("sc_digest")
    with pytest.raises(MiError):
        b.mi("sc_resync", {"peer": 9})


def test_metrics_and_health(nodes):
    _, b = nodes
    base = f"http://127.0.0.1:{b.admin_port}"
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert "sidecar_contacts 2500.0" in text
    assert 'sidecar_peer_link_live{peer="1"} 1.0' in text
    health = json.loads(urllib.request.urlopen(f"{base}/health", timeout=5).read())
    assert health["status"] == "ok" and health["contacts"] == 2500


def test_cli_mi_talks_to_the_node(nodes):
    _, b = nodes
    out = subprocess.run([sys.executable, "-m", "sidecar", "mi", "--url",
                          f"http://127.0.0.1:{b.admin_port}/mi", "ul_show_contact",
                          "u0000002@sip.example.com"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["AOR"] == "u0000002@sip.example.com"
