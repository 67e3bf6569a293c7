"""What follows the role: NAT keepalive ownership and loading replicated contacts into the
local proxy.

* ``[keepalive] mode = "proxy"``: the proxy's own pinger (Kamailio ``nathelper.enable_ping``,
  OpenSIPS ``nh_enable_ping``) is switched on on the active node and off on the passive one,
  and re-asserted periodically because a restarted proxy forgets.
* ``[keepalive] mode = "sidecar"``: the proxy's pinger is kept off everywhere and the active
  sidecar sends the keepalives itself from the proxy's socket (VIP:port), spread over the
  interval, sweeping every NATed contact right after a promotion, and deleting (replicated)
  contacts that stop answering.
* ``[proxy] load``: replicated contacts are written into the local proxy with ``ul.add`` —
  continuously (``warm``: the standby's proxy already holds every contact when it takes over)
  or at promotion (``on_promotion``). Loading never makes the standby ping: its pinger is off.
  ``load_method = "register"`` writes them losslessly instead, by replaying each contact as a
  REGISTER to the proxy's replay route (:mod:`sidecar.proxy.replay_client`), several in
  flight at once; removals still go over RPC/MI.

The role service calls :meth:`Ownership.switch` on every role change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from .keepalive.messages import OptionsPinger
from .keepalive.proxy_pinger import KamailioPinger, OpensipsPinger, ProxyPingingKeeper
from .keepalive.scheduler import Drop, KeepaliveScheduler
from .keepalive.sender import KeepaliveSender, ReplyReceiver, open_reply_socket
from .keepalive.service import KeepaliveService
from .model import CALLID, CSEQ, HANDLE, LAST_MODIFIED, URI, rec_bid
from .proxy.kamailio_dump import ProxyRpcError
from .replica import Replica

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """``[proxy]``: how to reach the local proxy's management interface."""

    type: str  # kamailio | opensips
    rpc_url: str | None = None
    fifo: str | None = None
    table: str = "location"
    load: str = "off"  # off | warm | on_promotion
    load_interval_s: float = 2.0
    load_rate: float = 2000.0  # ul.add calls per second at most
    timeout_s: float = 5.0
    load_method: str = "rpc"  # rpc (ul.add / ul_add) | register (REGISTER replay)
    replay_target: tuple[str, int] = ("127.0.0.1", 5060)  # UDP IP:PORT of the replay route
    replay_source: str = "127.0.0.1"  # address replays are sent from (the proxy trusts it)
    replay_window: int = 64  # replay transactions in flight at once


@dataclass(frozen=True, slots=True)
class KeepaliveSettings:
    mode: str = "proxy"  # proxy | sidecar | off
    reassert_s: float = 10.0
    interval_s: float = 20.0
    kind: str = "options"  # options | crlf | null
    source: tuple[str, int] | None = None
    reply_via: tuple[str, int] | None = None
    max_lost: int = 3
    sweep_rate: float = 100_000.0
    from_uri: str = "sip:pinger@localhost"


def make_proxy_client(p: ProxySettings) -> Any:
    if p.type == "kamailio":
        from .proxy.kamailio import KamailioRpc

        return KamailioRpc(url=p.rpc_url, fifo_path=p.fifo, timeout=p.timeout_s)
    from .proxy.opensips_mi import OpensipsMi

    return OpensipsMi(url=p.rpc_url, fifo_path=p.fifo, timeout=p.timeout_s)


def make_loader(p: ProxySettings, client: Any, node_id: int) -> Any:
    """What the loader writes contacts with: the RPC/MI client itself (``load_method =
    "rpc"``), or a REGISTER-replay adapter that delegates removals to it."""
    if p.load_method != "register":
        return client
    from .proxy.replay_client import RegisterReplayClient

    return RegisterReplayClient(client, target=p.replay_target, source_ip=p.replay_source,
                                node_id=node_id, window=p.replay_window,
                                timeout_s=p.timeout_s)


