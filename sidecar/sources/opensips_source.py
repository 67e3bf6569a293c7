"""``type = "opensips"``: contacts from OpenSIPS usrloc events, kept honest with MI reads.

OpenSIPS raises a JSON-RPC notification for every usrloc change (``E_UL_CONTACT_INSERT`` ...)
to the sockets subscribed with MI ``event_subscribe``: one datagram each with
``event_datagram`` (``udp:IP:PORT``), or concatenated JSON on one TCP connection with
``event_stream`` (``tcp:IP:PORT``). This source listens on one or both, turns events into
:meth:`Replica.local_put` / :meth:`Replica.local_delete`, and uses MI to make up for what
events cannot guarantee:

* **subscriptions expire and vanish on restart**: they are renewed every third of
  ``subscribe_expire_s``, and ``subscribers_list`` is checked every ``subscription_check_s``;
  if ours are gone (OpenSIPS restarted) they are redone and a full reconcile follows, since
  events raised while nobody was subscribed are lost. An event_stream connection that closes
  triggers the check at once.
* **UDP drops datagrams**: a gap is suspected when an UPDATE or REFRESH names a binding we do
  not hold, a DELETE names a different Call-ID than ours, or the contact count OpenSIPS
  reports (``get_statistics usrloc:``) drifts from ours on two checks in a row. Suspect AORs
  are re-read with ``ul_show_contact``; a drift triggers a full reconcile.
* **reconcile** (at start, after lost subscriptions, every ``reconcile_interval_s``): a
  *brief* ``ul_dump`` (``brief`` as the integer 1; a full dump of 50k contacts took 21 s and
  14.5 MB on OpenSIPS 3.6) lists the AORs, then ``ul_show_contact`` per AOR, rate-limited by
  ``show_contact_rate``. Our own bindings are made to match: missing or different ones are
  put, ones OpenSIPS no longer has (and that were last changed before the reconcile started)
  are deleted. A reply for an AOR that received an event while the read was in flight is
  discarded and the AOR re-read, so a stale read never undoes a newer event.

Whose contacts: in a full-sharing cluster every node raises every event, and the copy from the
node that did not receive the REGISTER has ``socket ""``; MI-added contacts have no socket
either. Only contacts on one of ``local_sockets`` (every non-empty socket when the list is
empty) are this node's to publish; the rest are ignored (``peer_copies_ignored``), the peer's
sidecar publishes them. The reconcile touches only bindings this node originated *and* whose
socket is local, so it never removes what another source or a peer stored.

Replayed copies: a sidecar that loads its peer's contacts into this OpenSIPS by REGISTER replay
(``[proxy] load_method = "register"``, opensips-cfg ``route[SC_REPLAY]``) makes OpenSIPS raise
ordinary events for them, on a local socket. The replay route marks them with the branch flag
``copy_flag_name`` (default ``SC_COPY``; list its bit in ``flag_bits``); events and MI contacts
carrying it are ignored (``replayed_copies_ignored``), or a standby would publish its peer's
contacts as its own. A re-REGISTER from the phone clears the flag.

Duplicates: subscribing both transports delivers every event twice, possibly far apart (the
event_stream sender lags under load). An event equal to what we hold is dropped, and a
put for a binding we deleted moments ago with the same Call-ID and no higher CSeq is a late
copy, not a re-registration, so it cannot resurrect the contact.

Bad input never raises out of here: it is counted (``parse_errors``, ``mi_errors``) and the
last message is kept in ``last_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, Section
from ..model import (
    AOR,
    ATTR,
    CALLID,
    CFLAGS,
    CSEQ,
    EXPIRES,
    FLAGS,
    HANDLE,
    INSTANCE,
    LAST_MODIFIED,
    METHODS,
    PATH,
    RECEIVED,
    SOCKET,
    URI,
    USER_AGENT,
    Q,
    handle_origin,
    now_ms,
    rec_bid,
)
from ..proxy.opensips_mi import OpensipsMi, OpensipsMiError
from .json_stream import JsonStreamError, JsonStreamSplitter
from .opensips_events import (
    E_UL_AOR_DELETE,
    E_UL_CONTACT_DELETE,
    E_UL_CONTACT_INSERT,
    E_UL_CONTACT_REFRESH,
    E_UL_CONTACT_UPDATE,
    OpensipsEventError,
    UsrlocEvent,
    event_change_kind,
    event_to_record,
    is_peer_copy,
    mi_contact_to_record,
    parse_event,
)
from .receive_buffer import set_receive_buffer
from .registrations import tally_local_put
from .registry import SourceContext

log = logging.getLogger(__name__)

# What we subscribe to. AOR_INSERT and LATENCY_UPDATE carry nothing we replicate.
SUBSCRIBED_EVENTS = (E_UL_CONTACT_INSERT, E_UL_CONTACT_UPDATE, E_UL_CONTACT_DELETE,
                     E_UL_CONTACT_REFRESH, E_UL_AOR_DELETE)
MAX_EVENT_BYTES = 64 * 1024  # one notification is ~500 bytes; anything this big is garbage
MAX_STREAM_CONNECTIONS = 8  # event_stream opens one per OpenSIPS instance
MAX_PENDING_AORS = 100_000  # beyond this a full reconcile is cheaper than per-AOR reads
MAX_AOR_RETRIES = 3  # re-reads of an AOR whose read raced with events
EXPIRES_SLACK_S = 2  # MI "Expires" is relative and rounded: tolerate this much difference
AOR_DELETE_GRACE_MS = 2000  # bindings changed this recently are re-read, not deleted
RECENT_DELETES = 65_536  # remembered deletes, to drop late duplicate puts
RECENT_DELETE_TTL_S = 300.0
COUNT_DRIFT_RATIO = 0.02  # count check tolerance: max(count_tolerance, 2 % of the table)
_RECORD_FIELDS = (AOR, URI, RECEIVED, PATH, SOCKET, Q, CALLID, CSEQ, USER_AGENT, FLAGS, ATTR)


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventListen:
    """One event listener: ``udp`` (event_datagram) or ``tcp`` (event_stream)."""

    proto: str
    host: str
    port: int

    def subscribe_socket(self, port: int) -> str:
        """The socket string OpenSIPS' ``event_subscribe`` wants for the bound port."""
        return f"{self.proto}:{self.host}:{port}"


