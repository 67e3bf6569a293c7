"""Kamailio JSON-RPC (``jsonrpcs``) messages and usrloc dumps, sans-I/O.

Everything here is bytes or plain Python values in, values out: no sockets, no clock (callers
pass ``now``). :mod:`sidecar.proxy.kamailio` moves the bytes over HTTP or a FIFO.

Facts this module relies on, checked against a real Kamailio 5.6.3 (Debian) with
kamailio-cfg/kamailio.cfg:

* ``ul.dump`` result: ``{"Domains": [{"Domain": {"Domain": table, "Size": n, "AoRs": [{"Info":
  {"AoR": aor, "HashID": n, "Contacts": [{"Contact": {...}}]}}], "Stats": {...}}}]}``;
  ``ul.lookup table aor`` returns ``{"AoR": aor, "Contacts": [...]}`` with the same contact
  objects, and fails with 500 "AOR not found in location table" (or "AOR has no contacts").
* A contact's ``Expires`` is the number of seconds **remaining** (``expires - time(0)`` at
  dump time), the string ``"permanent"`` for expires 0, ``"expired"`` when past its expiry but
  not yet purged by the usrloc timer, ``"deleted"`` for a contact being removed.
  ``Last-Modified`` is absolute UNIX seconds (0 for contacts created by ``ul.add``).
* ``Q`` is a float, -1 when the contact had no q. Unset strings (User-Agent, Received, Path,
  Socket, Instance, Ruid) are the literal ``"[not set]"``. ``Instance`` keeps its angle
  brackets (``"<urn:uuid:...>"``). ``Methods`` is 4294967295 when the phone sent no Allow.
* ``ul.add`` (5.6): ``table, aor, contact, expires, q, path, flags, cflags, methods
  [, received [, socket]]``. ``expires`` is seconds from now (0 = permanent), ``q`` a JSON
  *number* (a string such as "0.5" is read as 0), ``path``/``received``/``socket`` take ``"."``
  (or ``"0"``) for "not set". A socket that is not one of Kamailio's listeners is silently
  dropped. Call-ID, CSeq, User-Agent cannot be given: Kamailio stores
  :data:`UL_ADD_CALLID`, CSeq 1 and :data:`UL_ADD_USER_AGENT`; instance/reg-id stay unset.
  An existing contact with the same URI is updated in place.
* With ``use_domain`` off, ``ul.*`` commands cut an AOR at ``@``; ``ul.rm`` of an unknown AOR
  succeeds; ``ul.rm_contact`` of an unknown AOR or contact fails with code 404.
* Errors come back as ``{"error": {"code": 500, "message": "Method Not Found"}}`` (HTTP status
  500 with the same JSON body).

Bad or unexpected input raises :class:`ProxyRpcError` and nothing else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sidecar.model import FLAG_NAT, ModelError, make_record

# What Kamailio 5.6 writes into a contact created by ul.add (no RPC parameter sets them).
UL_ADD_CALLID = "dfjrewr12386fd6-343@kamailio.rpc"
UL_ADD_USER_AGENT = "kamailio SIP Router - RPC Server"
UL_ADD_CSEQ = 1

# Branch flags of kamailio-cfg/kamailio.cfg (FLB_NATB 6, FLB_NATSIPPING 7) as contact cflags.
NAT_BFLAG_MASK = 1 << 6
SIPPING_BFLAG_MASK = 1 << 7

ALL_METHODS = 0xFFFFFFFF  # what Kamailio stores when a REGISTER has no Allow header
# Kamailio numbers SIP methods differently from OpenSIPS (whose order the sidecar's contact
# tuples use, see sidecar.sip.registration.METHOD_BITS): REGISTER is 32 and OPTIONS 512 here.
# Checked against a real Kamailio 5.6 (tests/test_kamailio_client.py registers one Allow
# method at a time and reads the stored mask back).
KAMAILIO_METHOD_BITS = {
    "INVITE": 1, "CANCEL": 2, "ACK": 4, "BYE": 8, "INFO": 16, "REGISTER": 32, "SUBSCRIBE": 64,
    "NOTIFY": 128, "MESSAGE": 256, "OPTIONS": 512, "PRACK": 1024, "UPDATE": 2048,
    "REFER": 4096, "PUBLISH": 8192,
}


def _translate(mask: int, source: Mapping[str, int], target: Mapping[str, int]) -> int:
    out = 0
    for name, bit in source.items():
        if mask & bit:
            out |= target[name]
    return out


def methods_from_kamailio(mask: int) -> int | None:
    """Kamailio's stored Methods -> the contact tuple's bitmask (None = no Allow: all)."""
    from ..sip.registration import METHOD_BITS

    if mask == ALL_METHODS:
        return None
    return _translate(mask, KAMAILIO_METHOD_BITS, METHOD_BITS)


def methods_to_kamailio(mask: int | None) -> int:
    """The contact tuple's bitmask -> what ``ul.add`` wants (all methods for None)."""
    from ..sip.registration import METHOD_BITS

    if mask is None:
        return ALL_METHODS
    return _translate(mask, METHOD_BITS, KAMAILIO_METHOD_BITS)
