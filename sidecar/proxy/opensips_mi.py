"""Asyncio client for the OpenSIPS 3.x Management Interface (JSON-RPC over mi_http or mi_fifo).

The sidecar uses it to subscribe to usrloc events (``event_subscribe``), to notice that the
subscriptions vanished after an OpenSIPS restart (``subscribers_list``), to read the location
table (``ul_dump`` brief, ``ul_show_contact``, ``get_statistics``), and to warm-load / remove
contacts and switch nathelper's pinger (``ul_add``, ``ul_rm``, ``ul_rm_contact``,
``nh_enable_ping``).

Why not the ``opensips`` package from PyPI (python-opensips): its MI connectors do blocking I/O
(``urllib`` with no timeout, blocking FIFO ``open()``), which would freeze the event loop - and
an mi_http request sent with the wrong content type *hangs forever* in OpenSIPS 3.6 (see
shared/opensips-samples/README.md); its event helpers use threads; and it is GPL-3. This
module is small, non-blocking, bounded in time and size, and raises exactly one error type.

Transports (same JSON-RPC 2.0 bodies, same results):

* **mi_http**: POST to ``http://HOST:PORT/mi`` with ``Content-Type: application/json``
  (anything else makes OpenSIPS hang or close without a reply). A JSON-RPC error body is
  honoured whatever the HTTP status; HTTP 500 with no JSON body (e.g. a 50k-contact
  ``ul_dump`` that does not fit httpd's buffer) becomes an error naming the status.
* **mi_fifo**: ``:REPLY_NAME:{json}`` is written to OpenSIPS' FIFO; OpenSIPS writes the reply
  into ``reply_dir/REPLY_NAME`` (``reply_dir`` must equal mi_fifo's ``reply_dir`` parameter,
  default ``/tmp/``). We create that reply FIFO and open it for reading *before* sending, then
  read until OpenSIPS closes it. Errors of the MI engine itself come back as plain text.

Encoding and decoding are pure functions (:func:`encode_request`, :func:`decode_response`,
:func:`fifo_request`); the transports only move bytes, with the code shared with the Kamailio
client in :mod:`sidecar.proxy.transport`. Every failure - refused connection,
timeout, HTTP error, malformed reply, JSON-RPC error - raises :class:`OpensipsMiError`.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sidecar import model
from sidecar.proxy.transport import FifoRoundTrip, HttpPost

DEFAULT_TIMEOUT = 5.0
# A full ul_dump is ~290 bytes per contact (14.5 MB at 50k); refuse anything beyond this.
DEFAULT_MAX_REPLY = 512 * 1024 * 1024
# JSON-RPC error code OpenSIPS uses for "AOR not found" in ul_show_contact / ul_rm_contact.
CODE_NOT_FOUND = 404
_FIFO_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"

Params = Mapping[str, Any] | Sequence[Any] | None


class OpensipsMiError(Exception):
    """An MI command failed: transport problem (``code`` None) or a JSON-RPC error reply."""

    def __init__(self, message: str, code: int | None = None, data: Any = None) -> None:
        super().__init__(message if code is None else f"{code}: {message}")
        self.message = message
        self.code = code
        self.data = data


# --- sans-I/O encoding ----------------------------------------------------------------------


def encode_request(method: str, params: Params, request_id: int) -> bytes:
    """One JSON-RPC 2.0 request; ``params`` may be named (dict) or positional (list)."""
    if not isinstance(method, str) or not method:
        raise OpensipsMiError("MI method must be a non-empty string")
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params is not None:
        body["params"] = dict(params) if isinstance(params, Mapping) else list(params)
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        raise OpensipsMiError(f"MI params of {method} are not JSON: {exc}") from None


def fifo_request(reply_name: str, body: bytes) -> bytes:
    """mi_fifo framing of OpenSIPS 3.x: ``:reply_fifo:`` followed by the JSON-RPC request."""
    if not reply_name or any(c not in _FIFO_NAME_CHARS for c in reply_name):
        raise OpensipsMiError(f"bad reply FIFO name {reply_name!r}")
    return b":" + reply_name.encode() + b":" + body


def decode_response(body: bytes, request_id: int | None = None) -> Any:
    """The ``result`` of a JSON-RPC reply, or :class:`OpensipsMiError` for an error/garbage."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        raise OpensipsMiError("empty MI reply")
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError):
        # mi_fifo reports errors of the MI engine itself as plain text.
        raise OpensipsMiError(f"MI reply is not JSON: {text[:200]!r}") from None
    if not isinstance(reply, dict) or reply.get("jsonrpc") != "2.0":
        raise OpensipsMiError("MI reply is not a JSON-RPC 2.0 object")
    if request_id is not None and "id" in reply and reply["id"] != request_id:
        raise OpensipsMiError(f"MI reply id {reply['id']!r} does not match {request_id}")
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict):
            raise OpensipsMiError(f"malformed MI error {err!r:.200}")
        code = err.get("code")
        message = err.get("message")
        data = err.get("data")
        text = str(message) if message is not None else "MI error"
        if isinstance(data, str) and data:
            text = f"{text} ({data})"
        raise OpensipsMiError(text, code if type(code) is int else -1, data)
    if "result" not in reply:
        raise OpensipsMiError("MI reply has neither 'result' nor 'error'")
    return reply["result"]


