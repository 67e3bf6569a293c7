"""Sans-I/O SIP parser for REGISTER traffic (bytes in, small objects out, no sockets).

The capture and HEP sources see every SIP packet the proxy handles, but only REGISTER requests
and the responses to them change usrloc. So the parser has two speeds: :func:`sniff_method`
looks at the start line (and, for a response, the CSeq method) without parsing headers, which
lets :func:`parse_register_traffic` skip INVITEs, OPTIONS pings and their responses cheaply; and
:func:`parse_message` does the full parse of the fields a registration needs.

Public API
----------
``SipParseError(ValueError)``
    The only exception any function here raises on bad input (fuzzed with hypothesis).
``parse_message(data, *, max_size=DEFAULT_MAX_MESSAGE) -> SipRequest | SipResponse``
    Full parse of one message (a UDP datagram, or one frame cut by :func:`message_length`).
    Leading CR/LF (stream keepalives, RFC 3261 §7.5) are skipped.
``parse_register_traffic(data, *, max_size=...) -> SipRequest | SipResponse | None``
    ``None`` for keepalives (only CR/LF) and for any message whose method (request) or CSeq
    method (response) is not REGISTER; otherwise the full parse.
``sniff_method(data) -> str``
    The request method, or for a response the CSeq method, from a quick look.
``is_keepalive(data) -> bool``
    True for RFC 5626 CRLF keepalives (data made only of CR and LF bytes).
``aor_of(uri) -> str``
    The address of record of a URI, as used for ``aor`` below.
``message_length(buffer, *, max_size=DEFAULT_MAX_MESSAGE) -> int | None``
    TCP/TLS framing: the byte length of the first complete message in ``buffer`` (leading
    CR/LF keepalives included), ``None`` if more bytes are needed, ``SipParseError`` if the
    header block is invalid or the message would exceed ``max_size``. A buffer holding only
    CR/LF returns its whole length, so the caller consumes keepalives like messages.
``SipRequest`` / ``SipResponse`` (slotted dataclasses, common fields in ``SipMessage``)
    ``method``/``uri`` or ``status``/``reason``, plus ``call_id``, ``cseq``, ``cseq_method``,
    the top Via (``via_transport``, ``via_sent_by``, ``via_branch``, ``via_received``,
    ``via_rport``: ``None`` when absent, ``0`` when present without a value), ``to_uri`` (raw
    URI of To), ``aor`` (``user@host`` of the To URI: no scheme, password, port or parameters,
    host lower-cased; just the host when there is no user part; the number for ``tel:``),
    ``contacts`` (list of :class:`ContactHeader`, from every Contact header in order),
    ``contact_wildcard`` (``Contact: *``), ``expires_header``, ``path`` (every Path header's
    value, in order, joined with ``","``), ``user_agent``, ``allow`` (Allow header values joined
    with ``","``), ``content_length`` and ``body``.
``ContactHeader(uri, display, expires, q, methods, instance, reg_id, params)``
    ``expires``: the ``expires`` param or ``None``; ``q``: ``q * 1000`` or ``-1``; ``methods``:
    the unquoted ``methods`` feature param (e.g. ``"INVITE,BYE"``) or ``None``; ``instance``:
    ``+sip.instance`` unquoted, angle brackets kept (``"<urn:uuid:...>"``, as Kamailio and
    OpenSIPS store it) or ``None``; ``reg_id``: int, ``0`` when absent (the model's "none");
    ``params``: every param, lower-cased name -> raw value as written (quotes kept) or ``None``.

Header names are case-insensitive and the compact forms of RFC 3261 §7.3.3 (and the IANA
registry) are understood; folded continuation lines are joined; comma-separated lists respect
quoted strings and ``<...>``. Bare-LF line endings are accepted, a stray CR is not. The header
block is decoded as UTF-8, falling back to Latin-1 so that a phone with a Latin-1 display name
still registers. Delta-seconds larger than 2**32-1 are capped there (RFC 3261 §20.19).
Call-ID, CSeq, Via and To must be present in every message: they key the transaction and name
the AOR. Headers the registration does not need are only checked to have a token name.

Speed: a message without a body is taken to end its header block where the data ends (it does
when no header line is empty and no stray line break shows), which saves searching for the
end. The header block is split into lines once and dispatched through a dict of common name
spellings; a header's value stays a plain string unless the header repeats. Only the needed
headers are parsed, with precompiled regexes over short spans and a ``str.split`` fast path
for parameter lists. The everyday shapes (a lone ``<uri>;params`` address, a plain top Via
with its params, the request line, a ``sip:user@host`` AOR) are each first matched whole by one
stricter pattern whose every match reads the same as the general code (the tests compare the
two); anything else falls through to that. A regex call has a fixed cost, hence one per shape.
The result objects are made with ``object.__new__`` and their slots assigned: the keyword call
of a 20-field dataclass ``__init__`` alone would cost about 1 µs. No per-character Python loops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

DEFAULT_MAX_MESSAGE = 64 * 1024
MAX_DELTA_SECONDS = 2**32 - 1  # RFC 3261: larger Expires values are taken as this
MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5: the CSeq number is below 2**31
_new = object.__new__  # builds the result objects without their __init__ (see parse_message)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "ContactHeader",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "aor_of",
    "is_keepalive",
    "message_length",
    "parse_message",
    "parse_register_traffic",
    "sniff_method",
]


class SipParseError(ValueError):
    """The bytes are not a SIP message this parser can trust (the only error raised here)."""


@dataclass(slots=True)
class ContactHeader:
    """One element of a Contact header list."""

    uri: str
    display: str | None = None
    expires: int | None = None
    q: int = -1
    methods: str | None = None
    instance: str | None = None
    reg_id: int = 0
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class SipMessage:
    """Fields shared by requests and responses; see the module docstring for their meaning."""

    call_id: str
    cseq: int
    cseq_method: str
    via_transport: str
    via_sent_by: str
    via_branch: str | None
    via_received: str | None
    via_rport: int | None
    to_uri: str
    aor: str
    contacts: list[ContactHeader]
    contact_wildcard: bool
    expires_header: int | None
    path: str | None
    user_agent: str | None
    allow: str | None
    content_length: int | None
    body: bytes


@dataclass(slots=True, kw_only=True)
class SipRequest(SipMessage):
    method: str
    uri: str


@dataclass(slots=True, kw_only=True)
class SipResponse(SipMessage):
    status: int
    reason: str


# --- header names -------------------------------------------------------------------------------
# Compact forms (RFC 3261 §7.3.3 and the IANA registry). Only the ones whose long form we read
# matter for dispatch; the rest are listed so the table documents the full set.
COMPACT_FORMS = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact",
    "k": "supported", "l": "content-length", "m": "contact", "n": "identity-info",
    "o": "event", "r": "refer-to", "s": "subject", "t": "to", "u": "allow-events", "v": "via",
    "x": "session-expires", "y": "identity",
}
_WANTED = (
    "via", "call-id", "cseq", "to", "contact", "expires", "path", "user-agent", "allow",
    "content-length",
)
# Lower-cased name -> canonical name for the headers we read.
_CANONICAL: dict[str, str] = {name: name for name in _WANTED}
_CANONICAL.update({short: long for short, long in COMPACT_FORMS.items() if long in _WANTED})
# Exact spellings as phones and proxies write them -> canonical name, or "" for a well-formed
# header we skip. A hit here saves the rstrip/lower/token check that an unusual spelling costs.
_SPELLINGS: dict[str, str] = {}
for _name, _canon in _CANONICAL.items():
    for _spelling in (_name, _name.upper(), "-".join(p.capitalize() for p in _name.split("-"))):
        _SPELLINGS[_spelling] = _canon
_SPELLINGS.update({"Call-ID": "call-id", "CSeq": "cseq", "User-agent": "user-agent"})
for _name in (
    "From", "Max-Forwards", "Supported", "Authorization", "Proxy-Authorization", "Accept",
    "Accept-Language", "Accept-Encoding", "Allow-Events", "WWW-Authenticate",
    "Proxy-Authenticate", "Server", "Date", "Route", "Record-Route", "Content-Type",
    "Require", "Proxy-Require", "Min-Expires", "Event", "Organization", "X-Real-IP",
    "P-Preferred-Identity", "P-Asserted-Identity", "Session-Expires", "Timestamp", "f", "k",
    "c", "Authentication-Info", "Service-Route", "P-Associated-URI", "Unsupported",
):
    _SPELLINGS.setdefault(_name, "")
del _name, _canon, _spelling

# --- regular expressions (compiled once; each runs in C over a short span) ----------------------
_TOKEN_CHARS = r"A-Za-z0-9\-.!%*_+`'~"
_TOKEN = re.compile(f"[{_TOKEN_CHARS}]+")
_QUOTED = r'"[^"\\]*(?:\\.[^"\\]*)*"'  # unrolled: no per-character alternation
_NAME_ADDR = re.compile(
    r"[ \t]*(?:(" + _QUOTED + r')|([^<>",;]*?))[ \t]*<[ \t]*([^<>\s]+)[ \t]*>'
)
_ADDR_SPEC = re.compile(r'[ \t]*([^\s<>",;]+)')
_PARAM_BODY = r'[ \t]*;[ \t]*([^\s=;,"<>]+)[ \t]*(?:=[ \t]*(' + _QUOTED + r'|[^\s;,"<>]+))?'
_PARAM = re.compile(_PARAM_BODY)
# A run of params matched in one call; findall over the run then yields (name, value) pairs.
_PARAM_RUN = re.compile("(?:" + _PARAM_BODY.replace("(", "(?:").replace("(?:?:", "(?:") + ")*")
# Names and unquoted values of params, joined: what the regex path accepts for them.
_PLAIN_PARAM_TEXT = re.compile(r'[^\s=;,"<>]+')
# The everyday param run: no whitespace, no escapes, quoted values without ";", ending at a
# list comma or the end. Every text it matches the regex path reads the same way, so a match
# can be split with str methods; anything else takes the general path. _FAST_CHAR is printable
# ASCII but the param delimiters ``"``, ``,``, ``;``, ``<``, ``=``, ``>`` and ``\``: a
# subset of the general path's classes that the regex engine tests with a bitmap, not per-char
# Unicode lookups. Anything outside it (non-ASCII included) takes the general path.
_FAST_CHAR = r"[!#-+\--:?-\[\]-~]"
_FAST_RUN = (
    r"(?:;" + _FAST_CHAR + r'++(?:=(?:"[^"\\;]*+"|' + _FAST_CHAR + r"++))?+)*+"
)
_FAST_PARAMS = re.compile(_FAST_RUN + r"(?=[ \t]*+(?:,|\Z))")
# The everyday single address, ``<uri>`` (printable ASCII but ``<``/``>``) and such a param
# run, as a whole header value.
_FAST_NAME_ADDR = re.compile(r"<([!-;=?-~]+)>(" + _FAST_RUN + ")")
# The same as one element of a list, ending at a comma or the end.
_FAST_LIST_ELEMENT = re.compile(
    r"[ \t]*+<([!-;=?-~]+)>(" + _FAST_RUN + r")(?=[ \t]*+(?:,|\Z))"
)
_LIST_SEP = re.compile(r"[ \t]*(,)?")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S")
_VIA = re.compile(
    r"[ \t]*SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([" + _TOKEN_CHARS + r"]+)[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?",
    re.IGNORECASE,
)
# The everyday top Via (``SIP/2.0/UDP host:port;...``): case-sensitive and without LWS, and it
# must end where params or the next Via start, so any match is the one _VIA would find; the
# IGNORECASE pattern (slower, and Unicode-aware) handles the rest.
_FAST_VIA = re.compile(
    r"SIP/2\.0/([" + _TOKEN_CHARS + r"]+) (\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._]+)"
    r"(?::([0-9]{1,5}))?(?=[;,]|\Z)"
)
# The same with its param run, as far as _params_at's fast path would read it: a match is
# exactly what the general code finds, with nothing but the next Via (or the end) after it.
_FAST_TOP_VIA = re.compile(_FAST_VIA.pattern + "(" + _FAST_RUN + r")(?=[ \t]*+(?:,|\Z))")
# A scheme as _URI reads it (its characters exclude ``:``, so possessive is the same).
_URI_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*+:"
# _FAST_NAME_ADDR with the URI check folded in: a match is a lone ``<uri>;params`` whose URI
# _URI accepts, so the caller needs no further check.
_FAST_ADDRESS = re.compile(r"<(" + _URI_SCHEME + r"[!-;=?-~]+)>(" + _FAST_RUN + ")")
# The everyday request line: a match reads as _request_line reads it.
_FAST_REQUEST_START = re.compile(
    r"([" + _TOKEN_CHARS + r"]+) (" + _URI_SCHEME + r"\S[^ ]*) SIP/2\.0"
)
# A sip:/sips: URI with a user part (no escapes) and a host that is not an IPv6 reference:
# group 1 is the user and group 2 the host exactly as _aor_general cuts them.
_FAST_AOR = re.compile(r"sips?:([^:@%]+)(?::[^@]*)?@([^:;?\[][^:;?]*)")
_CSEQ = re.compile(r"([0-9]{1,10})[ \t]+([" + _TOKEN_CHARS + r"]+)")
_QVALUE = re.compile(r"(?:0(?:\.([0-9]{0,3}))?|1(?:\.0{0,3})?)")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)

# Bytes-level patterns for the cheap paths (sniffing and stream framing).
_REQUEST_LINE = re.compile(
    rb"([" + _TOKEN_CHARS.encode() + rb"]+) [^ \r\n]+ SIP/2\.0\r?\n", re.IGNORECASE
)
_STATUS_LINE = re.compile(rb"SIP/2\.0 [1-6][0-9][0-9](?: [^\r\n]*)?\r?\n", re.IGNORECASE)
_CSEQ_METHOD = re.compile(
    rb"\n[Cc][Ss][Ee][Qq][ \t]*:[ \t]*[0-9]+[ \t]+([" + _TOKEN_CHARS.encode() + rb"]+)"
)
_CONTENT_LENGTH = re.compile(rb"^(?:content-length|l)[ \t]*:([^\n]*)", re.IGNORECASE | re.M)
# Every control character but HT: CR and LF may only appear as the line breaks.
_CONTROL_BYTES = bytes([*range(0, 9), *range(10, 32), 127])
_CRLF = b"\r\n"
_LWS = " \t"


def is_keepalive(data: bytes) -> bool:
    """True when ``data`` is only CR/LF: an RFC 5626 ping (CRLFCRLF) or pong (CRLF)."""
    if type(data) is bytes and data and data[0] not in (10, 13):
        return False  # the usual message, settled by its first byte without strip's copy
    return bool(data) and not data.strip(_CRLF)


def _skip_crlf(data: bytes | bytearray) -> int:
    if data[:1] not in (b"\r", b"\n"):
        return 0  # the usual case, without the loop
    start = 0
    n = len(data)
    while start < n and data[start] in (10, 13):
        start += 1
    return start


def _find_head_end(data: bytes | bytearray, start: int, stop: int) -> tuple[int, int]:
    """``(end of header block, start of body)``, or ``(-1, -1)`` if no empty line yet.

    The first line's ending says whether the sender uses CRLF (RFC 3261) or bare LF, so only
    one terminator is searched for; a message mixing both is rejected later, line by line.
    """
    first_lf = data.find(b"\n", start, stop)
    if first_lf > start and data[first_lf - 1] == 13:
        end = data.find(b"\r\n\r\n", first_lf - 1, stop + 4)
        return (end, end + 4) if end >= 0 else (-1, -1)
    if first_lf < 0:
        return -1, -1
    end = data.find(b"\n\n", first_lf, stop + 2)
    return (end, end + 2) if end >= 0 else (-1, -1)


def sniff_method(data: bytes) -> str:
    """Method of a request, or the CSeq method of a response, without a full parse.

    Raises :class:`SipParseError` when the start line is not a SIP request or status line (or
    a response has no readable CSeq). The result is upper-cased.
    """
    start = _skip_crlf(data)
    m = _REQUEST_LINE.match(data, start)
    if m is not None:
        return m.group(1).decode("ascii").upper()
    if _STATUS_LINE.match(data, start) is None:
        raise SipParseError("not a SIP request or status line")
    m = _CSEQ_METHOD.search(data, start)
    if m is None:
        raise SipParseError("response without a CSeq header")
    return m.group(1).decode("ascii").upper()


def parse_register_traffic(
    data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE
) -> SipRequest | SipResponse | None:
    """Full parse of a REGISTER or a response to one; ``None`` for anything else.

    Keepalives and non-REGISTER messages are skipped after a glance at the start line (and the
    CSeq line for responses), so a capture on a busy proxy spends its time on registrations.
    """
    if is_keepalive(data):
        return None
    if sniff_method(data) != "REGISTER":
        return None
    return parse_message(data, max_size=max_size)


def message_length(buffer: bytes | bytearray, *, max_size: int = DEFAULT_MAX_MESSAGE) -> int | None:
    """Length of the first complete message in a stream buffer, or ``None`` if incomplete.

    Leading CR/LF keepalives are counted into the message they precede; a buffer of nothing
    but CR/LF returns its full length so the caller drops it. Content-Length frames the body
    (a missing one means no body, as lenient stacks assume). Raises :class:`SipParseError`
    when the start line is not SIP, the Content-Length is malformed or contradictory, or the
    header block or whole message would exceed ``max_size`` — the caller should then close the
    connection, since a byte stream cannot resynchronise.
    """
    n = len(buffer)
    start = _skip_crlf(buffer)
    if start == n:
        return n or None
    head_end, body_start = _find_head_end(buffer, start, start + max_size)
    if head_end < 0:
        if n - start > max_size:
            raise SipParseError(f"header block larger than {max_size} bytes")
        if buffer.find(b"\n", start) >= 0:
            _check_start_line(buffer, start)
        return None
    _check_start_line(buffer, start)
    lengths = {value.strip(b" \t\r") for value in _CONTENT_LENGTH.findall(buffer, start, head_end)}
    if len(lengths) > 1:
        raise SipParseError("conflicting Content-Length headers")
    body_len = 0
    if lengths:
        raw = lengths.pop()
        if not raw.isdigit() or len(raw) > 10:
            raise SipParseError("invalid Content-Length")
        body_len = int(raw)
    total = body_start + body_len
    if total - start > max_size:
        raise SipParseError(f"message larger than {max_size} bytes")
    if n < total:
        return None
    return total


def _check_start_line(buffer: bytes | bytearray, start: int) -> None:
    if _REQUEST_LINE.match(buffer, start) is None and _STATUS_LINE.match(buffer, start) is None:
        raise SipParseError("not a SIP request or status line")


def _head_lines(data: bytes, start: int, head_end: int, line_end: str) -> list[str] | None:
    """The lines of the header block ``data[start:head_end]``, or ``None`` if it holds a control
    character or a line break other than ``line_end``."""
    head_bytes = data[start:head_end]
    try:
        head = head_bytes.decode("utf-8")
    except UnicodeDecodeError:
        head = head_bytes.decode("latin-1")
    lines = head.split(line_end)
    # Deleting every control byte (CR and LF included) must remove exactly the line breaks:
    # anything more is a stray CR/LF or a control character inside a header.
    removed = len(head_bytes) - len(head_bytes.translate(None, _CONTROL_BYTES))
    if removed != len(line_end) * (len(lines) - 1):
        return None
    return lines


def parse_message(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE) -> SipRequest | SipResponse:
    """Parse one whole SIP message; raise :class:`SipParseError` if it is malformed."""
    if not isinstance(data, bytes):
        if not isinstance(data, bytearray | memoryview):
            raise SipParseError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
    if len(data) > max_size:
        raise SipParseError(f"message larger than {max_size} bytes")
    start = _skip_crlf(data) if data[:1] in (b"\r", b"\n") else 0
    lines = None
    if data.endswith(b"\r\n\r\n"):
        # Most messages have no body, so the header block usually ends where the data does.
        # That holds when the lines split at CRLF are clean and none is empty (an empty line
        # is an earlier end), and it saves searching for the end; otherwise search as below.
        body_start = len(data)
        lines = _head_lines(data, start, body_start - 4, "\r\n")
        if lines is not None and "" in lines:
            lines = None
    if lines is None:
        head_end, body_start = _find_head_end(data, start, len(data))
        if head_end < 0:
            raise SipParseError("no empty line after the header block")
        lines = _head_lines(data, start, head_end, "\r\n" if body_start - head_end == 4 else "\n")
        if lines is None:
            raise SipParseError("control character or stray line break in the header block")
    first = lines[0]
    del lines[0]
    # The message is made without __init__ (see "Speed" above); every field is assigned below,
    # and the tests check that the result equals one made with __init__.
    is_response = first[:8].upper() == "SIP/2.0 "
    msg = _new(SipResponse if is_response else SipRequest)
    content_length = _header_fields(lines, max_size, msg)

    body = data[body_start:]
    if content_length is not None:
        if len(body) < content_length:
            raise SipParseError("body shorter than Content-Length")
        body = body[:content_length]
    msg.body = body

    if is_response:
        status_text, _, reason = first[8:].partition(" ")
        # isdecimal, not isdigit: int() refuses digits such as "²" that isdigit accepts.
        if (
            len(status_text) != 3
            or not status_text.isdecimal()
            or not "1" <= status_text[0] <= "6"
        ):
            raise SipParseError(f"bad status code {status_text!r}")
        msg.status = int(status_text)
        msg.reason = reason
        return msg
    m = _FAST_REQUEST_START.fullmatch(first)
    method, uri = _request_line(first) if m is None else m.groups()
    if method != msg.cseq_method:
        raise SipParseError("CSeq method differs from the request method")
    msg.method = method
    msg.uri = uri
    return msg


def _request_line(first: str) -> tuple[str, str]:
    """``(method, uri)`` of a request line (the general path of ``_FAST_REQUEST_START``)."""
    parts = first.split(" ")
    if len(parts) != 3 or parts[2].upper() != "SIP/2.0":
        raise SipParseError("bad request line")
    method, uri = parts[0], parts[1]
    if _TOKEN.fullmatch(method) is None or _URI.match(uri) is None:
        raise SipParseError("bad request line")
    return method, uri


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines (starting with SP or HT) to the header line above them."""
    out: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not out:
                raise SipParseError("continuation line before the first header")
            out[-1] = out[-1] + " " + line.strip(_LWS)
        else:
            out.append(line)
    return out