NOT_SET = "[not set]"
UNSET_ARG = "."  # "no value" for ul.add's path, received and socket

# jsonrpcs reads a FIFO request into an 8 KiB buffer; writes up to PIPE_BUF are atomic, so
# concurrent clients never interleave. Reply FIFO names may not contain '.', '/' or '\'.
FIFO_MAX_REQUEST = 4096
FIFO_MAX_REPLY_PATH = 127
_REPLY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_U32 = (1 << 32) - 1
_MAX_TEXT = 64 * 1024

# ul.lookup fault messages that only mean "nothing registered".
LOOKUP_EMPTY_MESSAGES = frozenset({"AOR not found in location table", "AOR has no contacts"})


class ProxyRpcError(Exception):
    """A proxy RPC call that did not succeed.

    ``code`` is the JSON-RPC error code Kamailio returned (e.g. 500, 404), or ``None`` when the
    call never got a well-formed answer (connection refused, timeout, FIFO missing, malformed
    reply). ``message`` says what happened in words.
    """

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message if self.code is None else f"[{self.code}] {self.message}"


# --- JSON-RPC envelope ----------------------------------------------------------------------

def encode_request(method: str, params: Sequence[Any], request_id: int,
                   *, reply_name: str | None = None) -> bytes:
    """JSON-RPC 2.0 request body; with ``reply_name`` it is the FIFO form.

    The FIFO reader in jsonrpcs finds the end of a request by counting braces outside quotes
    and treats any quote preceded by a backslash as escaped, so a string ending in a backslash
    would swallow the rest of the stream. Backslashes and single quotes are therefore sent as
    ``\\u005c`` / ``\\u0027`` escapes, which every JSON parser reads back unchanged.
    """
    if not isinstance(method, str) or not method:
        raise ProxyRpcError(None, "RPC method name must be a non-empty string")
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": list(params),
                           "id": request_id}
    if reply_name is not None:
        check_reply_name(reply_name)
        doc["reply_name"] = reply_name
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProxyRpcError(None, f"RPC parameters are not JSON-serialisable: {exc}") from None
    if reply_name is not None:
        text = text.replace("\\\\", "\\u005c").replace("'", "\\u0027")
        if len(text) > FIFO_MAX_REQUEST:
            raise ProxyRpcError(
                None, f"request of {len(text)} bytes is too large for the FIFO transport "
                      f"(max {FIFO_MAX_REQUEST}); use HTTP")
    return text.encode()


def check_reply_name(name: str) -> None:
    """Kamailio refuses reply FIFO names with '.', '/' or '\\'; keep to a safe alphabet."""
    if not isinstance(name, str) or not _REPLY_NAME.fullmatch(name):
        raise ProxyRpcError(None, f"invalid reply FIFO name {name!r}")


