"""Turn a contact record into a keepalive target: where to ping it from and to (sans-I/O).

A NATed contact's pinhole is the pair (proxy socket, phone's public address): the phone sent its
REGISTER from ``RECEIVED`` to the proxy's ``SOCKET``, and a NAT only lets packets back in along
that pair (a restricted-cone NAT checks the source address, a port-restricted one also the port).
So a keepalive must go to ``RECEIVED`` *from* ``SOCKET``; the contact URI only names the phone
in an OPTIONS Request-URI.

Only UDP contacts are pinged by the sidecar. A TCP/TLS/WS contact's pinhole is the proxy's own
connection, which the sidecar cannot write to (and which dies with the proxy on failover, so the
phone reconnects anyway); RFC 5626 phones keep such flows alive themselves with CRLF pings.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple

from sidecar.model import AOR, CALLID, CSEQ, FLAG_NAT, FLAGS, RECEIVED, SOCKET, URI, rec_bid

__all__ = [
    "Address",
    "PingKey",
    "PingTarget",
    "TargetError",
    "keepalive_key",
    "parse_sip_hostport",
    "parse_socket",
    "target_from_record",
]

Address = tuple[str, int]  # (IP literal, port); IPv6 without brackets
PingKey = tuple[str, str]  # (aor, binding id) - the store's key of a binding

_DEFAULT_PORTS = {"sip": 5060, "sips": 5061}
MAX_FIELD = 2048  # longer URI/socket strings are not something a proxy stored
# Source addresses are shared by thousands of contacts: one tuple each lets the sender see
# "same source as the previous ping" by identity.
_SOURCES: dict[Address, Address] = {}
_SOCKETS: dict[str, tuple[str, str, int]] = {}  # parse_socket answers by socket string
_SOURCES_LIMIT = 4096


class TargetError(ValueError):
    """A RECEIVED/URI/SOCKET value that names no pingable IP address and port."""


class PingTarget(NamedTuple):
    """Everything needed to ping one binding (a plain tuple: cheap and GC-untracked).

    ``source`` is ``None`` when the record carries no socket (e.g. an OpenSIPS peer replica);
    the sender then uses its configured default source. ``callid``/``cseq`` name the version
    that was scheduled, so a drop can be replicated as a delete that loses to any newer
    REGISTER of the same phone.
    """

    uri: str
    dest: Address
    source: Address | None
    callid: str
    cseq: int


def keepalive_key(rec: tuple) -> PingKey:
    return (rec[AOR], rec_bid(rec))


def _ip_literal(host: str) -> str:
    """The canonical text of an IP literal. Dotted IPv4 (nearly every phone) takes the C
    ``inet_pton`` path, which accepts exactly the canonical form (no leading zeros, four
    decimal parts); everything else goes through :mod:`ipaddress`."""
    if ":" not in host:
        try:
            socket.inet_pton(socket.AF_INET, host)
        except (OSError, ValueError):
            raise TargetError(f"{host!r} is not an IP address") from None
        return host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise TargetError(f"{host!r} is not an IP address") from None


def _port(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise TargetError(f"bad port {text!r} in {what}")
    port = int(text)
    if not 0 < port < 65536:
        raise TargetError(f"port {port} out of range in {what}")
    return port


def parse_sip_hostport(uri: str) -> tuple[str, int, str]:
    """``sip:[user@]host[:port][;params]`` -> (IP, port, transport), transport lower-case.

    The host must be an IP literal: a keepalive target is a NAT's public address, never a name
    to resolve. The default port follows the scheme (5060 sip, 5061 sips).
    """
    if not isinstance(uri, str) or len(uri) > MAX_FIELD:
        raise TargetError("URI missing or too long")
    text = uri.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise TargetError(f"{uri!r} is not a sip: or sips: URI")
    rest = rest.partition("?")[0]
    at = rest.rfind("@")
    hostport_params = rest[at + 1:] if at >= 0 else rest
    hostport, _, params = hostport_params.partition(";")
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise TargetError(f"unclosed IPv6 reference in {uri!r}")
        host, tail = hostport[1:end], hostport[end + 1:]
        if tail and not tail.startswith(":"):
            raise TargetError(f"junk after IPv6 reference in {uri!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = hostport.partition(":")
    ip = _ip_literal(host)
    port = _port(port_text, uri) if port_text else _DEFAULT_PORTS[scheme]
    transport = "tls" if scheme == "sips" else "udp"
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "transport" and value:
            transport = value.strip().lower()
    return ip, port, transport


def parse_socket(value: str) -> tuple[str, str, int]:
    """Proxy socket ``proto:IP:PORT`` (IPv6 bracketed or not) -> (proto, IP, port).

    A proxy has a handful of sockets shared by every contact, so answers are remembered
    (bounded): rebuilding the wheel of 100,000 contacts parses the same few strings."""
    if type(value) is str:
        known = _SOCKETS.get(value)
        if known is not None:
            return known
    parsed = _parse_socket(value)
    if len(_SOCKETS) < _SOURCES_LIMIT:
        _SOCKETS[value] = parsed
    return parsed


def _parse_socket(value: str) -> tuple[str, str, int]:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise TargetError("socket missing or too long")
    proto, sep, rest = value.strip().partition(":")
    if not sep:
        raise TargetError(f"socket {value!r} lacks proto:")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise TargetError(f"socket {value!r} lacks a port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return proto.lower(), _ip_literal(host), _port(port_text, value)


def target_from_record(rec: tuple, *, require_nat: bool = True) -> PingTarget | None:
    """The ping target of a contact record, or ``None`` when the sidecar must not ping it.

    ``None`` for: contacts without the NAT flag (unless ``require_nat`` is False), non-UDP
    contacts (see the module docstring), and contacts whose address is not an IP literal or is
    malformed (nothing sensible to send to; the proxy's own pinger would fail the same way).
    """
    if require_nat and not rec[FLAGS] & FLAG_NAT:
        return None
    try:
        dest_field = rec[RECEIVED] or rec[URI]
        ip, port, transport = parse_sip_hostport(dest_field)
        if transport != "udp":
            return None
        source = None
        if rec[SOCKET]:
            proto, sip, sport = parse_socket(rec[SOCKET])
            if proto != "udp":
                return None
            source = (sip, sport)
            source = _SOURCES.get(source) or source
            if len(_SOURCES) < _SOURCES_LIMIT:
                _SOURCES.setdefault(source, source)
    except TargetError:
        return None
    if source is not None and (":" in source[0]) != (":" in ip):
        return None  # IPv4 socket, IPv6 phone (or the reverse): no such path
    return PingTarget(rec[URI], (ip, port), source, rec[CALLID], rec[CSEQ])