def _collect_headers(
    lines: list[str],
) -> tuple[dict[str, str], dict[str, list[str]] | None] | None:
    """The headers we read: ``(first value by canonical name, repeated)``.

    ``repeated`` is ``None`` unless some header we read comes more than once; it then holds
    every value of each such header, in message order (single values are not wrapped in lists:
    most headers come once). Other header names are only checked to be tokens, all at once at
    the end. Returns ``None`` on meeting a continuation line, so unfolding costs nothing for
    the usual unfolded message.
    """
    values: dict[str, str] = {}
    repeated: dict[str, list[str]] | None = None
    unusual: list[str] = []
    spelling = _SPELLINGS.get
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            if line[:1] in (" ", "\t"):
                return None
            raise SipParseError("header line without a colon")
        canon = spelling(name)
        if canon is None:
            if name[:1] in (" ", "\t"):
                return None  # a folded line: the caller unfolds and asks again
            key = name.rstrip(_LWS).lower()
            canon = _CANONICAL.get(key)
            if canon is None:
                if not key:
                    raise SipParseError("empty header name")
                unusual.append(key)
                continue
        elif not canon:
            continue
        if canon not in values:
            values[canon] = value.strip(_LWS)
        elif repeated is None:
            repeated = {canon: [values[canon], value.strip(_LWS)]}
        elif canon in repeated:
            repeated[canon].append(value.strip(_LWS))
        else:
            repeated[canon] = [values[canon], value.strip(_LWS)]
    if unusual and _TOKEN.fullmatch("".join(unusual)) is None:
        raise SipParseError("bad header name")
    return values, repeated


