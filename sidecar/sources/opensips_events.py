"""OpenSIPS usrloc events and MI usrloc dumps, normalised into contact records (sans-I/O).

Two ways to learn what an OpenSIPS registrar holds, both captured from a real OpenSIPS 3.6 in
shared/opensips-samples/ (whose README lists the conventions relied on here):

* **events** (``event_datagram`` / ``event_stream``): JSON-RPC 2.0 notifications such as
  ``E_UL_CONTACT_INSERT``, one per change. :func:`parse_event` checks one and returns a
  :class:`UsrlocEvent`; :func:`event_change_kind` says what the store should do with it and
  :func:`event_to_record` builds the contact tuple of :mod:`sidecar.model`.
* **MI** (``ul_dump``, ``ul_show_contact``): the full state, used to reconcile after a missed
  event or a restart. :func:`parse_ul_dump` / :func:`parse_ul_show_contact` walk the result and
  :func:`mi_contact_to_record` converts one contact.

Conventions that differ from the module docs and matter here: ``qval`` is q×1000 with -1 for
"no q"; ``received``/``path`` are JSON ``null`` when unset; ``expires`` is an absolute UNIX time
with 0 for a permanent contact; ``aor`` is the user part only (use_domain=0); a DELETE carries
the contact's last stored state. In a full-sharing cluster **both** nodes raise every event,
and the copy from the node that did not receive the REGISTER has ``socket: ""``: that is how
:func:`is_peer_copy` tells them apart (MI-added contacts also have an empty socket on both
nodes, so they count as copies: the sidecar's own ``ul_add`` warm-loads must not loop back).
MI reports ``Expires`` as seconds remaining, ``Q`` as a decimal string and ``Cflags`` as flag
names.

Anything malformed raises :class:`OpensipsEventError` (a ``ValueError``) and nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.model import FLAG_NAT, ModelError, make_record

E_UL_AOR_INSERT = "E_UL_AOR_INSERT"
E_UL_AOR_DELETE = "E_UL_AOR_DELETE"
E_UL_CONTACT_INSERT = "E_UL_CONTACT_INSERT"
E_UL_CONTACT_UPDATE = "E_UL_CONTACT_UPDATE"
E_UL_CONTACT_DELETE = "E_UL_CONTACT_DELETE"
E_UL_CONTACT_REFRESH = "E_UL_CONTACT_REFRESH"
E_UL_LATENCY_UPDATE = "E_UL_LATENCY_UPDATE"

AOR_EVENTS = frozenset({E_UL_AOR_INSERT, E_UL_AOR_DELETE})
# Events whose params describe one contact with its full state (REFRESH is a reduced set).
FULL_CONTACT_EVENTS = frozenset(
    {E_UL_CONTACT_INSERT, E_UL_CONTACT_UPDATE, E_UL_CONTACT_DELETE, E_UL_LATENCY_UPDATE}
)
CONTACT_EVENTS = FULL_CONTACT_EVENTS | {E_UL_CONTACT_REFRESH}
EVENT_NAMES = AOR_EVENTS | CONTACT_EVENTS

REFRESH_REG = "reg-refresh"  # usrloc contact_refresh_timer (push-notification re-register)
REFRESH_INVITE = "ini-INVITE"  # lookup() of a push-notification contact by an initial INVITE

ChangeKind = Literal["put", "delete", "delete_aor", "refresh", "ignore"]

_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1
_MAX_I64 = (1 << 63) - 1
_DIGITS = re.compile(r"[0-9]{1,20}")
_Q_TEXT = re.compile(r"[0-9]{1,4}(?:\.[0-9]{0,6})?")


class OpensipsEventError(ValueError):
    """An OpenSIPS event or MI usrloc payload that does not have the expected shape."""


@dataclass(slots=True, frozen=True)
class UsrlocEvent:
    """One usrloc event, normalised.

    Empty strings become ``None`` (``socket`` ``""`` marks a replicated copy, see
    :func:`is_peer_copy`). ``q`` is q×1000 or -1. ``cseq`` and ``latency`` are ``None`` for
    E_UL_CONTACT_REFRESH, which lacks them; ``reason`` and ``req_callid`` only come with it.
    AOR events fill only ``name``, ``domain`` and ``aor``.
    """

    name: str
    domain: str
    aor: str
    uri: str | None = None
    received: str | None = None
    path: str | None = None
    q: int = -1
    user_agent: str | None = None
    socket: str | None = None
    bflags: int = 0
    expires: int = 0
    callid: str | None = None
    cseq: int | None = None
    attr: str | None = None
    latency: int | None = None
    shtag: str | None = None
    reason: str | None = None
    req_callid: str | None = None


# --- field checks -------------------------------------------------------------------------------


def _check_text(value: str, what: str) -> str:
    """Reject lone surrogates (from JSON ``\\ud800`` escapes): they cannot be re-encoded later."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OpensipsEventError(f"{what} is not valid Unicode text") from None
    return value


