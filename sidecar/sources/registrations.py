"""Turn a registrar's answer (a paired REGISTER + 2xx) into replica changes.

Shared by every source that sees SIP (packet capture, HEP mirror): they parse and pair, this
module decides what the 2xx means for the table. The 2xx Contact list is authoritative for its
AOR (RFC 3261 §10.3): bindings it lists carry the registrar's current expiry, bindings it no
longer lists are gone. Only bindings the REGISTER itself carried get this REGISTER's Call-ID,
CSeq, NAT address and socket; the AOR's other devices keep what we already know about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import (
    CALLID,
    CSEQ,
    LAST_MODIFIED,
    ModelError,
    binding_id,
    make_record,
    rec_bid,
)
from ..replica import Replica
from ..sip.registration import RegistrationOutcome, binding_flags


@dataclass(slots=True)
class OutcomeCounts:
    puts: int = 0
    refreshes: int = 0
    deletes: int = 0
    stale: int = 0
    unknown_other_bindings: int = 0  # listed by the 2xx, registered before we were watching
    invalid: int = 0


def aor_key(aor: str, use_domain: bool) -> str:
    """The AOR as the proxy's usrloc stores it (``user`` or ``user@domain``)."""
    return aor if use_domain else aor.split("@", 1)[0]


def tally_local_put(counts, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Count what :meth:`Replica.local_put` said ("put", "refresh" or "stale") in any
    counters object with ``puts``, ``refreshes`` and ``stale`` (the SIP and reconcile
    sources share this, so their counters mean the same)."""
    if kind == "put":
        counts.puts += 1
    elif kind == "refresh":
        counts.refreshes += 1
    else:
        counts.stale += 1


def apply_outcome(replica: Replica, outcome: RegistrationOutcome, *, use_domain: bool = False,
                  counts: OutcomeCounts | None = None) -> OutcomeCounts:
    counts = counts if counts is not None else OutcomeCounts()
    aor = aor_key(outcome.aor, use_domain)
    lm = int(outcome.time * 1000)
    listed: set[str] = set()
    for b in outcome.bindings:
        bid = binding_id(b.uri, b.instance, b.reg_id)
        listed.add(bid)
        if not b.own:
            if replica.store.get(aor, bid) is None:
                counts.unknown_other_bindings += 1  # the reconcile source fills these in
            continue
        try:
            rec = make_record(
                aor=aor, uri=b.uri, callid=outcome.callid, cseq=outcome.cseq,
                expires=b.expires_abs, handle=0, last_modified=lm,
                received=outcome.received, path=outcome.path, socket=outcome.socket,
                q=b.q, user_agent=outcome.user_agent, flags=binding_flags(outcome, b),
                methods=b.methods, instance=b.instance, reg_id=b.reg_id)
        except (ModelError, ValueError, TypeError):
            counts.invalid += 1
            continue
        tally_local_put(counts, replica.local_put(rec))
    if outcome.complete:
        # Only bindings stored before this REGISTER arrived can be judged by its 2xx: one
        # stored later came from a concurrent REGISTER the registrar handled meanwhile.
        cutoff = int((outcome.request_time if outcome.request_time is not None
                      else outcome.time) * 1000)
        for rec in replica.store.lookup_aor(aor):
            bid = rec_bid(rec)
            if bid in listed or rec[LAST_MODIFIED] >= cutoff:
                continue
            # The delete must win over the stored version: this REGISTER's Call-ID/CSeq when
            # it is the same phone, otherwise the (newer) time of the 2xx decides.
            same_phone = rec[CALLID] == outcome.callid
            cseq = outcome.cseq if same_phone else rec[CSEQ]
            callid = outcome.callid if same_phone else rec[CALLID]
            if replica.local_delete(aor, bid, callid, cseq, lm):
                counts.deletes += 1
            else:
                counts.stale += 1
    return counts
