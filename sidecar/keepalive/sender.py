"""Sending keepalives from the proxy's own address, and reading the replies (asyncio adapter).

Why from the proxy's address: a NAT lets a packet in only along a pair it has seen go out -
the phone's REGISTER went to the proxy socket (VIP:5060), so a restricted-cone NAT accepts
pings from VIP (any port) and a port-restricted one only from VIP:5060. So the sidecar binds
its UDP socket to exactly the proxy's socket address while the proxy is listening there:

* ``SO_REUSEADDR`` on both sockets is what lets two UDP sockets bind one address on Linux.
  Kamailio and OpenSIPS set it on their UDP listeners (checked against the real Kamailio in
  the tests); a proxy socket without it makes our bind fail with EADDRINUSE, reported as
  :class:`KeepaliveSocketError`. ``SO_REUSEPORT`` is set too (harmless, and needed when the
  proxy itself uses it); ``IP_FREEBIND`` lets the bind happen before the VIP is on the host.
* **Not stealing the proxy's traffic.** With two unconnected sockets on one address, Linux
  delivers every datagram to the most recently bound one - the sidecar would swallow every
  REGISTER (measured in the tests). So the shared socket is ``connect()``-ed to the discard
  port of its own address: a connected UDP socket only matches datagrams from its peer, which
  never sends, and ``sendto()`` with an explicit destination still works on it. The only
  exposure is the few microseconds between ``bind()`` and ``connect()`` when a socket is
  opened (once per activation); a datagram landing there is lost like any UDP loss and the
  phone's SIP retransmission covers it.
* Consequence: **replies to keepalives sent from the shared port go to the proxy**, not to us.
  What is tracked how:

  - ``null``: never answered; fire and forget (``ReplyMode.NONE``).
  - ``crlf``: phones answer rarely over UDP; anything the phone sends back reaches the proxy
    port. The daemon can feed packets it sees from phones to that port (capture/HEP source)
    into :meth:`ReplyReceiver.feed` for ``ReplyMode.ADDRESS``; otherwise use ``NONE``.
  - ``options``: the Via ``sent-by`` decides where the response goes (RFC 3261 §18.2.2, no
    ``rport`` is sent). With ``reply_via`` set to a port the sidecar owns (e.g. VIP:5062) the
    responses come to the sidecar's :class:`ReplyReceiver` and are matched by Call-ID
    (``ReplyMode.TOKEN``); the proxy never sees them. Without it, Via is the proxy's port: the
    proxy receives the responses (and drops them as strays), and the daemon can still match
    them from its capture/HEP source through :meth:`ReplyReceiver.feed`.

  An *exclusive* source (``shared=False``: nothing else listens there, e.g. a dedicated
  keepalive address) is not connected and its replies are read directly.

Throughput: a prebuilt payload and ``sendto`` in a tight loop (:func:`measure_send_rate`);
:meth:`KeepaliveSender.send` sends in batches and yields to the event loop between them, and
waits for writability instead of spinning when the socket buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .messages import KeepaliveKind, KeepaliveMessageError, OptionsPinger, static_payload
from .scheduler import KeepaliveScheduler, Ping, ReplyMode
from .targets import Address

__all__ = [
    "IPV6_FREEBIND",
    "IP_FREEBIND",
    "KeepaliveSender",
    "KeepaliveSocketError",
    "ReplyReceiver",
    "SendRate",
    "SenderStats",
    "SourceSockets",
    "measure_send_rate",
    "measure_sender_rate",
    "open_reply_socket",
    "open_source_socket",
]

log = logging.getLogger(__name__)

IP_FREEBIND = 15  # <linux/in.h>; Python's socket module does not export it
IPV6_FREEBIND = 78  # <linux/in6.h>, Linux >= 4.15
DISCARD_PORT = 9  # the peer a shared socket is connected to: nobody sends from it
DEFAULT_BATCH = 2000  # sends per event-loop turn (~7 ms at 300k/s)
MAX_DATAGRAM = 65535


class KeepaliveSocketError(Exception):
    """A keepalive socket could not be opened (bind/connect refused); the message says why."""


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _freebind(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


def open_source_socket(source: Address, *, shared: bool = True) -> socket.socket:
    """A non-blocking UDP socket bound to ``source`` (the proxy's IP:port).

    ``shared``: the proxy listens on the same address; the socket is connected to
    ``source_ip:9`` so it never receives (see the module docstring). Raises
    KeepaliveSocketError with the reason.
    """
    ip, port = source
    family = _family(ip)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _freebind(sock, family)
        sock.setblocking(False)
        sock.bind((ip, port))
        if shared:
            sock.connect((ip, DISCARD_PORT))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KeepaliveSocketError(
                f"cannot bind {ip}:{port} next to the proxy: its socket lacks SO_REUSEADDR "
                "(Kamailio and OpenSIPS set it on UDP listeners), or another process holds the "
                "port exclusively") from None
        if exc.errno == errno.EACCES:
            raise KeepaliveSocketError(f"no permission to bind {ip}:{port} (port < 1024 needs "
                                       "CAP_NET_BIND_SERVICE)") from None
        raise KeepaliveSocketError(f"cannot open keepalive socket {ip}:{port}: "
                                   f"{exc.strerror or exc}") from None
    return sock


def open_reply_socket(address: Address) -> socket.socket:
    """A non-blocking UDP socket the sidecar alone listens on (OPTIONS ``reply_via``)."""
    ip, port = address
    family = _family(ip)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _freebind(sock, family)
        sock.setblocking(False)
        sock.bind((ip, port))
    except OSError as exc:
        sock.close()
        raise KeepaliveSocketError(f"cannot listen for keepalive replies on {ip}:{port}: "
                                   f"{exc.strerror or exc}") from None
    return sock


class SourceSockets:
    """One socket per source address, opened on first use and kept until :meth:`close`.

    A source that failed to open is retried no sooner than ``retry_after`` seconds later (the
    VIP may not be routable yet), so a broken source costs one syscall per retry, not per ping.
    """

    def __init__(self, *, shared: bool = True, retry_after: float = 1.0,
                 on_open: Callable[[socket.socket], None] | None = None,
                 on_close: Callable[[socket.socket], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shared = shared
        self.retry_after = retry_after
        self.on_open = on_open
        self.on_close = on_close
        self.clock = clock
        self._socks: dict[Address, socket.socket] = {}
        self._failed: dict[Address, tuple[float, str]] = {}
        self.opened = 0
        self.last_error: str | None = None

    def get(self, source: Address) -> socket.socket | None:
        sock = self._socks.get(source)
        if sock is not None:
            return sock
        failed = self._failed.get(source)
        now = self.clock()
        if failed is not None and now - failed[0] < self.retry_after:
            return None
        try:
            sock = open_source_socket(source, shared=self.shared)
        except KeepaliveSocketError as exc:
            self._failed[source] = (now, str(exc))
            if self.last_error != str(exc):
                log.error("keepalive source %s:%s unusable: %s", source[0], source[1], exc)
            self.last_error = str(exc)
            return None
        self._failed.pop(source, None)
        self._socks[source] = sock
        self.opened += 1
        if self.on_open is not None:
            self.on_open(sock)
        return sock

    def sockets(self) -> list[socket.socket]:
        return list(self._socks.values())

    def close(self) -> None:
        for sock in self._socks.values():
            if self.on_close is not None:
                self.on_close(sock)  # e.g. stop reading it before the fd goes away
            sock.close()
        self._socks.clear()
        self._failed.clear()

    def errors(self) -> dict[str, str]:
        return {f"{ip}:{port}": err for (ip, port), (_, err) in self._failed.items()}


@dataclass(slots=True)
class SenderStats:
    sent: int = 0
    send_errors: int = 0  # sendto failed (unreachable, refused by a firewall, ...)
    blocked: int = 0  # times the socket buffer was full and we waited for room
    abandoned: int = 0  # pings not sent because the socket stayed full past block_timeout
    no_source: int = 0  # no usable source address/socket for the ping
    bad_target: int = 0  # the OPTIONS could not be built from the record's URI
    last_error: str | None = None


class KeepaliveSender:
    """Turns scheduler pings into datagrams.

    ``source``: a fixed source address for every ping (e.g. VIP:5060 when the records carry
    the node's own address), else each target's socket, else ``default_source``.
    ``reply_via``: OPTIONS only - the address written in Via, where responses will go.
    """

    def __init__(self, kind: KeepaliveKind | str, *, pinger: OptionsPinger | None = None,
                 source: Address | None = None, default_source: Address | None = None,
                 reply_via: Address | None = None, sockets: SourceSockets | None = None,
                 batch: int = DEFAULT_BATCH, block_timeout: float = 1.0) -> None:
        self.kind = KeepaliveKind(kind)
        if self.kind is KeepaliveKind.OPTIONS:
            self.pinger = pinger or OptionsPinger()
            self._payload = b""
        else:
            self.pinger = pinger
            self._payload = static_payload(self.kind)
        self.source = source
        self.default_source = default_source
        self.reply_via = reply_via
        self.sockets = sockets if sockets is not None else SourceSockets()
        self.batch = max(1, batch)
        self.block_timeout = block_timeout
        self.stats = SenderStats()

    def payload(self, ping: Ping, source: Address) -> bytes:
        if self.kind is not KeepaliveKind.OPTIONS:
            return self._payload
        assert self.pinger is not None
        return self.pinger.build(ping.ping_id, ping.target.uri, self.reply_via or source)

    def send_now(self, pings: Sequence[Ping], start: int = 0, stop: int | None = None
                 ) -> tuple[int, socket.socket | None]:
        """Send ``pings[start:stop]`` without blocking. Returns the index reached and, when it
        stopped early because a socket buffer was full, that socket (else None)."""
        # Hot loop (a sweep runs it 100k+ times a second): tuple indexing instead of NamedTuple
        # attributes, the socket looked up only when the source changes.
        stop = len(pings) if stop is None else stop
        stats = self.stats
        fixed, default = self.source, self.default_source
        get_sock = self.sockets.get
        build = self.pinger.build if self.kind is KeepaliveKind.OPTIONS else None
        via = self.reply_via
        payload = self._payload
        last_src: Address | None = None
        sock: socket.socket | None = None
        sent = 0
        i = start
        while i < stop:
            ping = pings[i]
            target = ping[2]
            src = fixed or target[2] or default
            if src is not last_src:
                if src is None:
                    stats.no_source += 1
                    i += 1
                    continue
                if src != last_src:
                    sock = get_sock(src)
                last_src = src
            if sock is None:
                stats.no_source += 1
                i += 1
                continue
            if build is not None:
                try:
                    payload = build(ping[0], target[0], via or src)
                except KeepaliveMessageError:
                    stats.bad_target += 1
                    i += 1
                    continue
            try:
                sock.sendto(payload, target[1])
            except BlockingIOError:
                stats.sent += sent
                stats.blocked += 1
                return i, sock
            except OSError as exc:
                stats.send_errors += 1
                stats.last_error = f"{target.dest[0]}:{target.dest[1]}: {exc.strerror or exc}"
            else:
                sent += 1
            i += 1
        stats.sent += sent
        return i, None

    async def send(self, pings: Sequence[Ping]) -> int:
        """Send every ping, ``batch`` per event-loop turn; returns how many were sent."""
        before = self.stats.sent
        i, n = 0, len(pings)
        while i < n:
            i, full = self.send_now(pings, i, min(n, i + self.batch))
            if full is not None:
                if not await _wait_writable(full, self.block_timeout):
                    self.stats.abandoned += n - i
                    break
            elif i < n:
                await asyncio.sleep(0)
        return self.stats.sent - before

    def close(self) -> None:
        self.sockets.close()


async def _wait_writable(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    if fd < 0:
        return False
    loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(fd)


@dataclass(slots=True)
class ReceiverStats:
    datagrams: int = 0
    matched: int = 0  # answered a ping (by token or by address)
    not_ours: int = 0  # valid, but not a reply to one of our pings
    bad: int = 0  # malformed SIP response


class ReplyReceiver:
    """Feeds replies to the scheduler: from sockets it reads itself (reply port, exclusive
    sources) or from packets the daemon hands to :meth:`feed` (capture/HEP of the proxy port).
    """

    def __init__(self, scheduler: KeepaliveScheduler, pinger: OptionsPinger | None = None, *,
                 max_per_wakeup: int = 1000) -> None:
        self.scheduler = scheduler
        self.pinger = pinger
        self.max_per_wakeup = max_per_wakeup
        self.stats = ReceiverStats()
        self._socks: list[socket.socket] = []

    def feed(self, data: bytes, source: tuple) -> bool:
        """One datagram that came from ``source`` (IP, port, ...). True if it answered a ping.
        Never raises on bad input."""
        self.stats.datagrams += 1
        answered = False
        if self.pinger is not None and self.scheduler.reply_mode is ReplyMode.TOKEN:
            try:
                ping_id = self.pinger.match(data)
            except KeepaliveMessageError:
                self.stats.bad += 1
                return False
            if ping_id is not None:
                answered = self.scheduler.reply(ping_id)
        elif self.scheduler.reply_mode is ReplyMode.ADDRESS:
            answered = self.scheduler.heard_from((source[0], source[1])) > 0
        if answered:
            self.stats.matched += 1
        else:
            self.stats.not_ours += 1
        return answered

    def attach(self, sock: socket.socket) -> None:
        """Read ``sock`` from the running event loop until :meth:`close`."""
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain, sock)
        self._socks.append(sock)

    def _drain(self, sock: socket.socket) -> None:
        for _ in range(self.max_per_wakeup):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors surface here on some sockets; nothing to read, keep listening
                return
            self.feed(data, addr)

    def detach(self, sock: socket.socket) -> None:
        """Stop reading ``sock`` (call before closing it); the socket is not closed here."""
        if sock in self._socks:
            self._socks.remove(sock)
            with contextlib.suppress(RuntimeError):
                if sock.fileno() >= 0:
                    asyncio.get_running_loop().remove_reader(sock.fileno())

    def close(self) -> None:
        """Stop reading every attached socket (closing them is their owner's job)."""
        for sock in list(self._socks):
            self.detach(sock)

    def snapshot(self) -> dict:
        return asdict(self.stats)


# --- measuring -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendRate:
    sent: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def _sink(dest: str) -> socket.socket:
    # A receiver with a tiny buffer that is never read: datagrams are dropped at its queue, so
    # the measure covers the sender's path without ICMP port-unreachable traffic.
    sink = socket.socket(_family(dest), socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.bind((dest, 0))
    return sink


def measure_send_rate(n: int = 300_000, dest: str = "127.0.0.1",
                      payload: bytes = b"\x00\x00\x00\x00",
                      source: Address | None = None) -> SendRate:
    """Raw keepalive throughput: ``sendto`` of a prebuilt payload in a tight loop from a
    shared-style socket (bound, connected to discard) to a sink on ``dest`` (loopback only).
    A benchmark helper, not a test: the number depends on the machine."""
    with contextlib.closing(_sink(dest)) as sink:
        target = sink.getsockname()[:2]
        src = source or (dest, 0)
        with contextlib.closing(open_source_socket(src, shared=True)) as sock:
            send = sock.sendto
            sent = 0
            started = time.perf_counter()
            for _ in range(n):
                try:
                    send(payload, target)
                    sent += 1
                except BlockingIOError:
                    pass
            return SendRate(sent, time.perf_counter() - started)


def measure_sender_rate(n: int = 300_000, dest: str = "127.0.0.1",
                        kind: KeepaliveKind | str = KeepaliveKind.NULL) -> SendRate:
    """Throughput of :meth:`KeepaliveSender.send_now` over ``n`` pings (per-ping source lookup
    and, for OPTIONS, building each message): what a sweep can reach."""
    from .targets import PingTarget

    with contextlib.closing(_sink(dest)) as sink:
        target_addr = sink.getsockname()[:2]
        sender = KeepaliveSender(kind, source=(dest, 0))
        # port 0 binds an ephemeral port once; every ping then shares that socket
        target = PingTarget("sip:bench@" + dest, target_addr, None, "bench", 1)
        pings = [Ping(i, ("bench", str(i)), target) for i in range(1, n + 1)]
        started = time.perf_counter()
        i = 0
        while i < n:
            i, _ = sender.send_now(pings, i)
        seconds = time.perf_counter() - started
        sender.close()
        return SendRate(sender.stats.sent, seconds)
