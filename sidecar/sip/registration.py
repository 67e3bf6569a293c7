"""Pair captured REGISTER transactions and turn each 2xx into the AOR's new binding set.

Sans-I/O: the capture or HEP adapter parses packets with :mod:`sidecar.sip.parser` and feeds
each message here with its transport addresses and capture time; nothing here reads a clock or
a socket, so the tests drive time by hand.

Why pair at all: a REGISTER alone says what a phone *asked* for; only the registrar's final
response says what usrloc now holds. A REGISTER is matched with its final response by Call-ID,
CSeq number and top Via branch (the transaction key, RFC 3261 §17.2.3). 1xx responses are
ignored; a 3xx-6xx final (401/407 challenges included) frees the transaction and yields
nothing; a 2xx yields one :class:`RegistrationOutcome`.

Public API
----------
``RegistrationTracker(*, timeout=32.0, max_pending=100_000, default_expires=3600)``
    ``feed(msg, src, dst, now) -> list[RegistrationOutcome]`` with ``src``/``dst`` as
    ``(proto, ip, port)`` and ``now`` in UNIX seconds; ``expire(now)`` drops transactions older
    than ``timeout`` (Timer F) without feeding a message; ``pending`` is the number of open
    transactions; ``stats`` (:class:`TrackerStats`) counts what was dropped and why.
``RegistrationOutcome(aor, callid, cseq, time, received, socket, user_agent, path, bindings,
wildcard_removed, complete)``
    The bindings the registrar reported for ``aor`` after this REGISTER. When ``complete`` is
    True (the normal case) the list is authoritative: any binding of the AOR that it does not
    list is gone and **the consumer must delete it**; ``bindings == []`` means the AOR has no
    bindings left (``Contact: *`` with Expires 0, or the only contact removed).
    ``complete`` is False only when a registrar answered 2xx without any Contact header to a
    REGISTER that added bindings; then ``bindings`` holds just that REGISTER's contacts and the
    consumer must not delete others.
``Binding(uri, expires_abs, q, methods, instance, reg_id, own)``
    ``expires_abs`` is absolute UNIX seconds (2xx contact ``expires`` param, else the
    REGISTER's contact param, else the REGISTER's Expires header, else ``default_expires``);
    bindings that end up with 0 are left out. ``methods`` is the Kamailio/OpenSIPS method
    bitmask (from the contact's ``methods`` param, else the REGISTER's Allow header for own
    bindings) or None. ``own`` is True when this REGISTER carried the binding: only then do
    the outcome's ``callid``, ``cseq``, ``received``, ``socket``, ``path`` and ``user_agent``
    describe it. Bindings with ``own=False`` belong to the AOR's other devices; the registrar
    lists them in every 2xx, so the consumer should confirm they still exist and keep what it
    already knows about them (their own Call-ID, NAT address, ...).
``REPLAY_BRANCH_PREFIX``
    Top-Via branch prefix of the REGISTERs the sidecar itself replays into its proxy
    (:mod:`sidecar.proxy.register_replay`). The tracker ignores such requests and their
    replies (``stats.replayed_ignored``): they load a peer's contacts into the standby's proxy,
    and publishing them as this node's own would loop them back.
``binding_flags(outcome, binding) -> int``
    ``model.FLAG_NAT`` for an own binding of a NATed registration, else 0.
``methods_bitmask(text) -> int | None``
    Comma-separated method names to the proxies' bitmask (unknown names ignored).
``format_received(src) -> str`` and ``format_socket(addr) -> str``
    ``sip:IP:PORT[;transport=tcp]`` and ``proto:IP:PORT`` (IPv6 in brackets).

``received`` is the REGISTER's source as a SIP URI when it differs from the host:port of a
Contact in that REGISTER (the phone is behind NAT), else None. A REGISTER that reached the
proxy through another proxy (it carries Path) never sets it: its source is that proxy, and
reaching the phone is the edge's job.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

from sidecar.model import FLAG_NAT
from sidecar.sip.parser import ContactHeader, SipRequest, SipResponse

__all__ = [
    "DEFAULT_EXPIRES",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_TIMEOUT",
    "METHOD_BITS",
    "REPLAY_BRANCH_PREFIX",
    "Binding",
    "RegistrationOutcome",
    "RegistrationTracker",
    "TrackerStats",
    "binding_flags",
    "format_received",
    "format_socket",
    "methods_bitmask",
]

Address = tuple[str, str, int]  # (proto, ip, port), proto lower-case: udp, tcp, tls, ws, wss

DEFAULT_TIMEOUT = 32.0  # RFC 3261 Timer F = 64 * T1
DEFAULT_MAX_PENDING = 100_000
DEFAULT_EXPIRES = 3600
# Every replay REGISTER (and so its reply) has a top Via branch starting with this. The
# X-SC-Replay header says the same, but the parser does not keep unknown headers, and the
# branch is part of the transaction key anyway, so requests and replies are told apart alike.
REPLAY_BRANCH_PREFIX = "z9hG4bKscreplay-"

# Method bits as Kamailio and OpenSIPS store them in usrloc (both inherit SER's enum).
METHOD_BITS = {
    "INVITE": 1, "CANCEL": 2, "ACK": 4, "BYE": 8, "INFO": 16, "OPTIONS": 32, "UPDATE": 64,
    "REGISTER": 128, "MESSAGE": 256, "SUBSCRIBE": 512, "NOTIFY": 1024, "PRACK": 2048,
    "REFER": 4096, "PUBLISH": 8192,
}


@dataclass(slots=True, frozen=True)
class Binding:
    uri: str
    expires_abs: int
    q: int
    methods: int | None
    instance: str | None
    reg_id: int
    own: bool


@dataclass(slots=True)
class RegistrationOutcome:
    aor: str
    callid: str
    cseq: int
    time: float
    received: str | None
    socket: str
    user_agent: str | None
    path: str | None
    bindings: list[Binding]
    wildcard_removed: bool
    complete: bool = True
    # When the REGISTER was seen. A binding stored after it may be missing from this 2xx only
    # because a concurrent REGISTER of the same AOR was processed meanwhile (registrars run
    # several workers, and mirrored replies can arrive out of order).
    request_time: float | None = field(default=None, compare=False)


@dataclass(slots=True)
class TrackerStats:
    """Counters for metrics: why messages produced nothing."""

    outcomes: int = 0
    rejected: int = 0  # 3xx-6xx finals (challenges included)
    duplicates: int = 0  # the same REGISTER or final response seen again
    unmatched_responses: int = 0  # final response with no REGISTER on record
    dropped_timeout: int = 0  # REGISTERs never answered within the timeout
    dropped_overflow: int = 0  # REGISTERs evicted because max_pending was reached
    replayed_ignored: int = 0  # the sidecar's own replay REGISTERs and their replies


class RegistrationTracker:
    """Open REGISTER transactions, and recently finished ones to recognise repeats.

    Both tables are insertion-ordered dicts, so the oldest entry is always first: timeouts and
    the size cap cost O(1) per eviction and memory stays bounded by ``max_pending`` each.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = DEFAULT_MAX_PENDING,
        default_expires: int = DEFAULT_EXPIRES,
    ) -> None:
        if timeout <= 0 or max_pending < 1 or default_expires < 0:
            raise ValueError("timeout and max_pending must be positive, default_expires >= 0")
        self.timeout = timeout
        self.max_pending = max_pending
        self.default_expires = default_expires
        self.stats = TrackerStats()
        # transaction key -> (REGISTER, src, dst, time seen)
        self._pending: OrderedDict[tuple, tuple[SipRequest, Address, Address, float]] = (
            OrderedDict()
        )
        # transaction keys (3-tuples) and (Call-ID, CSeq) of emitted outcomes -> time finished
        self._finished: OrderedDict[tuple, float] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(
        self, msg: SipRequest | SipResponse, src: Address, dst: Address, now: float
    ) -> list[RegistrationOutcome]:
        """Account one captured message; return the outcomes it completes (zero or one)."""
        self.expire(now)
        if msg.cseq_method != "REGISTER":
            return []
        branch = msg.via_branch or ""
        if branch.startswith(REPLAY_BRANCH_PREFIX):
            self.stats.replayed_ignored += 1
            return []
        key = (msg.call_id, msg.cseq, branch)
        if isinstance(msg, SipRequest):
            if key in self._pending or key in self._finished:
                self.stats.duplicates += 1
                return []
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.stats.dropped_overflow += 1
            self._pending[key] = (msg, src, dst, now)
            return []
        if msg.status < 200:
            return []
        entry = self._pending.pop(key, None)
        if entry is None:
            if key in self._finished:
                self.stats.duplicates += 1
            else:
                self.stats.unmatched_responses += 1
            return []
        self._remember(key, now)
        if msg.status >= 300:
            self.stats.rejected += 1
            return []
        # A REGISTER forwarded to a separate registrar is seen on both legs with different
        # branches; one registration is one outcome.
        emitted = (msg.call_id, msg.cseq)
        if emitted in self._finished:
            self.stats.duplicates += 1
            return []
        self._remember(emitted, now)
        request, req_src, req_dst, req_time = entry
        self.stats.outcomes += 1
        outcome = self._outcome(request, req_src, req_dst, msg, now)
        outcome.request_time = req_time
        return [outcome]

    def expire(self, now: float) -> None:
        """Drop transactions and repeat-guards older than ``timeout`` seconds."""
        deadline = now - self.timeout
        pending = self._pending
        while pending:
            key = next(iter(pending))
            if pending[key][3] > deadline:
                break
            del pending[key]
            self.stats.dropped_timeout += 1
        finished = self._finished
        while finished:
            key = next(iter(finished))
            if finished[key] > deadline:
                break
            del finished[key]

    def _remember(self, key: tuple, now: float) -> None:
        if len(self._finished) >= 2 * self.max_pending:
            self._finished.popitem(last=False)
        self._finished[key] = now

    def _outcome(
        self, request: SipRequest, src: Address, dst: Address, response: SipResponse, now: float
    ) -> RegistrationOutcome:
        now_s = int(now)
        header_expires = request.expires_header
        fallback = self.default_expires if header_expires is None else header_expires
        own_by_instance = {(c.instance, c.reg_id): c for c in request.contacts if c.instance}
        own_by_uri = {c.uri: c for c in request.contacts}
        allow_mask = methods_bitmask(request.allow)

        listed = response.contacts
        complete = True
        if not listed and any(
            (c.expires if c.expires is not None else fallback) > 0 for c in request.contacts
        ):
            listed = request.contacts
            complete = False

        bindings: list[Binding] = []
        for contact in listed:
            own = _own_contact(contact, own_by_instance, own_by_uri)
            if contact.expires is not None:
                delta = contact.expires
            elif own is not None and own.expires is not None:
                delta = own.expires
            else:
                delta = fallback
            if delta <= 0:
                continue
            if own is None:
                q, instance, reg_id = contact.q, contact.instance, contact.reg_id
                methods = methods_bitmask(contact.methods)
            else:
                q = contact.q if contact.q != -1 else own.q
                instance = contact.instance or own.instance
                reg_id = contact.reg_id or own.reg_id
                text = contact.methods or own.methods
                methods = methods_bitmask(text) if text is not None else allow_mask
            bindings.append(
                Binding(contact.uri, now_s + delta, q, methods, instance, reg_id, own is not None)
            )

        path = request.path or response.path
        echoed = _echoed_received(listed, own_by_instance, own_by_uri)
        if echoed is not _NOT_ECHOED:
            received = echoed  # the registrar said what it stored: that is the truth
        else:
            received = None if path else _nat_received(request.contacts, src)
        return RegistrationOutcome(
            aor=request.aor,
            callid=request.call_id,
            cseq=request.cseq,
            time=now,
            received=received,
            socket=format_socket(dst),
            user_agent=request.user_agent,
            path=path,
            bindings=bindings,
            wildcard_removed=request.contact_wildcard,
            complete=complete,
        )


