"""Redis as the optional shared backend: a bounded change stream plus generation snapshots.

Why Redis next to the local files (DESIGN §8): a shared store outlives both nodes of a pair and
lets a fresh node restore without a peer. Why a stream *and* snapshots: the stream is cheap to
append to but bounded (``MAXLEN ~``), so it only has to cover the changes since the last
snapshot; a restore is "latest snapshot generation + stream entries after its cut".

Keys (``P`` = ``sc:{<cluster_name>}``; the braces are a Redis Cluster hash tag, so every key of
one cluster name lives in one slot and the Lua pointer switch may touch them all)::

    P:stream          stream; entry fields  node=<id>  n=<changes>  c=<msgpack array of changes>
    P:snap:gen        INCR counter handing out snapshot generations
    P:snap:<gen>      hash; fields "0", "1", ... = framed chunks (change_log.frame of a msgpack
                      array of at most CHUNK_RECORDS contact tuples), written with a TTL while
                      in progress so a writer that dies half way leaves nothing behind
    P:snap:current    msgpack (REDIS_SNAPSHOT_VERSION, gen, cut_id, records, chunks,
                      created_ms, node_id): the pointer; switched by one Lua script, so a
                      reader sees either the old complete snapshot or the new complete one
    P:snap:prev       generation kept one switch longer for readers that just read the pointer

A change is exactly the replication/log tuple (``sidecar.model``): an 18-item contact for a PUT,
the 6-item ``(aor, bid, callid, cseq, last_modified, handle)`` for a DELETE. A stream entry
carries up to ``entry_changes`` of them, which is what makes >100k changes/s possible from
Python: per-command overhead is paid per batch, not per change. ``stream_maxlen`` counts
changes and is turned into an entry bound.

Degraded mode: Redis being down must never stop replication. :meth:`RedisBackend.publish` is a
synchronous append to an in-memory backlog (bounded by ``backlog_limit`` changes); flushing and
every other coroutine here catch Redis errors, count them and set :attr:`degraded` instead of
raising. Changes beyond the bound are counted as lost and set :attr:`snapshot_wanted`: only a
fresh snapshot can cover them. Re-sending a batch whose reply was lost may duplicate entries;
that is harmless because re-applying a change is a no-op under the conflict rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zlib import crc32

import msgpack
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.sentinel import Sentinel

from ..model import DELETE_LEN, RECORD_LEN, now_ms
from ..replication.wire import WireError, check_change
from ..store import ContactStore
from .background_writer import BackgroundWriter
from .change_log import FRAME, MAX_FRAME, PersistError
from .snapshot_file import CHUNK_RECORDS

log = logging.getLogger(__name__)

REDIS_SNAPSHOT_VERSION = 1
IN_PROGRESS_TTL_S = 3600  # an unfinished generation disappears on its own after this
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError)

# Atomic pointer switch. KEYS: current, prev, new generation hash. ARGV: new pointer value,
# new generation number, key prefix for generation hashes. Makes the new hash permanent,
# points "current" at it, remembers the old generation as "prev" and drops the one before.
_SWITCH_LUA = """
local old = redis.call('GET', KEYS[1])
local oldprev = redis.call('GET', KEYS[2])
redis.call('PERSIST', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1])
if old then
  local oldgen = cmsgpack.unpack(old)
  if type(oldgen) == 'table' then
    redis.call('SET', KEYS[2], tostring(oldgen[2]))
  end
end
if oldprev and oldprev ~= ARGV[2] then
  redis.call('DEL', ARGV[3] .. oldprev)