@dataclass(frozen=True, slots=True)
class OpensipsSettings:
    name: str = "opensips"
    mi_url: str | None = None
    mi_fifo: Path | None = None
    mi_reply_dir: Path = Path("/tmp")
    mi_timeout_s: float = 5.0
    dump_timeout_s: float = 60.0
    events_udp: EventListen | None = None
    events_tcp: EventListen | None = None
    subscribe_expire_s: int = 3600
    subscription_check_s: float = 10.0
    local_sockets: frozenset[str] = frozenset()
    nat_bflag_mask: int = 1
    nat_flag_name: str = "NAT"
    flag_bits: tuple[tuple[str, int], ...] = ()
    copy_flag_name: str = "SC_COPY"  # branch flag of REGISTER-replayed copies (in flag_bits)
    table: str = "location"
    reconcile_interval_s: float = 3600.0
    show_contact_rate: float = 200.0
    count_tolerance: int = 100
    udp_rcvbuf: int = 64 * 1024 * 1024
    unsubscribe_on_stop: bool = True


def _parse_listen(value: str, where: str) -> EventListen:
    proto, sep, rest = value.partition(":")
    host, sep2, port_text = rest.rpartition(":")
    if not sep or not sep2 or proto not in ("udp", "tcp"):
        raise ConfigError(f"{where}: {value!r} is not udp:IP:PORT (event_datagram) or "
                          "tcp:IP:PORT (event_stream)")
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        raise ConfigError(f"{where}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{where}: port {port_text!r} is not 0..65535")
    return EventListen(proto, host, int(port_text))


def _str_list(section: Section, key: str) -> list[str]:
    """A string or an array of strings (Section has no list getter)."""
    section.used.add(key)
    raw = section.data.get(key, [])
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{section.name}.{key}: expected a string or an array of "
                          "non-empty strings")
    return items


