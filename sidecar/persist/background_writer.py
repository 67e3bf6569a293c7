"""Lifecycle shared by the Redis writers (stream backend, cluster directory).

Both keep changes in an in-memory backlog and push them from one background task that wakes
on a timer or when the backlog is large; both must flush what is left on a clean stop and
close their client. Keeping start/stop/close here means the two writers differ only in what
they write and how they recover, not in how their task is started and torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any


class BackgroundWriter:
    """Mixin: subclasses provide ``client``, ``_backlog``, ``flush()`` and ``_run(records)``
    (the loop, which waits on :meth:`_sleep`), and set ``task_name``."""

    task_name = "writer"
    client: Any
    _backlog: Any
    _task: asyncio.Task | None = None
    _wake: asyncio.Event | None = None

    async def flush(self) -> bool:  # pragma: no cover - always overridden
        raise NotImplementedError

    async def _run(self, records: Callable[[], Sequence[tuple]] | None) -> None:
        raise NotImplementedError  # pragma: no cover - always overridden

    def _nudge(self) -> None:
        """Wake the task early (the backlog reached a batch)."""
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Wait for *seconds* or until :meth:`_nudge`, whichever comes first."""
        assert self._wake is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def start(self, records: Callable[[], Sequence[tuple]] | None = None) -> None:
        """Start the background task; ``records()`` returns this node's contacts when a
        writer has to rewrite everything (after a lost backlog)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(records), name=self.task_name)

    async def stop(self, flush: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake = None
        if flush and self._backlog:
            await self.flush()

    async def aclose(self) -> None:
        await self.stop(flush=False)
        with contextlib.suppress(Exception):
            await self.client.aclose()