class Ownership:
    def __init__(self, replica: Replica, kick, proxy: ProxySettings | None,
                 keepalive: KeepaliveSettings | None) -> None:
        self.replica = replica
        self.kick = kick
        self.proxy_settings = proxy
        self.ka = keepalive or KeepaliveSettings(mode="off")
        self.client = make_proxy_client(proxy) if proxy is not None else None
        self.loader = (make_loader(proxy, self.client, replica.node_id)
                       if proxy is not None else None)
        self.keeper: ProxyPingingKeeper | None = None
        self.service: KeepaliveService | None = None
        self.active = False
        # binding key -> (handle, last_modified, contact URI) of the version loaded
        self.loaded: dict[tuple[str, str], tuple[int, int, str]] = {}
        self.load_stats = {"added": 0, "removed": 0, "errors": 0, "passes": 0, "rejected": 0}
        # binding key -> version the proxy refused (4xx to a replay): not retried until it changes
        self.rejected: dict[tuple[str, str], tuple[int, int, str]] = {}
        self.last_error = ""
        self._tasks: list[asyncio.Task] = []
        self._load_now = asyncio.Event()
        self._refresh_now = asyncio.Event()  # rebuild the keepalive wheel now (promotion)
        self.refreshes = 0  # keepalive wheel rebuilds done
        self._wheel_generation = -1  # replica.bulk_generation the last rebuild started from
        if self.ka.mode in ("proxy", "sidecar") and self.client is not None:
            pinger = (KamailioPinger(self.client) if proxy and proxy.type == "kamailio"
                      else OpensipsPinger(self.client))
            self.keeper = ProxyPingingKeeper(pinger, period=self.ka.reassert_s)
        if self.ka.mode == "sidecar":
            scheduler = KeepaliveScheduler(self.ka.interval_s, max_lost=self.ka.max_lost,
                                           reply_mode="token" if self.ka.kind == "options"
                                           and self.ka.reply_via else "none",
                                           sweep_rate=self.ka.sweep_rate)
            pinger = OptionsPinger(from_uri=self.ka.from_uri) if self.ka.kind == "options" \
                else None
            sender = KeepaliveSender(self.ka.kind, pinger=pinger, source=self.ka.source,
                                     reply_via=self.ka.reply_via)
            receiver = None
            if pinger is not None and self.ka.reply_via is not None:
                receiver = ReplyReceiver(scheduler, pinger)
            self.service = KeepaliveService(scheduler, sender, receiver=receiver,
                                            on_drop=self._drop)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.service is not None:
            if self.service.receiver is not None and self.ka.reply_via is not None:
                self.service.receiver.attach(open_reply_socket(self.ka.reply_via))
            self.service.start()
            self._tasks.append(asyncio.create_task(self._refresh_targets(), name="ka-targets"))
        if self.keeper is not None:
            await self.keeper.apply(self._proxy_should_ping())
            self._tasks.append(asyncio.create_task(self.keeper.run(), name="ka-keeper"))
        if self.proxy_settings is not None and self.proxy_settings.load != "off":
            self._tasks.append(asyncio.create_task(self._loader(), name="proxy-loader"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.service is not None:
            await self.service.stop()
        if self.loader is not None and self.loader is not self.client:
            with contextlib.suppress(Exception):
                await self.loader.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()

    def _proxy_should_ping(self) -> bool:
        return self.active and self.ka.mode == "proxy"

    async def switch(self, active: bool) -> None:
        """Role changed (called by the role service, in order with VIP moves).

        The wheel is kept current on the passive node too (:meth:`_refresh_targets`), so a
        promotion starts the sweep at once instead of spending ~0.5 s per 100,000 contacts
        rebuilding first; a fresh rebuild follows in the background. Contacts it adds
        registered within the last refresh interval, so their pinholes are fresh and their
        regular slot (within ``interval_s``) is soon enough."""
        self.active = active
        if self.service is not None:
            if active and not self._wheel_is_current():
                # a snapshot (or a repair) brought contacts the wheel has not seen: their
                # pinholes may be old, so the sweep must include them
                await self.refresh_wheel()
            self.service.set_active(active)  # promotion sweeps every NATed contact
            if active:
                self._refresh_now.set()
        if self.keeper is not None:
            await self.keeper.apply(self._proxy_should_ping())
        if active and self.proxy_settings is not None and self.proxy_settings.load != "off":
            self._load_now.set()  # make sure the proxy holds everything before it serves

    # ------------------------------------------------------------ sidecar keepalives
    async def refresh_wheel(self) -> None:
        """Rebuild the keepalive wheel from a copy of the table, in slices."""
        assert self.service is not None
        generation = self.replica.bulk_generation
        for _ in self.service.scheduler.rebuild_in_slices(self.replica.store.records()):
            await asyncio.sleep(0)
        self._wheel_generation = generation
        self.refreshes += 1

    def _wheel_is_current(self) -> bool:
        """The wheel was rebuilt from a copy of the table taken after the last bulk arrival
        (snapshot, repair): what it lacks came over the live stream, i.e. registered or
        refreshed since, with a fresh pinhole."""
        return self._wheel_generation == self.replica.bulk_generation

    async def _refresh_targets(self) -> None:
        """Re-read the table at start and then once per interval, on the passive node too:
        contacts registered meanwhile join the spread schedule (a fresh registration has just
        opened its pinhole anyway), and a promotion finds the wheel ready. The rebuild runs
        in slices so replication and heartbeats are never held up by it."""
        while True:
            await self.refresh_wheel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ka.interval_s):
                    await self._refresh_now.wait()
            self._refresh_now.clear()

    def _drop(self, d: Drop) -> None:
        aor, bid = d.key
        rec = self.replica.store.get(aor, bid)
        if rec is None or rec[CALLID] != d.target.callid or rec[CSEQ] != d.target.cseq:
            return  # re-registered meanwhile: the phone is alive
        if self.replica.local_delete(aor, bid, rec[CALLID], rec[CSEQ]):
            log.info("dropped %s %s after %d lost keepalives", aor, bid, d.lost)
            self.kick()

    # ------------------------------------------------------------ proxy loading
    async def _loader(self) -> None:
        p = self.proxy_settings
        assert p is not None and self.client is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(p.load_interval_s):
                    await self._load_now.wait()
            self._load_now.clear()
            if p.load == "on_promotion" and not self.active:
                continue
            try:
                await self.load_pass()
            except Exception as exc:  # the proxy is down or refuses: try again next pass
                self.load_stats["errors"] += 1
                self.last_error = f"proxy load: {exc}"
                log.warning("%s", self.last_error)

    async def load_pass(self) -> None:
        """Write into the proxy what it lacks: replicated contacts not yet loaded (or changed
        since), and remove the ones that are gone. Own-origin contacts came from this proxy
        while it was active; on a passive node (e.g. restarted after a failover) they are
        loaded too, since its proxy may have lost them."""
        p = self.proxy_settings
        assert p is not None and self.client is not None
        node = self.replica.node_id
        now = time.time()
        current: dict[tuple[str, str], tuple] = {}
        for rec in self.replica.store:
            if (not self.active or rec[HANDLE] >> 56 != node) and (rec[5] == 0 or rec[5] > now):
                current[(rec[0], rec_bid(rec))] = rec
        delay = 1.0 / p.load_rate if p.load_rate > 0 else 0.0
        loader = self.loader if self.loader is not None else self.client
        window = getattr(loader, "window", 1)
        if window > 1:
            await self._load_concurrently(loader, current, window, delay, p.table)
        else:
            for key, rec in current.items():
                version = (rec[HANDLE], rec[LAST_MODIFIED], rec[URI])
                if self.loaded.get(key) == version:
                    continue
                await loader.ul_add_record(rec, table=p.table)
                self.loaded[key] = version
                self.load_stats["added"] += 1
                if delay:
                    await asyncio.sleep(delay)
        for key in [k for k in self.rejected if k not in current]:
            del self.rejected[key]
        for key in [k for k in self.loaded if k not in current]:
            uri = self.loaded.pop(key)[2]
            if self.replica.store.get(*key) is not None:
                continue  # now an own-origin contact: the proxy holds it itself
            with contextlib.suppress(Exception):
                await self.client.ul_rm_contact(p.table, key[0], uri)
                self.load_stats["removed"] += 1
        self.load_stats["passes"] += 1

    async def _load_concurrently(self, loader: Any, current: dict[tuple[str, str], tuple],
                                 window: int, delay: float, table: str) -> None:
        """Load what the proxy lacks with up to ``window`` loads in flight (REGISTER replay),
        started at most ``load_rate`` per second.

        A contact the proxy refuses (a final non-2xx other than 403) is counted, logged and
        skipped until its version changes; a 5xx is retried next pass. No answer at all, or
        403 (this node is not trusted: a config error), stops the pass and raises like a
        failed ``ul.add``; loads already in flight finish first.
        """
        slots = asyncio.Semaphore(window)
        fatal: list[BaseException] = []

        async def load_one(key: tuple[str, str], rec: tuple,
                           version: tuple[int, int, str]) -> None:
            try:
                await loader.ul_add_record(rec, table=table)
            except ProxyRpcError as exc:
                if exc.code is None or exc.code == 403:
                    fatal.append(exc)
                    return
                self.load_stats["errors"] += 1
                self.load_stats["rejected"] += 1
                self.last_error = f"proxy load: {exc}"
                log.warning("%s", self.last_error)
                if exc.code < 500:
                    self.rejected[key] = version
                return
            except Exception as exc:  # the proxy is unreachable: end the pass
                fatal.append(exc)
                return
            finally:
                slots.release()
            self.loaded[key] = version
            self.load_stats["added"] += 1

        tasks: list[asyncio.Task] = []
        started = time.monotonic()
        try:
            for key, rec in current.items():
                version = (rec[HANDLE], rec[LAST_MODIFIED], rec[URI])
                if self.loaded.get(key) == version or self.rejected.get(key) == version:
                    continue
                await slots.acquire()
                if fatal:
                    slots.release()
                    break
                tasks.append(asyncio.create_task(load_one(key, rec, version)))
                # Pace against the clock, not per call: a sleep of a fraction of a millisecond
                # costs more than that, which would cap the rate far below load_rate.
                ahead = started + len(tasks) * delay - time.monotonic()
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        if fatal:
            raise fatal[0]

    def status(self) -> dict:
        out: dict[str, Any] = {"mode": self.ka.mode, "active": self.active,
                               "last_error": self.last_error}
        if self.keeper is not None:
            out["proxy_pinger"] = self.keeper.snapshot()
        if self.service is not None:
            out["sidecar_pings"] = {**self.service.snapshot(), "wheel_refreshes": self.refreshes}
        if self.proxy_settings is not None:
            out["proxy_load"] = {"mode": self.proxy_settings.load, "loaded": len(self.loaded),
                                 "method": self.proxy_settings.load_method, **self.load_stats}
            if self.loader is not None and hasattr(self.loader, "snapshot"):
                out["proxy_load"]["replay"] = self.loader.snapshot()
        return out