def _only(found: list[str], name: str) -> str:
    """The value of a header that must not differ between its copies (``found`` is not empty)."""
    if len(found) > 1 and any(v != found[0] for v in found):
        raise SipParseError(f"conflicting {name} headers")
    return found[0]


def _header_fields(lines: list[str], max_size: int, msg: SipMessage) -> int | None:
    """Set the :class:`SipMessage` fields (all but ``body``) of ``msg`` from the header lines.

    Returns the Content-Length (``None`` when absent) for the caller to cut the body with.
    """
    collected = _collect_headers(lines)
    if collected is None:
        collected = _collect_headers(_unfold(lines))
        if collected is None:
            raise SipParseError("folded header line")
    values, repeated = collected
    get = values.get
    call_id = get("call-id")
    if repeated and "call-id" in repeated:
        call_id = _only(repeated["call-id"], "call-id")
    if not call_id or len(call_id.split()) != 1:
        raise SipParseError("missing or bad Call-ID")
    found = get("cseq")
    if found is None:
        raise SipParseError("missing CSeq")
    if repeated and "cseq" in repeated:
        found = _only(repeated["cseq"], "cseq")
    m = _CSEQ.fullmatch(found)
    if m is None:
        raise SipParseError("bad CSeq")
    cseq_text, cseq_method = m.groups()
    cseq = int(cseq_text)
    if cseq > MAX_CSEQ:
        raise SipParseError("bad CSeq")
    found = get("to")
    if found is None:
        raise SipParseError("missing To")
    if repeated and "to" in repeated:
        found = _only(repeated["to"], "to")
    m = _FAST_ADDRESS.fullmatch(found)
    if m is not None:  # the To params are only checked, and a fast match is a valid run
        to_uri = m.group(1)
    else:
        to_list = _parse_address_list(found, "To")
        if len(to_list) != 1:
            raise SipParseError("To must hold one address")
        to_uri = to_list[0][1]
    top_via = get("via")  # the first Via header holds the top Via
    if top_via is None:
        raise SipParseError("missing Via")
    content_length = None
    found = get("content-length")
    if found is not None:
        if repeated and "content-length" in repeated:
            found = _only(repeated["content-length"], "content-length")
        if found == "0":
            content_length = 0
        elif not _is_digits(found) or len(found) > 10 or int(found) > max_size:
            raise SipParseError("bad Content-Length")
        else:
            content_length = int(found)
    expires_text = get("expires")
    if repeated and "expires" in repeated:
        expires_text = _only(repeated["expires"], "expires")
    found = get("contact")
    if found is None:
        contacts, wildcard = [], False
    elif repeated and "contact" in repeated:
        contacts, wildcard = _parse_contacts(repeated["contact"])
    else:
        m = _FAST_ADDRESS.fullmatch(found)
        if m is not None:  # what _parse_contacts reads from a lone ``<uri>;params``
            uri, run = m.groups()
            contacts = [_contact_from(None, uri, _split_fast_run(run) if run else {})]
            wildcard = False
        else:
            contacts, wildcard = _parse_contacts([found])
    msg.call_id = call_id
    msg.cseq = cseq
    msg.cseq_method = cseq_method
    msg.to_uri = to_uri
    msg.aor = aor_of(to_uri)
    msg.contacts = contacts
    msg.contact_wildcard = wildcard
    msg.expires_header = None if expires_text is None else _delta_seconds(expires_text)
    found = get("path")
    if found is None:
        msg.path = None
    elif repeated and "path" in repeated:
        msg.path = _join_path(repeated["path"])
    else:
        if _FAST_ADDRESS.fullmatch(found) is None:
            _parse_address_list(found, "Path")  # only checked
        msg.path = found
    found = get("user-agent")
    if repeated and "user-agent" in repeated:
        found = _only(repeated["user-agent"], "user-agent")
    msg.user_agent = found or None
    found = get("allow")
    msg.allow = ",".join(repeated["allow"]) if repeated and "allow" in repeated else found
    msg.content_length = content_length
    (
        msg.via_transport, msg.via_sent_by, msg.via_branch, msg.via_received, msg.via_rport
    ) = _parse_top_via(top_via)
    return content_length


