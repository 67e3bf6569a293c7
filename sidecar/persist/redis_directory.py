"""A contact directory shared by many proxies through a real Redis Cluster (DESIGN §8).

Why: one active/standby pair replicates over ZeroMQ; operators with several independent
proxies (or pairs) still want "where is this phone registered?" answered on any of them.
Each node writes the changes *it originated* into the cluster (per-AOR hashes spread over
all slots, merged by a Lua version of the conflict rule: see :mod:`.directory_codec`), and
any node can read any AOR.

Degraded mode, as in :mod:`.redis_backend`: :meth:`RedisDirectory.put` / ``delete`` only
append to a bounded in-memory backlog; a task flushes it (coalesced per binding, one script
call per AOR, pipelined; the cluster pipeline groups the calls by master). Failures are
counted, set :attr:`~RedisDirectory.degraded` and keep the affected changes queued; calls
that succeeded on healthy masters are done. Changes beyond ``backlog_limit`` are counted as
lost and make the directory re-push every contact this node originated once the cluster is
back (lost *deletes* cannot be re-pushed: those contacts leave the directory when they
expire). Error replies that retrying cannot fix (wrong key type, foreign fields) are counted
as rejected, logged with the key, and dropped: never retried forever, never overwritten.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..model import EXPIRES, HANDLE, URI, now_ms
from .background_writer import BackgroundWriter
from .directory_codec import (
    DIRECTORY_LUA,
    RedisDirectoryError,
    coalesce,
    decode_contact,
    directory_key,
    encode_op,
)
from .redis_backend import describe_error

log = logging.getLogger(__name__)

SOURCE_NAME = "redis-cluster"  # the marker ul_show_contact puts on contacts found here

# Errors that retrying later can fix: the cluster (or one master) is away, or moving slots.
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.ClusterError, rexc.TryAgainError,
              rexc.AskError, rexc.RedisClusterException, OSError, asyncio.TimeoutError)


@dataclass(slots=True)
class DirectoryStats:
    """Counters for sc_status (all monotonic except the *_since / last_error fields)."""

    queued: int = 0  # changes accepted into the backlog
    written: int = 0  # versions the cluster stored (won there)
    stale: int = 0  # versions the cluster already had newer (or identical: a resend)
    rejected: int = 0  # changes refused by an error reply retrying cannot fix
    lost: int = 0  # changes dropped because the backlog was full
    errors: int = 0  # failed flush attempts and failed script calls
    catch_ups: int = 0  # times the backlog drained after being degraded
    repushes: int = 0  # full re-pushes of this node's own contacts
    repushed: int = 0  # contacts written by them
    script_loads: int = 0  # SCRIPT LOADs (at start and after a master lost its cache)
    lookups: int = 0
    lookup_errors: int = 0
    bad_entries: int = 0  # undecodable contact fields seen by lookups
    last_error: str = ""
    degraded_since_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def _is_fixable(exc: BaseException) -> bool:
    """Error results worth retrying later (NoScript is handled before this)."""
    return isinstance(exc, _TRANSIENT)


# ---------------------------------------------------------------------- the directory
class RedisDirectory(BackgroundWriter):
    """This node's writer into, and reader of, the shared contact directory.

    Wiring: put :class:`DirectoryJournal` in the replica's journal chain, ``await start()``,
    and answer lookups with :meth:`lookup`. :meth:`put`/:meth:`delete` never raise and never
    block; :meth:`write` writes at once and is for tests and tools.
    """

    task_name = "redis-directory"

    def __init__(self, nodes: Sequence[tuple[str, int]], cluster_name: str, node_id: int, *,
                 backlog_limit: int = 1_000_000, tombstone_ttl_s: float = 300.0,
                 batch_changes: int = 2048, flush_interval_s: float = 0.05,
                 retry_interval_s: float = 0.5, socket_timeout: float = 1.0,
                 password: str | None = None, clock: Callable[[], int] = now_ms,
                 client: RedisCluster | None = None) -> None:
        if not cluster_name or any(c in cluster_name for c in "{}"):
            raise RedisDirectoryError("config", "cluster_name must be non-empty, without braces")
        if not nodes and client is None:
            raise RedisDirectoryError("config", "at least one cluster node is needed")
        if backlog_limit < 1 or batch_changes < 1 or tombstone_ttl_s < 0:
            raise RedisDirectoryError("config", "backlog_limit >= 1, batch_changes >= 1 and "
                                                "tombstone_ttl_s >= 0 are required")
        self.nodes = tuple((str(h), int(p)) for h, p in nodes)
        self.client = client if client is not None else RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.nodes],
            socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            password=password, retry=Retry(NoBackoff(), 1))
        self.cluster_name = cluster_name
        self.node_id = node_id
        self.backlog_limit = backlog_limit
        self.tombstone_ttl_ms = int(tombstone_ttl_s * 1000)
        self.batch_changes = batch_changes
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.stats = DirectoryStats()
        self.degraded = False
        self.repush_wanted = False
        self._backlog: list[tuple] = []
        self._sha: str | None = None
        self._lock = asyncio.Lock()

    def key(self, aor: str) -> str:
        return directory_key(self.cluster_name, aor)

    # ------------------------------------------------------------------ hot path
    def put(self, rec: tuple) -> None:
        """Queue a contact version this node originated (synchronous, never raises)."""
        self._queue(rec)

    def delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
               handle: int) -> None:
        """Queue a delete this node originated (synchronous, never raises)."""
        self._queue((aor, bid, callid, cseq, last_modified, handle))

    def _queue(self, change: tuple) -> None:
        if len(self._backlog) >= self.backlog_limit:
            self.stats.lost += 1
            if not self.repush_wanted:
                log.error("redis directory backlog full (%d changes): dropping changes, this "
                          "node's contacts will be re-pushed when the cluster is back",
                          self.backlog_limit)
            self.repush_wanted = True
            return
        self._backlog.append(change)
        self.stats.queued += 1
        if len(self._backlog) >= self.batch_changes:
            self._nudge()

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def status(self) -> dict[str, Any]:
        return {"mode": "cluster", "cluster": self.cluster_name,
                "nodes": [f"{h}:{p}" for h, p in self.nodes], "degraded": self.degraded,
                "backlog": len(self._backlog), "repush_wanted": self.repush_wanted,
                **self.stats.as_dict()}

    # ------------------------------------------------------------------ writing
    async def _load_script(self) -> None:
        self._sha = await self.client.script_load(DIRECTORY_LUA)
        self.stats.script_loads += 1

    async def _run_calls(self, calls: list[tuple[str, list[bytes]]]) -> list[Any]:
        """Run script calls (key, op args) pipelined; one result per call: a list of 0/1
        outcomes or the exception for that call. Raises only when the pipeline as a whole
        failed. A master that forgot the script (restarted) gets it again, once."""
        if self._sha is None:
            await self._load_script()
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            now = self.clock()
            head = [str(now).encode(), str(now + self.tombstone_ttl_ms).encode(),
                    str(self.tombstone_ttl_ms).encode()]
            pipe = self.client.pipeline()
            for i in todo:
                key, args = calls[i]
                pipe.execute_command("EVALSHA", self._sha, 1, key, *head, *args)
            replies = await pipe.execute(raise_on_error=False)
            missing = []
            for i, r in zip(todo, replies, strict=True):
                results[i] = r
                if isinstance(r, rexc.NoScriptError):
                    missing.append(i)
            if not missing or attempt:
                break
            await self._load_script()
            todo = missing
        return results

    def _encode_calls(self, changes: Sequence[tuple]
                      ) -> tuple[list[tuple[str, list[bytes]]], list[list[tuple]], int]:
        """Script calls for *changes* (coalesced), the changes behind each call, and how many
        changes could not be encoded (counted as rejected here)."""
        calls: list[tuple[str, list[bytes]]] = []
        owners: list[list[tuple]] = []
        bad = 0
        for aor, group in coalesce(changes).items():
            args: list[bytes] = []
            kept: list[tuple] = []
            for c in group:
                try:
                    _, op = encode_op(c)
                except RedisDirectoryError as exc:
                    bad += 1
                    self._reject(str(exc), 1)
                    continue
                args += op
                kept.append(c)
            if kept:
                calls.append((self.key(aor), args))
                owners.append(kept)
        return calls, owners, bad

    async def flush(self) -> bool:
        """Send the backlog; True when it is empty. Never raises."""
        async with self._lock:
            while self._backlog:
                part = self._backlog[:self.batch_changes]
                retry = await self._send(part)
                if retry is None:  # the pipeline failed as a whole: keep everything
                    return False
                self._backlog[:len(part)] = retry
                if retry:
                    return False
                await asyncio.sleep(0)
        self._recovered()
        return True

    async def _send(self, changes: Sequence[tuple]) -> list[tuple] | None:
        """Write *changes*; returns those to retry (their master was away), or None when
        nothing could be sent at all."""
        calls, owners, _ = self._encode_calls(changes)
        if not calls:
            return []
        try:
            results = await self._run_calls(calls)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            self._failed(exc)
            return None
        retry: list[tuple] = []
        first_failure: tuple[BaseException, str] | None = None
        for (key, _), kept, r in zip(calls, owners, results, strict=True):
            if isinstance(r, BaseException):
                if _is_fixable(r) or isinstance(r, rexc.NoScriptError):
                    first_failure = first_failure or (r, key)
                    retry.extend(kept)
                else:
                    self._reject(describe_error(r, key), len(kept))
                continue
            for outcome in r:
                if outcome == 1:
                    self.stats.written += 1
                else:
                    self.stats.stale += 1
        if first_failure is not None:  # counted once per attempt, not once per AOR
            self._failed(*first_failure)
        return retry

    async def write(self, changes: Sequence[tuple]) -> list[bool]:
        """Write *changes* now, in order and without coalescing; one bool per change (True:
        the cluster stored it; False: it held an equal or newer version). Raises
        RedisDirectoryError on any failure. For tests and tools; the node uses put/delete."""
        calls: list[tuple[str, list[bytes]]] = []
        for c in changes:
            aor, op = encode_op(c)
            key = self.key(aor)
            if calls and calls[-1][0] == key:
                calls[-1][1].extend(op)
            else:
                calls.append((key, op))
        try:
            results = await self._run_calls(calls)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            raise self._as_error(exc, "") from None
        out: list[bool] = []
        for (key, _), r in zip(calls, results, strict=True):
            if isinstance(r, BaseException):
                raise self._as_error(r, key)
            out.extend(x == 1 for x in r)
        return out

    async def repush(self, records: Sequence[tuple]) -> int:
        """Write every contact in *records* that this node originated (after changes were
        lost); the conflict rule keeps newer versions in the cluster. Returns how many were
        sent, or -1 when the cluster failed meanwhile (still wanted then)."""
        own = [r for r in records if r[HANDLE] >> 56 == self.node_id]
        lost_before = self.stats.lost
        sent = 0
        async with self._lock:
            for i in range(0, len(own), self.batch_changes):
                retry = await self._send(own[i:i + self.batch_changes])
                if retry is None or retry:
                    return -1
                sent += min(self.batch_changes, len(own) - i)
                await asyncio.sleep(0)
        if self.stats.lost == lost_before:
            self.repush_wanted = False
        self.stats.repushes += 1
        self.stats.repushed += sent
        log.warning("redis directory: re-pushed %d own contacts after lost changes", sent)
        return sent

    def _as_error(self, exc: BaseException, key: str) -> RedisDirectoryError:
        text = describe_error(exc, key)
        if isinstance(exc, rexc.ResponseError) and "WRONGTYPE" in str(exc):
            return RedisDirectoryError("wrongtype", text)
        if _is_fixable(exc):
            return RedisDirectoryError("unavailable", text)
        return RedisDirectoryError("error", text)

    def _failed(self, exc: BaseException, key: str = "") -> None:
        self.stats.errors += 1
        self.stats.last_error = describe_error(exc, key)
        if isinstance(exc, rexc.NoScriptError):
            self._sha = None
        if not self.degraded:
            self.degraded = True
            self.stats.degraded_since_ms = now_ms()
            log.error("redis directory degraded: %s", self.stats.last_error)

    def _reject(self, why: str, n: int) -> None:
        self.stats.rejected += n
        self.stats.errors += 1
        self.stats.last_error = why
        if self.stats.errors <= 10 or self.stats.errors % 1000 == 0:
            log.error("redis directory refused %d change(s): %s", n, why)

    def _recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            self.stats.degraded_since_ms = 0
            self.stats.catch_ups += 1
            log.warning("redis directory caught up")

    # ------------------------------------------------------------------ reading
    async def lookup(self, aor: str, contact: str | None = None) -> list[tuple]:
        """Unexpired contacts of *aor* in the directory (only *contact*'s, if given).

        Raises RedisDirectoryError when the cluster cannot answer or the key is not a
        directory hash; an undecodable contact field is skipped, counted in
        ``bad_entries`` and named in ``last_error``."""
        key = self.key(aor)
        self.stats.lookups += 1
        try:
            raw = await self.client.hgetall(key)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            self.stats.lookup_errors += 1
            raise self._as_error(exc, key) from None
        now = time.time()
        out = []
        for f, v in raw.items():
            if f.startswith(b"v:"):
                continue
            if not f.startswith(b"c:"):
                self._bad_entry(f"{key}: foreign field {f[:60]!r}")
                continue
            try:
                rec = decode_contact(v, f"{key} field {f[:60]!r}")
            except RedisDirectoryError as exc:
                self._bad_entry(str(exc))
                continue
            exp = rec[EXPIRES]
            if (exp and exp <= now) or rec[0] != aor:
                continue
            if contact is None or rec[URI] == contact:
                out.append(rec)
        return out

    def _bad_entry(self, why: str) -> None:
        self.stats.bad_entries += 1
        self.stats.last_error = why
        log.warning("redis directory: %s", why)

    # ------------------------------------------------------------------ lifecycle
    async def _run(self, records: Callable[[], Sequence[tuple]] | None) -> None:
        while True:
            await self._sleep(self.retry_interval_s if self.degraded else self.flush_interval_s)
            try:
                if self.degraded and not self._backlog and not await self._ping():
                    continue  # e.g. a failed re-push: wait for every master before retrying
                if (self._backlog or self.degraded) and not await self.flush():
                    continue
                if self.repush_wanted and records is not None:
                    await self.repush(records())
            except Exception as exc:  # never let the writer task die
                self._failed(exc)
                log.exception("redis directory flush failed unexpectedly")

    async def _ping(self) -> bool:
        """Every master answers: the cheap check before leaving the degraded state when no
        backlog flush can prove the cluster is back."""
        try:
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            self._failed(exc)
            return False
        return True


class DirectoryJournal:
    """Journal adapter: passes on only the changes this node originated (the handle's top
    byte is the origin node), so each change reaches the directory exactly once, from its
    origin, and replicated copies are never written back."""

    def __init__(self, directory: RedisDirectory, node_id: int) -> None:
        self.directory = directory
        self.node_id = node_id

    def record_put(self, rec: tuple) -> None:
        if rec[HANDLE] >> 56 == self.node_id:
            self.directory.put(rec)

    def record_delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
                      handle: int) -> None:
        if handle >> 56 == self.node_id:
            self.directory.delete(aor, bid, callid, cseq, last_modified, handle)


__all__ = [
    "SOURCE_NAME",
    "DirectoryJournal",
    "DirectoryStats",
    "RedisDirectory",
    "RedisDirectoryError",
]