def _flag_bits(section: Section, key: str) -> tuple[tuple[str, int], ...]:
    section.used.add(key)
    raw = section.data.get(key, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{section.name}.{key}: expected a table of flag name = bit mask")
    out = []
    for name, bit in raw.items():
        if isinstance(bit, bool) or not isinstance(bit, int) or not 0 < bit < (1 << 63):
            raise ConfigError(f"{section.name}.{key}.{name}: expected a positive integer "
                              "bit mask")
        out.append((name, bit))
    return tuple(out)


def parse_settings(section: Section, base: Path) -> OpensipsSettings:
    """Validate a ``[[sources]] type = "opensips"`` table; every error names its key."""
    d = OpensipsSettings()
    name = section.str("name", d.name) or d.name
    mi_url = section.str("mi_url")
    mi_fifo = section.path("mi_fifo", base)
    if mi_url is not None and not mi_url.startswith(("http://", "https://")):
        raise ConfigError(f"{section.name}.mi_url: {mi_url!r} is not an http(s):// URL")
    if mi_url is not None and mi_fifo is not None:
        raise ConfigError(f"{section.name}.mi_fifo: give mi_url (mi_http) or mi_fifo, not both")
    if mi_url is None and mi_fifo is None:
        raise ConfigError(f"{section.name}.mi_url: required (or mi_fifo): the source needs "
                          "MI to subscribe to events and to reconcile")
    listens: dict[str, EventListen] = {}
    where = f"{section.name}.events_listen"
    for value in _str_list(section, "events_listen"):
        listen = _parse_listen(value, where)
        if listen.proto in listens:
            raise ConfigError(f"{where}: more than one {listen.proto} listener")
        listens[listen.proto] = listen
    if not listens:
        raise ConfigError(f"{where}: required key is missing (udp:IP:PORT and/or tcp:IP:PORT)")
    sockets = _str_list(section, "local_sockets")
    for s in sockets:
        if s.partition(":")[0] not in ("udp", "tcp", "tls", "sctp", "ws", "wss", "bin"):
            raise ConfigError(f"{section.name}.local_sockets: {s!r} is not PROTO:IP:PORT "
                              "as OpenSIPS prints it (udp:203.0.113.10:5060)")
    expire = section.int("subscribe_expire_s", d.subscribe_expire_s, lo=2, hi=10 * 365 * 86400)
    return OpensipsSettings(
        name=name,
        mi_url=mi_url,
        mi_fifo=mi_fifo,
        mi_reply_dir=section.path("mi_reply_dir", base) or d.mi_reply_dir,
        mi_timeout_s=section.num("mi_timeout_s", d.mi_timeout_s, lo=0.05, hi=600),
        dump_timeout_s=section.num("dump_timeout_s", d.dump_timeout_s, lo=0.05, hi=3600),
        events_udp=listens.get("udp"),
        events_tcp=listens.get("tcp"),
        subscribe_expire_s=expire,
        subscription_check_s=section.num("subscription_check_s", d.subscription_check_s,
                                         lo=0.02, hi=86400),
        local_sockets=frozenset(sockets),
        nat_bflag_mask=section.int("nat_bflag_mask", d.nat_bflag_mask, lo=0, hi=(1 << 63) - 1),
        nat_flag_name=section.str("nat_flag_name", d.nat_flag_name) or d.nat_flag_name,
        flag_bits=_flag_bits(section, "flag_bits"),
        copy_flag_name=section.str("copy_flag_name", d.copy_flag_name) or d.copy_flag_name,
        table=section.str("table", d.table) or d.table,
        reconcile_interval_s=section.num("reconcile_interval_s", d.reconcile_interval_s,
                                         lo=0, hi=30 * 86400),
        show_contact_rate=section.num("show_contact_rate", d.show_contact_rate,
                                      lo=0.1, hi=1e6),
        count_tolerance=section.int("count_tolerance", d.count_tolerance, lo=0, hi=1 << 40),
        udp_rcvbuf=section.int("udp_rcvbuf", d.udp_rcvbuf, lo=0, hi=1 << 30),
        unsubscribe_on_stop=section.bool("unsubscribe_on_stop", d.unsubscribe_on_stop),
    )


def build(settings: OpensipsSettings, ctx: SourceContext) -> OpensipsSource:
    return OpensipsSource(settings, ctx)


# --- helpers ----------------------------------------------------------------------------------


@dataclass(slots=True)
class OpensipsSourceStats:
    """Counters for sc_status / metrics (see :meth:`OpensipsSource.status`)."""

    events: int = 0  # JSON values received (both transports)
    datagrams: int = 0
    stream_connections: int = 0
    parse_errors: int = 0
    peer_copies_ignored: int = 0
    replayed_copies_ignored: int = 0  # events of contacts a sidecar loaded by REGISTER replay
    ignored: int = 0  # AOR_INSERT, LATENCY_UPDATE, REFRESH ini-INVITE, other tables
    duplicates: int = 0  # second copy of an event we already applied
    puts: int = 0
    refreshes: int = 0
    deletes: int = 0
    stale: int = 0
    gaps: int = 0  # events that suggest a lost notification
    subscriptions: int = 0
    resubscribes: int = 0  # subscriptions found missing (OpenSIPS restarted) and redone
    renewals: int = 0
    reconciles: int = 0  # full reconciles completed
    aor_reconciles: int = 0  # ul_show_contact reads applied
    reconcile_puts: int = 0
    reconcile_deletes: int = 0
    count_mismatches: int = 0
    mi_errors: int = 0
    internal_errors: int = 0
    last_error: str = ""


def _next_lm(old: tuple | None) -> int:
    """``last_modified`` for our next version of a binding: now, but strictly after ``old``.

    Insert, update and delete of one contact can all land in the same millisecond; with the
    same Call-ID and CSeq the conflict rule then compares ``last_modified`` and a tie would
    make the proxy's own later change lose.
    """
    lm = now_ms()
    if old is not None and lm <= old[LAST_MODIFIED]:
        return old[LAST_MODIFIED] + 1
    return lm


class _TokenBucket:
    """At most ``rate`` acquisitions per second, bursts of ``burst`` (ul_show_contact pacing)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, rate / 10 if burst is None else burst)
        self._tokens = self.burst
        self._last = time.monotonic()

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)


class _DatagramReceiver(asyncio.DatagramProtocol):
    def __init__(self, source: OpensipsSource) -> None:
        self.source = source

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.source.feed_datagram(data)

    def error_received(self, exc: Exception) -> None:
        self.source.note_error(f"event_datagram socket: {exc}")


# --- the source -------------------------------------------------------------------------------


class OpensipsSource:
    """Event listener + MI supervisor for one OpenSIPS instance (see the module docstring).

    ``clock`` (seconds, like :func:`time.time`) turns MI's relative ``Expires`` into absolute
    times; tests pin it to the capture time of recorded payloads.
    """

    def __init__(self, settings: OpensipsSettings, ctx: SourceContext, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.name = settings.name
        self.ctx = ctx
        self.replica = ctx.replica
        self.store = ctx.replica.store
        self.clock = clock
        self.stats = OpensipsSourceStats()
        self.local_sockets = settings.local_sockets
        self.nat_mask = settings.nat_bflag_mask
        bits = dict(settings.flag_bits) or {settings.nat_flag_name: settings.nat_bflag_mask}
        self.flag_bits = bits
        self.cflag_mask = 0
        for bit in bits.values():
            self.cflag_mask |= bit
        self.copy_mask = bits.get(settings.copy_flag_name, 0)
        self.mi = (OpensipsMi(url=settings.mi_url, timeout=settings.mi_timeout_s)
                   if settings.mi_url else
                   OpensipsMi(fifo_path=settings.mi_fifo, reply_dir=settings.mi_reply_dir,
                              timeout=settings.mi_timeout_s))
        self.udp_socket: str | None = None  # "udp:IP:PORT" as subscribed (actual port)
        self.tcp_socket: str | None = None
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._stream_tasks: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._limiter = _TokenBucket(settings.show_contact_rate)
        self._changed = False
        # subscriptions
        self._subscribed_at: float | None = None  # monotonic time of the last full subscribe
        self._check_now = asyncio.Event()
        # reconcile
        self._full_wanted = asyncio.Event()
        self._full_running = False
        self._aor_queue: OrderedDict[str, int] = OrderedDict()  # aor -> retries so far
        self._aor_ready = asyncio.Event()
        self._inflight: dict[str, bool] = {}  # AOR being read over MI -> "an event raced it"
        self._recent_deletes: OrderedDict[tuple[str, str], tuple[str, int, float]] = \
            OrderedDict()
        # count drift detection
        self._count_baseline: int | None = None
        self._count_strikes = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the listeners, then subscribe and reconcile in the background.

        Nothing here waits for OpenSIPS: it may be down when the sidecar starts, and the
        daemon must come up anyway; the background tasks retry.
        """
        try:
            await self._listen()
        except OSError:
            await self.stop()  # e.g. the port is taken: release what was bound, then fail
            raise
        self._tasks = [
            asyncio.create_task(self._subscription_loop(), name=f"{self.name}-subscribe"),
            asyncio.create_task(self._reconcile_loop(), name=f"{self.name}-reconcile"),
            asyncio.create_task(self._aor_loop(), name=f"{self.name}-aor-reconcile"),
        ]
        log.info("%s: listening for OpenSIPS events on %s, MI %s", self.name,
                 ", ".join(x for x in (self.udp_socket, self.tcp_socket) if x), self.mi.endpoint)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.events_udp is not None:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _DatagramReceiver(self), local_addr=(s.events_udp.host.strip("[]"),
                                                             s.events_udp.port))
            self._udp_transport = transport
            sock = transport.get_extra_info("socket")
            set_receive_buffer(sock, s.udp_rcvbuf)
            self.udp_socket = s.events_udp.subscribe_socket(sock.getsockname()[1])
        if s.events_tcp is not None:
            self._tcp_server = await asyncio.start_server(
                self._on_stream, s.events_tcp.host.strip("[]"), s.events_tcp.port)
            port = self._tcp_server.sockets[0].getsockname()[1]
            self.tcp_socket = s.events_tcp.subscribe_socket(port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self.settings.unsubscribe_on_stop and self._subscribed_at is not None:
            # Best effort: otherwise OpenSIPS keeps sending to a closed port until expiry.
            with contextlib.suppress(OpensipsMiError, TimeoutError):
                async with asyncio.timeout(2.0):
                    for event, sock in self._wanted_subscriptions():
                        await self.mi.event_subscribe(event, sock, 0)
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            for t in list(self._stream_tasks):
                t.cancel()
            for t in list(self._stream_tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self._tcp_server.wait_closed()
            self._tcp_server = None
        await self.mi.close()

    def status(self) -> dict[str, Any]:
        out = asdict(self.stats)
        out.update(
            events_udp=self.udp_socket,
            events_tcp=self.tcp_socket,
            mi=self.mi.endpoint,
            pending_aors=len(self._aor_queue),
            reconcile_running=self._full_running,
        )
        return out

    def note_error(self, message: str) -> None:
        self.stats.last_error = message[:500]

    # ------------------------------------------------------------------ event input
    def feed_datagram(self, data: bytes) -> None:
        """One event_datagram notification (one JSON object per datagram)."""
        self.stats.datagrams += 1
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            self.stats.events += 1
            self._parse_error(f"event datagram is not JSON: {exc}")
            return
        self._handle_guarded(obj)
        self._flush()

    async def _on_stream(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """One event_stream connection: concatenated JSON objects, no delimiter."""
        task = asyncio.current_task()
        if len(self._stream_tasks) >= MAX_STREAM_CONNECTIONS:
            self.note_error("too many event_stream connections; refused one")
            writer.close()
            return
        assert task is not None
        self._stream_tasks.add(task)
        self.stats.stream_connections += 1
        splitter = JsonStreamSplitter(max_object=MAX_EVENT_BYTES)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.feed_stream(splitter, data)
        except (ConnectionError, OSError) as exc:
            self.note_error(f"event_stream connection: {exc}")
        finally:
            self._stream_tasks.discard(task)
            writer.close()
            # OpenSIPS keeps this connection for its lifetime: losing it hints at a restart.
            self._check_now.set()

    def feed_stream(self, splitter: JsonStreamSplitter, data: bytes) -> None:
        """Bytes of an event_stream connection; garbage is skipped up to the next ``{``."""
        values: list[Any] = []
        while True:
            try:
                values.extend(splitter.feed(data))
                break
            except JsonStreamError as exc:
                values.extend(exc.values)
                self.stats.events += 1
                self._parse_error(f"event_stream: {exc}")
                splitter.reset()
                data = b""
        for obj in values:
            self._handle_guarded(obj)
        self._flush()

    def _handle_guarded(self, obj: Any) -> None:
        try:
            self.handle_value(obj)
        except Exception as exc:  # a bug must not kill the listener; count it loudly
            self._internal_error("event", exc)

    def _internal_error(self, what: str, exc: Exception) -> None:
        self.stats.internal_errors += 1
        self.note_error(f"internal error ({what}): {exc!r}")
        log.error("%s: internal error (%s)", self.name, what, exc_info=exc)

    def _flush(self) -> None:
        if self._changed:
            self._changed = False
            self.ctx.kick()

    def _parse_error(self, message: str) -> None:
        self.stats.parse_errors += 1
        self.note_error(message)
        if self.stats.parse_errors <= 10 or self.stats.parse_errors % 10_000 == 0:
            log.warning("%s: %s (%d bad events so far)", self.name, message,
                        self.stats.parse_errors)

    def handle_value(self, obj: Any) -> None:
        """Apply one decoded notification to the replica (sans-I/O core of the source)."""
        st = self.stats
        st.events += 1
        try:
            ev = parse_event(obj)
        except OpensipsEventError as exc:
            self._parse_error(str(exc))
            return
        if ev.domain != self.settings.table:
            st.ignored += 1
            return
        kind = event_change_kind(ev)
        if kind == "ignore":
            st.ignored += 1
            return
        if self._inflight and ev.aor in self._inflight:
            self._inflight[ev.aor] = True  # an MI read of this AOR is now possibly stale
        if kind == "delete_aor":
            self._on_aor_delete(ev.aor)
        elif is_peer_copy(ev, self.local_sockets):
            st.peer_copies_ignored += 1
        elif ev.bflags & self.copy_mask:
            st.replayed_copies_ignored += 1
        elif kind == "put":
            self._on_put(ev)
        elif kind == "delete":
            self._on_delete(ev)
        else:
            self._on_refresh(ev)

    def _on_put(self, ev: UsrlocEvent) -> None:
        st = self.stats
        try:
            rec = event_to_record(ev, handle=0, last_modified=0, nat_bflag_mask=self.nat_mask)
        except OpensipsEventError as exc:
            self._parse_error(str(exc))
            return
        aor, uri = rec[AOR], rec[URI]
        old = self.store.get(aor, uri)
        if old is None:
            if self._is_late_copy(aor, uri, rec[CALLID], rec[CSEQ]):
                st.duplicates += 1
                return
            if ev.name == E_UL_CONTACT_UPDATE:
                # An update of something we never saw inserted: we lost at least one event.
                self._gap(aor)
        else:
            if old[METHODS] is not None:  # events do not carry methods; keep what MI said
                rec = (*rec[:METHODS], old[METHODS], *rec[METHODS + 1:])
            if old[:LAST_MODIFIED] == rec[:LAST_MODIFIED]:
                st.duplicates += 1
                return
        rec = (*rec[:LAST_MODIFIED], _next_lm(old), rec[HANDLE])
        result = self.replica.local_put(rec)
        tally_local_put(st, result)
        if result == "stale":
            return
        self._changed = True

    def _on_delete(self, ev: UsrlocEvent) -> None:
        st = self.stats
        aor, uri, callid = ev.aor, ev.uri or "", ev.callid or ""
        cseq = ev.cseq or 0
        old = self.store.get(aor, uri)
        if old is None:
            st.stale += 1  # already gone: expired here first, or the other copy came first
            return
        if old[CALLID] != callid:
            # OpenSIPS deleted a version we do not hold: ours may be newer or we missed one.
            self._gap(aor)
            return
        if self.replica.local_delete(aor, uri, callid, cseq, _next_lm(old)):
            st.deletes += 1
            self._remember_delete(aor, uri, callid, cseq)
            self._changed = True
        else:
            st.stale += 1

    def _on_refresh(self, ev: UsrlocEvent) -> None:
        """``reg-refresh``: only the expiry may change; the rest of the record stays."""
        st = self.stats
        old = self.store.get(ev.aor, ev.uri or "")
        if old is None or old[CALLID] != ev.callid:
            self._gap(ev.aor)
            return
        if old[EXPIRES] == ev.expires:
            st.duplicates += 1
            return
        rec = (*old[:EXPIRES], ev.expires, *old[EXPIRES + 1:LAST_MODIFIED], _next_lm(old), 0)
        if self.replica.local_put(rec) == "stale":
            st.stale += 1
            return
        st.refreshes += 1
        self._changed = True

    def _on_aor_delete(self, aor: str) -> None:
        """Safety net after the per-contact DELETEs: drop our own bindings of the AOR.

        Datagrams come from several OpenSIPS processes and may be reordered, so a binding
        changed in the last moments (a re-registration racing the removal) is re-read over
        MI instead of deleted.
        """
        now = now_ms()
        for rec in self.store.lookup_aor(aor):
            if not self._own(rec):
                continue
            if now - rec[LAST_MODIFIED] < AOR_DELETE_GRACE_MS:
                self.schedule_aor(aor)
                continue
            bid = rec_bid(rec)
            if self.replica.local_delete(aor, bid, rec[CALLID], rec[CSEQ], _next_lm(rec)):
                self.stats.deletes += 1
                self._remember_delete(aor, bid, rec[CALLID], rec[CSEQ])
                self._changed = True

    def _own(self, rec: tuple) -> bool:
        """A binding this source is responsible for: ours by origin and on a local socket."""
        return (handle_origin(rec[HANDLE]) == self.replica.node_id
                and self._local(rec[SOCKET]) and rec[INSTANCE] is None)

    def _local(self, sock: str | None) -> bool:
        return sock is not None and (not self.local_sockets or sock in self.local_sockets)

    def _remember_delete(self, aor: str, bid: str, callid: str, cseq: int) -> None:
        recent = self._recent_deletes
        recent.pop((aor, bid), None)
        recent[(aor, bid)] = (callid, cseq, time.monotonic() + RECENT_DELETE_TTL_S)
        while len(recent) > RECENT_DELETES:
            recent.popitem(last=False)

    def _is_late_copy(self, aor: str, bid: str, callid: str, cseq: int) -> bool:
        entry = self._recent_deletes.get((aor, bid))
        if entry is None:
            return False
        if entry[2] < time.monotonic():
            del self._recent_deletes[(aor, bid)]
            return False
        return entry[0] == callid and cseq <= entry[1]

    def _gap(self, aor: str) -> None:
        self.stats.gaps += 1
        self.schedule_aor(aor)

    # ------------------------------------------------------------------ MI: subscriptions
    def _wanted_subscriptions(self) -> list[tuple[str, str]]:
        sockets = [s for s in (self.udp_socket, self.tcp_socket) if s]
        return [(event, sock) for sock in sockets for event in SUBSCRIBED_EVENTS]

    async def _subscribe_all(self) -> None:
        expire = self.settings.subscribe_expire_s
        wanted = self._wanted_subscriptions()
        for event, sock in wanted:
            await self.mi.event_subscribe(event, sock, expire)
        self.stats.subscriptions = len(wanted)
        self._subscribed_at = time.monotonic()

    async def check_subscriptions(self) -> None:
        """Subscribe, renew when a third of the expiry has passed, redo lost ones.

        Lost subscriptions (``subscribers_list`` lacks ours) mean OpenSIPS restarted, so
        events were missed: a full reconcile follows.
        """
        if self._subscribed_at is None:
            await self._subscribe_all()
            self.request_full_reconcile()
            return
        present = await self.mi.subscribers_list()
        missing = [(e, s) for e, s in self._wanted_subscriptions()
                   if s not in present.get(e, {})]
        if missing:
            self.stats.resubscribes += 1
            log.warning("%s: %d event subscription(s) missing in OpenSIPS (restarted?); "
                        "subscribing again and reconciling", self.name, len(missing))
            await self._subscribe_all()
            self.request_full_reconcile()
            return
        if time.monotonic() - self._subscribed_at >= self.settings.subscribe_expire_s / 3:
            await self._subscribe_all()
            self.stats.renewals += 1

    async def _subscription_loop(self) -> None:
        interval = self.settings.subscription_check_s
        while True:
            self._check_now.clear()
            try:
                await self.check_subscriptions()
                if not self._full_running:
                    await self.check_counts()
            except OpensipsMiError as exc:
                self._mi_error(exc)
            except Exception as exc:  # keep supervising whatever happens
                self._internal_error("subscription check", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), interval)

    def _mi_error(self, exc: OpensipsMiError) -> None:
        self.stats.mi_errors += 1
        self.note_error(f"MI: {exc}")
        if self.stats.mi_errors <= 10 or self.stats.mi_errors % 1000 == 0:
            log.warning("%s: MI call failed: %s", self.name, exc)

    # ------------------------------------------------------------------ MI: drift check
    async def check_counts(self) -> None:
        """Compare OpenSIPS' contact count with ours; two drifts in a row -> reconcile.

        The counts differ anyway (OpenSIPS holds MI-added contacts we do not publish, removes
        expired ones up to ``timer_interval`` late, and a full-sharing peer's contacts are
        replicated by the peer's sidecar), so what is watched is the *change* of the
        difference since the last reconcile, with a tolerance.
        """
        stats = await self.mi.get_statistics(["usrloc:"])
        theirs = stats.get(f"usrloc:{self.settings.table}-contacts")
        if theirs is None:
            return
        offset = theirs - len(self.store)
        if self._count_baseline is None:
            self._count_baseline = offset
            return
        tolerance = max(self.settings.count_tolerance, int(theirs * COUNT_DRIFT_RATIO))
        if abs(offset - self._count_baseline) <= tolerance:
            self._count_strikes = 0
            return
        self._count_strikes += 1
        if self._count_strikes >= 2:
            self._count_strikes = 0
            self.stats.count_mismatches += 1
            log.warning("%s: OpenSIPS reports %d contacts, we hold %d (expected offset %d): "
                        "reconciling", self.name, theirs, len(self.store), self._count_baseline)
            self.request_full_reconcile()

    # ------------------------------------------------------------------ MI: reconcile
    def request_full_reconcile(self) -> None:
        self._full_wanted.set()

    def schedule_aor(self, aor: str) -> None:
        """Re-read one AOR over MI soon (rate-limited, de-duplicated)."""
        if aor in self._aor_queue:
            return
        if len(self._aor_queue) >= MAX_PENDING_AORS:
            self._aor_queue.clear()
            self.request_full_reconcile()
            return
        self._aor_queue[aor] = 0
        self._aor_ready.set()

    async def _reconcile_loop(self) -> None:
        interval = self.settings.reconcile_interval_s or None
        retry = max(self.settings.subscription_check_s, 0.05)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full_wanted.wait(), interval)
            self._full_wanted.clear()
            try:
                await self.reconcile_all()
            except Exception as exc:  # MI failures and bugs alike: retry later
                if isinstance(exc, OpensipsMiError):
                    self._mi_error(exc)
                else:
                    self._internal_error("reconcile", exc)
                await asyncio.sleep(retry)
                self._full_wanted.set()

    async def _aor_loop(self) -> None:
        while True:
            await self._aor_ready.wait()
            while self._aor_queue:
                aor, retries = self._aor_queue.popitem(last=False)
                await self._limiter.acquire()
                try:
                    raced = await self.reconcile_aor(aor)
                except OpensipsMiError as exc:
                    self._mi_error(exc)
                    raced = True
                except Exception as exc:
                    self._internal_error(f"re-read of AOR {aor[:64]!r}", exc)
                    raced = False
                if raced and retries < MAX_AOR_RETRIES and aor not in self._aor_queue:
                    self._aor_queue[aor] = retries + 1
            self._aor_ready.clear()

    async def reconcile_all(self) -> None:
        """Make our own bindings match OpenSIPS: brief dump, then ``ul_show_contact`` per AOR."""
        self._full_running = True
        try:
            started = now_ms()
            table = self.settings.table
            aors = await self.mi.ul_dump_brief(table, timeout=self.settings.dump_timeout_s)
            listed = set(aors)
            for aor in aors:
                await self._limiter.acquire()
                if await self.reconcile_aor(aor, started):
                    self.schedule_aor(aor)
            # Our bindings of AORs OpenSIPS did not list at all.
            doomed = [r for r in self.store
                      if r[AOR] not in listed and r[LAST_MODIFIED] < started and self._own(r)]
            for i, rec in enumerate(doomed):
                self._reconcile_delete(rec)
                if i % 5000 == 4999:
                    self._flush()
                    await asyncio.sleep(0)
            self._flush()
            self.stats.reconciles += 1
            self._count_baseline = None  # re-learn the count offset from the repaired state
            log.info("%s: reconciled %d AORs with OpenSIPS", self.name, len(aors))
        finally:
            self._full_running = False

    async def reconcile_aor(self, aor: str, started: int | None = None) -> bool:
        """Re-read one AOR and repair our bindings of it; True if an event raced the read."""
        began = now_ms() if started is None else started
        self._inflight[aor] = False
        try:
            contacts = await self.mi.ul_show_contact(self.settings.table, aor)
        finally:
            raced = self._inflight.pop(aor, False)
        if raced:
            return True
        now = self.clock()
        theirs: dict[str, tuple] = {}
        for c in contacts:
            try:
                rec = mi_contact_to_record(
                    aor, c, now=now, handle=0, last_modified=0, nat_bflag_mask=self.nat_mask,
                    nat_flag_name=self.settings.nat_flag_name, flag_bits=self.flag_bits)
            except OpensipsEventError as exc:
                self._parse_error(f"MI ul_show_contact {aor!r}: {exc}")
                continue
            if rec is not None and self._local(rec[SOCKET]):
                if rec[CFLAGS] & self.copy_mask:
                    self.stats.replayed_copies_ignored += 1
                    continue
                theirs[rec[URI]] = rec
        st = self.stats
        for uri, rec in theirs.items():
            old = self.store.get(aor, uri)
            if old is not None and self._same(old, rec):
                continue
            rec = (*rec[:LAST_MODIFIED], _next_lm(old), rec[HANDLE])
            if self.replica.local_put(rec) != "stale":
                st.reconcile_puts += 1
                self._changed = True
        for old in self.store.lookup_aor(aor):
            if old[URI] not in theirs and old[LAST_MODIFIED] < began and self._own(old):
                self._reconcile_delete(old)
        st.aor_reconciles += 1
        self._flush()
        return False

    def _reconcile_delete(self, rec: tuple) -> None:
        aor, bid = rec[AOR], rec_bid(rec)
        if self.replica.local_delete(aor, bid, rec[CALLID], rec[CSEQ], _next_lm(rec)):
            self.stats.reconcile_deletes += 1
            self._remember_delete(aor, bid, rec[CALLID], rec[CSEQ])
            self._changed = True

    def _same(self, old: tuple, new: tuple) -> bool:
        """Equal as far as MI can tell (MI rounds Expires to seconds and adds Methods)."""
        for i in _RECORD_FIELDS:
            if old[i] != new[i]:
                return False
        if (old[CFLAGS] & self.cflag_mask) != (new[CFLAGS] & self.cflag_mask):
            return False
        a, b = old[EXPIRES], new[EXPIRES]
        return a == b or (a != 0 and b != 0 and abs(a - b) <= EXPIRES_SLACK_S)


__all__ = ["EventListen", "OpensipsSettings", "OpensipsSource", "OpensipsSourceStats",
           "build", "parse_settings"]