def _is_digits(text: str) -> bool:
    """``[0-9]+`` without a regex call: ``isdigit`` alone would take other scripts' digits."""
    return text.isascii() and text.isdigit()


# --- field parsers ------------------------------------------------------------------------------
def _delta_seconds(text: str) -> int:
    if not (text.isascii() and text.isdigit()):  # _is_digits, inline
        raise SipParseError(f"bad delta-seconds {text[:20]!r}")
    if len(text) > 10:  # keeps int() clear of its digit limit on hostile input
        text = text.lstrip("0") or "0"
        if len(text) > 10:
            return MAX_DELTA_SECONDS
    return min(int(text), MAX_DELTA_SECONDS)


def _qvalue(text: str) -> int:
    m = _QVALUE.fullmatch(text)
    if m is None:
        raise SipParseError(f"bad q value {text[:20]!r}")
    if text[0] == "1":
        return 1000
    return int((m.group(1) or "").ljust(3, "0"))


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
        if "\\" in text:
            text = _UNESCAPE.sub(r"\1", text)
    return text


def _params_at(value: str, pos: int) -> tuple[dict[str, str | None], int]:
    """The ``;name[=value]`` run starting at ``pos`` and the position after it."""
    m = _FAST_PARAMS.match(value, pos)
    if m is not None:
        end = m.end()
        return (_split_fast_run(value[pos:end]) if end != pos else {}), end
    if "," not in value and "\\" not in value:
        params = _split_params(value[pos:])
        if params is not None:
            return params, len(value)
    end = _PARAM_RUN.match(value, pos).end()
    if end == pos:
        return {}, pos
    return {name.lower(): raw or None for name, raw in _PARAM.findall(value, pos, end)}, end


