"""A role lease in Redis: one active node at a time, with a fencing epoch (DESIGN §6, §8).

Why a lease next to the peer heartbeat: two nodes that cannot see each other (a partition)
could both promote; a shared key that only one of them can hold breaks the tie. Why an epoch:
a holder that stalled past its TTL (GC pause, frozen VM) may still believe it is active; every
successful acquisition takes a new, strictly higher number from ``INCR <key>:epoch``, so the
stale holder's writes and heartbeats carry a lower epoch and are refused, and its renewal fails
because the value is no longer its own.

Value of ``<key>``: ``"<node_id>:<epoch>"``. All state changes are single Lua scripts, so
"check it is ours, then act" is atomic: acquire (``SET NX PX`` + ``INCR`` only on success),
renew (compare-and-``PEXPIRE``), release (compare-and-``DEL``). For Redis Cluster give the key a
hash tag (``{sc}:lease``) so ``<key>:epoch`` lands in the same slot.

:class:`LeaseCheckpoint` turns the lease into an arbiter checkpoint: ok (the active is there)
while another node holds a live lease, "gone" when the lease is free, expired or ours.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis import exceptions as rexc

from .checkpoints import Checkpoint, CheckpointConfigError, ProbeResult

# KEYS: lease, epoch. ARGV: node id, ttl ms, lowest acceptable epoch. Returns the epoch held
# afterwards, or nil. A free key: INCR the epoch (raised to ARGV[3] when the counter is behind,
# e.g. a node whose arbiter epochs predate the lease) and SET value NX PX. Already ours: extend
# and keep the epoch.
_ACQUIRE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local node, epoch = string.match(cur, '^(.*):(%d+)$')
  if node == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(epoch)
  end
  return false
end
local e = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3]) or 0
if floor > e then
  redis.call('SET', KEYS[2], floor)
  e = floor
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. e, 'NX', 'PX', ARGV[2])
return e
"""

# KEYS: lease. ARGV: our value, ttl ms. 1 when still ours and extended, else 0.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: our value. 1 when it was ours and is deleted, else 0.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, OSError)


class LeaseError(ValueError):
    """Redis could not answer the lease question: unreachable, an error reply, a key of the
    wrong type or a value that is not ``node:epoch``. ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(slots=True, frozen=True)
class LeaseHolder:
    node: str
    epoch: int
    ttl_ms: int  # remaining life of the lease


def parse_lease_value(value: bytes | str, key: str = "lease") -> tuple[str, int]:
    """``b"node:epoch"`` -> (node, epoch); raise LeaseError for anything else (sans-I/O)."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        raise LeaseError("malformed", f"{key}: value is not text") from None
    node, sep, epoch = text.rpartition(":")
    if not sep or not node or not epoch.isdigit():
        raise LeaseError("malformed", f"{key}: value {text[:60]!r} is not node:epoch")
    return node, int(epoch)


