"""Asyncio client for Kamailio's JSON-RPC server (``jsonrpcs``), over HTTP or the FIFO.

The sidecar uses it to read the location table (``ul.dump``), warm-load contacts into a
standby Kamailio (``ul.add``), remove them, and switch nathelper's own NAT pinger on the active
node only (``nathelper.enable_ping``). Message formats and parsing live in
:mod:`sidecar.proxy.kamailio_dump`; this module only moves bytes.

Two transports, same results:

* **HTTP**: POST to the xhttp URL (``http://127.0.0.1:5071/RPC`` with kamailio-cfg). Kamailio
  answers errors with HTTP 500 and a JSON-RPC error body, so the body is read whatever the
  status.
* **FIFO**: the request, with a ``reply_name`` member, is written to Kamailio's FIFO
  (``kamailio_rpc.fifo`` in its runtime dir); Kamailio opens ``fifo_reply_dir + reply_name``,
  writes the JSON reply and closes it. We create that reply FIFO and open it for reading
  *before* sending (Kamailio gives up after ~0.3 s if nobody reads), then read to EOF.
  The reply dir must be the ``fifo_reply_dir`` configured in Kamailio (with its trailing
  "/").

The byte moving itself (timeouts, size caps, the FIFO round trip) is shared with the OpenSIPS
client in :mod:`sidecar.proxy.transport`.

Every failure - connection refused, timeout, missing FIFO, Kamailio error reply, malformed
reply - raises :class:`ProxyRpcError`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar import model
from sidecar.proxy.kamailio_dump import (
    FIFO_MAX_REPLY_PATH,
    LOOKUP_EMPTY_MESSAGES,
    NAT_BFLAG_MASK,
    SIPPING_BFLAG_MASK,
    ProxyRpcError,
    decode_response,
    encode_request,
    kamailio_contact_to_record,
    methods_to_kamailio,
    parse_ul_dump,
    parse_ul_lookup,
    ul_add_params,
)
from sidecar.proxy.transport import FifoRoundTrip, HttpPost

__all__ = [
    "NAT_BFLAG_MASK",
    "FifoTransport",
    "HttpTransport",
    "KamailioRpc",
    "ProxyRpcError",
    "kamailio_contact_to_record",
]

DEFAULT_TIMEOUT = 5.0
# ul.dump of a big table is large (about 550 bytes per contact); refuse anything beyond this.
DEFAULT_MAX_REPLY = 256 * 1024 * 1024


class HttpTransport:
    """POSTs JSON-RPC bodies to Kamailio's xhttp listener."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.url = url
        self.timeout = timeout
        self.max_reply = max_reply
        # Kamailio drops the connection when it cannot build a reply, typically a big ul.dump
        # that does not fit its private memory (raise it with -M): "closed the connection".
        self._http = HttpPost(url, proxy="Kamailio", label="Kamailio RPC", error=ProxyRpcError,
                              max_reply=max_reply)

    async def exchange(self, method: str, params: Sequence[Any], request_id: int) -> bytes:
        body = encode_request(method, params, request_id)
        _status, reply = await self._http.post(body, self.timeout)  # errors come as HTTP 500
        return reply

    async def close(self) -> None:
        await self._http.close()


