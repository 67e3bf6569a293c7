"""asyncio adapter: follows one peer (SUB for the live stream, DEALER for catch-up).

All decisions are taken by the sans-I/O :class:`Follower`; this class only moves bytes and
executes the actions it returns against the :class:`Replica`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import zmq
import zmq.asyncio

from ..replica import Replica
from . import wire
from .follower import Apply, ApplySnapshot, Follower, RequestSync, SnapshotDone
from .security import CurveConfig, apply_client_curve

log = logging.getLogger(__name__)

REPAIR_INTERVAL_S = 30.0


class Subscriber:
    def __init__(self, ctx: zmq.asyncio.Context, replica: Replica, peer_id: int,
                 pub_endpoint: str, sync_endpoint: str, *, rcvhwm: int = 10_000,
                 sync_timeout: float = 5.0, tick_s: float = 0.25,
                 curve: CurveConfig | None = None, peer_public_key: bytes | None = None,
                 apply_delay_s: float = 0.0, tcp_buffer: int = 0,
                 on_heartbeat: Callable[[wire.Heartbeat], None] | None = None) -> None:
        self.replica = replica
        self.peer_id = peer_id
        self.pub_endpoint = pub_endpoint
        self.sync_endpoint = sync_endpoint
        self.follower = Follower(peer_id, sync_timeout=sync_timeout)
        self.tick_s = tick_s
        self.apply_delay_s = apply_delay_s  # test knob: a deliberately slow subscriber
        self.on_heartbeat = on_heartbeat  # the role arbiter listens to the peer's heartbeats
        self.errors: Counter[str] = Counter()
        self.sub = ctx.socket(zmq.SUB)
        self.dealer = ctx.socket(zmq.DEALER)
        for s in (self.sub, self.dealer):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if curve is not None:
                if peer_public_key is None:
                    raise ValueError(f"peer {peer_id}: CURVE needs the peer's public key")
                apply_client_curve(s, curve, peer_public_key)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        if tcp_buffer:
            self.sub.setsockopt(zmq.RCVBUF, tcp_buffer)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(pub_endpoint)
        self.dealer.connect(sync_endpoint)
        self._tasks: list[asyncio.Task] = []
        self._seen: set[int] | None = None
        self.last_error = ""
        self._last_repair = -REPAIR_INTERVAL_S

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._live(), name=f"sub-{self.peer_id}"),
                       asyncio.create_task(self._catchup(), name=f"dealer-{self.peer_id}"),
                       asyncio.create_task(self._ticks(), name=f"tick-{self.peer_id}")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.sub.close(0)
        self.dealer.close(0)

    # ------------------------------------------------------------ loops
    async def _live(self) -> None:
        sub = self.sub
        burst = 1 if self.apply_delay_s else 256
        while True:
            frames = await sub.recv_multipart(copy=True)
            self._on_live(frames)
            # drain what is already queued without going back to the event loop each time
            for _ in range(burst - 1):
                try:
                    frames = sub.recv_multipart(flags=zmq.NOBLOCK).result()
                except zmq.Again:
                    break
                self._on_live(frames)
            if self.apply_delay_s:
                await asyncio.sleep(self.apply_delay_s)
            else:
                await asyncio.sleep(0)

    async def _catchup(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart()
            now = time.monotonic()
            f = self.follower
            try:
                if len(frames) != 2:
                    raise wire.WireError("malformed", f"{len(frames)} frames")
                kind, payload = frames
                if kind == wire.REPLAY:
                    hdr, changes = wire.decode_batch(payload)
                    self._run(f.on_replay(hdr, changes, now))
                elif kind == wire.SNAP:
                    chunk = wire.decode_snapshot_chunk(payload)
                    self._run(f.on_snapshot_chunk(chunk, now))
                elif kind == wire.END:
                    self._run(f.on_sync_end(wire.decode_sync_end(payload), now))
                elif kind == wire.ERROR:
                    code, message = wire.decode_error(payload)
                    self.last_error = f"peer refused catch-up ({code}): {message}"
                    log.warning("peer %d: %s", self.peer_id, self.last_error)
                    self._run(f.on_sync_error(now))
                else:
                    raise wire.WireError("malformed", f"unknown kind {kind[:16]!r}")
            except wire.WireError as exc:
                self._count_error(exc)

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._run(self.follower.tick(time.monotonic()))
            if self.peer_id in self.replica.needs_snapshot_from:
                self._repair()  # a repair postponed by the rate limit

    # ------------------------------------------------------------ plumbing
    def _on_live(self, frames: list[bytes]) -> None:
        now = time.monotonic()
        try:
            if len(frames) != 2:
                raise wire.WireError("malformed", f"{len(frames)} frames")
            kind, payload = frames
            if kind == wire.BATCH:
                hdr, changes = wire.decode_batch(payload)
                self._run(self.follower.on_batch(hdr, changes, now))
            elif kind == wire.HEARTBEAT:
                hb = wire.decode_heartbeat(payload)
                self._run(self.follower.on_heartbeat(hb, now))
                if self.on_heartbeat is not None and hb.node_id == self.peer_id:
                    self.on_heartbeat(hb)
            else:
                raise wire.WireError("malformed", f"unknown kind {kind[:16]!r}")
        except wire.WireError as exc:
            self._count_error(exc)

    def _count_error(self, exc: wire.WireError) -> None:
        self.errors[exc.reason] += 1
        self.last_error = str(exc)
        total = sum(self.errors.values())
        if total <= 10 or total % 10_000 == 0:
            log.warning("peer %d: dropped bad frame (%d so far): %s", self.peer_id, total, exc)

    def _run(self, actions: list) -> None:
        replica = self.replica
        for a in actions:
            if type(a) is Apply:
                replica.apply_remote(a.header, a.changes)
                if self.peer_id in replica.needs_snapshot_from:
                    self._repair()
            elif type(a) is ApplySnapshot:
                if a.first or self._seen is None:
                    self._seen = set()
                replica.apply_snapshot(a.records, self._seen)
            elif type(a) is SnapshotDone:
                # no chunk at all means the peer's table is empty: prune against nothing
                seen = self._seen if self._seen is not None else set()
                n = replica.prune_origin(a.origin, a.incarnation, seen, a.cut_ms)
                if n:
                    log.info("peer %d: pruned %d contacts deleted there meanwhile",
                             self.peer_id, n)
                self._seen = None
            elif type(a) is RequestSync:
                self._seen = None
                payload = wire.encode_sync_request(replica.node_id, a.incarnation, a.from_seq,
                                                   a.req_id)
                fut = self.dealer.send_multipart((wire.SYNC, payload), flags=zmq.NOBLOCK)
                fut.add_done_callback(self._sent)
                log.info("peer %d: catch-up requested from seq %d", self.peer_id, a.from_seq)

    def _sent(self, fut: asyncio.Future) -> None:
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            # Nobody connected yet: the follower's timeout asks again.
            self.last_error = f"catch-up request not sent: {exc}"

    def _repair(self) -> None:
        """Snapshot after an unplaceable refresh, at most once per REPAIR_INTERVAL_S."""
        now = time.monotonic()
        if now - self._last_repair < REPAIR_INTERVAL_S:
            return
        self._last_repair = now
        self.replica.needs_snapshot_from.discard(self.peer_id)
        log.warning("peer %d: refresh for an unknown binding version; asking for a snapshot",
                    self.peer_id)
        self._run(self.follower.force_resync(now))

    def resync(self) -> None:
        self._run(self.follower.force_resync(time.monotonic()))

    def status(self) -> dict:
        f = self.follower
        return {
            "peer": self.peer_id,
            "endpoint": self.pub_endpoint,
            "state": f.state.value,
            "incarnation": f.incarnation,
            "epoch": f.last_epoch,
            "last_seq_applied": f.next_seq - 1,
            "peer_last_seq": f.peer_last_seq,
            "lag_changes": f.lag,
            "last_heard_s_ago": round(time.monotonic() - f.last_heard, 3) if f.last_heard
            else None,
            "stats": {k: getattr(f.stats, k) for k in f.stats.__slots__},
            "frame_errors": dict(self.errors),
            "last_error": self.last_error,
        }