def _own_contact(
    contact: ContactHeader,
    by_instance: dict[tuple[str | None, int], ContactHeader],
    by_uri: dict[str, ContactHeader],
) -> ContactHeader | None:
    """The REGISTER's contact that this 2xx contact reports, if any (RFC 5626 key first)."""
    if contact.instance:
        own = by_instance.get((contact.instance, contact.reg_id))
        if own is not None:
            return own
    own = by_uri.get(contact.uri)
    if own is None and by_uri:
        wanted = contact.uri.lower()
        for uri, candidate in by_uri.items():
            if uri.lower() == wanted:
                return candidate
    return own


def binding_flags(outcome: RegistrationOutcome, binding: Binding) -> int:
    """Sidecar flags for a binding: FLAG_NAT when this NATed REGISTER carried it.

    For ``own=False`` bindings the outcome says nothing about their NAT state, so this returns
    0 and the consumer keeps the flags it already stores for them.
    """
    return FLAG_NAT if outcome.received is not None and binding.own else 0


def methods_bitmask(text: str | None) -> int | None:
    """``"INVITE, ACK,BYE"`` -> bitmask of :data:`METHOD_BITS`; None when there is no list."""
    if text is None:
        return None
    mask = 0
    for name in text.split(","):
        mask |= METHOD_BITS.get(name.strip(" \t").upper(), 0)
    return mask


