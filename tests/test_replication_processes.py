"""Real `sidecar run` processes exchanging over real ZeroMQ sockets on loopback.

Start, load, kill -9, restart, and check that the replicas converge — by an order-independent
digest of every contact (sc_digest), not just by counts.
"""

import signal
import socket
from pathlib import Path

import msgpack
import pytest
import zmq

from sidecar.lab.nodes import NodeProcess, free_ports, make_pair, wait_until
from sidecar.lab.synthetic import contact, contacts
from sidecar.replication import wire

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path):
    nodes = []

    def start(extra_a=None, extra_b=None):
        a, b = make_pair(tmp_path, extra_a, extra_b)
        nodes.extend([a, b])
        a.start()
        b.start()
        return a, b

    yield start
    for n in nodes:
        n.kill()


def digest(node):
    return node.mi("sc_digest")


def converged(a, b, count=None):
    da, db = digest(a), digest(b)
    return da == db and (count is None or da["count"] == count)


def test_load_replicates_exactly_and_admin_views_agree(pair):
    a, b = pair()
    a.push(contacts(0, 20_000))
    wait_until(lambda: converged(a, b, 20_000), 30, what="B equals A")
    # refreshes (same Call-ID, higher CSeq, new expiry) and de-registrations
    refreshed = [contact(i, version=2) for i in range(0, 5000)]
    a.push(refreshed)
    c = contact(7)
    a.push([(c[0], c[1], c[7], 3)])  # delete: aor, bid, callid, cseq
    wait_until(lambda: converged(a, b, 19_999), 30, what="refresh/delete replicated")
    st_a, st_b = a.mi("sc_status"), b.mi("sc_status")
    assert st_a["publisher"]["changes"] == 25_001
    assert st_b["replica"]["bad_changes"] == 0
    assert st_b["store"]["refreshes"] == 5000  # sent as refreshes, not full records
    [peer] = st_b["peers"]
    assert peer["state"] == "live" and peer["lag_changes"] == 0
    assert b.mi("ul_show_contact", {"aor": "u0000008@sip.example.com"})["Contacts"][0]["cseq"] == 2


def test_standby_killed_and_restarted_resyncs(pair):
    a, b = pair()
    a.push(contacts(0, 10_000))
    wait_until(lambda: converged(a, b, 10_000), 30, what="initial sync")
    b.kill(signal.SIGKILL)
    a.push(contacts(10_000, 5_000))  # B misses these while dead
    b.start()
    wait_until(lambda: converged(a, b, 15_000), 30, what="B resynced after kill -9")
    a.push(contacts(15_000, 1_000))
    wait_until(lambda: converged(a, b, 16_000), 30, what="live again after resync")


def test_active_killed_and_restarted_gets_its_contacts_back(pair):
    a, b = pair()
    a.push(contacts(0, 8_000))
    wait_until(lambda: converged(a, b, 8_000), 30, what="initial sync")
    a.kill(signal.SIGKILL)
    b.push(contacts(8_000, 2_000))  # the standby learns new phones while A is down
    a.start()  # empty memory, new incarnation
    wait_until(lambda: converged(a, b, 10_000), 30,
               what="A restored from B (its own old contacts included)")
    a.push(contacts(10_000, 500))
    wait_until(lambda: converged(a, b, 10_500), 30, what="A publishes again after restart")
    st = b.mi("sc_status")
    assert st["peers"][0]["stats"]["peer_restarts"] >= 1


def test_slow_subscriber_loses_nothing(pair):
    # tiny queues and a subscriber that sleeps after every receive burst: the publisher's
    # PUB queue overflows and drops, and every drop must be detected and repaired
    tiny = {"sndhwm": 2, "rcvhwm": 2, "tcp_buffer": 16384, "max_batch": 100}
    a, b = pair(tiny, {**tiny, "apply_delay_ms": 5})
    a.push(contacts(0, 40_000), chunk=500)
    wait_until(lambda: converged(a, b, 40_000), 90, interval=0.2, what="slow B catches up")
    stats = b.mi("sc_status")["peers"][0]["stats"]
    assert stats["gaps"] >= 1, stats  # drops happened and were repaired


