"""NAT keepalive ownership (DESIGN §7): only the active node keeps phones' pinholes open.

* :mod:`.targets` - contact record -> where to ping from/to (sans-I/O);
* :mod:`.scheduler` - balanced timing wheel, post-promotion sweep, loss counting (sans-I/O);
* :mod:`.messages` - CRLF / 4-byte null / SIP OPTIONS payloads and reply matching (sans-I/O);
* :mod:`.sender` - UDP sockets sharing the proxy's address, batched sends, reply reading;
* :mod:`.service` - the tick loop tying them together;
* :mod:`.proxy_pinger` - switching Kamailio's / OpenSIPS' own pinger, re-asserted periodically.
"""

from .messages import KeepaliveKind, KeepaliveMessageError, OptionsPinger
from .proxy_pinger import (
    KamailioPinger,
    OpensipsPinger,
    ProxyPingerError,
    ProxyPingingKeeper,
)
from .scheduler import Drop, KeepaliveScheduler, Ping, ReplyMode
from .sender import (
    KeepaliveSender,
    KeepaliveSocketError,
    ReplyReceiver,
    SourceSockets,
    measure_send_rate,
    measure_sender_rate,
    open_reply_socket,
    open_source_socket,
)
from .service import KeepaliveService
from .targets import PingTarget, keepalive_key, target_from_record

__all__ = [
    "Drop",
    "KamailioPinger",
    "KeepaliveKind",
    "KeepaliveMessageError",
    "KeepaliveScheduler",
    "KeepaliveSender",
    "KeepaliveService",
    "KeepaliveSocketError",
    "OpensipsPinger",
    "OptionsPinger",
    "Ping",
    "PingTarget",
    "ProxyPingerError",
    "ProxyPingingKeeper",
    "ReplyMode",
    "ReplyReceiver",
    "SourceSockets",
    "keepalive_key",
    "measure_send_rate",
    "measure_sender_rate",
    "open_reply_socket",
    "open_source_socket",
    "target_from_record",
]
