"""SIP message handling for the capture and HEP sources (sans-I/O).

:mod:`sidecar.sip.parser` turns bytes into :class:`SipRequest`/:class:`SipResponse` objects
(one error type, :class:`SipParseError`); :mod:`sidecar.sip.registration` pairs REGISTERs with
their final responses and reports each successful registration as a
:class:`RegistrationOutcome`.
"""

from sidecar.sip.parser import (
    DEFAULT_MAX_MESSAGE,
    ContactHeader,
    SipMessage,
    SipParseError,
    SipRequest,
    SipResponse,
    aor_of,
    is_keepalive,
    message_length,
    parse_message,
    parse_register_traffic,
    sniff_method,
)
from sidecar.sip.registration import (
    Binding,
    RegistrationOutcome,
    RegistrationTracker,
    TrackerStats,
    binding_flags,
    format_received,
    format_socket,
    methods_bitmask,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "Binding",
    "ContactHeader",
    "RegistrationOutcome",
    "RegistrationTracker",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "TrackerStats",
    "aor_of",
    "binding_flags",
    "format_received",
    "format_socket",
    "is_keepalive",
    "message_length",
    "methods_bitmask",
    "parse_message",
    "parse_register_traffic",
    "sniff_method",
]
