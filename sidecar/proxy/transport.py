"""Byte transports shared by the proxy clients: an HTTP POST and a FIFO round trip.

Kamailio's ``jsonrpcs`` and OpenSIPS' MI speak JSON-RPC over the same two carriers, and the
hard parts - bounding every call in time and size, never blocking the event loop on a FIFO,
telling "proxy not running" from other failures - are the same for both. They live here once;
:mod:`sidecar.proxy.kamailio` and :mod:`sidecar.proxy.opensips_mi` keep what differs: the
request encoding and FIFO framing, which they hand over as bytes, and their error type, which
they hand over as a factory so each client still raises exactly one documented exception.

FIFO round trip (both proxies): we create a reply FIFO in the proxy's reply directory, open
it for reading *before* sending (the proxy opens it non-blocking and gives up without a
reader), open the proxy's FIFO non-blocking for writing (``ENXIO`` = nobody reads it, i.e. the
proxy is not running), write the request, read the reply until the proxy closes the FIFO, and
always unlink the reply FIFO. Both proxies close the reply FIFO after one reply, so EOF is the
end of the reply for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import aiohttp

# (code, message) -> the client's exception; transport failures always pass code None.
ErrorFactory = Callable[[int | None, str], Exception]
# reply FIFO name -> the complete request to write to the proxy's FIFO.
FifoFraming = Callable[[str], bytes]

_READ_SIZE = 65536


class HttpPost:
    """POSTs JSON bodies to one URL over a lazily created, reusable aiohttp session.

    ``proxy`` ("Kamailio") and ``label`` ("Kamailio RPC", "mi_http") name the peer in error
    messages; every failure is raised through ``error``.
    """

    def __init__(self, url: str, *, proxy: str, label: str, error: ErrorFactory,
                 max_reply: int) -> None:
        self.url = url
        self.proxy = proxy
        self.label = label
        self.error = error
        self.max_reply = max_reply
        self._session: aiohttp.ClientSession | None = None

    async def post(self, body: bytes, timeout: float) -> tuple[int, bytes]:
        """``(HTTP status, body)``; the body is read whatever the status (errors come as 500)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                    self.url, data=body, headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                data = await self._read(resp)
                return resp.status, data
        except TimeoutError:  # before OSError, of which it is a subclass
            raise self.error(None, f"{self.label} at {self.url} timed out after "
                                   f"{timeout} s") from None
        except aiohttp.ServerDisconnectedError:
            # Typically a reply that does not fit the proxy's memory or buffer (e.g. a big dump).
            raise self.error(None, f"{self.proxy} at {self.url} closed the connection without "
                                   "a reply (see its log)") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self.error(None, f"{self.label} at {self.url} unreachable: "
                                   f"{str(exc) or type(exc).__name__}") from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > self.max_reply:
            raise self.error(None, f"{self.label} reply of {resp.content_length} bytes from "
                                   f"{self.url} exceeds {self.max_reply}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > self.max_reply:
                raise self.error(None, f"{self.label} reply from {self.url} exceeds "
                                       f"{self.max_reply} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class FifoRoundTrip:
    """One request/reply exchange per call over the proxy's FIFO and a reply FIFO of ours.

    ``proxy`` ("OpenSIPS") and ``label`` ("mi_fifo", "Kamailio FIFO") name the peer in error
    messages; every failure is raised through ``error``. The caller frames the request (it
    knows its proxy's FIFO dialect) from the reply FIFO name this class picks.
    """

    def __init__(self, fifo_path: str | os.PathLike[str], reply_dir: str | os.PathLike[str],
                 *, proxy: str, label: str, error: ErrorFactory, max_reply: int) -> None:
        self.fifo_path = Path(fifo_path)
        self.reply_dir = Path(reply_dir)
        self.proxy = proxy
        self.label = label
        self.error = error
        self.max_reply = max_reply
        # Unique per process and per client; lower-case letters and digits only, which both
        # proxies accept as a reply name (OpenSIPS: [a-z0-9_], Kamailio: [A-Za-z0-9_-]).
        self._prefix = f"sc{os.getpid()}x{secrets.token_hex(3)}x"
        self._names = itertools.count(1)

    async def exchange(self, frame: FifoFraming, timeout: float) -> bytes:
        """Send ``frame(reply_name)`` and return the whole reply, within ``timeout`` seconds."""
        name = f"{self._prefix}{next(self._names)}"
        reply_path = self.reply_dir / name
        request = frame(name)
        try:
            os.mkfifo(reply_path, 0o600)
        except OSError as exc:
            raise self.error(None, f"cannot create reply FIFO {reply_path}: "
                                   f"{exc.strerror}") from None
        try:
            async with asyncio.timeout(timeout):
                return await self._roundtrip(request, reply_path)
        except TimeoutError:
            raise self.error(None, f"no reply from {self.label} {self.fifo_path} within "
                                   f"{timeout} s") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(reply_path)

    async def _roundtrip(self, request: bytes, reply_path: Path) -> bytes:
        loop = asyncio.get_running_loop()
        # Reader first: the proxy opens the reply FIFO non-blocking and gives up without one.
        reader_fd = os.open(reply_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            await self._send(loop, request)
            return await self._read_reply(loop, reader_fd)
        finally:
            os.close(reader_fd)

    async def _send(self, loop: asyncio.AbstractEventLoop, request: bytes) -> None:
        try:
            fd = os.open(self.fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            reason = (f"nobody reads it ({self.proxy} is not running)"
                      if exc.errno == errno.ENXIO else exc.strerror or str(exc))
            raise self.error(None, f"{self.label} {self.fifo_path} unusable: {reason}") \
                from None
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise self.error(None, f"{self.fifo_path} is not a FIFO")
            # A write of <= PIPE_BUF bytes is atomic (all or EAGAIN); longer ones may be split,
            # so keep writing the rest, waiting for room whenever the pipe is full.
            view = memoryview(request)
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    await wait_fd(loop, fd, writable=True)
                    continue
                except BrokenPipeError:
                    raise self.error(None, f"{self.proxy} closed its FIFO {self.fifo_path}") \
                        from None
                view = view[written:]
        finally:
            os.close(fd)

    async def _read_reply(self, loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
        # A FIFO that never had a writer reads as EOF but is not reported readable (Linux),
        # so wait for readiness first: it means the proxy opened it. Then read until it closes.
        chunks: list[bytes] = []
        size = 0
        while True:
            await wait_fd(loop, fd, writable=False)
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if not chunk:
                if not chunks:
                    raise self.error(None, f"{self.proxy} closed the reply FIFO without "
                                           "writing a reply")
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_reply:
                raise self.error(None, f"FIFO reply exceeds {self.max_reply} bytes")
            chunks.append(chunk)


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, *, writable: bool) -> None:
    """Wait until ``fd`` is readable/writable (the caller's asyncio.timeout bounds it)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add, remove = ((loop.add_writer, loop.remove_writer) if writable
                   else (loop.add_reader, loop.remove_reader))
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)