end
return 1
"""


class RedisBackendError(PersistError):
    """A Redis answer that cannot be used (wrong key type, error reply, foreign or newer
    snapshot format). Subclass of PersistError so ``reason`` labels stay uniform."""


@dataclass(slots=True, frozen=True)
class RedisSettings:
    """Where Redis is: a plain URL, or Sentinel addresses plus the monitored master's name."""

    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = "mymaster"
    socket_timeout: float = 1.0
    password: str | None = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RedisSettings:
        sentinels = tuple((str(h), int(p)) for h, p in cfg.get("sentinels", ()))
        return cls(url=str(cfg.get("url", cls.url)), sentinels=sentinels,
                   master_name=str(cfg.get("master_name", cls.master_name)),
                   socket_timeout=float(cfg.get("socket_timeout", cls.socket_timeout)),
                   password=cfg.get("password"))


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client; through Sentinel (``master_for``) when sentinels are configured, so
    a Redis master failover is followed without reconfiguration."""
    if settings.sentinels:
        sentinel = Sentinel(list(settings.sentinels), socket_timeout=settings.socket_timeout,
                            password=settings.password)
        return sentinel.master_for(settings.master_name, socket_timeout=settings.socket_timeout,
                                   password=settings.password)
    return aioredis.Redis.from_url(settings.url, socket_timeout=settings.socket_timeout,
                                   socket_connect_timeout=settings.socket_timeout,
                                   password=settings.password)


def describe_error(exc: BaseException, key: str = "") -> str:
    """One line naming the failure and, for error replies, the key involved."""
    where = f" (key {key})" if key else ""
    if isinstance(exc, rexc.ResponseError) and "WRONGTYPE" in str(exc):
        return f"wrongtype{where}: key holds another Redis type; refusing to overwrite it"
    if isinstance(exc, rexc.ResponseError):
        return f"error reply{where}: {exc}"
    return f"{type(exc).__name__}{where}: {exc}"


@dataclass(slots=True)
class RedisBackendStats:
    """Counters for sc_status and /metrics."""

    changes_published: int = 0
    entries_written: int = 0
    errors: int = 0
    lost_changes: int = 0  # dropped because the backlog was full while Redis was away
    snapshots: int = 0
    catch_ups: int = 0
    last_error: str = ""
    degraded_since_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class RedisSnapshotInfo:
    ok: bool
    generation: int = 0
    records: int = 0
    cut_id: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass(slots=True)
class RedisRestoreReport:
    generation: int = 0  # 0: no usable snapshot
    snapshot_records: int = 0
    stream_entries: int = 0
    stream_changes: int = 0
    puts_applied: int = 0
    deletes_applied: int = 0
    expired_dropped: int = 0
    bad_records: int = 0
    gap: str = ""  # stream trimmed past the snapshot cut: changes may be missing
    errors: list[str] = field(default_factory=list)
    contacts: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.errors or self.bad_records or self.gap)

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        out["clean"] = self.clean
        out["seconds"] = round(self.seconds, 3)
        return out


# ---------------------------------------------------------------------- codec (sans-I/O)
def encode_pointer(gen: int, cut_id: str, records: int, chunks: int, created_ms: int,
                   node_id: int) -> bytes:
    return msgpack.packb((REDIS_SNAPSHOT_VERSION, gen, cut_id, records, chunks, created_ms,
                          node_id), use_bin_type=True)


def decode_pointer(data: bytes) -> tuple[int, str, int, int]:
    """(gen, cut_id, records, chunks) from the pointer value, or raise RedisBackendError."""
    try:
        obj = msgpack.unpackb(data, use_list=False, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise RedisBackendError("malformed", f"snapshot pointer undecodable: {exc}") from None
    if type(obj) is not tuple or not obj or type(obj[0]) is not int:
        raise RedisBackendError("malformed", "snapshot pointer is not a versioned array")
    if obj[0] != REDIS_SNAPSHOT_VERSION:
        raise RedisBackendError("version", f"snapshot format version {obj[0]} is not "
                                           f"supported (this build reads "
                                           f"{REDIS_SNAPSHOT_VERSION}); refusing to guess")
    if (len(obj) != 7 or type(obj[1]) is not int or type(obj[2]) is not str
            or type(obj[3]) is not int or type(obj[4]) is not int):
        raise RedisBackendError("malformed", "snapshot pointer has wrong field types")
    return obj[1], obj[2], obj[3], obj[4]


def encode_chunk(records: Sequence[tuple]) -> bytes:
    payload = msgpack.packb(list(records), use_bin_type=True)
    return FRAME.pack(len(payload), crc32(payload)) + payload


def decode_chunk(data: bytes, where: str) -> tuple:
    """Verified contact tuples of one snapshot chunk, or raise RedisBackendError."""
    if len(data) < FRAME.size:
        raise RedisBackendError("truncated", f"{where}: chunk of {len(data)} bytes")
    length, stored = FRAME.unpack_from(data)
    if length > MAX_FRAME or len(data) != FRAME.size + length:
        raise RedisBackendError("length", f"{where}: chunk length {length} does not match")
    payload = data[FRAME.size:]
    if crc32(payload) != stored:
        raise RedisBackendError("crc", f"{where}: chunk checksum mismatch")
    try:
        records = msgpack.unpackb(payload, use_list=False, raw=False)
        if type(records) is not tuple:
            raise WireError("bad_change", "chunk is no array")
        for r in records:
            if check_change(r) != RECORD_LEN:
                raise WireError("bad_change", "not a contact record")
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise RedisBackendError("malformed", f"{where}: {exc}") from None
    return records


def decode_entry(fields: dict) -> tuple:
    """The changes of one stream entry (a tuple of change tuples, not yet shape-checked)."""
    data = fields.get(b"c")
    if data is None:
        raise RedisBackendError("malformed", "stream entry without a 'c' field")
    try:
        changes = msgpack.unpackb(data, use_list=False, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise RedisBackendError("malformed", f"stream entry undecodable: {exc}") from None
    if type(changes) is not tuple:
        raise RedisBackendError("malformed", "stream entry is no array of changes")
    return changes



# ---------------------------------------------------------------------- the backend
class RedisBackend(BackgroundWriter):
    """Publishes winning changes to Redis, writes snapshots, restores; degrades, never raises.

    Wiring: call :meth:`publish` with every change that won in the store (the same tuples the
    local change log gets), ``await start()`` for the periodic flush/reconnect task, and
    :meth:`write_snapshot` periodically and whenever :attr:`snapshot_wanted` is set.
    """

    task_name = "redis-backend"

    def __init__(self, settings: RedisSettings | str, cluster_name: str, node_id: int,
                 stream_maxlen: int = 1_000_000, *, entry_changes: int = 128,
                 pipeline_entries: int = 64, backlog_limit: int = 1_000_000,
                 flush_interval_s: float = 0.05, retry_interval_s: float = 0.5,
                 client: aioredis.Redis | None = None) -> None:
        if not cluster_name or any(c in cluster_name for c in "{}"):
            raise RedisBackendError("config", "cluster_name must be non-empty, without braces")
        if stream_maxlen < entry_changes or entry_changes < 1 or backlog_limit < 1:
            raise RedisBackendError("config", "stream_maxlen >= entry_changes >= 1 and "
                                              "backlog_limit >= 1 are required")
        if isinstance(settings, str):
            settings = RedisSettings(url=settings)
        self.settings = settings
        self.client = client if client is not None else connect_redis(settings)
        self.node_id = node_id
        self.prefix = f"sc:{{{cluster_name}}}"
        self.stream_key = f"{self.prefix}:stream"
        self.entry_changes = entry_changes
        self.stream_maxlen_entries = max(1, stream_maxlen // entry_changes)
        self.pipeline_entries = pipeline_entries
        self.backlog_limit = backlog_limit
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.stats = RedisBackendStats()
        self.degraded = False
        self.snapshot_wanted = False
        self.last_id = ""  # stream id of the last entry we wrote
        self._backlog: list[tuple] = []
        self._enqueued = 0  # changes accepted into the backlog since start (ever)
        self._flushed = 0  # of those, written to Redis
        self._lock = asyncio.Lock()
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._switch = self.client.register_script(_SWITCH_LUA)

    # ------------------------------------------------------------------ hot path
    def publish(self, changes: Sequence[tuple]) -> None:
        """Queue winning changes for the stream (synchronous, never raises)."""
        room = self.backlog_limit - len(self._backlog)
        if len(changes) > room:
            lost = len(changes) - max(room, 0)
            self.stats.lost_changes += lost
            if not self.snapshot_wanted:
                log.error("redis backlog full (%d changes): %d changes not queued, a snapshot "
                          "is needed to cover them", self.backlog_limit, lost)
            self.snapshot_wanted = True
            changes = changes[:max(room, 0)]
        self._backlog.extend(changes)
        self._enqueued += len(changes)
        if len(self._backlog) >= self.entry_changes * 8:
            self._nudge()

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def status(self) -> dict[str, Any]:
        return {"degraded": self.degraded, "backlog": len(self._backlog),
                "snapshot_wanted": self.snapshot_wanted, "last_id": self.last_id,
                **self.stats.as_dict()}

    # ------------------------------------------------------------------ flushing
    async def flush(self, limit: int | None = None) -> bool:
        """Write the backlog (or its first *limit* changes) to the stream. True when that
        much is in Redis; False (degraded, error counted) otherwise."""
        async with self._lock:
            return await self._flush_locked(limit)

    async def _flush_locked(self, limit: int | None = None) -> bool:
        todo = len(self._backlog) if limit is None else min(limit, len(self._backlog))
        step = self.entry_changes
        per_round = step * self.pipeline_entries
        while todo > 0:
            n = min(todo, per_round)
            batch = self._backlog[:n]
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, n, step):
                part = batch[i:i + step]
                pipe.xadd(self.stream_key, {"node": self.node_id, "n": len(part),
                                            "c": self._pack(part)},
                          maxlen=self.stream_maxlen_entries, approximate=True)
            try:
                ids = await pipe.execute(raise_on_error=True)
            except (*_TRANSIENT, rexc.ResponseError) as exc:
                self._failed(exc, self.stream_key)
                return False
            del self._backlog[:n]
            self._flushed += n
            self.stats.changes_published += n
            self.stats.entries_written += len(ids)
            last = ids[-1]
            self.last_id = last.decode() if isinstance(last, bytes) else str(last)
            todo -= n
        self._recovered()
        return True

    def _failed(self, exc: BaseException, key: str = "") -> None:
        self.stats.errors += 1
        self.stats.last_error = describe_error(exc, key)
        if not self.degraded:
            self.degraded = True
            self.stats.degraded_since_ms = now_ms()
            log.error("redis backend degraded: %s", self.stats.last_error)

    def _recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            self.stats.degraded_since_ms = 0
            self.stats.catch_ups += 1
            log.warning("redis backend caught up")

    async def catch_up(self, records: Callable[[], list[tuple]] | None = None) -> bool:
        """Replay the backlog after an outage; if changes were lost beyond the backlog bound
        and *records* (e.g. ``store.records``) is given, also write a covering snapshot.
        True when Redis is fully up to date."""
        try:
            await self.client.ping()
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            self._failed(exc)
            return False
        if not await self.flush():
            return False
        if self.snapshot_wanted and records is not None:
            return (await self.write_snapshot(records())).ok
        return not self.snapshot_wanted

    # ------------------------------------------------------------------ lifecycle
    async def _run(self, records: Callable[[], list[tuple]] | None) -> None:
        while True:
            await self._sleep(self.retry_interval_s if self.degraded else self.flush_interval_s)
            if self.degraded or self.snapshot_wanted:
                await self.catch_up(records)
            elif self._backlog:
                await self.flush()

    # ------------------------------------------------------------------ snapshots
    async def write_snapshot(self, records: list[tuple]) -> RedisSnapshotInfo:
        """Write *records* (a copy of the store taken by the caller just now) as a new
        generation and switch the pointer atomically. Changes queued before this call are
        flushed first, so the cut (last stream id included) is exact. Never raises."""
        started = time.monotonic()
        cut_at = self._enqueued  # every change queued so far is covered by *records*
        lost_at = self.stats.lost_changes  # and so is every change lost so far
        async with self._lock:
            if not await self._flush_locked(cut_at - self._flushed):
                return RedisSnapshotInfo(False, error=self.stats.last_error)
            cut_id = self.last_id
            key = ""
            try:
                if not cut_id:
                    key = self.stream_key
                    last = await self.client.xrevrange(self.stream_key, count=1)
                    cut_id = last[0][0].decode() if last else "0-0"
                key = f"{self.prefix}:snap:gen"
                gen = int(await self.client.incr(key))
                key = f"{self.prefix}:snap:{gen}"
                chunks = 0
                for i in range(0, max(len(records), 1), CHUNK_RECORDS * 8):
                    pipe = self.client.pipeline(transaction=False)
                    for j in range(i, min(i + CHUNK_RECORDS * 8, len(records)), CHUNK_RECORDS):
                        pipe.hset(key, str(chunks), encode_chunk(records[j:j + CHUNK_RECORDS]))
                        chunks += 1
                    pipe.expire(key, IN_PROGRESS_TTL_S)
                    await pipe.execute(raise_on_error=True)
                    await asyncio.sleep(0)
                pointer = encode_pointer(gen, cut_id, len(records), chunks, now_ms(),
                                         self.node_id)
                key = f"{self.prefix}:snap:current"
                await self._switch(keys=[key, f"{self.prefix}:snap:prev",
                                         f"{self.prefix}:snap:{gen}"],
                                   args=[pointer, str(gen), f"{self.prefix}:snap:"])
            except (*_TRANSIENT, rexc.ResponseError) as exc:
                self._failed(exc, key)
                return RedisSnapshotInfo(False, error=self.stats.last_error)
        if self.stats.lost_changes == lost_at:
            self.snapshot_wanted = False
        self.stats.snapshots += 1
        return RedisSnapshotInfo(True, gen, len(records), cut_id, time.monotonic() - started)

    # ------------------------------------------------------------------ restore
    async def restore(self, store: ContactStore, page: int = 512) -> RedisRestoreReport:
        """Latest snapshot generation, then stream entries after its cut, into *store*
        (directly, so nothing is re-published). Expired contacts are not loaded. Problems
        are listed in the report; never raises."""
        started = time.monotonic()
        report = RedisRestoreReport()
        now = store.clock()
        cut_id = "0-0"
        key = f"{self.prefix}:snap:current"
        try:
            raw = await self.client.get(key)
            if raw is not None:
                snap = await self._read_snapshot(raw, report)
                if snap is not None:
                    cut_id, records = snap
                    for r in records:
                        exp = r[5]
                        if exp and exp <= now:
                            report.expired_dropped += 1
                            continue
                        report.puts_applied += store.put(r)
            key = self.stream_key
            await self._check_gap(cut_id, report)
            start = f"({cut_id}"
            while True:
                entries = await self.client.xrange(self.stream_key, min=start, count=page)
                for _entry_id, fields in entries:
                    self._apply_entry(store, fields, report, now)
                if len(entries) < page:
                    break
                start = f"({entries[-1][0].decode()}"
                await asyncio.sleep(0)
        except (*_TRANSIENT, rexc.ResponseError) as exc:
            report.errors.append(describe_error(exc, key))
            self._failed(exc, key)
        except RedisBackendError as exc:
            report.errors.append(str(exc))
        report.contacts = len(store)
        report.seconds = time.monotonic() - started
        return report

    async def _read_snapshot(self, raw: bytes,
                             report: RedisRestoreReport) -> tuple[str, list[tuple]] | None:
        """Decode and verify a whole generation before anything is applied."""
        try:
            gen, cut_id, count, chunks = decode_pointer(raw)
        except RedisBackendError as exc:
            report.errors.append(f"snapshot pointer: {exc}")
            return None
        key = f"{self.prefix}:snap:{gen}"
        fields = [str(i) for i in range(chunks)]
        values = await self.client.hmget(key, fields) if fields else []
        records: list[tuple] = []
        try:
            for i, v in enumerate(values):
                if v is None:
                    raise RedisBackendError("missing", f"{key}: chunk {i} of {chunks} missing")
                records.extend(decode_chunk(v, f"{key} chunk {i}"))
            if len(records) != count:
                raise RedisBackendError("count", f"{key}: pointer says {count} records, "
                                                 f"chunks hold {len(records)}")
        except RedisBackendError as exc:
            report.errors.append(f"snapshot generation {gen} skipped: {exc}")
            return None
        report.generation = gen
        report.snapshot_records = count
        return cut_id, records

    async def _check_gap(self, cut_id: str, report: RedisRestoreReport) -> None:
        """Trimming removes the oldest entries first, so while the cut entry itself is still
        in the stream nothing after it is gone; once it was trimmed, changes after the cut may
        be missing (conservative: with several writers the exact count is unknowable)."""
        if not await self.client.exists(self.stream_key):
            return
        info = await self.client.xinfo_stream(self.stream_key)
        if cut_id == "0-0":  # the stream was empty at the cut: was anything trimmed since?
            added = info.get("entries-added")
            trimmed = added is not None and int(added) > int(info.get("length", 0))
        else:
            trimmed = not await self.client.xrange(self.stream_key, min=cut_id, max=cut_id)
        if trimmed:
            first = info.get("first-entry")
            first_id = first[0].decode() if first else "?"
            report.gap = (f"stream trimmed past the snapshot cut {cut_id} (first entry now "
                          f"{first_id}): changes in between may be lost (snapshot more often "
                          f"than every stream_maxlen changes)")

    @staticmethod
    def _apply_entry(store: ContactStore, fields: dict, report: RedisRestoreReport,
                     now: float) -> None:
        report.stream_entries += 1
        try:
            changes = decode_entry(fields)
        except RedisBackendError:
            report.bad_records += 1
            return
        for c in changes:
            report.stream_changes += 1
            try:
                n = check_change(c)
            except WireError:
                report.bad_records += 1
                continue
            if n == RECORD_LEN:
                exp = c[5]
                if exp and exp <= now:
                    report.expired_dropped += 1
                report.puts_applied += store.put(c)
            elif n == DELETE_LEN:
                report.deletes_applied += store.delete(*c)
            else:
                report.bad_records += 1


# ---------------------------------------------------------------------- measurement
async def measure_redis_rate(n: int = 200_000, url: str = "redis://127.0.0.1:6379/0",
                             cluster_name: str = "bench") -> float:
    """Changes/s published and flushed (pipelined) into a running Redis at *url*."""
    from .durability import synthetic_records

    recs = synthetic_records(min(n, 20_000))
    m = len(recs)
    backend = RedisBackend(url, cluster_name, node_id=1, stream_maxlen=max(n, 1000),
                           backlog_limit=n + 1)
    try:
        await backend.client.delete(backend.stream_key)
        started = time.perf_counter()
        done = 0
        while done < n:
            k = min(8192, n - done)
            backend.publish([recs[(done + i) % m] for i in range(k)])
            if not await backend.flush():
                raise RedisBackendError("io", backend.stats.last_error)
            done += k
        rate = n / (time.perf_counter() - started)
        await backend.client.delete(backend.stream_key)
        return rate
    finally:
        await backend.aclose()


__all__ = [
    "REDIS_SNAPSHOT_VERSION",
    "RedisBackend",
    "RedisBackendError",
    "RedisBackendStats",
    "RedisRestoreReport",
    "RedisSettings",
    "RedisSnapshotInfo",
    "connect_redis",
    "describe_error",
    "measure_redis_rate",
]
