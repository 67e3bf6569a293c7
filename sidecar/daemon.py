"""`sidecar run`: wires one node together — replica, publisher, subscribers, sources, admin.

The daemon owns the asyncio loop and the lifetimes; every piece it starts has a single job
and lives in its own module (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Iterator

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from .admin.commands import CommandRegistry
from .admin.node_commands import register_node_commands
from .admin.server import AdminServer
from .config import Config
from .incarnation import next_incarnation
from .metrics import NodeMetrics
from .ownership import Ownership
from .persist import Durability
from .replica import Replica
from .replication.publisher import Publisher
from .replication.security import CurveConfig, load_public_key
from .replication.subscriber import Subscriber
from .role.service import RoleService
from .sources.ingest import IngestSource
from .sources.registry import Source, SourceContext, build_source
from .store import ContactStore

log = logging.getLogger(__name__)

GC_THRESHOLDS = tuple(int(x) for x in os.environ.get("SIDECAR_GC", "5000,20,50").split(","))


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.ctx = zmq.asyncio.Context()
        rep = cfg.replication
        self.replica = Replica(cfg.node_id, ContactStore(tombstone_ttl=cfg.tombstone_ttl_s),
                               incarnation=next_incarnation(cfg.state_dir),
                               max_batch=rep.max_batch, ring_changes=rep.ring_changes,
                               renew_incarnation=lambda m: next_incarnation(cfg.state_dir,
                                                                            minimum=m))
        self.curve: CurveConfig | None = None
        self.authenticator: AsyncioAuthenticator | None = None
        self.publisher: Publisher | None = None
        self.subscribers: list[Subscriber] = []
        self.ingest: IngestSource | None = None
        self.sources: list[Source] = []
        self.role_service: RoleService | None = None
        self.ownership: Ownership | None = None
        self.durability: Durability | None = None
        self.restore_report: dict | None = None
        self.redis = None
        self.directory = None  # RedisDirectory when [redis] mode = "cluster"
        self.admin: AdminServer | None = None
        self.registry = CommandRegistry()
        self.metrics = NodeMetrics(self)
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()

    def role(self) -> str:
        """Without [role], every node is an 'active' publisher (replication only)."""
        return self.role_service.role if self.role_service else "active"

    async def start(self) -> None:
        cfg, rep = self.cfg, self.cfg.replication
        dur = cfg.durability
        if dur is not None and dur.enabled:
            # Cold start: snapshot + change log back into the store before anything else
            # (restored contacts are neither logged again nor published: they are history).
            self.durability = Durability(
                cfg.state_dir / "data", node_id=cfg.node_id, fsync=dur.fsync,
                fsync_interval_s=dur.fsync_interval_s,
                snapshot_interval_s=dur.snapshot_interval_s, retention=dur.retention)
            report = self.durability.restore(self.replica.store)
            self.restore_report = report.as_dict()
            log.info("restored %d contacts (%d from snapshot, %d log records, %d expired "
                     "dropped)%s", report.contacts, report.snapshot_records, report.log_records,
                     report.expired_dropped,
                     "" if report.clean else f"; damage: {self.restore_report['damage']}")
            self.replica.journal = self.durability
            await self.durability.start(self.replica.store)
        if cfg.redis is not None and cfg.redis.mode == "cluster":
            if cfg.redis.directory:
                await self._start_directory(cfg.redis)
        elif cfg.redis is not None:
            await self._start_redis(cfg.redis)
        # Contact tuples are GC-untracked, but building a million of them triggers many
        # young-generation collections; a larger threshold keeps bulk loads at full speed.
        gc.set_threshold(*GC_THRESHOLDS)
        if cfg.curve.enabled:
            assert cfg.curve.secret_key is not None
            self.curve = CurveConfig.from_files(cfg.curve.secret_key, cfg.curve.authorized_keys)
            self.authenticator = AsyncioAuthenticator(self.ctx)
            self.authenticator.start()
            location = str(cfg.curve.authorized_keys) if cfg.curve.authorized_keys \
                else zmq.auth.CURVE_ALLOW_ANY
            self.authenticator.configure_curve(domain="*", location=location)
        self.publisher = Publisher(
            self.ctx, self.replica, rep.pub, rep.sync, heartbeat_s=rep.heartbeat_ms / 1000,
            sndhwm=rep.sndhwm, snapshot_chunk=rep.snapshot_chunk, curve=self.curve,
            tcp_buffer=rep.tcp_buffer, role=self.role)
        on_heartbeat = None
        if cfg.role is not None:
            # created before the first heartbeat leaves, so that it already says "starting"
            publisher = self.publisher
            lease = None
            if cfg.role.redis_lease:
                from .persist.redis_backend import RedisSettings, connect_redis
                from .role.redis_lease import RedisLease

                rc = cfg.redis
                client = connect_redis(RedisSettings(url=rc.url, sentinels=rc.sentinels,
                                                     master_name=rc.master_name))
                lease = RedisLease(client, f"sc:{{{rc.cluster}}}:lease", cfg.node_id,
                                   ttl_ms=cfg.role.lease_ttl_ms)
            self.role_service = service = RoleService(
                cfg.role, node_id=cfg.node_id, peer_id=cfg.peers[0].id,
                state_dir=cfg.state_dir, set_epoch=publisher.set_epoch,
                announce=publisher.heartbeat, lease=lease)

            def on_heartbeat(hb) -> None:
                service.on_peer_heartbeat(hb.node_id, hb.epoch, hb.role)

        await self.publisher.start()
        for peer in cfg.peers:
            key = load_public_key(peer.public_key) if self.curve and peer.public_key else None
            sub = Subscriber(self.ctx, self.replica, peer.id, peer.pub, peer.sync,
                             rcvhwm=rep.rcvhwm, sync_timeout=rep.sync_timeout_s,
                             curve=self.curve, peer_public_key=key,
                             apply_delay_s=rep.apply_delay_ms / 1000,
                             tcp_buffer=rep.tcp_buffer, on_heartbeat=on_heartbeat,
                             antientropy_interval_s=rep.antientropy_interval_s,
                             antientropy_buckets=rep.antientropy_buckets)
            await sub.start()
            self.subscribers.append(sub)
        ctx = SourceContext(self.replica, self.publisher.kick, self.ctx, cfg.node_id,
                            is_active=lambda: self.role() == "active")
        for source_cfg in cfg.sources:
            source = build_source(source_cfg, ctx)
            await source.start()
            self.sources.append(source)
        if cfg.ingest_endpoint:
            self.ingest = IngestSource(self.ctx, self.replica, cfg.ingest_endpoint,
                                       self.publisher.kick)
            await self.ingest.start()
        if cfg.proxy is not None or cfg.keepalive is not None:
            self.ownership = Ownership(self.replica, self.publisher.kick, cfg.proxy,
                                       cfg.keepalive)
            if self.role_service is not None:
                self.role_service.switches.append(self.ownership.switch)
            else:
                self.ownership.active = True  # a lone node owns its phones
            await self.ownership.start()
        if self.role_service is not None:
            await self.role_service.start()
        register_node_commands(self.registry, self)
        self.admin = AdminServer(self.registry, cfg.admin.host, cfg.admin.port,
                                 token=cfg.admin.token, metrics=self.metrics.render,
                                 health=self.health)
        await self.admin.start()
        self._tasks.append(asyncio.create_task(self._expiry_loop(), name="expiry"))
        log.info("node %d (%s) up: pub %s sync %s admin %s, incarnation %d, %d peer(s)",
                 cfg.node_id, cfg.node_name, self.publisher.pub_endpoint,
                 self.publisher.sync_endpoint, self.admin.url, self.replica.incarnation,
                 len(self.subscribers))

    async def _start_redis(self, rc) -> None:
        """Shared backend: every winning change also goes to the Redis stream; at start the
        Redis snapshot + stream are merged in (after the local files, by the conflict rule)."""
        from .persist.journal import JournalFanout, RedisJournal
        from .persist.redis_backend import RedisBackend, RedisSettings

        settings = RedisSettings(url=rc.url, sentinels=rc.sentinels, master_name=rc.master_name)
        self.redis = RedisBackend(settings, rc.cluster, self.cfg.node_id,
                                  stream_maxlen=rc.stream_maxlen)
        if rc.restore_at_start:
            report = await self.redis.restore(self.replica.store)
            log.info("Redis restore: %s", report.as_dict())
        journals = [j for j in (self.replica.journal, RedisJournal(self.redis)) if j is not None]
        self.replica.journal = JournalFanout(journals) if len(journals) > 1 else journals[0]
        await self.redis.start(self.replica.store.records)
        self._tasks.append(asyncio.create_task(self._redis_snapshots(rc.snapshot_interval_s),
                                               name="redis-snapshots"))

    async def _start_directory(self, rc) -> None:
        """Redis Cluster mode: this node's own changes go to the shared contact directory
        (there is no stream/snapshot backend in this mode)."""
        from .persist.journal import JournalFanout
        from .persist.redis_directory import DirectoryJournal, RedisDirectory

        self.directory = RedisDirectory(rc.cluster_nodes, rc.cluster, self.cfg.node_id,
                                        backlog_limit=rc.directory_backlog,
                                        tombstone_ttl_s=rc.directory_tombstone_ttl_s)
        journals = [j for j in (self.replica.journal,
                                DirectoryJournal(self.directory, self.cfg.node_id))
                    if j is not None]
        self.replica.journal = JournalFanout(journals) if len(journals) > 1 else journals[0]
        await self.directory.start(self.replica.store.records)

    async def _redis_snapshots(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.redis.write_snapshot(self.replica.store.records())

    async def _expiry_loop(self) -> None:
        interval = self.cfg.expiry_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            self.replica.store.expire()

    def health(self) -> tuple[bool, dict]:
        links = {str(s.peer_id): s.follower.state.value for s in self.subscribers}
        return True, {"node": self.cfg.node_id, "contacts": len(self.replica.store),
                      "links": links}

    def status(self) -> dict:
        r = self.replica
        ob = r.outbox
        lag = sorted(r.lag_ms)

        def pct(p: float) -> float | None:
            return lag[min(len(lag) - 1, int(p * len(lag)))] if lag else None

        return {
            "node_id": self.cfg.node_id,
            "name": self.cfg.node_name,
            "role": self.role(),
            "epoch": ob.epoch,
            "role_detail": self.role_service.status() if self.role_service else None,
            "ownership": self.ownership.status() if self.ownership else None,
            "durability": None if self.durability is None else {
                "degraded": bool(self.durability.stats.last_error),
                **{k: getattr(self.durability.stats, k)
                   for k in self.durability.stats.__dataclass_fields__},
                "restore": self.restore_report},
            "incarnation": r.incarnation,
            "uptime_s": round(time.time() - self.started, 3),
            "contacts": len(r.store),
            "aors": r.store.aor_count,
            "last_seq_sent": ob.last_seq,
            "ring_first_seq": ob.ring_first_seq,
            "publisher": {**_fields(self.publisher.stats), **_fields(ob.stats)}
            if self.publisher else {},
            "peers": [s.status() for s in self.subscribers],
            "replica": _fields(r.stats),
            "store": _fields(r.store.stats),
            "lag_ms": {"p50": pct(0.5), "p99": pct(0.99), "samples": len(lag)},
            "sources": self.source_status(),
            "redis": self.redis.status() if self.redis is not None else None,
            "directory": self.directory.status() if self.directory is not None else None,
        }

    def source_status(self) -> dict:
        out: dict = {s.name: s.status() for s in self.sources}
        if self.ingest:
            out["ingest"] = dict(self.ingest.counters)
        return out

    def iter_subscribers(self) -> Iterator[Subscriber]:
        return iter(self.subscribers)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.admin:
            await self.admin.stop()
        if self.role_service:
            await self.role_service.stop()
        if self.ownership:
            await self.ownership.stop()
        if self.ingest:
            await self.ingest.stop()
        for source in self.sources:
            await source.stop()
        for s in self.subscribers:
            await s.stop()
        if self.publisher:
            await self.publisher.stop()
        if self.durability:
            await self.durability.stop()
        if self.redis is not None:
            await self.redis.stop()
            await self.redis.aclose()
        if self.directory is not None:
            await self.directory.stop()
            await self.directory.aclose()
        if self.authenticator:
            self.authenticator.stop()
        self.ctx.term()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        await self._stopping.wait()
        log.info("stopping")
        await self.stop()


def _fields(obj: object) -> dict:
    return {k: getattr(obj, k) for k in obj.__slots__}  # type: ignore[attr-defined]


def run(cfg: Config) -> None:
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a listed dependency
        runner = asyncio.run
    profile_path = os.environ.get("SIDECAR_PROFILE")
    if profile_path:  # developer aid: cProfile the whole run, written at clean shutdown
        import cProfile

        with cProfile.Profile() as prof:
            runner(Daemon(cfg).run_until_signalled())
        prof.dump_stats(profile_path)
        return
    runner(Daemon(cfg).run_until_signalled())