def _bracketed(ip: str) -> str:
    return f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip


def format_received(src: Address) -> str:
    """``sip:IP:PORT`` with ``;transport=`` for anything but UDP (what usrloc stores)."""
    proto, ip, port = src
    proto = proto.lower()
    uri = f"sip:{_bracketed(ip)}:{port}"
    return uri if proto == "udp" else f"{uri};transport={proto}"


def format_socket(addr: Address) -> str:
    """``proto:IP:PORT`` as Kamailio and OpenSIPS name a listening socket."""
    proto, ip, port = addr
    return f"{proto.lower()}:{_bracketed(ip)}:{port}"


_NOT_ECHOED = object()


def _echoed_received(listed: list[ContactHeader], by_instance, by_uri) -> object:
    """What the registrar stored as ``received`` for this REGISTER's own contacts, when its 2xx
    says so: Kamailio and OpenSIPS append ``;received="sip:IP:PORT"`` to each contact they
    stored with a received address (registrar ``received_param``). When any listed contact
    carries the parameter the 2xx is authoritative (an own contact without it has none);
    when none does, returns _NOT_ECHOED and the caller falls back to comparing addresses.
    """
    if not any("received" in c.params for c in listed):
        return _NOT_ECHOED
    for c in listed:
        if _own_contact(c, by_instance, by_uri) is not None:
            value = c.params.get("received")
            if value:
                return value.strip('"') or None
    return None


