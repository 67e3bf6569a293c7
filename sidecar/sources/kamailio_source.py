"""Kamailio reconcile source (``type = "kamailio"``): make our view equal Kamailio's table.

Kamailio has no usrloc change events, so this source reads the whole location table with the
JSON-RPC ``ul.dump`` at start and then every ``reconcile_interval_s`` seconds, and corrects the
contacts this node owns. It is the safety net under the HEP source (a lost datagram, a sidecar
restart, contacts registered before the sidecar started) and the only source when no mirror is
configured. A fresh node converges in one dump.

What one reconcile does (:func:`reconcile`, no I/O):

* every contact Kamailio holds that we lack, or hold differently (aor, uri, received, path,
  socket, callid, cseq, NAT flag, or expires more than ``tolerance`` seconds apart), is put
  with :meth:`Replica.local_put`, stamped with the time the dump started;
* every binding this node created (handle origin = this node) that Kamailio no longer holds is
  deleted with :meth:`Replica.local_delete` -- but only if it was last changed *before* the
  dump started. A binding learned later (HEP, a peer) may simply not be in the dump yet, and the
  peer's contacts are never deleted here: a standby's proxy not holding them is normal;
* contacts Kamailio marks ``loaded_by_rpc`` were warm-loaded by a sidecar (``ul.add``): they
  are copies of someone's registration, not registrations this proxy received, so they are
  neither taken over nor treated as missing. The same goes for contacts carrying the
  ``copy_bflag`` branch flag: kamailio-cfg's ``route[REPLAY]`` sets it on every contact a
  sidecar loaded by REGISTER replay (which otherwise looks exactly like a registration); a
  phone's own re-REGISTER clears it, and from then on the contact is this proxy's;
* a binding whose stored version changed after the dump started is left alone for the same
  reason (the dump may predate the change).

Connection failures and malformed dumps are logged, counted and retried at the next interval;
the source never raises out of its task.

Settings (``[[sources]]`` table)::

    type = "kamailio"
    rpc_url = "http://127.0.0.1:5071/RPC"   # or: fifo = "/run/kamailio/kamailio_rpc.fifo"
    fifo_reply_dir = "/tmp/"                # with fifo: Kamailio's jsonrpcs fifo_reply_dir
    reconcile_interval_s = 60               # 0 = reconcile once, at start
    use_domain = false                      # must match Kamailio's usrloc use_domain
    table = "location"
    timeout_s = 30                          # a dump of 30,000 contacts takes ~4 s
    nat_bflag = 6                           # branch flag that marks NATed contacts
    copy_bflag = 8                          # branch flag of REGISTER-replayed copies
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import (
    AOR,
    CALLID,
    CFLAGS,
    CSEQ,
    EXPIRES,
    FLAG_NAT,
    FLAGS,
    HANDLE,
    LAST_MODIFIED,
    PATH,
    RECEIVED,
    SOCKET,
    URI,
    handle_origin,
    rec_bid,
)
from ..proxy.kamailio import KamailioRpc, ProxyRpcError, kamailio_contact_to_record
from ..proxy.kamailio_dump import parse_ul_dump
from ..replica import Replica
from .registrations import aor_key, tally_local_put
from .registry import SourceContext

log = logging.getLogger(__name__)

EXPIRES_TOLERANCE_S = 1


@dataclass(frozen=True, slots=True)
class KamailioSettings:
    rpc_url: str | None = None
    fifo: Path | None = None
    fifo_reply_dir: Path = Path("/tmp/")
    reconcile_interval_s: float = 60.0
    use_domain: bool = False
    table: str = "location"
    timeout_s: float = 30.0
    nat_bflag: int = 6
    copy_bflag: int = 8  # kamailio-cfg FLB_SC_COPY: set by route[REPLAY] on replayed copies
    name: str = "kamailio"


def parse_settings(section: Any, base: Path) -> KamailioSettings:
    """Validate a ``[[sources]]`` table of type "kamailio" (every error names the key)."""
    from ..config import ConfigError

    d = KamailioSettings()
    rpc_url = section.str("rpc_url")
    fifo = section.path("fifo", base)
    if (rpc_url is None) == (fifo is None):
        raise ConfigError(f"{section.name}.rpc_url: give exactly one of rpc_url (HTTP) "
                          "or fifo")
    if rpc_url is not None and not rpc_url.startswith(("http://", "https://")):
        raise ConfigError(f"{section.name}.rpc_url: {rpc_url!r} is not an http(s):// URL")
    reply_dir = section.path("fifo_reply_dir", base) or d.fifo_reply_dir
    table = section.str("table", d.table)
    if not table:
        raise ConfigError(f"{section.name}.table: must not be empty")
    return KamailioSettings(
        rpc_url=rpc_url, fifo=fifo, fifo_reply_dir=reply_dir,
        reconcile_interval_s=section.num("reconcile_interval_s", d.reconcile_interval_s,
                                         lo=0, hi=86_400),
        use_domain=section.bool("use_domain", d.use_domain),
        table=table,
        timeout_s=section.num("timeout_s", d.timeout_s, lo=0.1, hi=3600),
        nat_bflag=section.int("nat_bflag", d.nat_bflag, lo=0, hi=31),
        copy_bflag=section.int("copy_bflag", d.copy_bflag, lo=0, hi=31),
        name=section.str("name", d.name) or d.name,
    )


def build(settings: KamailioSettings, ctx: SourceContext) -> KamailioSource:
    return KamailioSource(settings, ctx)


@dataclass(slots=True)
class ReconcileCounts:
    """What one reconcile did (also summed over all reconciles in ``status()``)."""

    contacts_seen: int = 0  # contacts of the table in the dump
    puts: int = 0  # missing or different: stored (full version)
    refreshes: int = 0  # only expires/cseq differed: stored as a refresh
    deletes: int = 0  # ours, gone from Kamailio
    unchanged: int = 0
    stale: int = 0  # the replica refused the version (it holds a newer one)
    newer_here: int = 0  # changed after the dump started: left alone
    loaded_by_rpc: int = 0  # warm-loaded copies: skipped
    replayed_copies: int = 0  # REGISTER-replayed copies (copy_bflag set): skipped
    invalid: int = 0  # contacts that cannot become records

    def add(self, other: ReconcileCounts) -> None:
        for name in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + getattr(other, name))


def same_binding(a: tuple, b: tuple, tolerance_s: float = EXPIRES_TOLERANCE_S) -> bool:
    """True when two versions agree on everything the proxy routes with (expires within
    ``tolerance_s``: Kamailio reports seconds remaining, so the absolute value wobbles)."""
    if (a[AOR] != b[AOR] or a[URI] != b[URI] or a[RECEIVED] != b[RECEIVED]
            or a[PATH] != b[PATH] or a[SOCKET] != b[SOCKET] or a[CALLID] != b[CALLID]
            or a[CSEQ] != b[CSEQ] or (a[FLAGS] & FLAG_NAT) != (b[FLAGS] & FLAG_NAT)):
        return False
    ea, eb = a[EXPIRES], b[EXPIRES]
    if ea == 0 or eb == 0:
        return ea == eb
    return abs(ea - eb) <= tolerance_s


def dump_clock(started: float, finished: float) -> int:
    """The UNIX second to add a dump's "seconds remaining" to.

    Kamailio computes each contact's remaining time with its own ``time(0)`` while it builds
    the reply, somewhere between the request and the answer. When both fall in the same second
    that second is exact; otherwise the middle of the call is the best estimate. (Taking the
    time after the answer, as ``KamailioRpc.ul_dump`` does, skews every expiry late by up to
    the dump's duration.)
    """
    if math.floor(started) == math.floor(finished):
        return math.floor(started)
    return math.floor((started + finished) / 2 + 0.5)


def reconcile(replica: Replica, contacts: list[dict[str, Any]], *, dump_start_ms: int,
              table: str = "location", use_domain: bool = False,
              nat_bflag_mask: int = 1 << 6, tolerance_s: float = EXPIRES_TOLERANCE_S,
              now: float | None = None, deletes: bool = True,
              copy_bflag_mask: int = 1 << 8) -> ReconcileCounts:
    """Make this node's own contacts in ``replica`` equal ``contacts`` (a parsed ``ul.dump``
    started at ``dump_start_ms``); see the module docstring for the rules. No I/O."""
    counts = ReconcileCounts()
    store = replica.store
    present: set[tuple[str, str]] = set()
    for c in contacts:
        if c.get("table") != table:
            continue
        counts.contacts_seen += 1
        try:
            aor = aor_key(c["aor"], use_domain)
            rec = kamailio_contact_to_record({**c, "aor": aor}, handle=0,
                                             last_modified=dump_start_ms,
                                             nat_bflag_mask=nat_bflag_mask)
        except (ProxyRpcError, KeyError, TypeError, AttributeError):
            counts.invalid += 1
            continue
        bid = rec_bid(rec)
        present.add((aor, bid))
        if c.get("loaded_by_rpc"):
            counts.loaded_by_rpc += 1
            continue
        if rec[CFLAGS] & copy_bflag_mask:
            counts.replayed_copies += 1
            continue
        old = store.get(aor, bid)
        if old is not None:
            if same_binding(old, rec, tolerance_s):
                counts.unchanged += 1
                continue
            if old[LAST_MODIFIED] >= dump_start_ms:
                counts.newer_here += 1
                continue
        tally_local_put(counts, replica.local_put(rec))
    if not deletes:
        # A passive node's proxy holds only what was warm-loaded into it (or nothing, right
        # after a restart): its absence of a contact proves nothing, so nothing is deleted.
        return counts
    now_s = time.time() if now is None else now
    own = replica.node_id
    for rec in store.records():
        if handle_origin(rec[HANDLE]) != own:
            continue
        bid = rec_bid(rec)
        if (rec[AOR], bid) in present:
            continue
        if rec[LAST_MODIFIED] >= dump_start_ms:
            counts.newer_here += 1
            continue
        if rec[EXPIRES] and rec[EXPIRES] <= now_s + tolerance_s:
            continue  # Kamailio already calls it expired; the store's expiry removes it
        if replica.local_delete(rec[AOR], bid, rec[CALLID], rec[CSEQ], dump_start_ms):
            counts.deletes += 1
        else:
            counts.stale += 1
    return counts


class KamailioSource:
    """Periodic ``ul.dump`` -> :func:`reconcile`."""

    def __init__(self, settings: KamailioSettings, ctx: SourceContext,
                 rpc: KamailioRpc | None = None) -> None:
        self.settings = settings
        self.ctx = ctx
        self.name = settings.name
        if rpc is None:
            if settings.rpc_url is not None:
                rpc = KamailioRpc(url=settings.rpc_url, timeout=settings.timeout_s)
            else:
                rpc = KamailioRpc(fifo_path=settings.fifo, reply_dir=settings.fifo_reply_dir,
                                  timeout=settings.timeout_s)
        self.rpc = rpc
        self.totals = ReconcileCounts()
        self.reconciles = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_duration_s: float | None = None
        self.last_dump_s: float | None = None
        self.last_ok_at: float | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.rpc.close()

    async def _run(self) -> None:
        interval = self.settings.reconcile_interval_s
        while True:
            try:
                await self.reconcile_now()
            except Exception as exc:  # a bug must not end the reconcile loop for good
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("kamailio source %s: reconcile failed", self.name)
            if interval <= 0:
                return
            await asyncio.sleep(interval)

    async def reconcile_now(self) -> ReconcileCounts | None:
        """One dump and reconcile; None (and counted, logged) when Kamailio could not be read."""
        async with self._lock:
            started = time.time()
            try:
                result = await self.rpc.call("ul.dump")
                dumped = time.time()
                contacts = parse_ul_dump(result, now=dump_clock(started, dumped))
            except ProxyRpcError as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("kamailio source %s: ul.dump failed (retry in %s s): %s", self.name,
                            self.settings.reconcile_interval_s or "never", exc)
                return None
            counts = reconcile(
                self.ctx.replica, contacts, dump_start_ms=int(started * 1000),
                table=self.settings.table, use_domain=self.settings.use_domain,
                nat_bflag_mask=1 << self.settings.nat_bflag,
                tolerance_s=EXPIRES_TOLERANCE_S + math.ceil(dumped - started),
                deletes=self.ctx.is_active(), copy_bflag_mask=1 << self.settings.copy_bflag)
            if counts.puts or counts.refreshes or counts.deletes:
                self.ctx.kick()
            self.totals.add(counts)
            self.reconciles += 1
            self.last_error = None
            self.last_dump_s = round(dumped - started, 3)
            self.last_duration_s = round(time.time() - started, 3)
            self.last_ok_at = time.time()
            log.info("kamailio source %s: reconciled %d contacts in %.3f s: %d put, %d refreshed,"
                     " %d deleted, %d unchanged", self.name, counts.contacts_seen,
                     self.last_duration_s, counts.puts, counts.refreshes, counts.deletes,
                     counts.unchanged)
            return counts

    def status(self) -> dict[str, Any]:
        t = self.totals
        return {
            "reconciles": self.reconciles, "contacts_seen": t.contacts_seen, "puts": t.puts,
            "refreshes": t.refreshes, "deletes": t.deletes, "unchanged": t.unchanged,
            "stale": t.stale, "newer_here": t.newer_here, "loaded_by_rpc": t.loaded_by_rpc,
            "replayed_copies": t.replayed_copies,
            "invalid": t.invalid, "errors": self.errors,
            "last_duration_s": self.last_duration_s, "last_dump_s": self.last_dump_s,
            "last_error": self.last_error,
        }