def decode_response(body: bytes, request_id: int | None = None) -> Any:
    """The ``result`` of a JSON-RPC reply; an ``error`` member becomes :class:`ProxyRpcError`."""
    if not body or not body.strip():
        raise ProxyRpcError(None, "empty reply from Kamailio")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProxyRpcError(None, f"reply is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProxyRpcError(None, "reply is not a JSON-RPC object")
    error = doc.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise ProxyRpcError(None, f"malformed JSON-RPC error member: {error!r:.200}")
        code = error.get("code")
        message = error.get("message")
        if not _is_int(code):
            code = None
        if not isinstance(message, str) or not message:
            message = "Kamailio returned an error without a message"
        raise ProxyRpcError(code, message[:_MAX_TEXT])
    if "result" not in doc:
        raise ProxyRpcError(None, "JSON-RPC reply has neither result nor error")
    if request_id is not None and doc.get("id") != request_id:
        raise ProxyRpcError(None, f"reply id {doc.get('id')!r:.40} does not match {request_id}")
    return doc["result"]


# --- usrloc dumps ---------------------------------------------------------------------------

def parse_ul_dump(result: Any, *, now: int) -> list[dict[str, Any]]:
    """Contacts of every table in an ``ul.dump`` result (the non-brief form), as plain dicts.

    ``now`` is the UNIX time the reply arrived; ``expires`` in the output is absolute
    (``now + remaining``, so within a second of Kamailio's own value; 0 = permanent).
    Contacts Kamailio reports as "expired" or "deleted" are left out: lookup() no longer
    returns them and the usrloc timer is about to purge them.
    """
    domains = _get(result, "Domains", list, "ul.dump result")
    out: list[dict[str, Any]] = []
    for entry in domains:
        domain = _get(entry, "Domain", dict, "ul.dump domain")
        table = _get(domain, "Domain", str, "ul.dump domain")
        for aor_entry in _get(domain, "AoRs", list, "ul.dump domain"):
            info = _get(aor_entry, "Info", dict, "ul.dump AoR entry")
            aor = _text(_get(info, "AoR", str, "ul.dump AoR"), "AoR")
            if not aor:
                raise ProxyRpcError(None, "ul.dump AoR is empty")
            _append_contacts(out, table, aor, _get(info, "Contacts", list, "ul.dump AoR"), now)
    return out


def parse_ul_lookup(result: Any, *, table: str, now: int) -> list[dict[str, Any]]:
    """Contacts of an ``ul.lookup`` result, same dict shape as :func:`parse_ul_dump`."""
    aor = _text(_get(result, "AoR", str, "ul.lookup result"), "AoR")
    if not aor:
        raise ProxyRpcError(None, "ul.lookup AoR is empty")
    out: list[dict[str, Any]] = []
    _append_contacts(out, table, aor, _get(result, "Contacts", list, "ul.lookup result"), now)
    return out


def _append_contacts(out: list[dict[str, Any]], table: str, aor: str, contacts: list,
                     now: int) -> None:
    for item in contacts:
        contact = parse_contact(_get(item, "Contact", dict, "contact entry"),
                                table=table, aor=aor, now=now)
        if contact is not None:
            out.append(contact)


def parse_contact(node: Mapping[str, Any], *, table: str, aor: str,
                  now: int) -> dict[str, Any] | None:
    """One ``{"Address": ..., "Expires": ...}`` object; ``None`` for expired/deleted ones.

    Keys of the result: table, aor, uri, expires (absolute, 0 = permanent), q (×1000, -1 =
    none), callid, cseq, user_agent, received, path, socket, flags, cflags, methods,
    instance, reg_id, last_modified (UNIX seconds, 0 after ul.add), ruid, keepalive,
    loaded_by_rpc (True for contacts created by ``ul.add``: they carry Kamailio's fixed RPC
    Call-ID, so they are warm-loaded copies rather than registrations this proxy received).
    """
    uri = _text(_get(node, "Address", str, "contact"), "Address")
    if not uri:
        raise ProxyRpcError(None, "contact Address is empty")
    raw_expires = _get(node, "Expires", (int, str), "contact")
    if isinstance(raw_expires, str):
        if raw_expires in ("expired", "deleted"):
            return None
        if raw_expires != "permanent":
            raise ProxyRpcError(None, f"unexpected contact Expires {raw_expires!r:.40}")
        expires = 0
    else:
        expires = now + _int_range(raw_expires, "Expires", 0, _U32)
    callid = _text(_get(node, "Call-ID", str, "contact"), "Call-ID")
    return {
        "table": table,
        "aor": aor,
        "uri": uri,
        "expires": expires,
        "q": _q_millis(_get(node, "Q", (int, float), "contact")),
        "callid": callid,
        "cseq": _int_range(_get(node, "CSeq", int, "contact"), "CSeq", 0, _U32),
        "user_agent": _optional(node, "User-Agent"),
        "received": _optional(node, "Received"),
        "path": _optional(node, "Path"),
        "socket": _optional(node, "Socket"),
        "flags": _int_range(_get(node, "Flags", int, "contact"), "Flags", 0, _U32),
        "cflags": _int_range(_get(node, "CFlags", int, "contact"), "CFlags", 0, _U32),
        "methods": _int_range(_get(node, "Methods", int, "contact"), "Methods",
                              -(1 << 31), _U32) & _U32,
        "instance": _optional(node, "Instance"),
        "reg_id": _int_range(_get(node, "Reg-Id", int, "contact"), "Reg-Id", 0, _U32),
        "last_modified": _int_range(_get(node, "Last-Modified", int, "contact"),
                                    "Last-Modified", 0, (1 << 63) - 1),
        "ruid": _optional(node, "Ruid"),
        "keepalive": _int_range(node.get("Keepalive", 0), "Keepalive", 0, _U32),
        "loaded_by_rpc": callid == UL_ADD_CALLID,
    }


def kamailio_contact_to_record(c: Mapping[str, Any], *, handle: int, last_modified: int,
                               nat_bflag_mask: int = NAT_BFLAG_MASK) -> tuple:
    """Contact tuple of :mod:`sidecar.model` from one :func:`parse_contact` dict.

    FLAG_NAT is set when the proxy's NAT branch flag is among the cflags or a received
    address was stored (fix_nated_register only fills it for NATed phones). ``last_modified``
    (ms) and ``handle`` come from the caller: Kamailio's own Last-Modified has one-second
    resolution and is 0 for ul.add contacts.
    """
    try:
        flags = FLAG_NAT if (int(c["cflags"]) & nat_bflag_mask or c.get("received")) else 0
        return make_record(
            aor=c["aor"], uri=c["uri"], callid=c["callid"], cseq=c["cseq"],
            expires=c["expires"], handle=handle, last_modified=last_modified,
            received=c.get("received"), path=c.get("path"), socket=c.get("socket"),
            q=c.get("q", -1), user_agent=c.get("user_agent"), flags=flags,
            cflags=c.get("cflags", 0),
            methods=None if c.get("methods") is None else methods_from_kamailio(c["methods"]),
            instance=c.get("instance"), reg_id=c.get("reg_id", 0),
        )
    except (KeyError, TypeError, ValueError, ModelError) as exc:
        raise ProxyRpcError(None, f"contact cannot become a record: {exc}") from None


# --- ul.add ---------------------------------------------------------------------------------

def ul_add_params(table: str, aor: str, contact: str, *, expires: int, now: int, q: int = -1,
                  path: str | None = None, flags: int = 0, cflags: int = 0,
                  methods: int | None = None, received: str | None = None,
                  socket: str | None = None) -> list[Any] | None:
    """Positional parameters of Kamailio 5.6 ``ul.add``, or ``None`` if already expired.

    ``expires`` is absolute UNIX seconds (0 = permanent) like the rest of the sidecar; it is
    sent as seconds remaining. ``q`` is q×1000 (-1 = none); ``methods`` ``None`` means all.
    """
    for name, value in (("table", table), ("aor", aor), ("contact", contact)):
        if not isinstance(value, str) or not value.strip():
            raise ProxyRpcError(None, f"ul.add {name} must be a non-empty string")
    if not _is_int(expires) or expires < 0:
        raise ProxyRpcError(None, f"ul.add expires must be an int >= 0, got {expires!r:.40}")
    if expires == 0:
        remaining = 0
    else:
        remaining = expires - now
        if remaining <= 0:
            return None
    if not _is_int(q) or not (q == -1 or 0 <= q <= 1000):
        raise ProxyRpcError(None, f"ul.add q must be -1 or 0..1000 (q×1000), got {q!r:.40}")
    ints = {"flags": flags, "cflags": cflags,
            "methods": ALL_METHODS if methods is None else methods}
    for name, value in ints.items():
        if not _is_int(value) or not 0 <= value <= _U32:
            raise ProxyRpcError(None, f"ul.add {name} must be 0..2^32-1, got {value!r:.40}")
    return [table, aor, contact, remaining, -1 if q == -1 else q / 1000,
            _arg(path, "path"), ints["flags"], ints["cflags"], ints["methods"],
            _arg(received, "received"), _arg(socket, "socket")]


def _arg(value: str | None, name: str) -> str:
    if value is None or value == "":
        return UNSET_ARG
    if not isinstance(value, str):
        raise ProxyRpcError(None, f"ul.add {name} must be a string")
    if value in (UNSET_ARG, "0"):
        raise ProxyRpcError(None, f"ul.add {name} {value!r} would read as 'not set'")
    return value


# --- small checks ---------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise ProxyRpcError(None, f"{where} is not an object")
    if key not in obj:
        raise ProxyRpcError(None, f"{where} lacks {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProxyRpcError(None, f"{where} {key!r} has type {type(value).__name__}")
    return value


def _text(value: str, name: str) -> str:
    if len(value) > _MAX_TEXT:
        raise ProxyRpcError(None, f"contact {name} longer than {_MAX_TEXT} characters")
    return value


def _optional(node: Mapping[str, Any], key: str) -> str | None:
    value = node.get(key, NOT_SET)
    if not isinstance(value, str):
        raise ProxyRpcError(None, f"contact {key!r} has type {type(value).__name__}")
    if value in (NOT_SET, ""):
        return None
    return _text(value, key)


def _int_range(value: Any, name: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ProxyRpcError(None, f"contact {name} out of range: {value!r:.40}")
    return value


def _q_millis(value: int | float) -> int:
    if not math.isfinite(value):
        raise ProxyRpcError(None, f"contact Q is not finite: {value!r}")
    if value == -1:
        return -1
    if not 0 <= value <= 1:
        raise ProxyRpcError(None, f"contact Q out of range: {value!r}")
    return round(value * 1000)