def _nat_received(contacts: list[ContactHeader], src: Address) -> str | None:
    if not contacts:
        return None
    src_ip = _comparable_host(src[1])
    for contact in contacts:
        host, port = _contact_host_port(contact.uri)
        if port != src[2] or _comparable_host(host) != src_ip:
            return format_received(src)
    return None


# host text -> comparable form. Phones re-register from the same few addresses, and
# ipaddress.ip_address costs microseconds, so results are kept; the dict is emptied when it
# reaches the cap, which bounds memory whatever hosts a capture sees.
_COMPARABLE_CACHE: dict[str, object] = {}
_COMPARABLE_CACHE_MAX = 4096


def _comparable_host(host: str) -> object:
    """An IP address object when ``host`` is one (so IPv6 spellings compare equal)."""
    found = _COMPARABLE_CACHE.get(host)
    if found is not None:
        return found
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        found = ipaddress.ip_address(text)
    except ValueError:
        found = text.lower()
    if len(_COMPARABLE_CACHE) >= _COMPARABLE_CACHE_MAX:
        _COMPARABLE_CACHE.clear()
    _COMPARABLE_CACHE[host] = found
    return found


def _contact_host_port(uri: str) -> tuple[str, int | None]:
    """Host and port a contact URI points at (5060, or 5061 for sips/TLS, when absent)."""
    scheme, _, rest = uri.partition(":")
    hostport = rest.partition("@")[2] or rest
    params = ""
    for stop in (";", "?"):
        cut = hostport.find(stop)
        if cut >= 0:
            if stop == ";":
                params = hostport[cut:].lower()
            hostport = hostport[:cut]
    if hostport.startswith("["):
        host, _, tail = hostport.partition("]")
        host += "]"
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if port_text:
        valid = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
        return host, int(port_text) if valid else None
    secure = scheme.lower() == "sips" or ";transport=tls" in params
    return host, 5061 if secure else 5060
