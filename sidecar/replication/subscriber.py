"""asyncio adapter: follows one peer (SUB for the live stream, DEALER for catch-up).

All decisions are taken by the sans-I/O :class:`Follower`; this class only moves bytes and
executes the actions it returns against the :class:`Replica`. It also runs the anti-entropy
rounds against the peer over the same DEALER (PROTOCOL §15; the comparison and the repair
plan are the sans-I/O ``antientropy`` module, the repair is ``Replica.repair_origin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from ..replica import Replica
from . import wire
from .antientropy import (
    DEFAULT_BUCKETS,
    SLICE,
    BucketCollector,
    Digest,
    DigestBuilder,
    RepairResult,
    differing_buckets,
    fetch_groups,
    plan_repair,
    valid_bucket_count,
)
from .follower import Apply, ApplySnapshot, Follower, LinkState, RequestSync, SnapshotDone
from .security import CurveConfig, apply_client_curve

log = logging.getLogger(__name__)

REPAIR_INTERVAL_S = 30.0

# anti-entropy (impl. values, PROTOCOL §15)
AE_HOLD_MAX_S = 1.0  # the live stream is held at most this long waiting for the CUT
AE_HOLD_MAX_FRAMES = 100_000  # ... and at most this many frames
AE_CUT_TIMEOUT_S = 5.0  # request -> applied exactly up to the cut
AE_ANSWER_TIMEOUT_S = 60.0  # cut -> DIGEST / BUCKETS (the peer hashes in slices)
AE_REPORT_BUCKETS = 64  # differing bucket numbers listed in a round's report


@dataclass(slots=True)
class AntiEntropyStats:
    """Counters of the anti-entropy rounds against one peer (sc_status, /metrics)."""

    rounds: int = 0  # completed rounds (compared, and repaired what differed)
    rounds_skipped: int = 0  # link not live, peer restarted, or the cut was passed
    errors: int = 0  # no answer, bad answer, send failure
    buckets_compared: int = 0
    buckets_differing: int = 0
    buckets_fetched: int = 0
    records_put: int = 0
    records_dropped: int = 0
    records_kept: int = 0  # earlier-incarnation records the peer lacks (kept, §9.5)
    records_refused: int = 0  # lost the conflict rule to another origin's newer version
    records_changed: int = 0  # changed after the cut: left to the stream
    last_round_s: float = 0.0  # duration of the last completed round
    last_differing: int = 0  # differing buckets in the last completed round


class AntiEntropySkipped(Exception):
    """This round cannot compare now (not in sync with the peer); the next one retries."""


class AntiEntropyFailed(Exception):
    """The peer did not answer, or answered something unusable."""


class _AePending:
    """One anti-entropy request in flight: its CUT, our copy at the cut, and the answer."""

    __slots__ = ("answer", "answer_kind", "copied", "cut", "req_id")

    def __init__(self, req_id: int, answer_kind: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.req_id = req_id
        self.answer_kind = answer_kind
        self.cut: wire.Cut | None = None
        self.copied: asyncio.Future = loop.create_future()  # -> records at exactly cut_seq
        self.answer: asyncio.Future = loop.create_future()  # -> DigestAnswer | BucketAnswer


class Subscriber:
    def __init__(self, ctx: zmq.asyncio.Context, replica: Replica, peer_id: int,
                 pub_endpoint: str, sync_endpoint: str, *, rcvhwm: int = 10_000,
                 sync_timeout: float = 5.0, tick_s: float = 0.25,
                 curve: CurveConfig | None = None, peer_public_key: bytes | None = None,
                 apply_delay_s: float = 0.0, tcp_buffer: int = 0,
                 on_heartbeat: Callable[[wire.Heartbeat], None] | None = None,
                 antientropy_interval_s: float = 0.0,
                 antientropy_buckets: int = DEFAULT_BUCKETS) -> None:
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
        if not valid_bucket_count(antientropy_buckets):
            raise ValueError(f"antientropy_buckets must be a power of two, got "
                             f"{antientropy_buckets}")
        self.antientropy_interval_s = antientropy_interval_s  # 0 = only on request
        self.antientropy_buckets = antientropy_buckets
        self.ae_stats = AntiEntropyStats()
        self._ae_lock = asyncio.Lock()
        self._ae_req_id = 0
        self._ae_pending: _AePending | None = None
        self._held: list[list[bytes]] | None = None  # live frames held until the CUT
        self._hold_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._live(), name=f"sub-{self.peer_id}"),
                       asyncio.create_task(self._catchup(), name=f"dealer-{self.peer_id}"),
                       asyncio.create_task(self._ticks(), name=f"tick-{self.peer_id}")]
        if self.antientropy_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._antientropy_loop(),
                                                   name=f"antientropy-{self.peer_id}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._release_hold()
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
                elif kind == wire.CUT:
                    self._on_cut(wire.decode_cut(payload))
                elif kind == wire.DIGEST:
                    self._on_ae_answer(wire.DIGEST, wire.decode_digest(payload))
                elif kind == wire.BUCKETS:
                    self._on_ae_answer(wire.BUCKETS, wire.decode_buckets(payload))
                elif kind == wire.ERROR:
                    code, message = wire.decode_error(payload)
                    self.last_error = f"peer refused a request ({code}): {message}"
                    log.warning("peer %d: %s", self.peer_id, self.last_error)
                    self._run(f.on_sync_error(now))
                    self._ae_fail(AntiEntropyFailed(self.last_error))
                else:
                    raise wire.WireError("malformed", f"unknown kind {kind[:16]!r}")
            except wire.WireError as exc:
                self._count_error(exc)
                if len(frames) == 2 and frames[0] in _AE_REPLIES:
                    self._ae_fail(AntiEntropyFailed(f"bad answer: {exc}"))

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._run(self.follower.tick(time.monotonic()))
            if self.peer_id in self.replica.needs_snapshot_from:
                self._repair()  # a repair postponed by the rate limit

    # ------------------------------------------------------------ plumbing
    def _on_live(self, frames: list[bytes], notify: bool = True) -> None:
        held = self._held
        if held is not None:
            # An anti-entropy request is waiting for its CUT: nothing may be applied past the
            # sequence number the peer is about to announce. The arbiter still hears
            # heartbeats at once (its liveness view must not lag behind a digest).
            held.append(frames)
            if notify:
                self._notify_heartbeat(frames)
            if len(held) > AE_HOLD_MAX_FRAMES:
                self._release_hold()
            return
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
                if notify and self.on_heartbeat is not None and hb.node_id == self.peer_id:
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
                if self._ae_pending is not None:
                    self._check_cut()  # batch by batch: the cut is a batch boundary
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
        if self._ae_pending is not None:
            self._check_cut()

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
            "antientropy": {k: getattr(self.ae_stats, k) for k in self.ae_stats.__slots__},
        }

    # ------------------------------------------------------------ anti-entropy
    async def antientropy_round(self) -> dict:
        """Compare this node's records of the peer's origin with the peer's own, bucket by
        bucket, and repair the buckets that differ (PROTOCOL §15). Returns a report; never
        raises for a peer that is away or out of sync (the report says so)."""
        async with self._ae_lock:
            return await self._ae_round()

    async def _antientropy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.antientropy_interval_s)
            if self.follower.state is not LinkState.LIVE:
                continue  # only when in sync: a catch-up repairs wholesale anyway
            try:
                report = await self.antientropy_round()
            except Exception:  # a bug here must not end the rounds, nor replication
                log.exception("peer %d: anti-entropy round failed", self.peer_id)
                continue
            if report["differing"]:
                log.warning("peer %d: anti-entropy found %d differing buckets; repaired %d "
                            "put, %d dropped", self.peer_id, report["differing"],
                            report["put"], report["dropped"])

    async def _ae_round(self) -> dict:
        st = self.ae_stats
        n = self.antientropy_buckets
        t0 = time.monotonic()
        total = RepairResult()
        report: dict = {"peer": self.peer_id, "result": "ok", "reason": "", "buckets": n,
                        "cut_seq": None, "records_peer": None, "records_local": None,
                        "differing": 0, "differing_buckets": [], "fetched": 0,
                        "put": 0, "dropped": 0, "kept": 0, "refused": 0, "changed": 0,
                        "duration_s": 0.0}
        try:
            if self.follower.state is not LinkState.LIVE:
                raise AntiEntropySkipped(f"link is {self.follower.state.value}, not live")
            node = self.replica.node_id
            cut, local, answer = await self._ae_request(
                wire.DIGEST_REQUEST, wire.DIGEST,
                lambda rid: wire.encode_digest_request(node, self.follower.incarnation, rid, n))
            if answer.buckets != n:
                raise AntiEntropyFailed(f"digest of {answer.buckets} buckets, asked {n}")
            builder = DigestBuilder(self.peer_id, n, cut.horizon_s)
            await _in_slices(local, builder.add)
            mine = builder.digest()
            theirs = Digest(answer.counts, answer.sums)
            diff = differing_buckets(mine, theirs)
            report.update(cut_seq=cut.cut_seq, records_peer=theirs.records,
                          records_local=mine.records, differing=len(diff),
                          differing_buckets=diff[:AE_REPORT_BUCKETS])
            st.buckets_compared += n
            st.buckets_differing += len(diff)
            for group in fetch_groups(diff, theirs.counts):
                cut2, local2, got = await self._ae_request(
                    wire.BUCKET_REQUEST, wire.BUCKETS,
                    lambda rid, g=group: wire.encode_bucket_request(
                        node, self.follower.incarnation, rid, n, g))
                if got.buckets != n or sorted(got.indices) != sorted(group):
                    raise AntiEntropyFailed("answer for other buckets than asked")
                collector = BucketCollector(self.peer_id, n, group)
                await _in_slices(local2, collector.add)
                plan = plan_repair(got.records, collector.records, origin=self.peer_id,
                                   origin_incarnation=cut2.incarnation, buckets=n,
                                   indices=group, horizon_s=cut2.horizon_s)
                result = self.replica.repair_origin(self.peer_id, plan)
                total.add(result)
                report["fetched"] += len(group)
                report["kept"] += plan.kept
                st.buckets_fetched += len(group)
                st.records_kept += plan.kept
                self.replica.stats.bad_changes += plan.bad
            st.rounds += 1
            st.last_differing = len(diff)
        except AntiEntropySkipped as exc:
            st.rounds_skipped += 1
            report.update(result="skipped", reason=str(exc))
        except (AntiEntropyFailed, wire.WireError, zmq.ZMQError, TimeoutError) as exc:
            st.errors += 1
            report.update(result="error", reason=str(exc) or type(exc).__name__)
            self.last_error = f"anti-entropy: {report['reason']}"
        finally:
            st.records_put += total.put
            st.records_dropped += total.dropped
            st.records_refused += total.refused
            st.records_changed += total.changed
            report.update(put=total.put, dropped=total.dropped, refused=total.refused,
                          changed=total.changed)
            report["duration_s"] = round(time.monotonic() - t0, 6)
        if report["result"] == "ok":
            st.last_round_s = report["duration_s"]
        return report

    async def _ae_request(self, kind: bytes, answer_kind: bytes,
                          payload: Callable[[int], bytes]) -> tuple:
        """Send one request; return (cut, our records at exactly the cut, the answer).

        From the send until the CUT arrives the live stream is held (bounded by
        AE_HOLD_MAX_S and AE_HOLD_MAX_FRAMES), so we cannot apply past the sequence number
        the peer announces; then we apply up to exactly that number and copy the table.
        """
        loop = asyncio.get_running_loop()
        self._ae_req_id += 1
        p = _AePending(self._ae_req_id, answer_kind, loop)
        self._ae_pending = p
        self._held = []
        self._hold_timer = loop.call_later(AE_HOLD_MAX_S, self._release_hold)
        try:
            await self.dealer.send_multipart((kind, payload(p.req_id)), flags=zmq.NOBLOCK)
            try:
                records = await asyncio.wait_for(p.copied, AE_CUT_TIMEOUT_S)
            except TimeoutError:
                if p.cut is None:
                    raise AntiEntropyFailed("no CUT from the peer (does it serve "
                                            "anti-entropy?)") from None
                raise AntiEntropySkipped(f"did not reach the cut at seq {p.cut.cut_seq} "
                                         "in time (lagging)") from None
            try:
                answer = await asyncio.wait_for(p.answer, AE_ANSWER_TIMEOUT_S)
            except TimeoutError:
                raise AntiEntropyFailed("no answer after the CUT") from None
            return p.cut, records, answer
        finally:
            if self._ae_pending is p:
                self._ae_pending = None
            self._release_hold()
            for fut in (p.copied, p.answer):
                if fut.done() and not fut.cancelled():
                    fut.exception()  # mark it retrieved: the round has its outcome already

    def _on_cut(self, cut: wire.Cut) -> None:
        p = self._ae_pending
        if p is None or cut.req_id != p.req_id or p.cut is not None:
            return  # an answer to a request we gave up on
        p.cut = cut
        if cut.incarnation != self.follower.incarnation:
            self._ae_fail(AntiEntropySkipped("the peer restarted (new incarnation)"))
        self._release_hold()
        self._check_cut()

    def _on_ae_answer(self, kind: bytes, answer) -> None:
        p = self._ae_pending
        if p is None or answer.req_id != p.req_id or kind != p.answer_kind \
                or p.answer.done():
            return
        if p.cut is None or answer.cut_seq != p.cut.cut_seq \
                or answer.incarnation != p.cut.incarnation:
            p.answer.set_exception(AntiEntropyFailed("answer does not match its CUT"))
        else:
            p.answer.set_result(answer)

    def _ae_fail(self, exc: Exception) -> None:
        """Fail the request in flight at the step it is waiting for."""
        p = self._ae_pending
        if p is None:
            return
        fut = p.copied if not p.copied.done() else p.answer
        if not fut.done():
            fut.set_exception(exc)

    def _check_cut(self) -> None:
        """Copy the table the moment we have applied exactly up to the peer's cut."""
        p = self._ae_pending
        if p is None or p.cut is None or p.copied.done():
            return
        f = self.follower
        if f.state is not LinkState.LIVE or f.incarnation != p.cut.incarnation:
            p.copied.set_exception(AntiEntropySkipped(f"link went {f.state.value} before "
                                                      "the cut"))
            return
        applied = f.next_seq - 1
        if applied == p.cut.cut_seq:
            p.copied.set_result(self.replica.store.records())
        elif applied > p.cut.cut_seq:
            p.copied.set_exception(AntiEntropySkipped(f"applied seq {applied}, past the cut "
                                                      f"at {p.cut.cut_seq}"))

    def _release_hold(self) -> None:
        """Feed the held live frames to the follower, in order (the cut check runs after
        every applied batch)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        held, self._held = self._held, None
        if held:
            for frames in held:
                self._on_live(frames, notify=False)

    def _notify_heartbeat(self, frames: list[bytes]) -> None:
        if self.on_heartbeat is None or len(frames) != 2 or frames[0] != wire.HEARTBEAT:
            return
        try:
            hb = wire.decode_heartbeat(frames[1])
        except wire.WireError:
            return  # counted when the frame is released to the follower
        if hb.node_id == self.peer_id:
            self.on_heartbeat(hb)


_AE_REPLIES = frozenset((wire.CUT, wire.DIGEST, wire.BUCKETS))


async def _in_slices(records: list, consume: Callable[[list], None]) -> None:
    """Feed a long record list to ``consume`` in slices, yielding to the loop in between."""
    for start in range(0, len(records), SLICE):
        consume(records[start:start + SLICE])
        await asyncio.sleep(0)
