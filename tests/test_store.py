"""The replica table: conflict rule, refresh, delete/tombstones, expiry, memory tricks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model import (
    AOR,
    CSEQ,
    EXPIRES,
    HANDLE,
    LAST_MODIFIED,
    SOCKET,
    USER_AGENT,
    HandleAllocator,
    ModelError,
    make_record,
    rec_bid,
    to_dict,
    wins,
)
from sidecar.store import ContactStore

NOW = 1_800_000_000


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(aor="alice@x", uri="sip:alice@10.0.0.1:5060", callid="c1", cseq=1, expires=NOW + 60,
        lm=1000, node=1, n=1, **kw):
    return make_record(aor=aor, uri=uri, callid=callid, cseq=cseq, expires=expires,
                       last_modified=lm, handle=(node << 56) | n, **kw)


def test_conflict_rule_same_callid_uses_cseq_even_against_clock():
    # RFC 3261 §10.3: same Call-ID, lower CSeq is stale even if stamped later
    assert wins("c", 5, 10, 1 << 56, "c", 4, 99, 1 << 56)
    assert not wins("c", 4, 99, 1 << 56, "c", 5, 10, 1 << 56)


def test_conflict_rule_other_callid_uses_time_then_origin():
    assert wins("b", 1, 20, 1 << 56, "a", 9, 10, 2 << 56)
    assert not wins("b", 1, 10, 1 << 56, "a", 9, 10, 2 << 56)  # tie: higher origin wins
    assert wins("a", 9, 10, 2 << 56, "b", 1, 10, 1 << 56)


def test_identical_version_does_not_win():
    assert not wins("c", 1, 10, 1 << 56, "c", 1, 10, 1 << 56)


def test_put_lookup_and_stale_rejection():
    s = ContactStore(clock=Clock())
    assert s.put(rec(cseq=2, lm=2000))
    assert not s.put(rec(cseq=1, lm=3000))  # older CSeq, same Call-ID
    assert s.stats.stale == 1
    [r] = s.lookup_aor("alice@x")
    assert r[CSEQ] == 2 and len(s) == 1 and s.aor_count == 1


def test_several_bindings_per_aor_and_outbound_key():
    s = ContactStore(clock=Clock())
    s.put(rec(uri="sip:a@1.1.1.1"))
    s.put(rec(uri="sip:a@2.2.2.2", n=2))
    s.put(rec(uri="sip:a@3.3.3.3", instance="<urn:uuid:1>", reg_id=1, n=3))
    # same instance + reg-id from a new address replaces the outbound binding (RFC 5626)
    s.put(rec(uri="sip:a@4.4.4.4", instance="<urn:uuid:1>", reg_id=1, n=4, lm=2000))
    uris = sorted(to_dict(r)["uri"] for r in s.lookup_aor("alice@x"))
    assert uris == ["sip:a@1.1.1.1", "sip:a@2.2.2.2", "sip:a@4.4.4.4"]
    assert len(s) == 3 and s.aor_count == 1


def test_refresh_by_handle_changes_only_version_fields():
    s = ContactStore(clock=Clock())
    r = rec(received="sip:198.51.100.1:4000")
    s.put(r)
    new = s.refresh(r[HANDLE], NOW + 120, 2, 5000)
    assert new[EXPIRES] == NOW + 120 and new[CSEQ] == 2 and new[LAST_MODIFIED] == 5000
    assert new[:5] == r[:5]
    assert s.refresh(r[HANDLE], NOW + 130, 1, 9000) is None  # lower CSeq: stale
    # an equal CSeq is only a replay or a proxy-side rewrite: the later stamp decides
    assert s.refresh(r[HANDLE], NOW + 130, 2, 4000) is None
    assert s.refresh(r[HANDLE], NOW + 130, 2, 6000)[EXPIRES] == NOW + 130
    assert s.refresh(12345, NOW, 3, 1) is None and s.stats.unknown_handle == 1


def test_delete_leaves_tombstone_that_blocks_older_put():
    clock = Clock()
    s = ContactStore(tombstone_ttl=100, clock=clock)
    r = rec(cseq=1, lm=1000)
    s.put(r)
    assert s.delete(r[AOR], rec_bid(r), "c1", 2, 2000, 2 << 56)
    assert len(s) == 0
    assert not s.put(r)  # delayed older version must not resurrect it
    assert s.put(rec(cseq=3, lm=3000))  # a newer REGISTER does
    # a delete that arrives before the put it supersedes also wins
    s2 = ContactStore(tombstone_ttl=100, clock=clock)
    assert s2.delete(r[AOR], rec_bid(r), "c1", 2, 2000, 2 << 56)
    assert not s2.put(r) and len(s2) == 0
    clock.t += 101
    s2.expire()
    assert s2.put(rec(cseq=1, lm=1000, expires=NOW + 1000))  # tombstone gone after its TTL


def test_expiry_removes_due_contacts_only():
    clock = Clock()
    s = ContactStore(clock=clock)
    s.put(rec(uri="sip:a@1", expires=NOW + 5))
    s.put(rec(uri="sip:a@2", expires=NOW + 50, n=2))
    s.put(rec(uri="sip:a@3", expires=0, n=3))  # permanent
    clock.t = NOW + 6
    assert len(s.lookup_aor("alice@x")) == 2  # invisible at once, even before the sweep
    gone = s.expire()
    assert [to_dict(r)["uri"] for r in gone] == ["sip:a@1"]
    clock.t = NOW + 10_000
    assert len(s.expire()) == 1 and len(s) == 1


def test_refresh_moves_expiry_and_old_wheel_entry_is_harmless():
    clock = Clock()
    s = ContactStore(clock=clock)
    r = rec(expires=NOW + 5)
    s.put(r)
    s.refresh(r[HANDLE], NOW + 100, 2, 2000)
    clock.t = NOW + 10
    assert s.expire() == [] and len(s) == 1


def test_put_of_already_expired_version_removes_binding():
    clock = Clock()
    s = ContactStore(clock=clock)
    s.put(rec())
    assert s.put(rec(cseq=2, lm=2000, expires=NOW - 1))
    assert len(s) == 0


def test_repeated_strings_are_shared_between_records():
    s = ContactStore(clock=Clock())
    ua1 = "".join(["Yealink ", "T46"])
    ua2 = "".join(["Yealink ", "T46"])
    assert ua1 is not ua2
    s.put(rec(uri="sip:a@1", user_agent=ua1, socket="udp:1.2.3.4:5060"))
    s.put(rec(aor="bob@x", uri="sip:b@1", user_agent=ua2, socket="udp:1.2.3.4:5060", n=2))
    a, b = (s.lookup_aor("alice@x")[0], s.lookup_aor("bob@x")[0])
    assert a[USER_AGENT] is b[USER_AGENT] and a[SOCKET] is b[SOCKET]


def test_drop_removes_exact_version_only():
    s = ContactStore(clock=Clock())
    r = rec()
    s.put(r)
    newer = rec(cseq=2, lm=2000)
    s.put(newer)
    assert not s.drop(r)
    assert s.drop(s.lookup_aor("alice@x")[0]) and len(s) == 0


def test_handles_are_unique_and_carry_origin():
    a = HandleAllocator(7, incarnation=100)
    hs = {a.next() for _ in range(1000)}
    assert len(hs) == 1000 and all(h >> 56 == 7 for h in hs)
    b = HandleAllocator(7, incarnation=101)  # restarted node: new incarnation, new handles
    assert not hs & {b.next() for _ in range(1000)}
    with pytest.raises(ModelError):
        HandleAllocator(0)


def test_make_record_validates():
    with pytest.raises(ModelError):
        make_record(aor="", uri="sip:x", callid="c", cseq=1, expires=1, handle=1,
                    last_modified=1)
    with pytest.raises(ModelError):
        make_record(aor="a", uri="sip:x", callid="c", cseq=-1, expires=1, handle=1,
                    last_modified=1)


def test_expiry_work_is_proportional_to_what_is_due():
    clock = Clock()
    s = ContactStore(clock=clock)
    for i in range(20_000):  # a big table expiring in an hour
        s.put(rec(aor=f"u{i}", uri=f"sip:u{i}@h", expires=NOW + 3600, n=i + 1))
    for i in range(10):  # and ten contacts due in a few seconds
        s.put(rec(aor=f"d{i}", uri=f"sip:d{i}@h", expires=NOW + 5, n=100_000 + i))
    clock.t = NOW + 10
    assert len(s.expire()) == 10
    assert s.stats.expiry_scanned == 10 and len(s) == 20_000


def test_expired_winning_version_leaves_a_tombstone():
    clock = Clock()
    s = ContactStore(clock=clock)
    s.put(rec(cseq=1, lm=1000))
    assert s.put(rec(cseq=2, lm=2000, expires=NOW - 1))  # wins, but is already expired
    assert len(s) == 0
    assert not s.put(rec(cseq=1, lm=1000))  # the older version must not come back


def _state(store: ContactStore) -> tuple:
    return (sorted(store), len(store), sorted(store._by_handle.items()),
            sorted((k, sorted(v)) for k, v in store._wheel.items()), sorted(store._tombs))


_AORS = ["a@x", "b@x", "c@x"]
_URIS = ["sip:1@h", "sip:2@h"]


@st.composite
def _versions(draw):
    out = []
    for i in range(draw(st.integers(0, 25))):
        expires = draw(st.sampled_from([0, NOW - 5, NOW + 30, NOW + 60]))
        out.append(rec(aor=draw(st.sampled_from(_AORS)), uri=draw(st.sampled_from(_URIS)),
                       callid=draw(st.sampled_from(["c1", "c2"])), cseq=draw(st.integers(1, 3)),
                       expires=expires, lm=draw(st.integers(1, 4)),
                       node=draw(st.integers(1, 2)), n=i + 1,
                       user_agent=draw(st.sampled_from([None, "UA"]))))
    return out


@given(before=_versions(), snapshot=_versions(), deletes=st.lists(
    st.tuples(st.sampled_from(_AORS), st.sampled_from(_URIS)), max_size=3))
@settings(max_examples=300, deadline=None)
def test_put_many_equals_put_one_by_one(before, snapshot, deletes):
    """The snapshot fast path must leave exactly the table (records, handle index, expiry
    wheel, tombstones) that one put() per record leaves, whatever the store held before."""
    stores = [ContactStore(clock=Clock()), ContactStore(clock=Clock())]
    for s in stores:
        for r in before:
            s.put(r)
        for aor, uri in deletes:
            s.delete(aor, uri, "c9", 9, 9, 1 << 56)
    one_by_one = sum(stores[0].put(r) for r in snapshot)
    applied, expired = stores[1].put_many(snapshot)
    assert applied == one_by_one
    assert expired == sum(1 for r in snapshot if r[EXPIRES] and r[EXPIRES] <= NOW)
    assert _state(stores[0]) == _state(stores[1])
