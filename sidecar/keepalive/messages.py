"""Keepalive payloads and reply matching (sans-I/O: bytes in, bytes or ids out).

Three kinds, as the proxies send them:

* ``crlf`` - RFC 5626 §4.4.1 "ping": a double CRLF. Over TCP the answer ("pong") is a single
  CRLF; over UDP RFC 5626 uses STUN, so phones rarely answer - the only usable evidence is any
  packet coming back from the phone's address (``ReplyMode.ADDRESS``).
* ``null`` - four zero bytes, what Kamailio/OpenSIPS nathelper send for plain UDP pinging.
  Never answered; it only refreshes the pinhole.
* ``options`` - a SIP OPTIONS like nathelper's ``sipping`` (see
  shared/opensips-samples/sip/nathelper_OPTIONS_ping.txt). Every response, whatever its status,
  proves the phone and the pinhole alive. Replies are matched by Call-ID, which carries this
  process's tag and the scheduler's ping id in hex: ``ka<tag>-<id>``.

Where OPTIONS replies go is decided by the Via ``sent-by`` (RFC 3261 §18.2.2: a response goes to
the request's source IP and the Via port, unless ``rport`` asks for the source port): with the
proxy's own port in Via the proxy receives them, with the sidecar's reply port they come to the
sidecar. See ``sender.py`` for how the daemon uses that.
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum

from sidecar.sip.parser import SipParseError, SipResponse, is_keepalive, parse_message

from .targets import Address

__all__ = [
    "CRLF_PING",
    "CRLF_PONG",
    "NULL_PING",
    "KeepaliveKind",
    "KeepaliveMessageError",
    "OptionsPinger",
    "is_pong",
    "static_payload",
]

CRLF_PING = b"\r\n\r\n"
CRLF_PONG = b"\r\n"
NULL_PING = b"\x00\x00\x00\x00"
MAX_REPLY = 64 * 1024
MAX_URI = 1024
_MAX_ID_DIGITS = 16  # a 64-bit ping id in hex
# The everyday reply to one of our pings, checked without a full parse (see OptionsPinger.match):
# a plain status line, and exactly one Call-ID and one CSeq line in the header block.
_QUICK_STATUS = re.compile(rb"SIP/2\.0 [1-6][0-9][0-9] [^\r\n]*\r\n")
_QUICK_CALL_ID = re.compile(rb"\n(?i:call-id|i)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r")
_QUICK_CSEQ = re.compile(rb"\n(?i:cseq)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r")
_QUICK_OUR_CSEQ = re.compile(rb"1[ \t]+OPTIONS")  # we always send "CSeq: 1 OPTIONS"


class KeepaliveKind(StrEnum):
    CRLF = "crlf"
    NULL = "null"
    OPTIONS = "options"


class KeepaliveMessageError(ValueError):
    """A keepalive that cannot be built from these values, or a reply that is not valid SIP
    (the only error raised in this module)."""


def static_payload(kind: KeepaliveKind | str) -> bytes:
    """The fixed payload of a ``crlf`` or ``null`` keepalive (built once, sent as is)."""
    kind = KeepaliveKind(kind)
    if kind is KeepaliveKind.CRLF:
        return CRLF_PING
    if kind is KeepaliveKind.NULL:
        return NULL_PING
    raise KeepaliveMessageError("OPTIONS keepalives differ per ping; use OptionsPinger.build")


def is_pong(data: bytes) -> bool:
    """RFC 5626 pong (or ping) on a stream: nothing but CR/LF."""
    return is_keepalive(data)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _check_uri(uri: str) -> str:
    # A URI from a replicated record goes into our packet verbatim: refuse anything that would
    # break the message (CR/LF, spaces, angle brackets) instead of sending garbage.
    if (not isinstance(uri, str) or not uri or len(uri) > MAX_URI or not uri.isprintable()
            or not uri.isascii() or " " in uri or "<" in uri or ">" in uri):
        raise KeepaliveMessageError(f"unusable URI for OPTIONS: {uri!r:.80}")
    return uri


class OptionsPinger:
    """Builds OPTIONS keepalives and recognises the replies to them.

    ``from_uri``: set it to the proxy's ``sipping_from`` so the pings look like the proxy's own
    (the phone sees one pinger whichever node is active). ``tag`` tells this process's pings
    from anyone else's (random by default, like nathelper's).
    """

    def __init__(self, *, from_uri: str = "sip:pinger@sidecar.invalid", tag: str | None = None,
                 user_agent: str | None = None) -> None:
        self.from_uri = _check_uri(from_uri)
        self.tag = tag if tag is not None else secrets.token_hex(4)
        if not self.tag or not self.tag.isalnum() or not self.tag.isascii() or len(self.tag) > 32:
            raise KeepaliveMessageError("tag must be 1-32 ASCII letters/digits")
        self._callid_prefix = f"ka{self.tag}-"
        self._prefix_bytes = self._callid_prefix.encode()
        if user_agent is not None and (not user_agent.isprintable() or len(user_agent) > 200):
            raise KeepaliveMessageError("user agent must be one printable line")
        self._tail = ("CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                      + (f"User-Agent: {user_agent}\r\n" if user_agent else "")
                      + "Content-Length: 0\r\n\r\n")

    def call_id(self, ping_id: int) -> str:
        return f"{self._callid_prefix}{ping_id:x}"

    def build(self, ping_id: int, uri: str, via: Address) -> bytes:
        """OPTIONS ``uri`` with ``via`` (IP, port) as Via sent-by: where the reply will go."""
        _check_uri(uri)
        hexid = f"{ping_id:x}"
        return (
            f"OPTIONS {uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {_host(via[0])}:{via[1]};branch=z9hG4bKka{self.tag}.{hexid}\r\n"
            f"From: <{self.from_uri}>;tag={self.tag}\r\n"
            f"To: <{uri}>\r\n"
            f"Call-ID: {self._callid_prefix}{hexid}\r\n"
            f"{self._tail}"
        ).encode()

    def ping_id_of(self, call_id: str) -> int | None:
        """The ping id a Call-ID of ours carries, or None if it is not one of ours."""
        if not call_id.startswith(self._callid_prefix):
            return None
        digits = call_id[len(self._callid_prefix):]
        if not 0 < len(digits) <= _MAX_ID_DIGITS:
            return None
        try:
            return int(digits, 16)
        except ValueError:
            return None

    def match(self, data: bytes) -> int | None:
        """Ping id answered by the datagram ``data``, or None when it is not a response to one
        of our OPTIONS (a request, a keepalive, someone else's transaction).

        Raises KeepaliveMessageError for a response that is not valid SIP.
        """
        if len(data) > MAX_REPLY:
            raise KeepaliveMessageError(f"reply of {len(data)} bytes exceeds {MAX_REPLY}")
        if data[:4].upper() != b"SIP/":
            return None  # requests and keepalives: cheap reject without parsing
        if self._prefix_bytes not in data:
            return None  # no Call-ID of ours anywhere: someone else's transaction
        quick = self._quick_match(data)
        if quick is not None:
            return quick
        try:
            msg = parse_message(data, max_size=MAX_REPLY)
        except SipParseError as exc:
            raise KeepaliveMessageError(f"bad SIP reply: {exc}") from None
        if not isinstance(msg, SipResponse) or msg.cseq_method != "OPTIONS":
            return None
        return self.ping_id_of(msg.call_id)

    def _quick_match(self, data: bytes) -> int | None:
        """The ping id of an everyday reply, or None to let the full parser decide.

        Accepts only a CRLF header block with a plain status line, no folded lines, exactly
        one Call-ID (ours) and exactly one CSeq (``1 OPTIONS``, as we sent it). Other headers
        are not checked: like nathelper's reply filter, an answer proves the phone alive.
        """
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0 or _QUICK_STATUS.match(data) is None:
            return None
        head = data[:head_end + 2]
        if b"\r\n " in head or b"\r\n\t" in head or head.count(b"\n") != head.count(b"\r\n"):
            return None
        call_ids = _QUICK_CALL_ID.findall(head)
        cseqs = _QUICK_CSEQ.findall(head)
        if len(call_ids) != 1 or len(cseqs) != 1 or _QUICK_OUR_CSEQ.fullmatch(cseqs[0]) is None:
            return None
        call_id = call_ids[0]
        prefix = self._prefix_bytes
        digits = call_id[len(prefix):]
        if (not call_id.startswith(prefix) or not 0 < len(digits) <= _MAX_ID_DIGITS
                or not digits.isalnum() or not digits.isascii()):
            return None
        try:
            return int(digits, 16)
        except ValueError:
            return None
