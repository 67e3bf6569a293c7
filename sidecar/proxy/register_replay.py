"""Load a replicated contact into a proxy by replaying it as a REGISTER, sans-I/O.

Why: the proxies' management commands cannot write a contact losslessly. OpenSIPS MI
``ul_add`` sets no received address, Path or socket and forces its own Call-ID/CSeq;
Kamailio ``ul.add`` takes received and socket but still forces Call-ID, CSeq and User-Agent
and drops instance/reg-id. A REGISTER carries all of it the way the phone sent it, and the few
things a REGISTER from the sidecar cannot say by itself (the phone's NAT address, the proxy
socket it registered on, its NAT flag) travel in ``X-SC-*`` headers that a dedicated route in
the proxy config (kamailio-cfg ``route[REPLAY]``, opensips-cfg ``route[SC_REPLAY]``) honours
only when the REGISTER comes from the sidecar's address.

What a replay REGISTER holds, for one contact tuple of :mod:`sidecar.model`:

* Request-URI ``sip:DOMAIN`` (the AOR's host part, else ``domain``); To/From ``sip:AOR``
  (user part %-escaped; an AOR without ``@`` gets ``@DOMAIN``), From with a tag;
* the contact's own Call-ID and CSeq; one Via (``SIP/2.0/UDP host:port;branch=...;rport``)
  whose branch starts with :data:`REPLAY_BRANCH_PREFIX`, so mirrors of it (HEP, capture) can
  be recognised without reading any other header; Max-Forwards, Content-Length 0;
* ``Contact: <URI>;expires=REMAINING[;q=Q][;+sip.instance="..."][;reg-id=N]``, with
  REMAINING = seconds left (absolute expiry minus the current UNIX second);
* ``Path`` (the stored value, verbatim), ``User-Agent``;
* ``X-SC-Replay: <node id>`` always, ``X-SC-Received`` when the contact has a received
  address, ``X-SC-Socket: proto:ip:port`` when it has a socket, ``X-SC-NAT: 1`` for FLAG_NAT.

The allowed-methods mask travels as an ``Allow`` header naming its methods (each registrar
derives its own numbering from the names; bits no SIP method name stands for are dropped).
Not carried: proxy branch flags besides NAT. **Permanent contacts**
(expires 0) cannot be expressed: ``expires=0`` in a REGISTER means "remove". They are
refused here with :class:`ReplayError` and the adapter loads them over RPC/MI instead (a
permanent contact was made by ``ul.add`` / an admin in the first place, so nothing is lost
that the RPC would not lose anyway). A contact already expired yields ``None``.

Every message is parsed back with the sidecar's own SIP parser before it is handed out, and a
contact whose fields would not survive the trip (a URI with whitespace, a Call-ID that is not
one word, a q outside 0..1, ...) raises :class:`ReplayError` instead of being sent damaged.

Replies: :class:`ReplayTransactions` matches them by Call-ID, CSeq and Via branch (RFC 3261
§17.1.3), retransmits over UDP on Timer E (T1 doubling up to T2; T2 after a provisional) and
gives up at a bounded timeout (Timer F), and holds at most ``window`` transactions.
Classification: 2xx is ``ok``; ``400`` whose ``P-Registrar-Error`` (Kamailio and OpenSIPS add
it) or reason says "Invalid CSeq" is ``held`` (the proxy already holds this Call-ID at this or
a higher CSeq: nothing to load); any other final answer is ``rejected`` (status and reason
kept); no final answer in time is ``timeout``. Garbage and replies to nothing never raise:
they are counted and ignored.

Public API
----------
``REPLAY_BRANCH_PREFIX``, ``HDR_REPLAY``, ``HDR_RECEIVED``, ``HDR_SOCKET``, ``HDR_NAT``
``ReplayError(ProxyRpcError)``: ``code`` is the SIP status, or None (timeout, bad contact).
``build_register(rec, *, node_id, via, branch, now, domain=None, from_tag=None)
-> ReplayRegister | None``
``replay_headers(data) -> dict[str, str]``: the ``X-SC-*`` headers of a message, by
lower-cased name (what the proxy route reads; the SIP parser does not keep them).
``ReplayTransactions(*, window=64, t1=0.5, t2=4.0, timeout=8.0)`` with ``add``,
``on_datagram``, ``poll``, ``cancel``, ``next_wakeup``, ``pending``, ``stats``.
``ReplayResult(key, kind, status, reason)`` with ``ok``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from sidecar import model
from sidecar.proxy.kamailio_dump import ProxyRpcError
from sidecar.sip.parser import MAX_CSEQ, SipParseError, SipResponse, parse_message
from sidecar.sip.registration import METHOD_BITS, REPLAY_BRANCH_PREFIX, methods_bitmask

_KNOWN_METHODS = sum(METHOD_BITS.values())

__all__ = [
    "HDR_NAT",
    "HDR_RECEIVED",
    "HDR_REPLAY",
    "HDR_SOCKET",
    "REPLAY_BRANCH_PREFIX",
    "ReplayError",
    "ReplayRegister",
    "ReplayResult",
    "ReplayTransactions",
    "build_register",
    "replay_headers",
]

HDR_REPLAY = "X-SC-Replay"
HDR_RECEIVED = "X-SC-Received"
HDR_SOCKET = "X-SC-Socket"
HDR_NAT = "X-SC-NAT"

DEFAULT_T1 = 0.5  # RFC 3261 Timer T1
DEFAULT_T2 = 4.0  # RFC 3261 Timer T2
DEFAULT_TIMEOUT = 8.0  # shorter than Timer F (32 s): the proxy is on the same host
DEFAULT_WINDOW = 64
MAX_WINDOW = 4096
MAX_FIELD = 4096  # longest URI / Path / Call-ID we put into a replay

# RFC 3261 user part: unreserved and user-unreserved characters stay, the rest is %-escaped.
# ",", ";" and "?" are escaped too although the grammar allows them: proxies' URI parsers
# disagree about them, and the escaped form means the same thing.
_USER_SAFE = "-_.!~*'()&=+$/"
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.\-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_FORBIDDEN_IN_URI = frozenset('<>"')
_TOKEN_NODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_HELD_HEADER = re.compile(rb"\n[ \t]*P-Registrar-Error[ \t]*:[ \t]*Invalid CSeq", re.IGNORECASE)
_HEADER_LINE = re.compile(rb"\r?\n(X-SC-[A-Za-z]+)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)

Key = tuple[str, int, str]  # (Call-ID, CSeq number, Via branch)


class ReplayError(ProxyRpcError):
    """A contact could not be replayed: ``code`` is the proxy's SIP status for a final
    non-2xx answer, ``None`` when no answer came in time or the contact cannot be expressed
    as a REGISTER. A subclass of :class:`ProxyRpcError` so the loader treats it like a
    failed ``ul.add``."""

    def __init__(self, code: int | None, message: str, *, reason: str = "") -> None:
        super().__init__(code, message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReplayRegister:
    """One replay REGISTER ready to send, and the transaction key its reply will carry."""

    data: bytes
    key: Key
    aor: str
    uri: str


# --- building ---------------------------------------------------------------------------------


def _bad(what: str, value: object) -> ReplayError:
    return ReplayError(None, f"contact cannot be replayed: {what} {value!r:.80}")


def _word(value: object, what: str) -> str:
    """Printable text without whitespace (Call-ID, received, socket, URI)."""
    if (not isinstance(value, str) or not value or len(value) > MAX_FIELD
            or not value.isprintable() or len(value.split()) != 1):
        raise _bad(what, value)
    return value


def _text(value: object, what: str) -> str:
    """A header value: printable, no surrounding whitespace (User-Agent, Path)."""
    if (not isinstance(value, str) or not value or len(value) > MAX_FIELD
            or not value.isprintable() or value != value.strip(" \t")):
        raise _bad(what, value)
    return value


def _uri(value: object, what: str) -> str:
    uri = _word(value, what)
    if _SCHEME.match(uri) is None or len(uri) == uri.index(":") + 1:
        raise _bad(what, value)
    if any(c in _FORBIDDEN_IN_URI for c in uri):
        raise _bad(what, value)
    return uri


def _aor_uri(aor: object, domain: str | None) -> tuple[str, str]:
    """``(To URI, Request-URI)`` for an AOR ``user@host`` or a bare ``user``."""
    if not isinstance(aor, str) or not aor or len(aor) > MAX_FIELD or not aor.isprintable():
        raise _bad("AOR", aor)
    user, at, host = aor.rpartition("@")
    if not at:
        user, host = aor, domain or ""
    host = host.lower()
    if not user or _HOST.fullmatch(host) is None:
        raise _bad("AOR (or replay domain)", aor if at else f"{aor}@{host}")
    escaped = quote(user, safe=_USER_SAFE, encoding="utf-8", errors="strict")
    return f"sip:{escaped}@{host}", f"sip:{host}"


def _q_text(q: int) -> str | None:
    if q == -1:
        return None
    if type(q) is not int or not 0 <= q <= 1000:
        raise _bad("q (x1000)", q)
    return "1" if q == 1000 else f"0.{q:03d}"


def build_register(rec: tuple, *, node_id: int | str, via: tuple[str, int], branch: str,
                   now: float, domain: str | None = None,
                   from_tag: str | None = None) -> ReplayRegister | None:
    """The replay REGISTER for contact tuple ``rec``; ``None`` if it already expired.

    ``via`` is the sidecar's own ``(ip, port)`` (replies come back there; ``rport`` is set
    too), ``branch`` must start with :data:`REPLAY_BRANCH_PREFIX` and be unique per
    transaction, ``now`` is the UNIX time, ``domain`` the host for AORs stored without one
    (usrloc ``use_domain`` off; default: the Via IP). Raises :class:`ReplayError` (code
    None) for permanent contacts and for contacts a REGISTER cannot carry unchanged.
    """
    if not isinstance(rec, tuple) or len(rec) != model.RECORD_LEN:
        raise _bad("record", type(rec).__name__)
    expires = rec[model.EXPIRES]
    if type(expires) is not int or expires < 0:
        raise _bad("expires", expires)
    if expires == 0:
        raise ReplayError(None, "permanent contacts cannot be replayed as a REGISTER "
                                "(expires=0 means remove); load them over RPC/MI")
    remaining = expires - int(now)
    if remaining <= 0:
        return None
    remaining = min(remaining, 2**32 - 1)
    if not isinstance(branch, str) or not branch.startswith(REPLAY_BRANCH_PREFIX) \
            or _TOKEN_NODE.fullmatch(branch) is None:
        raise _bad("branch", branch)
    node = str(node_id)
    if _TOKEN_NODE.fullmatch(node) is None:
        raise _bad("node id", node_id)
    via_ip, via_port = via
    via_host = f"[{via_ip}]" if ":" in via_ip else via_ip
    to_uri, request_uri = _aor_uri(rec[model.AOR], domain or via_ip)
    contact_uri = _uri(rec[model.URI], "contact URI")
    callid = _word(rec[model.CALLID], "Call-ID")
    cseq = rec[model.CSEQ]
    if type(cseq) is not int or not 0 <= cseq <= MAX_CSEQ:
        raise _bad("CSeq", cseq)
    q = _q_text(rec[model.Q])
    instance = rec[model.INSTANCE]
    if instance is not None:
        instance = _text(instance, "+sip.instance")
        if '"' in instance or "\\" in instance:
            raise _bad("+sip.instance", instance)
    reg_id = rec[model.REG_ID]
    if type(reg_id) is not int or not 0 <= reg_id <= MAX_CSEQ:
        raise _bad("reg-id", reg_id)
    path = rec[model.PATH]
    if path is not None:
        path = _text(path, "Path")
    user_agent = rec[model.USER_AGENT]
    if user_agent is not None:
        user_agent = _text(user_agent, "User-Agent")
    received = rec[model.RECEIVED]
    if received is not None:
        received = _word(received, "received")
    sock = rec[model.SOCKET]
    if sock is not None:
        sock = _word(sock, "socket")
    flags = rec[model.FLAGS]
    if type(flags) is not int:
        raise _bad("flags", flags)
    nat = bool(flags & model.FLAG_NAT)
    tag = from_tag or branch[len(REPLAY_BRANCH_PREFIX):] or "sc"

    contact = f"<{contact_uri}>;expires={remaining}"
    if q is not None:
        contact += f";q={q}"
    if instance is not None:
        contact += f';+sip.instance="{instance}"'
    if reg_id:
        contact += f";reg-id={reg_id}"
    lines = [
        f"REGISTER {request_uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {via_host}:{via_port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <{to_uri}>;tag={tag}",
        f"To: <{to_uri}>",
        f"Call-ID: {callid}",
        f"CSeq: {cseq} REGISTER",
        f"Contact: {contact}",
    ]
    if path is not None:
        lines.append(f"Path: {path}")
    if user_agent is not None:
        lines.append(f"User-Agent: {user_agent}")
    allow = allow_header(rec[model.METHODS])
    if allow is not None:
        lines.append(f"Allow: {allow}")
    lines.append(f"{HDR_REPLAY}: {node}")
    if received is not None:
        lines.append(f"{HDR_RECEIVED}: {received}")
    if sock is not None:
        lines.append(f"{HDR_SOCKET}: {sock}")
    if nat:
        lines.append(f"{HDR_NAT}: 1")
    lines.append("Content-Length: 0")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    _check_round_trip(data, rec, remaining, branch, path, user_agent)
    return ReplayRegister(data, (callid, cseq, branch), rec[model.AOR], contact_uri)


def allow_header(methods: int | None) -> str | None:
    """The ``Allow`` value naming the methods of a contact's bitmask (sidecar numbering,
    :data:`sidecar.sip.registration.METHOD_BITS`), or None for "no Allow" (all methods).
    Each registrar turns the names into its own numbering, so the mask survives the replay
    whichever proxy stores it; unknown bits have no name and are left out."""
    if methods is None:
        return None
    names = [name for name, bit in METHOD_BITS.items() if methods & bit]
    return ", ".join(names) if names else None


def _check_round_trip(data: bytes, rec: tuple, remaining: int, branch: str,
                      path: str | None, user_agent: str | None) -> None:
    """Parse the message back; refuse it unless every carried field reads the same."""
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        raise _bad(f"message does not parse ({exc}) for", rec[model.URI]) from None
    got = (msg.call_id, msg.cseq, msg.via_branch, len(msg.contacts), msg.path, msg.user_agent,
           methods_bitmask(msg.allow))
    methods = rec[model.METHODS]
    want = (rec[model.CALLID], rec[model.CSEQ], branch, 1, path, user_agent,
            None if allow_header(methods) is None else methods & _KNOWN_METHODS)
    if got != want:
        raise _bad("fields do not survive parsing for", rec[model.URI])
    c = msg.contacts[0]
    if (c.uri, c.expires, c.q, c.instance, c.reg_id) != (
            rec[model.URI], remaining, rec[model.Q], rec[model.INSTANCE], rec[model.REG_ID]):
        raise _bad("contact does not survive parsing", rec[model.URI])


def replay_headers(data: bytes) -> dict[str, str]:
    """``X-SC-*`` headers of a message's header block, by lower-cased name (last one wins).

    Never raises: anything that is not bytes, or has no such headers, gives ``{}``.
    """
    if not isinstance(data, bytes | bytearray):
        return {}
    end = data.find(b"\r\n\r\n")
    head = bytes(data if end < 0 else data[:end])
    out: dict[str, str] = {}
    for name, value in _HEADER_LINE.findall(head):
        out[name.decode("ascii").lower()] = value.decode("utf-8", "replace").strip(" \t")
    return out


# --- transactions -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """How one replay transaction ended: ``kind`` is ok | held | rejected | timeout."""

    key: Key
    kind: str
    status: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """The proxy now holds this contact (or a newer version of it)."""
        return self.kind in ("ok", "held")


def classify(status: int, reason: str, raw: bytes = b"") -> str:
    """``ok`` | ``held`` | ``rejected`` for a final response (see the module docstring)."""
    if 200 <= status < 300:
        return "ok"
    if status == 400 and (_HELD_HEADER.search(raw) is not None or "cseq" in reason.lower()):
        return "held"
    return "rejected"


@dataclass(slots=True)
class _Pending:
    request: ReplayRegister
    deadline: float
    next_send: float
    interval: float


@dataclass(slots=True)
class TransactionStats:
    sent: int = 0
    retransmitted: int = 0
    ok: int = 0
    held: int = 0
    rejected: int = 0
    timeouts: int = 0
    provisional: int = 0
    unmatched: int = 0  # well-formed replies that match no open transaction (late, duplicate)
    garbage: int = 0  # datagrams that are not a SIP response to a REGISTER


class ReplayTransactions:
    """Open replay transactions: retransmission and timeout timers, reply matching.

    Time is whatever monotonic clock the caller passes (seconds); nothing here reads one.
    """

    def __init__(self, *, window: int = DEFAULT_WINDOW, t1: float = DEFAULT_T1,
                 t2: float = DEFAULT_T2, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        if not 0 < t1 <= t2 or timeout <= 0:
            raise ValueError("need 0 < t1 <= t2 and timeout > 0")
        self.window = window
        self.t1 = t1
        self.t2 = t2
        self.timeout = timeout
        self.stats = TransactionStats()
        self._pending: dict[Key, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, request: ReplayRegister, now: float) -> None:
        """Open a transaction for a request the caller sends right now."""
        if len(self._pending) >= self.window:
            raise ReplayError(None, f"replay window full ({self.window} transactions open)")
        if request.key in self._pending:
            raise ReplayError(None, f"replay transaction {request.key!r:.120} already open")
        self._pending[request.key] = _Pending(request, now + self.timeout, now + self.t1,
                                              self.t1)
        self.stats.sent += 1

    def cancel(self, key: Key) -> None:
        """Forget a transaction whose caller gave up (a late reply is then ``unmatched``)."""
        self._pending.pop(key, None)

    def on_datagram(self, data: bytes) -> ReplayResult | None:
        """A datagram from the proxy: the result it completes, or ``None`` (ignored)."""
        try:
            msg = parse_message(data)
        except SipParseError:
            self.stats.garbage += 1
            return None
        if not isinstance(msg, SipResponse) or msg.cseq_method != "REGISTER":
            self.stats.garbage += 1
            return None
        key = (msg.call_id, msg.cseq, msg.via_branch or "")
        entry = self._pending.get(key)
        if entry is None:
            self.stats.unmatched += 1
            return None
        if msg.status < 200:
            self.stats.provisional += 1
            entry.interval = self.t2  # RFC 3261 §17.1.2.2: Proceeding retransmits at T2
            return None
        del self._pending[key]
        kind = classify(msg.status, msg.reason, data)
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
        return ReplayResult(key, kind, msg.status, msg.reason[:200])

    def poll(self, now: float) -> tuple[list[bytes], list[ReplayResult]]:
        """Requests to retransmit now, and transactions that timed out (now closed)."""
        resend: list[bytes] = []
        expired: list[ReplayResult] = []
        for key, entry in list(self._pending.items()):
            if now >= entry.deadline:
                del self._pending[key]
                self.stats.timeouts += 1
                expired.append(ReplayResult(key, "timeout", None, "no final response"))
            elif now >= entry.next_send:
                resend.append(entry.request.data)
                self.stats.retransmitted += 1
                entry.interval = min(entry.interval * 2, self.t2)
                entry.next_send = now + entry.interval
        return resend, expired

    def next_wakeup(self) -> float | None:
        """Earliest time :meth:`poll` has something to do, or ``None`` when idle."""
        if not self._pending:
            return None
        return min(min(e.next_send, e.deadline) for e in self._pending.values())
