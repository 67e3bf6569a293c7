"""The node's MI commands: status, usrloc views and replication control.

Names and output shapes follow OpenSIPS MI where one exists (``ul_dump``, ``ul_show_contact``
with ``{"code":404,"message":"AOR not found"}``), so operators' scripts carry over.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from ..model import EXPIRES, URI, to_dict
from .commands import (
    COMMAND_FAILED,
    NOT_FOUND,
    CommandRegistry,
    JsonRpcError,
    Param,
    invalid_params,
)

if TYPE_CHECKING:
    from ..daemon import Daemon

MAX_PAGE = 10_000


def _contact_json(rec: tuple, now: float) -> dict:
    d = to_dict(rec)
    exp = rec[EXPIRES]
    d["expires_in"] = "permanent" if exp == 0 else max(0, int(exp - now))
    return d


def table_digest(records) -> dict:
    """Order-independent digest of a table: count plus a sum of per-record hashes.

    Two replicas hold the same contacts exactly when their digests are equal (up to 2^-64),
    which lets tests and the benchmark compare a million contacts without dumping them.
    """
    total = 0
    n = 0
    pack = msgpack.Packer(use_bin_type=True).pack
    for rec in records:
        total += int.from_bytes(hashlib.blake2b(pack(rec), digest_size=8).digest(), "big")
        n += 1
    return {"count": n, "digest": f"{total & 0xFFFFFFFFFFFFFFFF:016x}"}


def _antientropy_totals(node: Daemon) -> dict:
    """Anti-entropy counters summed over the peers (sc_counters)."""
    keys = ("rounds", "errors", "buckets_differing", "records_put", "records_dropped")
    out = dict.fromkeys(keys, 0)
    for sub in node.iter_subscribers():
        for k in keys:
            out[k] += getattr(sub.ae_stats, k)
    return {f"antientropy_{k}": v for k, v in out.items()}


def register_node_commands(reg: CommandRegistry, node: Daemon) -> None:
    store = node.replica.store

    @reg.command(
        "sc_status",
        help="Node id, role, epoch, sequence numbers, per-peer link "
        "state and lag, contact counts, uptime and counters.",
    )
    def sc_status() -> dict:
        return node.status()

    def _role():
        if node.role_service is None:
            raise JsonRpcError(NOT_FOUND, "role arbitration is not configured ([role])")
        return node.role_service

    @reg.command("sc_role", help="This node's role, epoch, peer state, checkpoints, backoff.")
    def sc_role() -> dict:
        return _role().status()

    @reg.command("sc_promote", params=[
        Param("force", bool, required=False, default=False,
              help="promote even while a live peer is active"),
    ], help="Make this node active (refused while the peer is live and active unless forced).")
    async def sc_promote(force: bool = False) -> dict:
        return await _role().command("promote", force=force)

    @reg.command("sc_demote", help="Make this node passive; the peer takes over.")
    async def sc_demote() -> dict:
        return await _role().command("demote")

    @reg.command("sc_failover", params=[
        Param("check_only", bool, required=False, default=False,
              help="report whether a failover would succeed and why, change nothing"),
        Param("target", int, required=False, help="node id that should end up active"),
    ], help="Move the active role (to the peer unless target says otherwise).")
    async def sc_failover(check_only: bool = False, target: int | None = None) -> dict:
        return await _role().command("failover", check_only=check_only, target=target)

    def _ownership():
        if node.ownership is None:
            raise JsonRpcError(NOT_FOUND, "keepalive ownership is not configured ([keepalive])")
        return node.ownership

    @reg.command("sc_ping_stats", help="NAT keepalive owner: mode, proxy pinger state, sidecar "
                                       "ping counters (sent, replies, lost, dropped, sweep).")
    def sc_ping_stats() -> dict:
        return _ownership().status()

    @reg.command("sc_ping_enable", params=[
        Param("enable", bool, help="1 to ping from this node, 0 to stop"),
        Param("force", bool, required=False, default=False,
              help="allow pinging on a passive node (risks double pinging)"),
    ], help="Switch this node's NAT pinging by hand (the role normally decides).")
    async def sc_ping_enable(enable: bool, force: bool = False) -> dict:
        own = _ownership()
        if enable and not force and node.role_service is not None \
                and not node.role_service.active:
            raise JsonRpcError(COMMAND_FAILED, "this node is passive: enabling its pinging "
                               "would make two nodes ping (use force=1 to override)")
        await own.switch(enable)
        return own.status()

    def _durability():
        if node.durability is None:
            raise JsonRpcError(NOT_FOUND, "durability is not configured ([durability])")
        return node.durability

    @reg.command("sc_snapshot", params=[
        Param("path", str, required=False, help="export to this file instead of the state "
                                                "directory (no log rotation)"),
    ], help="Write a full snapshot of the table now (like dbbackup).")
    async def sc_snapshot(path: str | None = None) -> dict:
        from ..persist import PersistError

        try:
            info = await _durability().snapshot_async(store, Path(path) if path else None)
        except PersistError as exc:
            raise JsonRpcError(COMMAND_FAILED, f"snapshot failed: {exc}") from None
        return {"path": str(info.path), "records": info.records, "bytes": info.bytes,
                "seconds": round(info.seconds, 3)}

    @reg.command("sc_restore", params=[
        Param("path", str, required=False, help="a snapshot file (default: the newest local "
                                                "snapshot plus the change log)"),
    ], help="Load a snapshot into the table (like dbrestore); contacts merge by the conflict "
            "rule and expired ones are dropped.")
    def sc_restore(path: str | None = None) -> dict:
        from ..persist import PersistError

        try:
            report = _durability().restore(store, Path(path) if path else None)
        except PersistError as exc:
            raise JsonRpcError(COMMAND_FAILED, f"restore refused: {exc}") from None
        return report.as_dict()

    @reg.command("sc_peers", help="Every configured peer: endpoint, link state, incarnation, "
                                  "epoch, last sequence applied, lag, catch-up counters.")
    def sc_peers() -> list:
        return [s.status() for s in node.iter_subscribers()]

    @reg.command(
        "sc_counters",
        help="Contact count and replication counters only (cheap enough to poll often).",
    )
    def sc_counters() -> dict:
        r = node.replica
        return {
            "contacts": len(store),
            "last_seq_sent": r.outbox.last_seq,
            "remote_changes": r.stats.remote_changes,
            "local_puts": r.stats.local_puts,
            "local_refreshes": r.stats.local_refreshes,
            **_antientropy_totals(node),
        }

    @reg.command(
        "ul_dump",
        params=[
            Param("aor", str, required=False, help="only this AOR"),
            Param("offset", int, required=False, default=0, help="skip this many AORs"),
            Param(
                "limit", int, required=False, default=1000, help=f"AORs per page (<= {MAX_PAGE})"
            ),
        ],
        help="Dump contacts by AOR, paged; 'next_offset' is null on the last page.",
    )
    def ul_dump(aor: str | None = None, offset: int = 0, limit: int = 1000) -> dict:
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise invalid_params(f"offset must be >= 0 and limit 1..{MAX_PAGE}")
        now = time.time()
        names = [aor] if aor else list(itertools.islice(store.aors(), offset, offset + limit))
        aors = []
        for name in names:
            recs = store.lookup_aor(name, now)
            if recs:
                aors.append({"AOR": name, "Contacts": [_contact_json(r, now) for r in recs]})
        more = not aor and offset + limit < store.aor_count
        return {
            "Contacts": len(store),
            "AORs_total": store.aor_count,
            "AORs": aors,
            "next_offset": offset + limit if more else None,
        }

    @reg.command(
        "ul_show_contact",
        params=[
            Param("aor", str, help="address of record"),
            Param(
                "table_name",
                str,
                required=False,
                default="location",
                help="accepted for OpenSIPS compatibility",
            ),
            Param("contact", str, required=False, help="only this contact URI"),
        ],
        help="Contacts of one AOR: this node's table first; if it has none and a Redis "
             "Cluster directory is configured, the directory ('source' says which).",
    )
    async def ul_show_contact(aor: str, table_name: str = "location",
                              contact: str | None = None) -> dict:
        now = time.time()
        recs = [r for r in store.lookup_aor(aor, now) if contact is None or r[URI] == contact]
        source = "local"
        directory = getattr(node, "directory", None)
        if not recs and directory is not None:
            from ..persist.redis_directory import SOURCE_NAME, RedisDirectoryError

            try:
                recs = await directory.lookup(aor, contact)
            except RedisDirectoryError as exc:
                raise JsonRpcError(COMMAND_FAILED, "directory lookup failed",
                                   str(exc)) from None
            source = SOURCE_NAME
        if not recs:
            raise JsonRpcError(NOT_FOUND, "AOR not found" if contact is None
                               else "Contact not found")
        return {"AOR": aor, "Contacts": [_contact_json(r, now) for r in recs],
                "source": source}

    @reg.command(
        "sc_resync",
        params=[
            Param("peer", int, required=False, help="peer node id (default: every peer)"),
        ],
        help="Ask peer(s) for a full snapshot now (repairs any suspected divergence).",
    )
    def sc_resync(peer: int | None = None) -> dict:
        subs = [s for s in node.iter_subscribers() if peer is None or s.peer_id == peer]
        if not subs:
            raise JsonRpcError(NOT_FOUND, f"no such peer {peer}")
        for s in subs:
            s.resync()
        return {"requested": [s.peer_id for s in subs]}

    @reg.command(
        "sc_antientropy",
        params=[
            Param("peer", int, required=False, help="peer node id (default: every peer)"),
        ],
        help="Run an anti-entropy round now: compare per-bucket digests of each peer's own "
             "contacts with ours and repair the differing buckets; reports what it found.",
    )
    async def sc_antientropy(peer: int | None = None) -> dict:
        subs = [s for s in node.iter_subscribers() if peer is None or s.peer_id == peer]
        if peer is not None and not subs:
            raise JsonRpcError(NOT_FOUND, f"no such peer {peer}")
        return {"rounds": [await s.antientropy_round() for s in subs]}

    @reg.command(
        "sc_digest",
        help="Count and order-independent hash of the whole table, to compare replicas.",
    )
    def sc_digest() -> dict:
        store.expire()
        return table_digest(store)