def test_bad_frames_from_a_peer_are_counted_and_harmless(tmp_path):
    """Node 2 follows a 'peer 3' that is this test: it sends garbage, wrong versions, changes
    of the wrong type and stale epochs. The node stays up and its replica stays correct."""
    pub_port, sync_port = free_ports(2)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{sync_port}")
    node = NodeProcess(2, tmp_path / "n2", external_peers=[
        (3, f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{sync_port}", None)])
    node.start()
    try:
        node.push(contacts(0, 100))
        wait_until(lambda: node.mi("sc_status")["contacts"] == 100, 10, what="local contacts")
        before = digest(node)
        inc = 1_700_000_000
        good_hb = wire.encode_heartbeat(3, inc, 5, 0, 0, "active")
        frames = [
            [b"B", b"\xc1garbage"],
            [b"B", msgpack.packb([9, 3, inc, 5, 1, 0, 0, []])],  # unknown version
            [b"H", msgpack.packb([1, "x"])],
            [b"Z", b"unknown kind"],
            [b"only one frame"],
            [b"H", good_hb],
            [b"H", wire.encode_heartbeat(3, inc, 4, 0, 0, "active")],  # epoch went back
        ]
        deadline_frames = 0
        # the SUB connects asynchronously: repeat until the node has counted the junk
        while deadline_frames < 200:
            for f in frames:
                pub.send_multipart(f)
            deadline_frames += 1
            st = node.mi("sc_status")
            peer = next(p for p in st["peers"] if p["peer"] == 3)
            if peer["frame_errors"].get("version") and peer["stats"]["stale_epoch"]:
                break
        errors = peer["frame_errors"]
        assert errors.get("malformed") and errors.get("version"), peer
        # a batch whose changes have wrong types: each is skipped, the valid one applies
        good = contact(5000)[:16] + (1_790_000_000_000, (3 << 56) | (inc << 24) | 1)
        bad = ("x",) * 18
        if router.poll(3000):
            ident, _, req_payload = router.recv_multipart()
            req = wire.decode_sync_request(req_payload)
            router.send_multipart([ident, b"END",
                                   wire.encode_sync_end(inc, 0, req.req_id, 2, 0, 0)])
        wait_until(lambda: next(p for p in node.mi("sc_status")["peers"]
                                if p["peer"] == 3)["state"] == "live", 10, what="live")
        pub.send_multipart([b"B", wire.encode_batch(3, inc, 5, 1, 0, [bad, good, (1, 2)])])
        wait_until(lambda: node.mi("sc_status")["replica"]["bad_changes"] == 2, 10,
                   what="bad changes counted")
        assert node.mi("sc_status")["contacts"] == 101
        assert node.alive
        # raw junk on the admin port and the ZeroMQ ports does not hurt either
        for port in (node.admin_port, node.pub_port, node.sync_port, node.ingest_port):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"\x00\xff" * 500 + b"GET / HTTP/1.1\r\n\r\n")
        node.push([("not", "a", "change")])
        wait_until(lambda: node.mi("sc_status")["sources"]["ingest"].get("errors"), 10,
                   what="ingest error counted")
        assert node.alive and digest(node)["count"] == before["count"] + 1
    finally:
        node.kill()
        pub.close(0)
        router.close(0)
        ctx.term()


def test_curve_encrypted_link_and_strangers_get_nothing(tmp_path):
    import zmq.auth

    keys = tmp_path / "keys"
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    keys.mkdir()
    a, b = make_pair(tmp_path)
    for n, name in ((a, "a"), (b, "b")):
        public, secret = zmq.auth.create_certificates(keys, name)
        (authorized / f"{name}.key").write_bytes(Path(public).read_bytes())
        n.public_key = str(public)
        n.extra_toml = (f'[curve]\nenabled = true\nsecret_key = "{secret}"\n'
                        f'authorized_keys = "{authorized}"\n')
    a.start()
    b.start()
    try:
        a.push(contacts(0, 2_000))
        wait_until(lambda: converged(a, b, 2_000), 30, what="CURVE link replicates")
        # a subscriber without keys connects but receives nothing, not even heartbeats
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(a.pub)
        assert not sub.poll(1500)
        sub.close(0)
        ctx.term()
    finally:
        a.kill()
        b.kill()