def _split_fast_run(run: str) -> dict[str, str | None]:
    """Params from a non-empty text that ``_FAST_RUN`` matched whole (so no checks needed)."""
    params: dict[str, str | None] = {}
    for piece in run[1:].split(";"):
        name, eq, raw = piece.partition("=")
        params[name.lower()] = raw if eq else None
    return params


def _split_params(rest: str) -> dict[str, str | None] | None:
    """Fast path of :func:`_params_at` for a last list element: plain ``str.split``.

    Returns ``None`` whenever the text is not exactly what the regex path would accept (a
    quoted value holding ``;``, stray characters, empty names), so that path decides.
    """
    pieces = rest.split(";")
    if pieces[0].strip(_LWS):
        return None
    params: dict[str, str | None] = {}
    plain: list[str] = []
    for piece in pieces[1:]:
        name, eq, raw = piece.partition("=")
        name = name.strip(_LWS)
        if not name:
            return None
        plain.append(name)
        if not eq:
            params[name.lower()] = None
            continue
        raw = raw.strip(_LWS)
        if not raw:
            return None
        if '"' in raw:
            if raw[0] != '"' or raw[-1] != '"' or raw.count('"') != 2:
                return None
        else:
            plain.append(raw)
        params[name.lower()] = raw
    if plain and _PLAIN_PARAM_TEXT.fullmatch("".join(plain)) is None:
        return None
    return params


