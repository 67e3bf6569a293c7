"""Property: replicas converge whatever order, interleaving or duplication changes arrive in.

Three partitioned nodes take registrations from the same phones (the worst case: split brain
with phones re-registering on both sides). Each node's real outbox output is encoded and
decoded with the real wire codec, then delivered to observers in different interleavings
(per-origin order kept, as the sequence-numbered stream guarantees) with duplicated batches,
or fully shuffled for the order-free change kinds. Every observer must end with the same table.
"""

import random
import time

from hypothesis import given
from hypothesis import strategies as st

from sidecar.model import make_record
from sidecar.replica import Replica
from sidecar.replication import wire

FUTURE = int(time.time()) + 10_000

op = st.tuples(
    st.integers(0, 2),  # node
    st.integers(0, 3),  # phone
    st.sampled_from(["register", "register", "register", "reboot", "deregister"]),
    st.integers(0, 1),  # which of two contact URIs
    st.integers(0, 2),  # time step in ms (0: same millisecond on another node)
    st.integers(0, 50),  # expires delta
)


def run_history(ops):
    nodes = [Replica(i + 1, incarnation=1000 + i) for i in range(3)]
    phones = {p: [f"call-{p}-0", 0] for p in range(4)}
    t = 1_700_000_000_000
    streams: list[list[bytes]] = [[], [], []]
    last_t = {}
    for node_i, phone, action, variant, step, exp in ops:
        # Convergence precondition (proto/PROTOCOL.md §11.4): one phone's successive
        # registrations are stamped strictly later. Different phones may share a millisecond.
        t = max(t + step, last_t.get(phone, 0) + 1)
        last_t[phone] = t
        node = nodes[node_i]
        state = phones[phone]
        if action == "reboot":
            state[0] = f"call-{phone}-{t}"
            state[1] = 0
        state[1] += 1
        uri = f"sip:p{phone}@h{variant}"
        if action == "deregister":
            node.local_delete(f"p{phone}", uri, state[0], state[1], last_modified=t)
        else:
            node.local_put(make_record(aor=f"p{phone}", uri=uri, callid=state[0], cseq=state[1],
                                       expires=FUTURE + exp, handle=0, last_modified=t))
        streams[node_i].extend(node.outbox.flush())
    return nodes, streams


def deliver(nodes, streams, rng: random.Random):
    observer = Replica(9, incarnation=1)
    queues = [list(s) for s in streams]
    while any(queues):
        i = rng.choice([k for k, q in enumerate(queues) if q])
        payload = queues[i].pop(0)
        if rng.random() < 0.2:
            queues[i].insert(0, payload)  # the same batch again (retransmit / replay overlap)
        hdr, changes = wire.decode_batch(payload)
        observer.apply_remote(hdr, changes)
    for origin in sorted(observer.needs_snapshot_from):
        # what the subscriber does on an unplaceable refresh: take the origin's snapshot
        observer.apply_snapshot(tuple(nodes[origin - 1].store.records()), None)
    return sorted(observer.store.records())


@given(st.lists(op, min_size=1, max_size=40), st.integers(0, 2**32))
def test_any_interleaving_converges(ops, seed):
    nodes, streams = run_history(ops)
    rng = random.Random(seed)
    results = [deliver(nodes, streams, rng) for _ in range(4)]
    assert all(r == results[0] for r in results[1:])


@given(st.lists(op, min_size=1, max_size=40), st.integers(0, 2**32))
def test_full_records_and_deletes_converge_in_any_order(ops, seed):
    """Without refreshes (every change a full record or delete) even arbitrary reordering
    across *and within* origins converges: the conflict rule alone decides."""
    ops = [(n, p, a, v, s, e) for n, p, a, v, s, e in ops]
    nodes, _ = run_history(ops)
    changes = []
    for node in nodes:
        # the winning versions and deletes each node holds, as full changes
        changes += node.store.records()
    for node in nodes:
        for (aor, bid), tomb in node.store._tombs.items():
            changes.append((aor, bid, tomb[0], tomb[1], tomb[2], tomb[3]))
    rng = random.Random(seed)
    tables = []
    for _ in range(4):
        rng.shuffle(changes)
        obs = Replica(9, incarnation=1)
        hdr = wire.BatchHeader(1, 1, 0, 1, len(changes), 0)
        obs.apply_remote(hdr, tuple(changes + changes[: len(changes) // 3]))
        tables.append(sorted(obs.store.records()))
    assert all(t == tables[0] for t in tables[1:])


def test_partitioned_nodes_merge_to_newest_registration():
    nodes, streams = run_history([
        (0, 0, "register", 0, 1, 0),  # phone 0 registers on node 1
        (1, 0, "register", 0, 1, 5),  # then (newer CSeq) on node 2
        (0, 1, "register", 1, 1, 0),
        (2, 1, "deregister", 1, 1, 0),  # phone 1 unregisters via node 3
    ])
    table = deliver(nodes, streams, random.Random(1))
    assert [(r[0], r[8], r[17] >> 56) for r in table] == [("p0", 2, 2)]
