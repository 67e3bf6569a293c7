"""The node's contact table plus what it publishes: the one place changes enter the store.

Local changes (from a source on this node) are stamped with this node's handle/origin, applied
to the store, and queued in the outbox *only if they won*; replicated changes are applied to the
store and never queued, so nothing is re-published and there are no loops (DESIGN §5).
No I/O here: the asyncio adapters flush the outbox and feed replicated batches in.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .model import (
    AOR,
    CALLID,
    CSEQ,
    EXPIRES,
    HANDLE,
    INSTANCE,
    LAST_MODIFIED,
    RECORD_LEN,
    REFRESH_LEN,
    URI,
    HandleAllocator,
    handle_incarnation,
    handle_origin,
    now_ms,
    rec_bid,
)
from .replication.antientropy import RepairPlan, RepairResult
from .replication.outbox import Outbox
from .replication.wire import BatchHeader, WireError, check_change
from .store import ContactStore

log = logging.getLogger(__name__)

_SAME_EXCEPT_VERSION = (0, 1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 13, 14, 15)


@dataclass(slots=True)
class ReplicaStats:
    local_puts: int = 0
    local_refreshes: int = 0
    local_deletes: int = 0
    local_stale: int = 0
    remote_changes: int = 0
    remote_applied: int = 0
    bad_changes: int = 0
    pruned: int = 0
    repaired: int = 0  # records put or dropped by anti-entropy repairs


class Replica:
    def __init__(self, node_id: int, store: ContactStore | None = None,
                 incarnation: int | None = None, max_batch: int = 2000,
                 ring_changes: int = 2_000_000,
                 renew_incarnation: Callable[[int], int] | None = None) -> None:
        self.node_id = node_id
        self.handles = HandleAllocator(node_id, incarnation, renew_incarnation)
        self.incarnation = self.handles.incarnation
        self.store = store if store is not None else ContactStore()
        self.outbox = Outbox(node_id, self.incarnation, max_batch=max_batch,
                             ring_changes=ring_changes)
        self.origin_marker = node_id << 56
        self.stats = ReplicaStats()
        self.lag_ms: deque[int] = deque(maxlen=20_000)  # replication lag samples, per batch
        self.needs_snapshot_from: set[int] = set()  # peers whose refreshes we could not place
        # Bumped whenever records arrive in bulk (snapshot chunks, anti-entropy repairs):
        # unlike the live stream, these may be old registrations, so whoever keeps a view of
        # the table (the keepalive wheel) knows its view may miss contacts with old pinholes.
        self.bulk_generation = 0
        # Durable log of every change that won (sidecar.persist.Durability), or None.
        self.journal: Any = None

    # ------------------------------------------------------------ local changes
    def local_put(self, rec: tuple) -> str:
        """Store a binding version learned on this node and queue it for the peers.

        *rec* is a contact tuple whose HANDLE and LAST_MODIFIED may be 0 (they are stamped
        here). Returns "put", "refresh" or "stale".
        """
        store = self.store
        aor = rec[AOR]
        old = store.get(aor, rec[URI] if rec[INSTANCE] is None else rec_bid(rec))
        lm = rec[LAST_MODIFIED] or now_ms()
        if old is not None and old[HANDLE] >> 56 == self.node_id:
            handle = old[HANDLE]
            if old[CALLID] == rec[CALLID] and all(old[i] == rec[i] for i in _SAME_EXCEPT_VERSION):
                new = store.refresh(handle, rec[EXPIRES], rec[CSEQ], lm)
                if new is None:
                    self.stats.local_stale += 1
                    return "stale"
                ob = self.outbox
                ob.pending.append((handle, rec[EXPIRES], rec[CSEQ], lm - ob.time_base()))
                if self.journal is not None:
                    self.journal.record_put(new)
                self.stats.local_refreshes += 1
                return "refresh"
        else:
            handle = self.handles.next()
        store.last_put = None
        if not store.put(rec, old, lm, handle):
            self.stats.local_stale += 1
            return "stale"
        stored = store.last_put
        if self.journal is not None and stored is not None:
            self.journal.record_put(stored)
        self.outbox.pending.append(stored if stored is not None and stored[HANDLE] == handle
                                   and stored[LAST_MODIFIED] == lm else (*rec[:16], lm, handle))
        self.stats.local_puts += 1
        return "put"

    def local_delete(self, aor: str, bid: str, callid: str, cseq: int,
                     last_modified: int = 0) -> bool:
        """Remove a binding on this node's authority (de-REGISTER, ping loss, admin)."""
        lm = last_modified or now_ms()
        if not self.store.delete(aor, bid, callid, cseq, lm, self.origin_marker):
            self.stats.local_stale += 1
            return False
        self.outbox.pending.append((aor, bid, callid, cseq, lm, self.origin_marker))
        if self.journal is not None:
            self.journal.record_delete(aor, bid, callid, cseq, lm, self.origin_marker)
        self.stats.local_deletes += 1
        return True

    # ------------------------------------------------------------ replicated changes
    def apply_remote(self, hdr: BatchHeader, changes: tuple) -> int:
        """Apply one batch from a peer; returns how many changes won. Never raises on bad
        changes: each is counted and skipped, the rest of the batch still applies."""
        store = self.store
        put, refresh, delete = store.put, store.refresh, store.delete
        unknown_before = store.stats.unknown_handle
        base = hdr.base_ms
        applied = 0
        journal = self.journal
        for c in changes:
            try:
                n = check_change(c)
            except WireError as exc:
                self._bad(exc)
                continue
            if n == RECORD_LEN:
                store.last_put = None
                if put(c):
                    applied += 1
                    if journal is not None and store.last_put is not None:
                        journal.record_put(store.last_put)
            elif n == REFRESH_LEN:
                rec = refresh(c[0], c[1], c[2], base + c[3])
                if rec is not None:
                    applied += 1
                    if journal is not None:
                        journal.record_put(rec)
            elif delete(*c):
                applied += 1
                if journal is not None:
                    journal.record_delete(*c)
        self.stats.remote_changes += len(changes)
        self.stats.remote_applied += applied
        if store.stats.unknown_handle != unknown_before:
            # A refresh for a version we do not hold (possible only after a partition with
            # the same phone registering on both sides): only a snapshot can repair it.
            self.needs_snapshot_from.add(hdr.node_id)
        if changes:
            first = changes[0]
            if type(first) is tuple:
                n = len(first)
                lm = (first[16] if n == RECORD_LEN else base + first[3] if n == REFRESH_LEN
                      else first[4])
                if type(lm) is int:
                    self.lag_ms.append(now_ms() - lm)
        return applied

    def apply_snapshot(self, records: tuple, seen: set[int] | None) -> int:
        """Apply one snapshot chunk from a peer; bad entries are counted and skipped. Without
        a journal the chunk goes through :meth:`ContactStore.put_many` (a fresh node's
        snapshot inserts new AORs without conflict checks: half the cost per record)."""
        self.bulk_generation += 1
        good = []
        for r in records:
            try:
                if check_change(r) != RECORD_LEN:
                    raise WireError("bad_change", "snapshot entry is not a contact record")
            except WireError as exc:
                self._bad(exc)
                continue
            good.append(r)
        if seen is not None:
            seen.update([r[HANDLE] for r in good])
        store = self.store
        journal = self.journal
        if journal is None:
            return store.put_many(good)[0]
        applied = 0
        put = store.put
        for r in good:
            store.last_put = None
            if put(r):
                applied += 1
                if store.last_put is not None:
                    journal.record_put(store.last_put)
        return applied

    def prune_origin(self, origin: int, incarnation: int, seen: set[int], cut_ms: int) -> int:
        """Drop records the peer created in its current incarnation and no longer has
        (deleted there while we lagged beyond its replay ring)."""
        doomed = [r for r in self.store
                  if handle_origin(r[HANDLE]) == origin
                  and handle_incarnation(r[HANDLE]) >= incarnation
                  and r[HANDLE] not in seen and r[LAST_MODIFIED] <= cut_ms]
        for r in doomed:
            self.store.drop(r)
        self.stats.pruned += len(doomed)
        return len(doomed)

    def repair_origin(self, origin: int, plan: RepairPlan) -> RepairResult:
        """Apply an anti-entropy repair of *origin*'s records (replication/antientropy.py).

        The plan was made against this store's state at the origin's cut; whatever changed
        here since then is left alone (compare-and-set per binding), because the live stream
        or a local change has brought something newer than the repair knows about.

        Authority: the origin is authoritative for versions it made, so a differing version
        *of the origin* held here is replaced outright, even if ``wins`` would prefer it (it
        cannot be newer than the origin's own table at the cut). Against a version of
        another origin, or a tombstone, the repair goes through the normal conflict rule:
        that version may be a newer change still on its way to the origin. Removals drop the
        record without a tombstone, like :meth:`prune_origin`.

        Like every replicated change, nothing here is queued in the outbox (no loops); puts
        go to the journal as ``apply_remote`` and ``apply_snapshot`` do, drops do not (as
        with pruning).
        """
        self.bulk_generation += 1
        store = self.store
        journal = self.journal
        res = RepairResult()
        for rec, expected in plan.puts:
            cur = store.get(rec[AOR], rec[URI] if rec[INSTANCE] is None else rec_bid(rec))
            if cur is not None and handle_origin(cur[HANDLE]) == origin:
                if cur != expected:
                    res.changed += 1
                    continue
                store.drop(cur)
            elif expected is not None:
                res.changed += 1
                continue
            store.last_put = None
            if store.put(rec):
                res.put += 1
                if journal is not None and store.last_put is not None:
                    journal.record_put(store.last_put)
            else:
                res.refused += 1
        for rec in plan.drops:
            if store.drop(rec):
                res.dropped += 1
            else:
                res.changed += 1
        self.stats.repaired += res.put + res.dropped
        return res

    def _bad(self, exc: WireError) -> None:
        self.stats.bad_changes += 1
        if self.stats.bad_changes <= 10 or self.stats.bad_changes % 10_000 == 0:
            log.warning("skipped malformed replicated change (%d so far): %s",
                        self.stats.bad_changes, exc)