class RedisLease:
    """This node's view of one lease key. Methods raise :class:`LeaseError` on Redis
    trouble; the caller (role service, checkpoint) decides what an unknown answer means."""

    def __init__(self, client: aioredis.Redis, key: str, node_id: int | str,
                 ttl_ms: int = 3000) -> None:
        if ttl_ms < 10:
            raise LeaseError("config", "ttl_ms must be >= 10")
        if not key or ":" in str(node_id) or not str(node_id):
            raise LeaseError("config", "a lease needs a key and a node id without ':'")
        self.client = client
        self.key = key
        self.epoch_key = f"{key}:epoch"
        self.node = str(node_id)
        self.ttl_ms = int(ttl_ms)
        self.epoch: int | None = None  # epoch of our current lease, None when not held
        self.highest_seen = 0  # highest epoch observed (ours or another holder's)
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    @property
    def value(self) -> str:
        return f"{self.node}:{self.epoch}"

    async def _call(self, what: str, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except rexc.ResponseError as exc:
            kind = "wrongtype" if "WRONGTYPE" in str(exc) else "error_reply"
            raise LeaseError(kind, f"{what} {self.key}: {exc}") from None
        except _TRANSIENT as exc:
            raise LeaseError("unreachable", f"{what} {self.key}: {exc}") from None

    async def acquire(self, min_epoch: int = 0) -> int | None:
        """Take the lease if free (or extend it if already ours). Returns our epoch, or None
        when another node holds it. A fresh lease gets an epoch of at least ``min_epoch`` (the
        arbiter's promotion epoch), so the Redis counter and the arbiter never disagree about
        which epoch is the newest: the role service then adopts the lease epoch as its own."""
        got = await self._call("acquire", self._acquire(keys=[self.key, self.epoch_key],
                                                        args=[self.node, self.ttl_ms,
                                                              int(min_epoch)]))
        if got is None:
            self.epoch = None
            await self.holder()  # remember the other holder's epoch
            return None
        self.epoch = int(got)
        self.highest_seen = max(self.highest_seen, self.epoch)
        return self.epoch

    async def renew(self) -> bool:
        """Extend our lease; False (and no longer held) when it expired or someone else
        took it. A stale holder then finds the newer epoch in :attr:`highest_seen`."""
        if self.epoch is None:
            return False
        ok = await self._call("renew", self._renew(keys=[self.key],
                                                    args=[self.value, self.ttl_ms]))
        if int(ok) == 1:
            return True
        self.epoch = None
        await self.holder()
        return False

    async def release(self) -> bool:
        """Give the lease up if it is still ours (demotion, shutdown)."""
        if self.epoch is None:
            return False
        n = await self._call("release", self._release(keys=[self.key], args=[self.value]))
        self.epoch = None
        return int(n) == 1

    async def holder(self) -> LeaseHolder | None:
        """Who holds the lease now, or None when it is free (expired keys are gone)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.key)
        pipe.pttl(self.key)
        value, ttl = await self._call("read", pipe.execute())
        if value is None:
            return None
        node, epoch = parse_lease_value(value, self.key)
        self.highest_seen = max(self.highest_seen, epoch)
        return LeaseHolder(node, epoch, int(ttl))

    async def current_epoch(self) -> int:
        """The last epoch handed out (0 before the first acquisition)."""
        raw = await self._call("read", self.client.get(self.epoch_key))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            raise LeaseError("malformed", f"{self.epoch_key}: {raw[:60]!r} is no integer") from None


class LeaseCheckpoint(Checkpoint):
    """Arbiter checkpoint: the active peer is "there" while another node holds a live lease.

    Redis unreachable (or answering nonsense) reports "gone" with the reason by default: the
    arbiter promotes only when *every* checkpoint agrees, so the peer heartbeat still has to
    say gone as well; set ``unreachable_is_gone=False`` to make a Redis outage block
    promotion instead.
    """

    kind = "redis_lease"

    def __init__(self, name: str, lease: RedisLease, *, interval: float = 1.0,
                 timeout: float = 1.0, unreachable_is_gone: bool = True) -> None:
        super().__init__(name, interval=interval, timeout=timeout)
        if not isinstance(lease, RedisLease):
            raise CheckpointConfigError(f"{name}: needs a RedisLease")
        self.lease = lease
        self.unreachable_is_gone = unreachable_is_gone

    async def check(self) -> ProbeResult:
        # A time-out is "Redis unknown" too, so it follows the same policy as an error.
        try:
            return await asyncio.wait_for(self.probe(), self.timeout)
        except TimeoutError:
            return ProbeResult(not self.unreachable_is_gone,
                               f"lease unknown: unreachable, no answer within {self.timeout:g}s")

    async def probe(self) -> ProbeResult:
        try:
            h = await self.lease.holder()
        except LeaseError as exc:
            return ProbeResult(not self.unreachable_is_gone, f"lease unknown: {exc}")
        if h is None:
            return ProbeResult(False, f"lease {self.lease.key} is free (active gone)")
        if h.node == self.lease.node:
            return ProbeResult(False, f"lease held by this node (epoch {h.epoch})")
        return ProbeResult(True, f"lease held by node {h.node} epoch {h.epoch}, "
                                 f"{h.ttl_ms} ms left")


__all__ = ["LeaseCheckpoint", "LeaseError", "LeaseHolder", "RedisLease", "parse_lease_value"]
