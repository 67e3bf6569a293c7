"""asyncio adapter: publishes this node's batches and heartbeats, and serves catch-up requests
(and anti-entropy requests, PROTOCOL §15).

Sockets (proto/PROTOCOL.md §2): a PUB socket for live batches and heartbeats, and a ROUTER
socket answering SYNC requests with a replay from the outbox ring or a chunked snapshot.
The PUB socket never blocks: at its high-water mark ZeroMQ drops, and the subscriber's
sequence check turns the drop into a catch-up, so back-pressure can slow a peer but never
lose a change silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from ..model import now_ms
from ..replica import Replica
from . import wire
from .catchup import antientropy_frames, catchup_frames
from .security import CurveConfig, apply_server_curve

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PublisherStats:
    heartbeats: int = 0
    sync_requests: int = 0
    replays: int = 0
    snapshots: int = 0
    snapshot_records: int = 0
    bad_requests: int = 0
    send_errors: int = 0
    antientropy_digests: int = 0  # DIGREQ answered (PROTOCOL §15)
    antientropy_fetches: int = 0  # BKTREQ answered


class Publisher:
    def __init__(self, ctx: zmq.asyncio.Context, replica: Replica, pub_endpoint: str,
                 sync_endpoint: str, *, heartbeat_s: float = 0.2, sndhwm: int = 10_000,
                 snapshot_chunk: int = 5_000, curve: CurveConfig | None = None,
                 tcp_buffer: int = 0,
                 role: Callable[[], str] = lambda: "active") -> None:
        self.replica = replica
        self.outbox = replica.outbox
        self.heartbeat_s = heartbeat_s
        self.snapshot_chunk = snapshot_chunk
        self.role = role
        self.stats = PublisherStats()
        # PUB is only ever written, without waiting: a plain (non-asyncio) socket raises
        # zmq.Again synchronously instead of burying it in a future.
        self.pub = zmq.Socket(ctx, zmq.PUB)
        self.router = ctx.socket(zmq.ROUTER)
        for s in (self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
            if curve is not None:
                apply_server_curve(s, curve)
        self.pub.setsockopt(zmq.SNDHWM, sndhwm)
        if tcp_buffer:
            self.pub.setsockopt(zmq.SNDBUF, tcp_buffer)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, 64)
        self.pub.bind(pub_endpoint)
        self.router.bind(sync_endpoint)
        self.pub_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sync_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task] = []
        self._serving: set[asyncio.Task] = set()
        self._answering: dict[bytes, asyncio.Task] = {}
        self._ae_answering: dict[bytes, asyncio.Task] = {}  # anti-entropy, apart from SYNC

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._heartbeats(), name="heartbeats"),
                       asyncio.create_task(self._serve_sync(), name="sync-server")]

    async def stop(self) -> None:
        for t in [*self._tasks, *self._serving]:
            t.cancel()
        for t in [*self._tasks, *self._serving]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.flush()
        self.pub.close(0)
        self.router.close(0)

    # ------------------------------------------------------------ live stream
    def kick(self) -> None:
        """Call after queueing local changes: flushes now if a batch is full, else at the end
        of the current event-loop iteration (well under 1 ms when the loop is not saturated)."""
        if self.outbox.full():
            self.flush()
        if self.outbox.pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        for payload in self.outbox.flush():
            self._send(wire.BATCH, payload)

    def _send(self, kind: bytes, payload: bytes) -> None:
        try:
            self.pub.send_multipart((kind, payload), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            # PUB drops silently at its high-water mark (subscribers see the gap and catch
            # up); an error here is something else, e.g. the socket closing at shutdown.
            self.stats.send_errors += 1
            log.warning("PUB send failed: %s", exc)

    def set_epoch(self, epoch: int) -> None:
        self.flush()
        self.outbox.epoch = epoch

    def heartbeat(self) -> None:
        self.flush()
        ob = self.outbox
        self._send(wire.HEARTBEAT, wire.encode_heartbeat(ob.node_id, ob.incarnation, ob.epoch,
                                                         ob.last_seq, now_ms(), self.role()))
        self.stats.heartbeats += 1

    async def _heartbeats(self) -> None:
        while True:
            self.heartbeat()
            await asyncio.sleep(self.heartbeat_s)

    # ------------------------------------------------------------ catch-up server
    async def _serve_sync(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) != 3 or frames[1] not in _REQUEST_KINDS:
                self.stats.bad_requests += 1
                continue
            ident, payload = frames[0], frames[2]
            if frames[1] != wire.SYNC:
                await self._serve_antientropy(ident, frames[1], payload)
                continue
            try:
                req = wire.decode_sync_request(payload)
            except wire.WireError as exc:
                await self._refuse(ident, exc)
                continue
            self.stats.sync_requests += 1
            previous = self._answering.pop(ident, None)
            if previous is not None:
                previous.cancel()  # the requester gave up on it: answer only the newest
            task = asyncio.create_task(self._answer(ident, req))
            self._answering[ident] = task
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
            task.add_done_callback(lambda t, i=ident: self._answering.pop(i, None)
                                   if self._answering.get(i) is t else None)

    async def _refuse(self, ident: bytes, exc: wire.WireError) -> None:
        self.stats.bad_requests += 1
        code = wire.ERR_VERSION if exc.reason == "version" else wire.ERR_MALFORMED
        # best effort, never blocks the request loop for long
        with contextlib.suppress(_PeerGone, zmq.ZMQError):
            await self._reply(ident, wire.ERROR, wire.encode_error(code, str(exc)), timeout=0.5)

    async def _serve_antientropy(self, ident: bytes, kind: bytes, payload: bytes) -> None:
        """DIGREQ / BKTREQ: answered by a task of its own (the hashing takes a while), which a
        newer anti-entropy request of the same requester cancels. SYNC answers are separate:
        an anti-entropy request never cancels a catch-up."""
        try:
            if kind == wire.DIGEST_REQUEST:
                req: wire.DigestRequest | wire.BucketRequest = \
                    wire.decode_digest_request(payload)
                self.stats.antientropy_digests += 1
            else:
                req = wire.decode_bucket_request(payload)
                self.stats.antientropy_fetches += 1
        except wire.WireError as exc:
            await self._refuse(ident, exc)
            return
        previous = self._ae_answering.pop(ident, None)
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(self._answer_antientropy(ident, req))
        self._ae_answering[ident] = task
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        task.add_done_callback(lambda t, i=ident: self._ae_answering.pop(i, None)
                               if self._ae_answering.get(i) is t else None)

    async def _answer_antientropy(self, ident: bytes,
                                  req: wire.DigestRequest | wire.BucketRequest) -> None:
        self.flush()  # the cut below then matches last_seq exactly (no await in between)
        try:
            for item in antientropy_frames(self.replica, req):
                if item is None:
                    await asyncio.sleep(0)  # a slice of hashing done: let the loop run
                else:
                    await self._reply(ident, *item)
        except _PeerGone:
            log.info("anti-entropy requester went away; dropped its request")

    async def _answer(self, ident: bytes, req: wire.SyncRequest) -> None:
        self.flush()  # everything in the store now has a sequence number
        t0 = time.perf_counter()
        sent = 0
        try:
            for kind, payload in catchup_frames(self.replica, req, self.snapshot_chunk):
                await self._reply(ident, kind, payload)
                await asyncio.sleep(0)  # keep live traffic flowing during a long snapshot
                if kind == wire.END:
                    end = wire.decode_sync_end(payload)
                    if end.mode == wire.MODE_SNAPSHOT:
                        self.stats.snapshots += 1
                        self.stats.snapshot_records += end.records
                        log.info("served snapshot of %d contacts at seq %d in %.2fs",
                                 end.records, end.upto_seq, time.perf_counter() - t0)
                    else:
                        self.stats.replays += 1
                        log.info("replayed %d batches up to seq %d", sent, end.upto_seq)
                sent += 1
        except _PeerGone:
            log.info("catch-up receiver went away; dropped its request")

    async def _reply(self, ident: bytes, kind: bytes, payload: bytes,
                     timeout: float = 30.0) -> None:
        """Send to one DEALER, waiting (not dropping) while its queue is full."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                await self.router.send_multipart((ident, kind, payload), flags=zmq.NOBLOCK,
                                                 copy=False)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise _PeerGone from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    raise _PeerGone from None
                raise


class _PeerGone(Exception):
    pass


_REQUEST_KINDS = frozenset((wire.SYNC, wire.DIGEST_REQUEST, wire.BUCKET_REQUEST))
