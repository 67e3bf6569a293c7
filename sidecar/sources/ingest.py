"""Generic change ingestion over a ZeroMQ PULL socket.

For integrations that already know the contacts (a custom registrar, a migration script, the
benchmark's load generator): they PUSH msgpack frames ``[1, [change, ...]]`` where a change is
a full contact record in the wire layout (``HANDLE`` and ``LAST_MODIFIED`` may be 0: this node
stamps them) or a de-registration ``[aor, bid, callid, cseq]``. Everything enters through
:meth:`Replica.local_put` / :meth:`Replica.local_delete`, exactly like the SIP sources.
Malformed frames and changes are counted and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

import msgpack
import zmq
import zmq.asyncio

from ..model import RECORD_LEN
from ..replica import Replica
from ..replication.wire import MAX_MESSAGE, WireError, check_change

log = logging.getLogger(__name__)

INGEST_VERSION = 1


def decode_ingest(payload: bytes) -> tuple:
    try:
        obj = msgpack.unpackb(payload, use_list=False, raw=False)
    except (ValueError, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise WireError("malformed", f"msgpack: {exc}") from None
    if (type(obj) is not tuple or len(obj) < 2 or type(obj[0]) is not int
            or obj[0] != INGEST_VERSION or type(obj[1]) is not tuple):
        raise WireError("malformed", "ingest frame must be [1, [changes...]]")
    return obj[1]


def encode_ingest(changes: list) -> bytes:
    return msgpack.packb((INGEST_VERSION, changes), use_bin_type=True)


class IngestSource:
    def __init__(self, ctx: zmq.asyncio.Context, replica: Replica, endpoint: str,
                 on_change: Callable[[], None]) -> None:
        self.replica = replica
        self.on_change = on_change
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.counters: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close(0)

    async def _run(self) -> None:
        while True:
            payload = await self.sock.recv()
            self.counters["messages"] += 1
            try:
                changes = decode_ingest(payload)
            except WireError as exc:
                self._bad(exc)
                continue
            self.apply(changes)
            self.on_change()
            await asyncio.sleep(0)  # let the publisher flush between large frames

    def apply(self, changes: tuple) -> None:
        put, delete = self.replica.local_put, self.replica.local_delete
        counters = self.counters
        for c in changes:
            try:
                if type(c) is tuple and len(c) == RECORD_LEN:
                    check_change(c, unstamped_ok=True)
                    counters[put(c)] += 1
                elif (type(c) is tuple and len(c) == 4 and type(c[0]) is str
                      and type(c[1]) is str and type(c[2]) is str and type(c[3]) is int):
                    counters["delete" if delete(*c) else "stale"] += 1
                else:
                    raise WireError("bad_change", "neither a contact record nor a delete")
            except WireError as exc:
                self._bad(exc)

    def _bad(self, exc: WireError) -> None:
        self.counters["errors"] += 1
        if self.counters["errors"] <= 10:
            log.warning("ingest: skipped bad input: %s", exc)
