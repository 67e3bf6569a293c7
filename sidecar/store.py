"""The in-memory contact table (replica) with conflict resolution and expiry.

Layout, chosen for memory at a million contacts (see docs/ARCHITECTURE.md):

* ``_aors``: AOR -> the contact tuple itself when the AOR has one binding (the common case),
  or a ``dict`` bid -> tuple when it has several. Lookup by AOR is one dict probe.
* ``_by_handle``: handle -> AOR, so a wire refresh (which names only the handle) finds its
  binding without carrying the AOR and URI again.
* ``_wheel``: expiry second -> AORs to look at then. Entries are never removed on refresh;
  the sweep simply re-checks the AOR, so expiry work is proportional to what is due, not to
  the table size.
* ``_tombs``: recently deleted bindings with the version that deleted them, so a delayed
  older PUT cannot resurrect a contact (needed for order-independent convergence).

Repeated strings (socket, user agent, path) are interned through a bounded pool: replicated
tuples arrive with fresh string objects and would otherwise cost ~140 bytes per contact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from .model import (
    AOR,
    CALLID,
    CSEQ,
    EXPIRES,
    HANDLE,
    KEY_SEP,
    LAST_MODIFIED,
    rec_bid,
    wins,
)

_POOL_LIMIT = 65_536
_LOOKUP = object()  # sentinel: "look the old version up yourself"


@dataclass(slots=True)
class StoreStats:
    """Counters exported by sc_status and /metrics."""

    puts: int = 0
    refreshes: int = 0
    deletes: int = 0
    stale: int = 0
    unknown_handle: int = 0
    expired: int = 0
    expiry_scanned: int = 0  # AOR entries the expiry sweep looked at (proportional to due work)


class ContactStore:
    """Replica of usrloc contacts, converging under any order of changes."""

    def __init__(self, tombstone_ttl: float = 300.0, clock=time.time) -> None:
        self._aors: dict[str, tuple | dict[str, tuple]] = {}
        self._by_handle: dict[int, str] = {}
        self._wheel: dict[int, list[str]] = {}
        self._tombs: dict[tuple[str, str], tuple[str, int, int, int, float]] = {}
        self._pool: dict[object, object] = {}
        self._count = 0
        self._next_sweep = int(clock())
        self.tombstone_ttl = tombstone_ttl
        self.clock = clock
        self.stats = StoreStats()
        self.last_put: tuple | None = None  # the tuple the last successful put() stored

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._count

    @property
    def aor_count(self) -> int:
        return len(self._aors)

    def get(self, aor: str, bid: str) -> tuple | None:
        v = self._aors.get(aor)
        if v is None:
            return None
        if type(v) is dict:
            return v.get(bid)
        return v if rec_bid(v) == bid else None

    def lookup_aor(self, aor: str, now: float | None = None) -> list[tuple]:
        """Unexpired bindings of *aor* (expired ones are invisible even before the sweep)."""
        v = self._aors.get(aor)
        if v is None:
            return []
        recs = list(v.values()) if type(v) is dict else [v]
        t = self.clock() if now is None else now
        return [r for r in recs if r[EXPIRES] == 0 or r[EXPIRES] > t]

    def by_handle(self, handle: int) -> tuple | None:
        aor = self._by_handle.get(handle)
        if aor is None:
            return None
        v = self._aors.get(aor)
        if v is None:
            return None
        if type(v) is dict:
            for r in v.values():
                if r[HANDLE] == handle:
                    return r
            return None
        return v if v[HANDLE] == handle else None

    def __iter__(self) -> Iterator[tuple]:
        for v in self._aors.values():
            if type(v) is dict:
                yield from v.values()
            else:
                yield v

    def aors(self) -> Iterator[str]:
        return iter(self._aors)

    def records(self) -> list[tuple]:
        """A consistent copy of every record (tuples are immutable, so this is a snapshot)."""
        return list(self)

    # ------------------------------------------------------------------ writing
    def _link(self, aor: str, bid: str, rec: tuple, old: tuple | None) -> None:
        """Install *rec* as the binding's current version (replacing *old* if given)."""
        aors = self._aors
        v = aors.get(aor)
        if v is None:
            aors[aor] = rec
            self._count += 1
        elif type(v) is dict:
            if old is None:
                self._count += 1
            v[bid] = rec
        elif old is not None:
            aors[aor] = rec
        else:
            aors[aor] = {rec_bid(v): v, bid: rec}
            self._count += 1
        h = rec[HANDLE]
        if old is not None and old[HANDLE] != h:
            self._by_handle.pop(old[HANDLE], None)
        self._by_handle[h] = rec[AOR]
        exp = rec[EXPIRES]
        if exp:
            bucket = self._wheel.get(exp)
            if bucket is None:
                self._wheel[exp] = [aor]
            else:
                bucket.append(aor)

    def _unlink(self, aor: str, bid: str, rec: tuple) -> None:
        v = self._aors.get(aor)
        if type(v) is dict:
            del v[bid]
            if len(v) == 1:
                (self._aors[aor],) = v.values()
        else:
            del self._aors[aor]
        self._count -= 1
        self._by_handle.pop(rec[HANDLE], None)

    def put(self, rec: tuple, old: tuple | object | None = _LOOKUP, lm: int = 0,
            handle: int = 0) -> bool:
        """Apply a full version of a binding; False when it is stale (not applied).

        ``old`` may be passed by a caller that already looked the binding up, and ``lm`` /
        ``handle`` stamp the version (local changes) without building an extra tuple. This is
        the replication hot path, so lookups and interning are inlined.
        """
        aor = rec[0]
        instance = rec[13]
        bid = rec[1] if instance is None else f"{instance}{KEY_SEP}{rec[14]}"
        v = self._aors.get(aor)
        if old is _LOOKUP:
            old = None
            if v is not None:
                if type(v) is dict:
                    old = v.get(bid)
                elif (v[1] if v[13] is None else f"{v[13]}{KEY_SEP}{v[14]}") == bid:
                    old = v
        if not lm:
            lm, handle = rec[16], rec[17]
        if old is not None:
            if not wins(rec[7], rec[8], lm, handle, old[7], old[8], old[16], old[17]):
                self.stats.stale += 1
                return False
            aor = old[0]
        elif self._tombs:
            tomb = self._tombs.get((aor, bid))
            if tomb is not None:
                if not wins(rec[7], rec[8], lm, handle, tomb[0], tomb[1], tomb[2], tomb[3]):
                    self.stats.stale += 1
                    return False
                del self._tombs[(aor, bid)]
        exp = rec[5]
        if exp and exp <= self.clock():
            # An already expired version still wins the conflict; it removes the binding and,
            # like a delete, leaves a tombstone so a delayed older version cannot come back.
            if old is not None:
                self._unlink(aor, bid, old)
            self._tomb(aor, bid, rec[7], rec[8], lm, handle)
            self.stats.expired += 1
            return True
        # intern repeated values (socket, user agent, path, methods) through a bounded pool
        pool = self._pool
        s, ua, p, m = rec[4], rec[9], rec[3], rec[12]
        si = pool.get(s)
        if si is None:
            si = s
            if len(pool) < _POOL_LIMIT:
                pool[s] = s
        ui = pool.get(ua)
        if ui is None:
            ui = ua
            if len(pool) < _POOL_LIMIT:
                pool[ua] = ua
        pi = pool.get(p) if p is not None else None
        if pi is None and p is not None:
            pi = p
            if len(pool) < _POOL_LIMIT:
                pool[p] = p
        mi = pool.get(m)
        if mi is None:
            mi = m
            if len(pool) < _POOL_LIMIT:
                pool[m] = m
        rec = (aor, rec[1], rec[2], pi, si, exp, rec[6], rec[7], rec[8], ui, rec[10], rec[11],
               mi, instance, rec[14], rec[15], lm, handle)
        self._link(aor, bid, rec, old)
        self.last_put = rec
        self.stats.puts += 1
        return True

    def put_many(self, records, now: float | None = None) -> tuple[int, int]:
        """Apply many full versions (a snapshot, a restore); returns (applied, expired).

        Same outcome as calling :meth:`put` for each, but a record whose AOR the store does
        not hold yet (and that no tombstone covers) is linked directly, with no conflict
        check to make: that is every record of a snapshot loaded into an empty table, and it
        halves the cost per record at a million contacts. Anything else (the AOR exists, a
        tombstone, an expired version) goes through :meth:`put`.
        """
        t = self.clock() if now is None else now
        aors, by_handle, wheel, pool = self._aors, self._by_handle, self._wheel, self._pool
        tombs = self._tombs
        put = self.put
        applied = expired = inserted = 0
        room = len(pool) < _POOL_LIMIT
        for rec in records:
            aor = rec[0]
            exp = rec[5]
            if exp and exp <= t:
                expired += 1
                applied += put(rec)
                continue
            if aor in aors or (tombs and (aor, rec[1] if rec[13] is None
                                          else f"{rec[13]}{KEY_SEP}{rec[14]}") in tombs):
                applied += put(rec)
                continue
            # interning inlined as in put(): a helper call per field would cost ~10 %
            s, ua, p_, m = rec[4], rec[9], rec[3], rec[12]
            si = pool.get(s)
            if si is None:
                si = s
                if room:
                    pool[s] = s
                    room = len(pool) < _POOL_LIMIT
            ui = pool.get(ua)
            if ui is None:
                ui = ua
                if room:
                    pool[ua] = ua
                    room = len(pool) < _POOL_LIMIT
            if p_ is not None:
                pi = pool.get(p_)
                if pi is None:
                    pi = p_
                    if room:
                        pool[p_] = p_
                        room = len(pool) < _POOL_LIMIT
            else:
                pi = None
            mi = pool.get(m)
            if mi is None:
                mi = m
                if room:
                    pool[m] = m
                    room = len(pool) < _POOL_LIMIT
            rec = (aor, rec[1], rec[2], pi, si, exp, rec[6], rec[7], rec[8], ui, rec[10],
                   rec[11], mi, rec[13], rec[14], rec[15], rec[16], rec[17])
            aors[aor] = rec
            by_handle[rec[17]] = aor
            if exp:
                bucket = wheel.get(exp)
                if bucket is None:
                    wheel[exp] = [aor]
                else:
                    bucket.append(aor)
            inserted += 1
        self._count += inserted
        self.stats.puts += inserted
        return applied + inserted, expired

    def refresh(self, handle: int, expires: int, cseq: int, last_modified: int) -> tuple | None:
        """Apply a refresh named by handle. Returns the new record, or None if not applied."""
        old = self.by_handle(handle)
        if old is None:
            self.stats.unknown_handle += 1
            return None
        if not wins(old[CALLID], cseq, last_modified, handle,
                    old[CALLID], old[CSEQ], old[LAST_MODIFIED], old[HANDLE]):
            self.stats.stale += 1
            return None
        rec = (*old[:5], expires, *old[6:8], cseq, *old[9:16], last_modified, handle)
        bid = rec_bid(old)
        if expires and expires <= self.clock():
            self._unlink(old[AOR], bid, old)
            self._tomb(old[AOR], bid, old[CALLID], cseq, last_modified, handle)
            self.stats.expired += 1
            return rec
        self._link(old[AOR], bid, rec, old)
        self.stats.refreshes += 1
        return rec

    def delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
               handle: int) -> bool:
        """Remove a binding if this delete is newer than what we hold; leaves a tombstone."""
        old = self.get(aor, bid)
        if old is not None:
            if not wins(callid, cseq, last_modified, handle,
                        old[CALLID], old[CSEQ], old[LAST_MODIFIED], old[HANDLE]):
                self.stats.stale += 1
                return False
            self._unlink(aor, bid, old)
        tomb = self._tombs.get((aor, bid))
        if tomb is not None and not wins(callid, cseq, last_modified, handle,
                                         tomb[0], tomb[1], tomb[2], tomb[3]):
            self.stats.stale += 1
            return old is not None
        self._tomb(aor, bid, callid, cseq, last_modified, handle)
        self.stats.deletes += 1
        return True

    def _tomb(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
              handle: int) -> None:
        self._tombs.pop((aor, bid), None)  # re-insert at the end: dict order = purge order
        self._tombs[(aor, bid)] = (callid, cseq, last_modified, handle,
                                   self.clock() + self.tombstone_ttl)

    def drop(self, rec: tuple) -> bool:
        """Remove exactly this record if it is still current (pruning, expiry); no tombstone."""
        aor, bid = rec[AOR], rec_bid(rec)
        cur = self.get(aor, bid)
        if cur is None or cur[HANDLE] != rec[HANDLE] or cur[LAST_MODIFIED] != rec[LAST_MODIFIED]:
            return False
        self._unlink(aor, bid, cur)
        return True

    # ------------------------------------------------------------------ expiry
    def expire(self, now: float | None = None) -> list[tuple]:
        """Remove every binding whose absolute expiry has passed; returns what was removed.

        Walks only the wheel buckets that have come due since the last call.
        """
        t = self.clock() if now is None else now
        upto = int(t)
        removed: list[tuple] = []
        wheel = self._wheel
        if len(wheel) and upto - self._next_sweep > len(wheel):
            due = sorted(s for s in wheel if s <= upto)  # long gap: cheaper than stepping
        else:
            due = [s for s in range(self._next_sweep, upto + 1) if s in wheel]
        for second in due:
            bucket = wheel.pop(second)
            self.stats.expiry_scanned += len(bucket)
            for aor in bucket:
                v = self._aors.get(aor)
                if v is None:
                    continue
                for rec in (list(v.values()) if type(v) is dict else (v,)):
                    exp = rec[EXPIRES]
                    if exp and exp <= t:
                        self._unlink(rec[AOR], rec_bid(rec), rec)
                        removed.append(rec)
        self._next_sweep = upto + 1
        self.stats.expired += len(removed)
        if self._tombs:
            dead = []
            for k, tomb in self._tombs.items():
                if tomb[4] > t:
                    break
                dead.append(k)
            for k in dead:
                del self._tombs[k]
        return removed

    def clear(self) -> None:
        self._aors.clear()
        self._by_handle.clear()
        self._wheel.clear()
        self._tombs.clear()
        self._count = 0
