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

Every failure - connection refused, timeout, missing FIFO, Kamailio error reply, malformed
reply - raises :class:`ProxyRpcError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from sidecar import model
from sidecar.proxy.kamailio_dump import (
    FIFO_MAX_REPLY_PATH,
    LOOKUP_EMPTY_MESSAGES,
    NAT_BFLAG_MASK,
    ProxyRpcError,
    decode_response,
    encode_request,
    kamailio_contact_to_record,
    parse_ul_dump,
    parse_ul_lookup,
    ul_add_params,
)

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
        self._session: aiohttp.ClientSession | None = None

    async def exchange(self, method: str, params: Sequence[Any], request_id: int) -> bytes:
        body = encode_request(method, params, request_id)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
                if resp.content_length is not None and resp.content_length > self.max_reply:
                    raise ProxyRpcError(None, f"reply of {resp.content_length} bytes from "
                                              f"{self.url} exceeds {self.max_reply}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_any():
                    size += len(chunk)
                    if size > self.max_reply:
                        raise ProxyRpcError(None, f"reply from {self.url} exceeds "
                                                  f"{self.max_reply} bytes")
                    chunks.append(chunk)
        except TimeoutError:  # before OSError, of which it is a subclass
            raise ProxyRpcError(None, f"Kamailio RPC at {self.url} timed out after "
                                      f"{self.timeout} s") from None
        except aiohttp.ServerDisconnectedError:
            # Kamailio drops the connection when it cannot build the reply, typically a big
            # ul.dump that does not fit its private memory (raise it with -M).
            raise ProxyRpcError(None, f"Kamailio at {self.url} closed the connection without "
                                      "a reply (see its log)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ProxyRpcError(None, f"Kamailio RPC at {self.url} unreachable: "
                                      f"{str(exc) or type(exc).__name__}") from None
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class FifoTransport:
    """Writes JSON-RPC requests to Kamailio's FIFO and reads the answer from a reply FIFO."""

    def __init__(self, fifo_path: str | os.PathLike[str], reply_dir: str | os.PathLike[str],
                 *, timeout: float = DEFAULT_TIMEOUT, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self.fifo_path = Path(fifo_path)
        self.reply_dir = Path(reply_dir)
        self.timeout = timeout
        self.max_reply = max_reply
        self._prefix = f"sc{os.getpid()}x{secrets.token_hex(3)}x"
        self._names = itertools.count(1)

    async def exchange(self, method: str, params: Sequence[Any], request_id: int) -> bytes:
        name = f"{self._prefix}{next(self._names)}"
        reply_path = self.reply_dir / name
        # Kamailio concatenates fifo_reply_dir and the name into a 128-byte buffer.
        if len(str(self.reply_dir)) + 1 + len(name) > FIFO_MAX_REPLY_PATH:
            raise ProxyRpcError(None, f"reply FIFO path in {self.reply_dir} is too long for "
                                      f"Kamailio (max {FIFO_MAX_REPLY_PATH} bytes)")
        body = encode_request(method, params, request_id, reply_name=name)
        try:
            os.mkfifo(reply_path, 0o600)
        except OSError as exc:
            raise ProxyRpcError(None, f"cannot create reply FIFO {reply_path}: "
                                      f"{exc.strerror}") from None
        try:
            async with asyncio.timeout(self.timeout):
                return await self._roundtrip(body, reply_path)
        except TimeoutError:
            raise ProxyRpcError(None, f"no reply from Kamailio FIFO {self.fifo_path} within "
                                      f"{self.timeout} s") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(reply_path)

    async def _roundtrip(self, body: bytes, reply_path: Path) -> bytes:
        loop = asyncio.get_running_loop()
        # Reader first: Kamailio opens the reply FIFO non-blocking and gives up without one.
        reader_fd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            await self._send(loop, body)
            return await self._read_reply(loop, reader_fd)
        finally:
            os.close(reader_fd)

    async def _send(self, loop: asyncio.AbstractEventLoop, body: bytes) -> None:
        try:
            fd = os.open(self.fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                reason = "nobody reads it (Kamailio is not running)"
            else:
                reason = exc.strerror or str(exc)
            raise ProxyRpcError(None, f"Kamailio FIFO {self.fifo_path} unusable: "
                                      f"{reason}") from None
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise ProxyRpcError(None, f"{self.fifo_path} is not a FIFO")
            # One write of <= PIPE_BUF bytes is atomic; wait for room if the pipe is full.
            while True:
                try:
                    written = os.write(fd, body)
                    break
                except BlockingIOError:
                    await _wait_fd(loop, fd, writable=True)
                except BrokenPipeError:
                    raise ProxyRpcError(None, f"Kamailio closed its FIFO {self.fifo_path}") \
                        from None
            if written != len(body):
                raise ProxyRpcError(None, f"short write to {self.fifo_path}")
        finally:
            os.close(fd)

    async def _read_reply(self, loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
        # A FIFO that never had a writer reads as EOF but is not reported readable (Linux),
        # so wait for readiness first: it means Kamailio connected. Then read until it closes.
        chunks: list[bytes] = []
        size = 0
        while True:
            await _wait_fd(loop, fd, writable=False)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                if not chunks:
                    raise ProxyRpcError(None, "Kamailio closed the reply FIFO without "
                                              "writing a reply")
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_reply:
                raise ProxyRpcError(None, f"FIFO reply exceeds {self.max_reply} bytes")
            chunks.append(chunk)

    async def close(self) -> None:
        return None


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    """Wait until ``fd`` is readable/writable (the caller's asyncio.timeout bounds it)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


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
                            nat_bflag_mask: int = NAT_BFLAG_MASK) -> bool:
        """Warm-load one :mod:`sidecar.model` contact tuple (NAT flag -> the NAT bflag)."""
        nat = nat_bflag_mask if rec[model.FLAGS] & model.FLAG_NAT else 0
        return await self.ul_add(
            table, rec[model.AOR], rec[model.URI], rec[model.EXPIRES], q=rec[model.Q],
            path=rec[model.PATH], cflags=rec[model.CFLAGS] | nat, methods=rec[model.METHODS],
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
