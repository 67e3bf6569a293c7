"""Where the replica reports every change that won: one or several durable journals.

The replica calls ``record_put(rec)`` / ``record_delete(...)`` on a single object; this module
fans that out to the local change log and the Redis stream when both are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Journal(Protocol):
    def record_put(self, rec: tuple) -> None: ...

    def record_delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
                      handle: int) -> None: ...


class JournalFanout:
    def __init__(self, journals: Sequence[Journal]) -> None:
        self.journals = tuple(journals)

    def record_put(self, rec: tuple) -> None:
        for j in self.journals:
            j.record_put(rec)

    def record_delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
                      handle: int) -> None:
        for j in self.journals:
            j.record_delete(aor, bid, callid, cseq, last_modified, handle)


class RedisJournal:
    """Adapts :class:`RedisBackend.publish` (which never raises) to the journal calls."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def record_put(self, rec: tuple) -> None:
        self.backend.publish((rec,))

    def record_delete(self, aor: str, bid: str, callid: str, cseq: int, last_modified: int,
                      handle: int) -> None:
        self.backend.publish(((aor, bid, callid, cseq, last_modified, handle),))