def q_param(q: int) -> str:
    """``ul_add`` wants q as a *string* ("0.5"); a JSON number is silently stored as q 0.

    ``ul_add`` cannot leave q unset, so -1 ("no q") is sent as "1".
    """
    if q < 0:
        return "1"
    return f"{min(q, 1000) / 1000:g}"


# --- transports -------------------------------------------------------------------------------


class MiHttpTransport:
    """POSTs JSON-RPC bodies to mi_http (``modparam("mi_http", "root", "mi")``)."""

    def __init__(self, url: str, *, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.url = url
        self.max_reply = max_reply
        self._http = HttpPost(url, proxy="OpenSIPS", label="mi_http", error=_transport_error,
                              max_reply=max_reply)

    async def exchange(self, body: bytes, timeout: float) -> bytes:
        status, data = await self._http.post(body, timeout)
        # A JSON-RPC error body counts whatever the status; anything else must be a 200.
        if status != 200 and not data.lstrip().startswith(b"{"):
            raise OpensipsMiError(f"mi_http at {self.url} answered HTTP {status}: "
                                  f"{data[:200].decode('utf-8', 'replace')!r}")
        return data

    async def close(self) -> None:
        await self._http.close()


class MiFifoTransport:
    """Writes ``:reply:{json}`` to OpenSIPS' mi_fifo and reads the reply from our own FIFO."""

    def __init__(self, fifo_path: str | os.PathLike[str], reply_dir: str | os.PathLike[str],
                 *, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.fifo_path = Path(fifo_path)
        self.reply_dir = Path(reply_dir)
        self.max_reply = max_reply
        self._fifo = FifoRoundTrip(fifo_path, reply_dir, proxy="OpenSIPS", label="mi_fifo",
                                   error=_transport_error, max_reply=max_reply)

    async def exchange(self, body: bytes, timeout: float) -> bytes:
        return await self._fifo.exchange(lambda name: fifo_request(name, body), timeout)

    async def close(self) -> None:
        return None


def _transport_error(code: int | None, message: str) -> OpensipsMiError:
    """The :class:`~sidecar.proxy.transport.ErrorFactory` for this client."""
    return OpensipsMiError(message, code)


# --- client -----------------------------------------------------------------------------------


class OpensipsMi:
    """OpenSIPS MI client; give ``url`` (mi_http) or ``fifo_path`` (mi_fifo, + ``reply_dir``).

    Use it as an async context manager or call :meth:`close` (HTTP keeps a connection pool).
    ``timeout`` bounds every call; pass ``timeout=`` to :meth:`call` for slow ones (a brief
    ``ul_dump`` of 50k AORs took 2.2 s, a full one 21 s).
    """

    def __init__(self, *, url: str | None = None,
                 fifo_path: str | os.PathLike[str] | None = None,
                 reply_dir: str | os.PathLike[str] = "/tmp/", timeout: float = DEFAULT_TIMEOUT,
                 max_reply: int = DEFAULT_MAX_REPLY) -> None:
        if (url is None) == (fifo_path is None):
            raise ValueError("give exactly one of url= (mi_http) or fifo_path= (mi_fifo)")
        self.transport: MiHttpTransport | MiFifoTransport
        if url is not None:
            self.transport = MiHttpTransport(url, max_reply=max_reply)
            self.endpoint = url
        else:
            assert fifo_path is not None
            self.transport = MiFifoTransport(fifo_path, reply_dir, max_reply=max_reply)
            self.endpoint = f"fifo:{fifo_path}"
        self.timeout = timeout
        self._ids = itertools.count(1)

    async def __aenter__(self) -> OpensipsMi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.transport.close()

    async def call(self, method: str, params: Params = None, *,
                   timeout: float | None = None) -> Any:
        """Run one MI command and return its ``result``."""
        request_id = next(self._ids)
        body = encode_request(method, params, request_id)
        reply = await self.transport.exchange(body, self.timeout if timeout is None else timeout)
        return decode_response(reply, request_id)

    # --- core / events ------------------------------------------------------------------------

    async def version(self) -> str:
        """``{"Server": "OpenSIPS (3.6.8 (x86_64/linux))"}`` -> the server string."""
        result = await self.call("version")
        server = result.get("Server") if isinstance(result, dict) else None
        if not isinstance(server, str):
            raise OpensipsMiError("version reply lacks 'Server'")
        return server

    async def event_subscribe(self, event: str, socket: str, expire: int) -> None:
        """Subscribe ``socket`` (``udp:IP:PORT`` / ``tcp:IP:PORT``) for ``expire`` s; 0 drops."""
        result = await self.call("event_subscribe",
                                 {"event": event, "socket": socket, "expire": expire})
        if result != "OK":
            raise OpensipsMiError(f"event_subscribe {event} answered {result!r:.100}")

    async def subscribers_list(self) -> dict[str, dict[str, int | None]]:
        """``{event: {socket: ttl_seconds_or_None}}`` for every event that has subscribers."""
        result = await self.call("subscribers_list")
        events = result.get("Events") if isinstance(result, dict) else None
        if not isinstance(events, list):
            raise OpensipsMiError("subscribers_list reply lacks an 'Events' list")
        out: dict[str, dict[str, int | None]] = {}
        for ev in events:
            if not isinstance(ev, dict) or not isinstance(ev.get("name"), str):
                raise OpensipsMiError("subscribers_list entry without a 'name'")
            subs = ev.get("Subscribers", [])
            if not isinstance(subs, list):
                raise OpensipsMiError("subscribers_list 'Subscribers' must be a list")
            sockets: dict[str, int | None] = {}
            for sub in subs:
                if isinstance(sub, dict) and isinstance(sub.get("socket"), str):
                    ttl = sub.get("ttl")
                    sockets[sub["socket"]] = ttl if type(ttl) is int else None
            out[ev["name"]] = sockets
        return out

    async def get_statistics(self, names: Sequence[str]) -> dict[str, int]:
        """Statistics by name (``["usrloc:"]`` gives the whole group as ``usrloc:NAME``)."""
        result = await self.call("get_statistics", {"statistics": list(names)})
        if not isinstance(result, dict):
            raise OpensipsMiError("get_statistics reply must be an object")
        return {k: v for k, v in result.items() if isinstance(k, str) and type(v) is int}

    # --- usrloc -------------------------------------------------------------------------------

    async def ul_dump_brief(self, table: str | None = None, *,
                            timeout: float | None = None) -> list[str]:
        """AOR names only. ``brief`` must be an integer in 3.6 (the string "brief" is refused)."""
        result = await self.call("ul_dump", {"brief": 1}, timeout=timeout)
        return [aor for aor, _ in _dump_aors(result, table)]

    async def ul_dump(self, table: str | None = None, *,
                      timeout: float | None = None) -> list[tuple[str, list[dict]]]:
        """``(aor, raw contact dicts)`` of every AOR (expensive: 21 s / 14.5 MB at 50k)."""
        result = await self.call("ul_dump", timeout=timeout)
        return _dump_aors(result, table)

    async def ul_show_contact(self, table: str, aor: str) -> list[dict]:
        """Raw contact dicts of one AOR; ``[]`` when OpenSIPS answers 404 "AOR not found"."""
        try:
            result = await self.call("ul_show_contact", {"table_name": table, "aor": aor})
        except OpensipsMiError as exc:
            if exc.code == CODE_NOT_FOUND:
                return []
            raise
        if not isinstance(result, dict) or not isinstance(result.get("Contacts", []), list):
            raise OpensipsMiError("ul_show_contact reply must be {'AOR', 'Contacts': [...]}")
        return [c for c in result.get("Contacts", []) if isinstance(c, dict)]

    async def ul_add(self, table: str, aor: str, contact: str, expires: int, *, q: int = -1,
                     flags: int = 0, cflags: int = 0, methods: int | None = None) -> None:
        """Insert/update a contact. ``expires`` is *relative* seconds here, 0 = permanent.

        OpenSIPS sets Call-ID ``dfjrewr12386fd6-343@opensips.mi``, CSeq 1 and User-Agent
        ``OpenSIPS MI Server`` itself, and the contact gets no socket and no received address.
        """
        await self.call("ul_add", {
            "table_name": table, "aor": aor, "contact": contact, "expires": int(expires),
            "q": q_param(q), "flags": int(flags), "cflags": int(cflags),
            "methods": 0xFFFFFFFF if methods is None else int(methods),
        })

    async def ul_add_record(self, rec: tuple, *, table: str = "location",
                            now: float | None = None) -> bool:
        """Warm-load one :mod:`sidecar.model` contact; False (nothing sent) if it expired."""
        expires = rec[model.EXPIRES]
        if expires:
            remaining = expires - int(time.time() if now is None else now)
            if remaining <= 0:
                return False
        else:
            remaining = 0
        await self.ul_add(table, rec[model.AOR], rec[model.URI], remaining, q=rec[model.Q],
                          cflags=rec[model.CFLAGS], methods=rec[model.METHODS])
        return True

    async def ul_rm(self, table: str, aor: str) -> None:
        await self.call("ul_rm", {"table_name": table, "aor": aor})

    async def ul_rm_contact(self, table: str, aor: str, contact: str) -> None:
        await self.call("ul_rm_contact", {"table_name": table, "aor": aor, "contact": contact})

    # --- nathelper ----------------------------------------------------------------------------

    async def nh_enable_ping(self, on: bool | None = None) -> int | None:
        """Query (``on`` None -> current status 0/1) or switch nathelper's pinger.

        The switch is sent as a positional param (``[1]`` / ``[0]``): only the query form was
        recorded, and positional params work whatever the param is named.
        """
        if on is None:
            result = await self.call("nh_enable_ping")
            status = result.get("Status") if isinstance(result, dict) else None
            if type(status) is not int:
                raise OpensipsMiError("nh_enable_ping reply lacks an integer 'Status'")
            return status
        await self.call("nh_enable_ping", [1 if on else 0])
        return None


def _dump_aors(result: Any, table: str | None) -> list[tuple[str, list[dict]]]:
    """Walk ``Domains`` -> ``AORs`` of an ``ul_dump`` result without trusting its shape."""
    domains = result.get("Domains") if isinstance(result, dict) else None
    if not isinstance(domains, list):
        raise OpensipsMiError("ul_dump reply lacks a 'Domains' list")
    out: list[tuple[str, list[dict]]] = []
    for dom in domains:
        if not isinstance(dom, dict):
            raise OpensipsMiError("ul_dump domain entry must be an object")
        if table is not None and dom.get("name") != table:
            continue
        aors = dom.get("AORs", [])
        if not isinstance(aors, list):
            raise OpensipsMiError("ul_dump 'AORs' must be a list")
        for node in aors:
            if not isinstance(node, dict) or not isinstance(node.get("AOR"), str) \
                    or not node["AOR"]:
                raise OpensipsMiError("ul_dump AOR entry lacks a non-empty 'AOR'")
            contacts = node.get("Contacts", [])
            if not isinstance(contacts, list):
                raise OpensipsMiError("ul_dump 'Contacts' must be a list")
            out.append((node["AOR"], [c for c in contacts if isinstance(c, dict)]))
    return out
