"""Asyncio UDP adapter that loads contacts into the local proxy by REGISTER replay.

:class:`RegisterReplayClient` has the two coroutines the proxy loader
(:meth:`sidecar.ownership.Ownership.load_pass`) calls on a proxy client, so it can stand in
for the RPC/MI client there:

* ``ul_add_record(rec, table=...)`` builds the replay REGISTER
  (:func:`sidecar.proxy.register_replay.build_register`), sends it from ``source_ip`` (the
  address the proxy's replay route trusts) to ``target``, and waits for the final answer.
  It returns True when the proxy holds the contact (2xx, or "already holds this Call-ID at
  this or a higher CSeq"), False when the contact had already expired (nothing sent), and
  raises :class:`~sidecar.proxy.register_replay.ReplayError` (a ``ProxyRpcError``) on any
  other final answer (``code`` = SIP status) or when no answer came in time (``code``
  None). Permanent contacts (expires 0) cannot be a REGISTER; they go to the RPC/MI client's
  own ``ul_add_record``.
* ``ul_rm_contact`` is the RPC/MI client's: removing a binding with a de-REGISTER would need
  a CSeq above the one stored, which the sidecar does not own.

Up to ``window`` transactions are in flight at once (``window`` is an attribute the loader
reads to run that many loads concurrently), so loading 10k contacts is not one round trip
each. The socket opens on first use; :meth:`close` closes it (not the RPC client, which
belongs to the caller). Everything protocol-shaped lives in the sans-I/O module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from sidecar import model
from sidecar.proxy.register_replay import (
    DEFAULT_T1,
    DEFAULT_T2,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    REPLAY_BRANCH_PREFIX,
    Key,
    ReplayError,
    ReplayRegister,
    ReplayResult,
    ReplayTransactions,
    build_register,
)

log = logging.getLogger(__name__)

_UNSENDABLE = "unsendable"  # ReplayError.reason of a contact a REGISTER cannot carry


class _ReplyProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: RegisterReplayClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.client._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: timeouts decide
        self.client.stats["socket_errors"] += 1


class RegisterReplayClient:
    """``ul_add_record`` by REGISTER replay, ``ul_rm_contact`` by the RPC/MI client ``rpc``."""

    def __init__(self, rpc: Any, *, target: tuple[str, int], source_ip: str = "127.0.0.1",
                 node_id: int | str = 1, domain: str | None = None,
                 window: int = DEFAULT_WINDOW, t1: float = DEFAULT_T1, t2: float = DEFAULT_T2,
                 timeout_s: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.rpc = rpc
        self.target = target
        self.source_ip = source_ip
        self.node_id = node_id
        # AORs stored without a domain (usrloc use_domain off) are sent as user@domain.
        self.domain = domain or target[0]
        self.window = window
        self.clock = clock
        self.tx = ReplayTransactions(window=window, t1=t1, t2=min(t2, max(t1, timeout_s)),
                                     timeout=timeout_s)
        self.stats: dict[str, int] = dict.fromkeys(
            ("replayed", "expired", "permanent_via_rpc", "unsendable_via_rpc", "failed",
             "foreign_datagrams", "socket_errors"), 0)
        self._slots = asyncio.Semaphore(window)
        self._waiters: dict[Key, asyncio.Future[ReplayResult]] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._local: tuple[str, int] | None = None
        self._timer_task: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self._open_lock = asyncio.Lock()
        self._branches = itertools.count(1)
        self._run_id = os.urandom(4).hex()

    # --- the loader's interface ---------------------------------------------------------------

    async def ul_add_record(self, rec: tuple, *, table: str = "location") -> bool:
        """Load one contact tuple (``table`` is the replay route's; see the module doc)."""
        if rec[model.EXPIRES] == 0:
            self.stats["permanent_via_rpc"] += 1
            return await self.rpc.ul_add_record(rec, table=table)
        try:
            outcome = await self._replay(rec)
        except ReplayError as exc:
            if exc.code is not None or exc.reason != _UNSENDABLE:
                raise
            # Better the proxy's own (lossy) load than none: e.g. a Call-ID with a space.
            log.info("loading %s over RPC/MI: %s", rec[model.URI], exc)
            self.stats["unsendable_via_rpc"] += 1
            return await self.rpc.ul_add_record(rec, table=table)
        if outcome is None:
            self.stats["expired"] += 1
            return False
        request, result = outcome
        if result.ok:
            self.stats["replayed"] += 1
            return True
        self.stats["failed"] += 1
        if result.status is None:
            raise ReplayError(None, f"replay of {request.aor} {request.uri}: no answer from "
                                    f"{self.target[0]}:{self.target[1]} within "
                                    f"{self.tx.timeout:g} s")
        raise ReplayError(result.status, f"replay of {request.aor} {request.uri} refused: "
                                         f"{result.status} {result.reason}",
                          reason=result.reason)

    async def _replay(self, rec: tuple) -> tuple[ReplayRegister, ReplayResult] | None:
        """Send one replay and wait for how it ended; None if the contact already expired."""
        async with self._slots:
            await self._open()
            assert self._transport is not None and self._local is not None
            branch = f"{REPLAY_BRANCH_PREFIX}{self._run_id}-{next(self._branches):x}"
            try:
                request = build_register(rec, node_id=self.node_id, via=self._local,
                                         branch=branch, now=self.clock(), domain=self.domain)
            except ReplayError as exc:
                raise ReplayError(None, str(exc), reason=_UNSENDABLE) from None
            if request is None:
                return None
            future: asyncio.Future[ReplayResult] = asyncio.get_running_loop().create_future()
            self.tx.add(request, time.monotonic())
            self._waiters[request.key] = future
            try:
                self._transport.sendto(request.data, self.target)
                self._kick.set()
                return request, await future
            finally:
                self._waiters.pop(request.key, None)
                self.tx.cancel(request.key)

    async def ul_rm_contact(self, table: str, aor: str, contact: str) -> None:
        await self.rpc.ul_rm_contact(table, aor, contact)

    def snapshot(self) -> dict[str, Any]:
        """Counters for status output: the adapter's and the transaction layer's."""
        return {**self.stats, "in_flight": self.tx.pending, **asdict(self.tx.stats)}

    async def close(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for future in self._waiters.values():
            if not future.done():
                future.set_result(ReplayResult(("", 0, ""), "timeout", None, "client closed"))

    # --- I/O ----------------------------------------------------------------------------------

    async def _open(self) -> None:
        if self._transport is not None:
            return
        async with self._open_lock:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ReplyProtocol(self), local_addr=(self.source_ip, 0))
            self._local = transport.get_extra_info("sockname")[:2]
            self._transport = transport
            self._timer_task = asyncio.create_task(self._timers(), name="replay-timers")

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if (addr[0], addr[1]) != self.target:
            self.stats["foreign_datagrams"] += 1
            return
        result = self.tx.on_datagram(data)
        if result is not None:
            self._resolve(result)

    def _resolve(self, result: ReplayResult) -> None:
        future = self._waiters.get(result.key)
        if future is not None and not future.done():
            future.set_result(result)

    async def _timers(self) -> None:
        """Retransmit and time out transactions (Timer E / F of the sans-I/O layer)."""
        while True:
            wake = self.tx.next_wakeup()
            self._kick.clear()
            delay = None if wake is None else max(0.0, wake - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            resend, expired = self.tx.poll(time.monotonic())
            if self._transport is not None:
                for data in resend:
                    self._transport.sendto(data, self.target)
            for result in expired:
                self._resolve(result)
