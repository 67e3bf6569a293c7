"""The shared contact directory's data layout and conflict script (sans-I/O).

Keys spread over the Redis Cluster's slots, one hash per AOR (the braces are a hash tag
around the AOR, so each AOR is one key in one slot and a single-key Lua script may change it
atomically, which is what makes it cluster-safe)::

    sc:<cluster_name>:aor:{<aor>}    hash
        v:<bid>   version line: kind, last_modified, cseq, origin, until_ms, callid (joined
                  by newlines; callid last, so it may contain anything); kind "c" = live
                  contact, "d" = tombstone (deleted, or expired and kept for the tombstone
                  TTL so that a late, older write cannot bring the contact back)
        c:<bid>   msgpack of the 18-item contact tuple (sidecar.model), only while kind is "c"

The key's expiry follows its fields: ``PEXPIREAT`` the latest contact expiry / tombstone
deadline, or none while a permanent contact (``expires`` 0) is in it.

Conflict rule: :data:`DIRECTORY_LUA` reproduces :func:`sidecar.model.wins` exactly on the
version line's fields. Numbers travel as canonical decimal strings and are compared by
length then bytes, Call-IDs byte by byte (UTF-8 byte order is code-point order, which is how
Python compares ``str``), so neither Lua's double rounding nor locale collation (Redis calls
``setlocale``) can make Redis pick another survivor than the nodes do. A write or delete that
loses is a no-op; deletes leave a tombstone. Every call also prunes the AOR's expired
entries. Before anything is written the script checks that the key is a hash made only of
``v:``/``c:`` fields with parsable versions; otherwise it answers an error reply and changes
nothing, so someone else's data is never overwritten.

This module only builds arguments and decodes values; :mod:`.redis_directory` does the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack

from ..model import CALLID, CSEQ, DELETE_LEN, EXPIRES, HANDLE, LAST_MODIFIED, RECORD_LEN, rec_bid
from ..replication.wire import WireError, check_change
from .change_log import PersistError

MAX_UNTIL_MS = 1 << 53  # expiry clamp: PEXPIREAT needs a sane integer (year ~287000)
ARGS_PER_OP = 8

# KEYS[1]: the AOR hash. ARGV: now_ms, tombstone_until_ms, tombstone_ttl_ms, then groups of
# ARGS_PER_OP: kind ("p" put / "d" delete), bid, last_modified, cseq, origin, callid,
# until_ms (contact expiry in ms, "0" = permanent), payload (msgpack contact; "" for deletes).
# Returns one integer per op: 1 applied, 0 stale (an equal or newer version is stored).
DIRECTORY_LUA = r"""
local key = KEYS[1]
local now, tomb_until, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

local function bytecmp(a, b)
  if a == b then return 0 end
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  if #a < #b then return -1 end
  return 1
end

-- canonical decimal integers (no leading zeros, optional '-'): exact at any size
local function numcmp(a, b)
  if a == b then return 0 end
  local na, nb = string.byte(a, 1) == 45, string.byte(b, 1) == 45
  if na ~= nb then
    if na then return -1 end
    return 1
  end
  local r
  if #a ~= #b then
    if #a < #b then r = -1 else r = 1 end
  else
    r = bytecmp(a, b)
  end
  if na then r = -r end
  return r
end

-- sidecar.model.wins on (callid, cseq, last_modified, origin)
local function wins(ncall, ncseq, nlm, norig, o)
  local ocall, ocseq, olm, oorig = o[6], o[3], o[2], o[4]
  if ncall == ocall and ncseq ~= ocseq then return numcmp(ncseq, ocseq) > 0 end
  if nlm ~= olm then return numcmp(nlm, olm) > 0 end
  if norig ~= oorig then return numcmp(norig, oorig) > 0 end
  if ncall ~= ocall then return bytecmp(ncall, ocall) > 0 end
  return numcmp(ncseq, ocseq) > 0
end

local function parse(line)
  local parts, pos = {}, 1
  for i = 1, 5 do
    local s = string.find(line, '\n', pos, true)
    if not s then return nil end
    parts[i] = string.sub(line, pos, s - 1)
    pos = s + 1
  end
  parts[6] = string.sub(line, pos)
  if parts[1] ~= 'c' and parts[1] ~= 'd' then return nil end
  for i = 2, 5 do
    if not string.find(parts[i], '^%-?%d+$') then return nil end
  end
  return parts
end

local t = redis.call('TYPE', key)['ok']
if t ~= 'hash' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t ..
                           ', not a contact directory hash')
end

