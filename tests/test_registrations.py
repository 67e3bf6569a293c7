"""A paired REGISTER/2xx becomes replica changes: puts, refreshes, deletes of unlisted bindings."""

import time

from sidecar.model import CALLID, CSEQ, FLAG_NAT, FLAGS, RECEIVED, SOCKET
from sidecar.replica import Replica
from sidecar.sip.registration import Binding, RegistrationOutcome
from sidecar.sources.registrations import apply_outcome

NOW = time.time()


def outcome(bindings, callid="c1", cseq=1, received=None, complete=True, t=NOW):
    return RegistrationOutcome(aor="alice@example.com", callid=callid, cseq=cseq, time=t,
                               received=received, socket="udp:127.0.0.1:5060",
                               user_agent="ua", path=None, bindings=bindings,
                               wildcard_removed=False, complete=complete)


def b(uri, own=True, exp=3600):
    return Binding(uri=uri, expires_abs=int(NOW) + exp, q=-1, methods=None, instance=None,
                   reg_id=0, own=own)


def test_register_refresh_and_unregister():
    r = Replica(1, incarnation=10)
    c = apply_outcome(r, outcome([b("sip:a@10.0.0.1")], received="sip:198.51.100.1:4000"))
    assert c.puts == 1
    [rec] = r.store.lookup_aor("alice")  # AOR as usrloc stores it without use_domain
    assert rec[RECEIVED] == "sip:198.51.100.1:4000" and rec[FLAGS] & FLAG_NAT
    assert rec[SOCKET] == "udp:127.0.0.1:5060"
    c = apply_outcome(r, outcome([b("sip:a@10.0.0.1", exp=7200)], cseq=2,
                                 received="sip:198.51.100.1:4000", t=NOW + 1))
    assert c.refreshes == 1
    c = apply_outcome(r, outcome([], cseq=3, t=NOW + 2))  # Expires: 0 -> nothing listed
    assert c.deletes == 1 and len(r.store) == 0
    assert [len(ch) for ch in r.outbox.pending] == [18, 4, 6]  # put, refresh, delete


def test_other_devices_are_kept_and_unlisted_ones_removed():
    r = Replica(1, incarnation=10)
    apply_outcome(r, outcome([b("sip:desk@1")], callid="desk", cseq=5))
    apply_outcome(r, outcome([b("sip:desk@1", own=False), b("sip:mobile@2")], callid="mob",
                             t=NOW + 1))
    recs = {x[1]: x for x in r.store.lookup_aor("alice")}
    assert recs["sip:desk@1"][CALLID] == "desk" and recs["sip:desk@1"][CSEQ] == 5
    # the desk phone's binding expired at the registrar: the next 2xx no longer lists it
    c = apply_outcome(r, outcome([b("sip:mobile@2")], callid="mob", cseq=2, t=NOW + 2))
    assert c.deletes == 1 and [x[1] for x in r.store.lookup_aor("alice")] == ["sip:mobile@2"]


def test_incomplete_answer_deletes_nothing_and_unknown_others_are_counted():
    r = Replica(1, incarnation=10)
    apply_outcome(r, outcome([b("sip:desk@1")], callid="desk"))
    c = apply_outcome(r, outcome([b("sip:x@3")], callid="x", complete=False, t=NOW + 1))
    assert c.deletes == 0 and len(r.store) == 2
    c = apply_outcome(r, outcome([b("sip:ghost@9", own=False), b("sip:x@3")], callid="x",
                                 cseq=2, t=NOW + 2))
    assert c.unknown_other_bindings == 1


def test_use_domain_keeps_the_full_aor():
    r = Replica(1, incarnation=10)
    apply_outcome(r, outcome([b("sip:a@1")]), use_domain=True)
    assert r.store.lookup_aor("alice@example.com")


def test_concurrent_register_of_the_same_aor_is_not_deleted_by_an_older_2xx():
    """Two phones of one AOR register at once; the registrar answers the first before it
    stored the second, but that answer is seen last (two workers, mirror reordering). The
    first 2xx does not list the second binding, which must survive: it was stored after the
    first REGISTER arrived."""
    r = Replica(1, incarnation=10)
    second = outcome([b("sip:desk@1", own=False), b("sip:mobile@2")], callid="mob", t=NOW + 1)
    second.request_time = NOW + 0.5
    apply_outcome(r, second)
    first = outcome([b("sip:desk@1")], callid="desk", t=NOW + 1.2)  # seen last
    first.request_time = NOW + 0.4
    c = apply_outcome(r, first)
    assert c.deletes == 0
    assert sorted(x[1] for x in r.store.lookup_aor("alice")) == ["sip:desk@1", "sip:mobile@2"]
    # a later REGISTER's 2xx that still omits it does remove it
    third = outcome([b("sip:desk@1")], callid="desk", cseq=2, t=NOW + 3)
    third.request_time = NOW + 2.9
    assert apply_outcome(r, third).deletes == 1
