"""The keepalive loop: every tick, ask the scheduler what is due, send it, report drops.

This is the only place where time passes for the keepalive parts: the scheduler is sans-I/O
and the sender only moves bytes. The daemon owns one :class:`KeepaliveService`, tells it the
role (:meth:`set_active`), feeds it contact changes through ``service.scheduler`` and deletes
the contacts reported to ``on_drop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .scheduler import Drop, KeepaliveScheduler
from .sender import KeepaliveSender, ReplyReceiver

__all__ = ["KeepaliveService"]

log = logging.getLogger(__name__)


class KeepaliveService:
    """Runs a scheduler and a sender on the event loop.

    ``on_drop`` is called (synchronously, from the loop) for each contact that lost
    ``max_lost`` pings in a row; an exception it raises is logged, not propagated.
    """

    def __init__(self, scheduler: KeepaliveScheduler, sender: KeepaliveSender, *,
                 receiver: ReplyReceiver | None = None,
                 on_drop: Callable[[Drop], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.sender = sender
        self.receiver = receiver
        self.on_drop = on_drop
        self.clock = clock
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def active(self) -> bool:
        return self.scheduler.enabled

    def set_active(self, active: bool, *, sweep: bool = True) -> None:
        """Start pinging (active node; sweeps unless ``sweep=False``) or stop at once.

        Stopping also closes the source sockets, so a passive node holds no socket on the
        proxy's port. Re-asserting the current state changes nothing.
        """
        self.scheduler.set_enabled(active, self.clock(), sweep=sweep)
        if not active:
            self.sender.close()
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="keepalive")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sender.close()
        if self.receiver is not None:
            self.receiver.close()

    async def run_once(self) -> int:
        """One tick: send what is due, report drops. Returns the pings sent."""
        pings = self.scheduler.due(self.clock())
        sent = await self.sender.send(pings) if pings else 0
        for drop in self.scheduler.take_drops():
            if self.on_drop is None:
                continue
            try:
                self.on_drop(drop)
            except Exception:  # a broken callback must not stop the pinging
                log.exception("keepalive drop callback failed for %s", drop.key)
        self.ticks += 1
        return sent

    async def run(self) -> None:
        tick = self.scheduler.tick
        next_at = self.clock()
        while True:
            await self.run_once()
            next_at += tick
            now = self.clock()
            if next_at < now:  # fell behind (a long sweep batch): don't try to catch up
                next_at = now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_at - now):
                    await self._wake.wait()
            if self._wake.is_set():
                next_at = self.clock()

    def snapshot(self) -> dict:
        """Scheduler, sender and receiver counters in one JSON-ready dict (sc_ping_stats)."""
        out = self.scheduler.snapshot()
        sender = self.sender.stats
        out["sender"] = {
            "kind": str(self.sender.kind), "sent": sender.sent, "send_errors": sender.send_errors,
            "blocked": sender.blocked, "abandoned": sender.abandoned,
            "no_source": sender.no_source, "bad_target": sender.bad_target,
            "last_error": sender.last_error, "sockets_opened": self.sender.sockets.opened,
            "source_errors": self.sender.sockets.errors(),
        }
        if self.receiver is not None:
            out["receiver"] = self.receiver.snapshot()
        return out
