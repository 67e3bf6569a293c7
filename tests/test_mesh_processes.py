"""Three sidecars in a full mesh (each follows the other two): changes from any node reach
every node, a node killed and restarted comes back complete, and a partitioned pair that took
different registrations converges after the heal (fail-back merge by the conflict rule)."""

import signal

import pytest

from sidecar.lab.nodes import NodeProcess, wait_until
from sidecar.lab.synthetic import contact, contacts

pytestmark = pytest.mark.slow


def mesh(tmp_path, n=3):
    nodes = [NodeProcess(i + 1, tmp_path / f"n{i + 1}") for i in range(n)]
    for node in nodes:
        node.peers = [p for p in nodes if p is not node]
    return nodes


def digests(nodes):
    return [n.mi("sc_digest") for n in nodes]


def test_three_node_mesh_converges_and_survives_a_restart(tmp_path):
    nodes = mesh(tmp_path)
    for n in nodes:
        n.start()
    try:
        for i, n in enumerate(nodes):  # every node takes its own phones
            n.push(contacts(i * 5000, 5000))
        wait_until(lambda: len({d["digest"] for d in digests(nodes)}) == 1
                   and digests(nodes)[0]["count"] == 15_000, 30, what="mesh converged")
        nodes[1].kill(signal.SIGKILL)
        nodes[0].push(contacts(15_000, 1000))
        nodes[2].push([contact(i, version=2) for i in range(10_000, 11_000)])
        nodes[1].start()
        wait_until(lambda: len({d["digest"] for d in digests(nodes)}) == 1
                   and digests(nodes)[0]["count"] == 16_000, 30, what="restarted node caught up")
        peers = nodes[1].mi("sc_peers")
        assert sorted(p["peer"] for p in peers) == [1, 3]
        assert all(p["state"] == "live" for p in peers)
    finally:
        for n in nodes:
            n.kill()


def test_partitioned_pair_merges_what_each_side_learned(tmp_path):
    """A and B run without hearing each other (their peer endpoints point nowhere), each takes
    different phones and a re-registration of a shared one; then they are restarted with the
    real endpoints and durable state: both end with the union, newest version winning."""
    a, b = mesh(tmp_path, 2)
    real = [a.peers, b.peers]
    dead = NodeProcess(9, tmp_path / "nowhere")  # ports nobody listens on: a partition
    for n in (a, b):
        n.peers = [dead]
        n.extra_toml = '[durability]\nfsync = "always"\n'
    a.start()
    b.start()
    try:
        a.push(contacts(0, 300))
        b.push(contacts(300, 300))
        b.push([contact(5, version=7)])  # phone 5 re-registered on B's side: newer CSeq
        wait_until(lambda: a.mi("sc_counters")["contacts"] == 300
                   and b.mi("sc_counters")["contacts"] == 301, 10, what="split brain load")
        for n, peers in zip((a, b), real, strict=True):
            n.kill(signal.SIGTERM)  # heal: restart with the real endpoints, state from disk
            n.peers = peers
            n.start()
        wait_until(lambda: a.mi("sc_digest") == b.mi("sc_digest"), 30, what="merged")
        assert a.mi("sc_digest")["count"] == 600  # phone 5 is on both sides
        [c5] = a.mi("ul_show_contact", {"aor": contact(5)[0]})["Contacts"]
        assert c5["cseq"] == 7 and c5["origin"] == 2
    finally:
        a.kill()
        b.kill()