def _parse_address_list(
    value: str, header: str
) -> list[tuple[str | None, str, dict[str, str | None]]]:
    """Split a name-addr/addr-spec list into ``(display, uri, params)`` triples.

    Params after an addr-spec belong to the header (RFC 3261 §20.10), so in both forms the
    params dict holds the header params; URI params stay inside the URI.
    """
    m = _FAST_NAME_ADDR.fullmatch(value)
    if m is not None:  # the usual lone ``<uri>;params``: what the loop below would read
        uri, run = m.group(1, 2)
        if _URI.match(uri) is None:
            raise SipParseError(f"bad URI in {header}")
        return [(None, uri, _split_fast_run(run) if run else {})]
    out: list[tuple[str | None, str, dict[str, str | None]]] = []
    pos = 0
    n = len(value)
    while True:
        m = _FAST_LIST_ELEMENT.match(value, pos)
        if m is not None:  # ``<uri>;params`` as in the lone case above
            uri, run = m.group(1, 2)
            display = None
        else:
            run = None
            m = _NAME_ADDR.match(value, pos)
            if m is not None:
                quoted, token, uri = m.group(1, 2, 3)
                display = _unquote(quoted) if quoted is not None else (token.strip(_LWS) or None)
            else:
                m = _ADDR_SPEC.match(value, pos)
                if m is None:
                    raise SipParseError(f"bad address in {header}")
                display, uri = None, m.group(1)
        if _URI.match(uri) is None:
            raise SipParseError(f"bad URI in {header}")
        if run is None:
            params, pos = _params_at(value, m.end())
        else:
            params, pos = (_split_fast_run(run) if run else {}), m.end()
        out.append((display, uri, params))
        if pos == n:
            return out
        sep = _LIST_SEP.match(value, pos)
        pos = sep.end()
        if sep.group(1) is None:
            if pos != n:
                raise SipParseError(f"junk after an address in {header}")
            return out