-- validate everything before the first write: a script error does not roll back
local metas = {}
if t == 'hash' then
  local flat = redis.call('HGETALL', key)
  local payloads = {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    local prefix, bid = string.sub(f, 1, 2), string.sub(f, 3)
    if prefix == 'v:' then
      local m = parse(flat[i + 1])
      if not m then
        return redis.error_reply('SCDIR malformed version field ' .. f .. ' in ' .. key)
      end
      metas[bid] = m
    elseif prefix == 'c:' then
      payloads[bid] = true
    else
      return redis.error_reply('SCDIR foreign field ' .. f .. ' in ' .. key ..
                               ', not a contact directory hash')
    end
  end
  for bid, _ in pairs(payloads) do
    if not metas[bid] or metas[bid][1] ~= 'c' then
      return redis.error_reply('SCDIR contact c:' .. bid .. ' without its version in ' .. key)
    end
  end
end

local out = {}
for i = 4, #ARGV, 8 do
  local kind, bid, lm, cseq = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local origin, callid, untl, payload = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local o = metas[bid]
  if o and not wins(callid, cseq, lm, origin, o) then
    out[#out + 1] = 0
  else
    local m
    if kind == 'p' and (untl == '0' or numcmp(untl, now) > 0) then
      m = {'c', lm, cseq, origin, untl, callid}
      redis.call('HSET', key, 'c:' .. bid, payload)
    else
      m = {'d', lm, cseq, origin, tomb_until, callid}
      if o and o[1] == 'c' then redis.call('HDEL', key, 'c:' .. bid) end
    end
    metas[bid] = m
    redis.call('HSET', key, 'v:' .. bid, table.concat(m, '\n'))
    out[#out + 1] = 1
  end
end

-- prune: expired contacts become tombstones for ttl, expired tombstones go
local latest, permanent = nil, false
local bids = {}
for bid, _ in pairs(metas) do bids[#bids + 1] = bid end
for _, bid in ipairs(bids) do
  local m = metas[bid]
  if m[1] == 'c' and m[5] ~= '0' and numcmp(m[5], now) <= 0 then
    redis.call('HDEL', key, 'c:' .. bid)
    m[1] = 'd'
    m[5] = string.format('%.0f', tonumber(m[5]) + ttl)
    redis.call('HSET', key, 'v:' .. bid, table.concat(m, '\n'))
  end
  if m[1] == 'd' and numcmp(m[5], now) <= 0 then
    redis.call('HDEL', key, 'v:' .. bid)
  elseif m[1] == 'c' and m[5] == '0' then
    permanent = true
  elseif latest == nil or numcmp(m[5], latest) > 0 then
    latest = m[5]
  end
end
if permanent then
  redis.call('PERSIST', key)
elseif latest then
  redis.call('PEXPIREAT', key, latest)
end
return out
"""


class RedisDirectoryError(PersistError):
    """The directory cannot answer or accept something: ``reason`` is "config",
    "unavailable" (cluster or a master away), "wrongtype" (the key holds foreign data),
    "error" (another error reply) or "encode" (a change that cannot be sent)."""


def directory_key(cluster_name: str, aor: str) -> str:
    """The hash holding one AOR's bindings; the hash tag spreads AORs over all slots."""
    return f"sc:{cluster_name}:aor:{{{aor}}}"


def encode_op(change: tuple) -> tuple[str, list[bytes]]:
    """(aor, the ARGS_PER_OP script arguments) of one put (contact tuple) or delete
    (``(aor, bid, callid, cseq, last_modified, handle)``); RedisDirectoryError("encode")
    for anything else or for text that is not valid Unicode."""
    try:
        if len(change) == RECORD_LEN:
            expires = change[EXPIRES]
            until = 0 if expires == 0 else min(expires * 1000, MAX_UNTIL_MS)
            args = [b"p", rec_bid(change).encode(), str(change[LAST_MODIFIED]).encode(),
                    str(change[CSEQ]).encode(), str(change[HANDLE] >> 56).encode(),
                    change[CALLID].encode(), str(until).encode(),
                    msgpack.packb(change, use_bin_type=True)]
            return change[0], args
        if len(change) == DELETE_LEN:
            aor, bid, callid, cseq, lm, handle = change
            return aor, [b"d", bid.encode(), str(lm).encode(), str(cseq).encode(),
                         str(handle >> 56).encode(), callid.encode(), b"0", b""]
    except (TypeError, ValueError, AttributeError, UnicodeError, OverflowError) as exc:
        raise RedisDirectoryError("encode", f"change cannot be encoded: {exc}") from None
    raise RedisDirectoryError("encode", f"a change of {len(change)} items is no put or delete")


def decode_contact(data: bytes, where: str) -> tuple:
    """A verified contact tuple from a ``c:`` field, or RedisDirectoryError("malformed")."""
    try:
        rec = msgpack.unpackb(data, use_list=False, raw=False)
        if check_change(rec) != RECORD_LEN:
            raise WireError("bad_change", "not a contact record")
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:
        raise RedisDirectoryError("malformed", f"{where}: {exc}") from None
    return rec


def coalesce(changes: Sequence[tuple]) -> dict[str, list[tuple]]:
    """Group changes by AOR, keeping only the last change per binding.

    Only this node's own winning changes reach the backlog, in the order they won, so the
    last one per binding supersedes the earlier ones: sending those would be wasted work.
    """
    by_aor: dict[str, dict[str, tuple]] = {}
    for c in changes:
        if len(c) == RECORD_LEN and type(c[0]) is str:
            aor, bid = c[0], rec_bid(c)
        elif len(c) == DELETE_LEN:
            aor, bid = c[0], c[1]
        else:
            aor, bid = "", repr(c)  # rejected by encode_op, with a counted error
        slot = by_aor.setdefault(aor, {})
        slot.pop(bid, None)
        slot[bid] = c
    return {aor: list(b.values()) for aor, b in by_aor.items()}


__all__ = [
    "ARGS_PER_OP",
    "DIRECTORY_LUA",
    "MAX_UNTIL_MS",
    "RedisDirectoryError",
    "coalesce",
    "decode_contact",
    "directory_key",
    "encode_op",
]