def _int_in(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise OpensipsEventError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise OpensipsEventError(f"{what} {value} outside {lo}..{hi}")
    return value


class _Params:
    """Typed access to an event's ``params`` object, naming the event in every error."""

    __slots__ = ("event", "params")

    def __init__(self, event: str, params: dict[str, Any]) -> None:
        self.event = event
        self.params = params

    def _what(self, key: str) -> str:
        return f"{self.event} param {key!r}"

    def text(self, key: str) -> str:
        """Mandatory non-empty string."""
        if key not in self.params:
            raise OpensipsEventError(f"{self.event} lacks param {key!r}")
        value = self.params[key]
        if not isinstance(value, str) or not value:
            raise OpensipsEventError(f"{self._what(key)} must be a non-empty string")
        return _check_text(value, self._what(key))

    def opt_text(self, key: str) -> str | None:
        """Optional string: absent, ``null`` and ``""`` all mean None."""
        value = self.params.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise OpensipsEventError(f"{self._what(key)} must be a string or null")
        return _check_text(value, self._what(key)) or None

    def integer(self, key: str, lo: int, hi: int) -> int:
        if key not in self.params:
            raise OpensipsEventError(f"{self.event} lacks param {key!r}")
        return _int_in(self.params[key], self._what(key), lo, hi)

    def opt_integer(self, key: str, lo: int, hi: int, default: int) -> int:
        if key not in self.params:
            return default
        return _int_in(self.params[key], self._what(key), lo, hi)


# --- events -------------------------------------------------------------------------------------


def parse_event(obj: Any) -> UsrlocEvent:
    """Validate one decoded JSON value as a usrloc event notification and normalise it.

    Mandatory params: ``domain``, ``aor``; for contact events also ``uri``, ``expires``,
    ``callid``, plus ``cseq`` (all but REFRESH) or ``reason`` (REFRESH). The other documented
    params are optional with neutral defaults, so an older or newer OpenSIPS that adds or drops
    one still works; present params must have the documented type. Unknown params are ignored.
    """
    if not isinstance(obj, dict):
        raise OpensipsEventError(f"event must be a JSON object, got {type(obj).__name__}")
    if obj.get("jsonrpc") != "2.0":
        raise OpensipsEventError("event is not JSON-RPC 2.0 (jsonrpc != '2.0')")
    if "id" in obj:
        raise OpensipsEventError("event has an 'id': a request or reply, not a notification")
    name = obj.get("method")
    if not isinstance(name, str):
        raise OpensipsEventError("event lacks a string 'method'")
    if name not in EVENT_NAMES:
        raise OpensipsEventError(f"unknown usrloc event {name[:64]!r}")
    params = obj.get("params")
    if not isinstance(params, dict):
        raise OpensipsEventError(f"{name} 'params' must be a JSON object")
    p = _Params(name, params)
    domain = p.text("domain")
    aor = p.text("aor")
    if name in AOR_EVENTS:
        return UsrlocEvent(name=name, domain=domain, aor=aor)
    full = name in FULL_CONTACT_EVENTS
    return UsrlocEvent(
        name=name,
        domain=domain,
        aor=aor,
        uri=p.text("uri"),
        received=p.opt_text("received"),
        path=p.opt_text("path") if full else None,
        q=p.opt_integer("qval", -1, 1000, -1) if full else -1,
        user_agent=p.opt_text("user_agent"),
        socket=p.opt_text("socket"),
        bflags=p.opt_integer("bflags", 0, _MAX_U64, 0),
        expires=p.integer("expires", 0, _MAX_I64),
        callid=p.text("callid"),
        cseq=p.integer("cseq", 0, _MAX_U32) if full else None,
        attr=p.opt_text("attr"),
        latency=p.opt_integer("latency", -_MAX_I64, _MAX_I64, 0) if full else None,
        shtag=p.opt_text("shtag"),
        reason=None if full else p.text("reason"),
        req_callid=None if full else p.opt_text("req_callid"),
    )


def is_peer_copy(ev: UsrlocEvent, local_sockets: AbstractSet[str]) -> bool:
    """True for a contact event raised by a node that does not own the contact.

    Such copies (socket ``""``, or a socket that is not one of this proxy's) describe a change
    another node made and replicated; its own sidecar reports it, so the consumer must ignore
    the copy or it would publish the change twice. An empty ``local_sockets`` means "every
    non-empty socket is ours". AOR events carry no socket, so they are never called copies;
    they add nothing the contact events do not already say.
    """
    if ev.name not in CONTACT_EVENTS:
        return False
    if ev.socket is None:
        return True
    return bool(local_sockets) and ev.socket not in local_sockets


def event_change_kind(ev: UsrlocEvent) -> ChangeKind:
    """What a store does with the event.

    INSERT/UPDATE → ``put``; contact DELETE → ``delete``; AOR DELETE → ``delete_aor`` (always
    preceded by the per-contact deletes, so it is a safety net); REFRESH ``reg-refresh`` →
    ``refresh`` (touch expires only); REFRESH ``ini-INVITE``, LATENCY_UPDATE and AOR INSERT →
    ``ignore`` (they change nothing we replicate).
    """
    name = ev.name
    if name in (E_UL_CONTACT_INSERT, E_UL_CONTACT_UPDATE):
        return "put"
    if name == E_UL_CONTACT_DELETE:
        return "delete"
    if name == E_UL_AOR_DELETE:
        return "delete_aor"
    if name == E_UL_CONTACT_REFRESH and ev.reason == REFRESH_REG:
        return "refresh"
    return "ignore"


def _nat_flags(bflags: int, received: str | None, nat_bflag_mask: int) -> int:
    return FLAG_NAT if (bflags & nat_bflag_mask) or received else 0


def event_to_record(ev: UsrlocEvent, *, handle: int, last_modified: int,
                    nat_bflag_mask: int) -> tuple:
    """Contact tuple (:func:`sidecar.model.make_record`) for a full contact event.

    ``cflags`` carries the proxy's bflags verbatim; ``FLAG_NAT`` is set when a NAT bflag is
    set or the proxy stored a ``received`` address. REFRESH and AOR events have no full state
    (no CSeq) and are refused.
    """
    if ev.name not in FULL_CONTACT_EVENTS or ev.cseq is None or ev.uri is None:
        raise OpensipsEventError(f"{ev.name} does not carry a full contact")
    try:
        return make_record(
            aor=ev.aor,
            uri=ev.uri,
            callid=ev.callid or "",
            cseq=ev.cseq,
            expires=ev.expires,
            handle=handle,
            last_modified=last_modified,
            received=ev.received,
            path=ev.path,
            socket=ev.socket,
            q=ev.q,
            user_agent=ev.user_agent,
            flags=_nat_flags(ev.bflags, ev.received, nat_bflag_mask),
            cflags=ev.bflags,
            methods=None,
            attr=ev.attr,
        )
    except ModelError as exc:
        raise OpensipsEventError(f"{ev.name}: {exc}") from None


# --- MI usrloc dumps ----------------------------------------------------------------------------


def _contacts_of(node: Mapping[str, Any], where: str) -> list[dict]:
    contacts = node.get("Contacts", [])
    if not isinstance(contacts, list):
        raise OpensipsEventError(f"{where}: 'Contacts' must be a list")
    for contact in contacts:
        if not isinstance(contact, dict):
            raise OpensipsEventError(f"{where}: every contact must be an object")
    return contacts


def _aor_name(node: Any, where: str) -> str:
    if not isinstance(node, dict):
        raise OpensipsEventError(f"{where}: AOR entry must be an object")
    aor = node.get("AOR")
    if not isinstance(aor, str) or not aor:
        raise OpensipsEventError(f"{where}: AOR entry lacks a non-empty 'AOR'")
    return _check_text(aor, where)


def parse_ul_dump(result: Any, domain: str | None = None) -> list[tuple[str, list[dict]]]:
    """``(aor, contacts)`` pairs from an ``ul_dump`` result (``Domains`` → ``AORs`` → ``Contacts``).

    ``domain`` keeps only that usrloc table (e.g. ``"location"``); by default all are walked.
    A brief dump (AOR names only) yields empty contact lists. Contacts stay raw MI dicts; pass
    each to :func:`mi_contact_to_record`.
    """
    if not isinstance(result, dict) or not isinstance(result.get("Domains"), list):
        raise OpensipsEventError("ul_dump result must be an object with a 'Domains' list")
    out: list[tuple[str, list[dict]]] = []
    for dom in result["Domains"]:
        if not isinstance(dom, dict) or not isinstance(dom.get("name"), str):
            raise OpensipsEventError("ul_dump domain entry must be an object with a 'name'")
        if domain is not None and dom["name"] != domain:
            continue
        aors = dom.get("AORs", [])
        if not isinstance(aors, list):
            raise OpensipsEventError(f"ul_dump domain {dom['name']!r}: 'AORs' must be a list")
        for node in aors:
            aor = _aor_name(node, "ul_dump")
            out.append((aor, _contacts_of(node, f"ul_dump AOR {aor!r}")))
    return out


def parse_ul_show_contact(result: Any) -> list[dict]:
    """Raw contact dicts of an ``ul_show_contact`` result (``{"AOR": .., "Contacts": [..]}``)."""
    aor = _aor_name(result, "ul_show_contact")
    return _contacts_of(result, f"ul_show_contact AOR {aor!r}")


def _mi_int(value: Any, what: str, lo: int, hi: int) -> int:
    """MI prints numbers as JSON numbers or, depending on version and field, digit strings."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        value = int(value)
    return _int_in(value, what, lo, hi)


def _mi_text(c: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = c.get(key)
    if value is None or value == "":
        if required:
            raise OpensipsEventError(f"MI contact lacks a non-empty {key!r}")
        return None
    if not isinstance(value, str):
        raise OpensipsEventError(f"MI contact {key!r} must be a string")
    return _check_text(value, f"MI contact {key!r}")


def _mi_q(value: Any) -> int:
    """``Q``: ``""`` (not given) → -1, else the decimal (``"0.5"``) × 1000."""
    if value is None or value == "":
        return -1
    if isinstance(value, str):
        if not _Q_TEXT.fullmatch(value):
            raise OpensipsEventError(f"MI contact 'Q' {value[:32]!r} is not a decimal")
        number = float(value)
    elif type(value) in (int, float):
        number = float(value)
    else:
        raise OpensipsEventError("MI contact 'Q' must be a string or a number")
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise OpensipsEventError(f"MI contact 'Q' {number} outside 0..1")
    return round(number * 1000)


def _mi_expires(value: Any, now: float) -> int | None:
    """Absolute expiry from ``Expires``; None when OpenSIPS says the contact is already gone."""
    if value == "permanent":
        return 0
    if value in ("expired", "deleted"):
        return None
    remaining = _mi_int(value, "MI contact 'Expires'", 0, _MAX_U32)
    return int(now) + remaining


def _mi_cflags(value: Any, flag_bits: Mapping[str, int]) -> tuple[int, set[str]]:
    """``Cflags`` as (bit mask, names). Names are translated with ``flag_bits``; unknown names
    are kept in the name set but add no bit. Older versions print a number instead."""
    if value is None or value == "":
        return 0, set()
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        names = set(_check_text(value, "MI contact 'Cflags'").split())
        mask = 0
        for name in names:
            mask |= flag_bits.get(name, 0)
        return mask, names
    return _mi_int(value, "MI contact 'Cflags'", 0, _MAX_U64), set()


def mi_contact_to_record(
    aor: str,
    c: Mapping[str, Any],
    *,
    now: float,
    handle: int,
    last_modified: int,
    nat_bflag_mask: int,
    nat_flag_name: str = "NAT",
    flag_bits: Mapping[str, int] | None = None,
) -> tuple | None:
    """Contact tuple for one MI contact dict, or None if OpenSIPS lists it as expired/deleted.

    ``now`` is the time the dump was taken (``Expires`` is relative to it). ``Cflags`` names
    become bits through ``flag_bits`` (by default just ``{nat_flag_name: nat_bflag_mask}``, so
    the NAT bit matches what the events report); ``FLAG_NAT`` is set when the NAT flag name is
    listed, a NAT bit is set, or a ``Received`` address is stored. A missing ``Socket`` (the
    peer's view of a replicated contact) gives ``socket`` None, as in the events.
    """
    if not isinstance(aor, str) or not aor:
        raise OpensipsEventError("MI contact needs a non-empty AOR")
    if not isinstance(c, Mapping):
        raise OpensipsEventError("MI contact must be an object")
    if not isinstance(now, int | float) or not math.isfinite(now) or now < 0:
        raise OpensipsEventError("'now' must be a finite, non-negative time")
    expires = _mi_expires(c.get("Expires"), now)
    if expires is None:
        return None
    bits = {nat_flag_name: nat_bflag_mask} if flag_bits is None else flag_bits
    cflags, names = _mi_cflags(c.get("Cflags"), bits)
    received = _mi_text(c, "Received")
    nat = nat_flag_name in names or (cflags & nat_bflag_mask) or received
    methods = c.get("Methods")
    try:
        return make_record(
            aor=_check_text(aor, "AOR"),
            uri=_mi_text(c, "Contact", required=True) or "",
            callid=_mi_text(c, "Callid", required=True) or "",
            cseq=_mi_int(c.get("Cseq"), "MI contact 'Cseq'", 0, _MAX_U32),
            expires=expires,
            handle=handle,
            last_modified=last_modified,
            received=received,
            path=_mi_text(c, "Path"),
            socket=_mi_text(c, "Socket"),
            q=_mi_q(c.get("Q")),
            user_agent=_mi_text(c, "User-agent"),
            flags=FLAG_NAT if nat else 0,
            cflags=cflags,
            methods=None if methods is None else _mi_int(methods, "MI 'Methods'", 0, _MAX_U64),
            attr=_mi_text(c, "Attr"),
        )
    except ModelError as exc:
        raise OpensipsEventError(f"MI contact of {aor!r}: {exc}") from None