def _parse_contacts(values: list[str] | None) -> tuple[list[ContactHeader], bool]:
    if values is None:
        return [], False
    contacts: list[ContactHeader] = []
    wildcard = False
    for value in values:
        if value == "*":
            wildcard = True
            continue
        for display, uri, params in _parse_address_list(value, "Contact"):
            contacts.append(_contact_from(display, uri, params))
    if wildcard and contacts:
        raise SipParseError("Contact * mixed with other contacts")
    return contacts, wildcard


def _contact_from(display: str | None, uri: str, params: dict[str, str | None]) -> ContactHeader:
    # Made without __init__, like the messages (see parse_message); every field is set.
    contact = _new(ContactHeader)
    contact.uri = uri
    contact.display = display
    contact.params = params
    if not params:
        contact.expires = contact.methods = contact.instance = None
        contact.q = -1
        contact.reg_id = 0
        return contact
    expires = params.get("expires")
    if expires is None:
        if "expires" in params:
            raise SipParseError("expires param without a value")
    elif expires.isascii() and expires.isdigit() and len(expires) <= 10:
        expires = min(int(expires), MAX_DELTA_SECONDS)  # what _delta_seconds makes of it
    else:
        expires = _delta_seconds(_unquote(expires))
    contact.expires = expires
    reg_id = params.get("reg-id")
    if reg_id is None:
        contact.reg_id = 0
    elif reg_id.isascii() and reg_id.isdigit() and len(reg_id) <= 10 and int(reg_id) <= MAX_CSEQ:
        contact.reg_id = int(reg_id)
    else:
        raise SipParseError("bad reg-id")
    q = params.get("q")
    contact.q = -1 if q is None else _qvalue(q)
    methods = params.get("methods")
    contact.methods = None if methods is None else _unquote(methods)
    instance = params.get("+sip.instance")
    contact.instance = None if instance is None else (_unquote(instance) or None)
    return contact