class FifoTransport:
    """Writes JSON-RPC requests to Kamailio's FIFO and reads the answer from a reply FIFO."""

    def __init__(self, fifo_path: str | os.PathLike[str], reply_dir: str | os.PathLike[str],
                 *, timeout: float = DEFAULT_TIMEOUT, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.fifo_path = Path(fifo_path)
        self.reply_dir = Path(reply_dir)
        self.timeout = timeout
        self.max_reply = max_reply
        self._fifo = FifoRoundTrip(fifo_path, reply_dir, proxy="Kamailio", label="Kamailio FIFO",
                                   error=ProxyRpcError, max_reply=max_reply)

    async def exchange(self, method: str, params: Sequence[Any], request_id: int) -> bytes:
        def frame(name: str) -> bytes:
            # Kamailio concatenates fifo_reply_dir and the name into a 128-byte buffer.
            if len(str(self.reply_dir)) + 1 + len(name) > FIFO_MAX_REPLY_PATH:
                raise ProxyRpcError(None, f"reply FIFO path in {self.reply_dir} is too long for "
                                          f"Kamailio (max {FIFO_MAX_REPLY_PATH} bytes)")
            # At most PIPE_BUF bytes (encode_request refuses more), so one atomic write.
            return encode_request(method, params, request_id, reply_name=name)

        return await self._fifo.exchange(frame, self.timeout)

    async def close(self) -> None:
        return None


class KamailioRpc:
    """Kamailio ``jsonrpcs`` client; give ``url`` (HTTP) or ``fifo_path`` (+ ``reply_dir``).

    Use it as an async context manager, or call :meth:`close` when done (HTTP keeps a
    connection pool).
    """

    def __init__(self, *, url: str | None = None, fifo_path: str | os.PathLike[str] | None = None,
                 reply_dir: str | os.PathLike[str] = "/tmp/", timeout: float = DEFAULT_TIMEOUT,
                 max_reply: int = DEFAULT_MAX_REPLY) -> None:
        if (url is None) == (fifo_path is None):
            raise ValueError("give exactly one of url= (HTTP) or fifo_path= (FIFO)")
        self.transport: HttpTransport | FifoTransport
        if url is not None:
            self.transport = HttpTransport(url, timeout=timeout, max_reply=max_reply)
        else:
            assert fifo_path is not None
            self.transport = FifoTransport(fifo_path, reply_dir, timeout=timeout,
                                           max_reply=max_reply)
        self._ids = itertools.count(1)

    async def __aenter__(self) -> KamailioRpc:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def call(self, method: str, *params: Any) -> Any:
        """Run one RPC command and return its ``result`` (``{}`` for commands with none)."""
        request_id = next(self._ids)
        body = await self.transport.exchange(method, params, request_id)
        return decode_response(body, request_id)

    # --- usrloc ---------------------------------------------------------------------------

    async def ul_dump(self) -> list[dict[str, Any]]:
        """Every contact of every location table (see ``kamailio_dump.parse_contact``)."""
        result = await self.call("ul.dump")
        return parse_ul_dump(result, now=int(time.time()))

    async def ul_lookup(self, table: str, aor: str) -> list[dict[str, Any]]:
        """Contacts of one AOR; ``[]`` when Kamailio has none."""
        try:
            result = await self.call("ul.lookup", table, aor)
        except ProxyRpcError as exc:
            if exc.message in LOOKUP_EMPTY_MESSAGES:
                return []
            raise
        return parse_ul_lookup(result, table=table, now=int(time.time()))

    async def ul_add(self, table: str, aor: str, contact: str, expires: int, q: int = -1,
                     path: str | None = None, flags: int = 0, cflags: int = 0,
                     methods: int | None = None, received: str | None = None,
                     socket: str | None = None) -> bool:
        """Insert or update one contact; False (nothing sent) if ``expires`` already passed.

        ``expires`` is absolute UNIX seconds, 0 = permanent; ``q`` is q×1000 or -1.
        ``socket`` must be one of Kamailio's listeners ("udp:IP:PORT") or Kamailio drops it.
        Kamailio sets Call-ID/CSeq/User-Agent itself (see ``kamailio_dump.UL_ADD_CALLID``).
        """
        params = ul_add_params(table, aor, contact, expires=expires, now=int(time.time()),
                               q=q, path=path, flags=flags, cflags=cflags, methods=methods,
                               received=received, socket=socket)
        if params is None:
            return False
        await self.call("ul.add", *params)
        return True

    async def ul_add_record(self, rec: tuple, *, table: str = "location",
                            nat_bflag_mask: int = NAT_BFLAG_MASK,
                            sipping_bflag_mask: int = SIPPING_BFLAG_MASK) -> bool:
        """Warm-load one :mod:`sidecar.model` contact tuple. A NATed contact gets the NAT and
        the SIP-ping branch flags, so the proxy's pinger sends OPTIONS (which phones answer)
        rather than 4-byte nulls once this node is active."""
        nat = nat_bflag_mask | sipping_bflag_mask if rec[model.FLAGS] & model.FLAG_NAT else 0
        return await self.ul_add(
            table, rec[model.AOR], rec[model.URI], rec[model.EXPIRES], q=rec[model.Q],
            path=rec[model.PATH], cflags=rec[model.CFLAGS] | nat,
            methods=methods_to_kamailio(rec[model.METHODS]),
            received=rec[model.RECEIVED], socket=rec[model.SOCKET])

    async def ul_rm(self, table: str, aor: str) -> None:
        """Remove an AOR with all its contacts (no error if it does not exist)."""
        await self.call("ul.rm", table, aor)

    async def ul_rm_contact(self, table: str, aor: str, contact: str) -> None:
        """Remove one contact; ProxyRpcError code 404 if the AOR or contact is unknown."""
        await self.call("ul.rm_contact", table, aor, contact)

    # --- nathelper ------------------------------------------------------------------------

    async def nathelper_enable_ping(self, on: bool) -> None:
        """Switch nathelper's NAT pinger on (active node) or off (standby)."""
        await self.call("nathelper.enable_ping", 1 if on else 0)
