"""Contact records, binding ids, handles and the conflict rule.

A contact is stored as a plain ``tuple`` whose positions are the constants below. This is
deliberate: the same tuple is what msgpack decodes from the wire (``use_list=False``), so a
replicated contact goes from socket to store with no per-field conversion, and plain tuples
holding only strings and ints are untracked by CPython's cyclic GC, which keeps collection
pauses flat at a million contacts. Code off the hot path uses :func:`to_dict` for names.

Binding (DESIGN §4): ``(aor, instance, reg_id)`` when the phone uses RFC 5626 outbound, else
``(aor, contact URI)``. The store indexes by AOR and then by the *binding id* (``bid``): the
contact URI itself, or ``instance \x1f reg_id`` for outbound, so the plain case needs no extra
string per contact.

Handles: every binding gets a 64-bit handle from the node that stored the winning version. The
top 8 bits are that node's id, the next 32 its incarnation (start time, never reused), the low 24
a counter, so handles are unique across nodes and restarts. Refreshes on the wire name the
binding by handle (a few bytes) instead of by AOR and URI (tens of bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# --- record layout (positions in the contact tuple; also the wire layout of a PUT) -------------
AOR = 0  # str: address of record
URI = 1  # str: contact URI
RECEIVED = 2  # str | None: NAT source address as SIP URI, e.g. "sip:198.51.100.7:40000"
PATH = 3  # str | None: Path header value(s)
SOCKET = 4  # str | None: proxy's local socket "udp:203.0.113.10:5060"
EXPIRES = 5  # int: absolute UNIX seconds; 0 = permanent
Q = 6  # int: q * 1000; -1 = not given
CALLID = 7  # str
CSEQ = 8  # int
USER_AGENT = 9  # str | None
FLAGS = 10  # int: sidecar flags (FLAG_NAT ...)
CFLAGS = 11  # int: the proxy's own branch/contact flag bits, carried verbatim
METHODS = 12  # int | None: allowed-methods bitmask as the proxy reports it
INSTANCE = 13  # str | None: +sip.instance
REG_ID = 14  # int: reg-id, 0 = none
ATTR = 15  # str | None: opaque per-contact attributes (OpenSIPS attr_avp)
LAST_MODIFIED = 16  # int: milliseconds since the UNIX epoch, stamped by the origin
HANDLE = 17  # int: 64-bit handle, origin node id in the top 8 bits
RECORD_LEN = 18

# Wire shapes of the other change kinds (told apart from a PUT by their length).
REFRESH_LEN = 4  # (handle, expires, cseq, lm_delta_ms)
DELETE_LEN = 6  # (aor, bid, callid, cseq, last_modified, handle)

FLAG_NAT = 1  # contact is behind NAT: the active node keeps its pinhole open

KEY_SEP = "\x1f"
FIELD_NAMES = (
    "aor", "uri", "received", "path", "socket", "expires", "q", "callid", "cseq",
    "user_agent", "flags", "cflags", "methods", "instance", "reg_id", "attr",
    "last_modified", "handle",
)

_NODE_SHIFT = 56
_INCARNATION_SHIFT = 24
_COUNTER_MASK = (1 << _INCARNATION_SHIFT) - 1
MAX_NODE_ID = 255


class ModelError(ValueError):
    """A change that cannot be represented (bad key parts, wrong types)."""


def binding_id(uri: str, instance: str | None, reg_id: int) -> str:
    """Second half of the binding key (the first is the AOR). An empty instance counts as
    none, as in :func:`make_record`; stored records use :func:`rec_bid`."""
    if instance:
        return f"{instance}{KEY_SEP}{reg_id}"
    return uri


def rec_bid(rec: tuple) -> str:
    instance = rec[INSTANCE]
    if instance is None:
        return rec[URI]
    return f"{instance}{KEY_SEP}{rec[REG_ID]}"


def handle_origin(handle: int) -> int:
    """Node id that created the binding's handle (the change's origin for tie-breaking)."""
    return handle >> _NODE_SHIFT


def handle_incarnation(handle: int) -> int:
    """Incarnation (start second) of the node when it created the handle."""
    return (handle >> _INCARNATION_SHIFT) & 0xFFFFFFFF


class HandleAllocator:
    """Hands out 64-bit binding handles that never repeat for this node.

    The incarnation is the start time in seconds and moves forward by one whenever the 24-bit
    counter wraps, so a restarted node cannot reissue a handle a peer still remembers.
    """

    def __init__(self, node_id: int, incarnation: int | None = None,
                 renew: Callable[[int], int] | None = None) -> None:
        if not 1 <= node_id <= MAX_NODE_ID:
            raise ModelError(f"node id must be 1..{MAX_NODE_ID}, got {node_id}")
        self.node_id = node_id
        self.incarnation = int(time.time()) if incarnation is None else incarnation
        self._prefix = (node_id << _NODE_SHIFT) | (self.incarnation << _INCARNATION_SHIFT)
        self._counter = 0
        # Called on counter wrap with the lowest acceptable next incarnation; returns the one to
        # use after recording it durably, so a restart can never reissue these handles.
        self._renew = renew

    def next(self) -> int:
        self._counter += 1
        if self._counter > _COUNTER_MASK:
            nxt = self.incarnation + 1
            self.incarnation = self._renew(nxt) if self._renew is not None else nxt
            self._prefix = (self.node_id << _NODE_SHIFT) | (self.incarnation << _INCARNATION_SHIFT)
            self._counter = 1
        return self._prefix | self._counter


def make_record(
    *,
    aor: str,
    uri: str,
    callid: str,
    cseq: int,
    expires: int,
    handle: int,
    last_modified: int,
    received: str | None = None,
    path: str | None = None,
    socket: str | None = None,
    q: int = -1,
    user_agent: str | None = None,
    flags: int = 0,
    cflags: int = 0,
    methods: int | None = None,
    instance: str | None = None,
    reg_id: int = 0,
    attr: str | None = None,
) -> tuple:
    """Build a validated contact tuple (sources and admin use this; the wire path does not)."""
    if not aor or not uri:
        raise ModelError("empty AOR or contact URI")
    if not callid:
        raise ModelError("empty Call-ID")
    rec = (
        str(aor), str(uri), received or None, path or None, socket or None, int(expires), int(q),
        str(callid), int(cseq), user_agent or None, int(flags), int(cflags),
        None if methods is None else int(methods), instance or None, int(reg_id), attr or None,
        int(last_modified), int(handle),
    )
    if rec[CSEQ] < 0 or rec[EXPIRES] < 0:
        raise ModelError("negative cseq or expires")
    return rec


def wins(new_callid: str, new_cseq: int, new_lm: int, new_handle: int,
         old_callid: str, old_cseq: int, old_lm: int, old_handle: int) -> bool:
    """True when version *new* supersedes version *old* of the same binding.

    RFC 3261 §10.3: with the same Call-ID, a lower or equal CSeq is stale. Otherwise (or on an
    equal CSeq, which only a replay or a proxy-internal rewrite produces) the later
    ``last_modified`` wins, ties broken by origin node id and then by Call-ID so that every
    replica picks the same survivor whatever order the versions arrive in.
    """
    if new_callid == old_callid and new_cseq != old_cseq:
        return new_cseq > old_cseq
    if new_lm != old_lm:
        return new_lm > old_lm
    new_origin = new_handle >> _NODE_SHIFT
    old_origin = old_handle >> _NODE_SHIFT
    if new_origin != old_origin:
        return new_origin > old_origin
    if new_callid != old_callid:
        return new_callid > old_callid
    return new_cseq > old_cseq


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def to_dict(rec: tuple) -> dict[str, Any]:
    """Named view of a contact for JSON output (admin commands, golden vectors)."""
    out: dict[str, Any] = dict(zip(FIELD_NAMES, rec, strict=False))
    out["origin"] = handle_origin(rec[HANDLE])
    return out