def _parse_top_via(value: str) -> tuple[str, str, str | None, str | None, int | None]:
    """``(transport, sent-by, branch, received, rport)`` of the first Via in ``value``."""
    m = _FAST_TOP_VIA.match(value)
    if m is not None:  # the everyday Via: no LWS, the plain param run read by _params_at
        transport, host, port, run = m.groups()
        if port is not None and len(port) == 5 and int(port) > 65535:
            raise SipParseError("bad Via port")
        params = _split_fast_run(run) if run else {}
    else:
        transport, host, port, params = _top_via_general(value)
    rport: int | None = None
    if "rport" in params:
        raw = params["rport"]
        if raw is None:
            rport = 0
        elif not _is_digits(raw) or len(raw) > 5 or int(raw) > 65535:
            raise SipParseError("bad rport")
        else:
            rport = int(raw)
    return (
        transport.upper(),
        host if port is None else f"{host}:{port}",
        params.get("branch"),
        params.get("received"),
        rport,
    )


def _top_via_general(value: str) -> tuple[str, str, str | None, dict[str, str | None]]:
    """``(transport, host, port, params)`` of the top Via: the general path of _FAST_TOP_VIA."""
    m = _FAST_VIA.match(value) or _VIA.match(value)
    if m is None:
        raise SipParseError("bad Via")
    transport, host, port = m.group(1, 2, 3)
    if port is not None and int(port) > 65535:
        raise SipParseError("bad Via port")
    params, pos = _params_at(value, m.end())
    if pos != len(value):
        sep = _LIST_SEP.match(value, pos)
        if sep.group(1) is None and sep.end() != len(value):
            raise SipParseError("junk in the top Via")
    return transport, host, port, params


def _join_path(values: list[str] | None) -> str | None:
    if not values:
        return None
    for value in values:
        _parse_address_list(value, "Path")
    return ",".join(values)


def aor_of(uri: str) -> str:
    """Address of record of a SIP/SIPS/TEL URI: ``user@host`` (or ``host``, or the number).

    The user part may legally hold ``;`` and ``?`` (RFC 3261 §25.1 user-unreserved), so the
    URI is split at ``@`` first and parameters are cut from the host part only. Like the
    Kamailio/OpenSIPS registrars, ``%XX`` escapes in the user part are decoded and the host is
    lower-cased; the user part otherwise keeps its case.
    """
    m = _FAST_AOR.match(uri)
    if m is None:
        return _aor_general(uri)
    user, host = m.groups()  # the everyday ``sip:user@host...``, cut as _aor_general cuts it
    return f"{user}@{host.lower()}"


def _aor_general(uri: str) -> str:
    """:func:`aor_of` for any URI (the general path of ``_FAST_AOR``)."""
    scheme, colon, rest = uri.partition(":")
    if not colon or not scheme:
        raise SipParseError("URI without a scheme")
    userinfo, at, hostport = rest.partition("@")
    if not at:
        hostport, userinfo = rest, ""
    for stop in (";", "?"):
        cut = hostport.find(stop)
        if cut >= 0:
            hostport = hostport[:cut]
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise SipParseError("unterminated IPv6 reference")
        host = hostport[: close + 1]
    else:
        host = hostport.partition(":")[0]
    if not host:
        raise SipParseError("URI without a host")
    user = userinfo.partition(":")[0]
    if at and not user:
        raise SipParseError("URI with an empty user part")
    if "%" in user:
        user = unquote(user, errors="replace")
        if not user.isprintable():
            raise SipParseError("escaped control character in the user part")
    if scheme.lower() == "tel":
        return host
    return f"{user}@{host.lower()}" if user else host.lower()
