"""Sans-I/O publisher side: sequence numbering, batching and the bounded replay ring.

Changes of local origin are appended; :meth:`Outbox.flush` turns what is pending into one
encoded batch with consecutive sequence numbers and keeps the encoded bytes in a ring so a
subscriber that missed batches can be served by replaying the very same bytes (no re-encode).
The ring is bounded by change count and bytes; when it no longer reaches back to what a
subscriber asks for, the catch-up falls back to a snapshot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..model import now_ms
from .wire import encode_batch


@dataclass(slots=True)
class OutboxStats:
    changes: int = 0
    batches: int = 0
    bytes: int = 0
    ring_evicted_batches: int = 0


class Outbox:
    def __init__(self, node_id: int, incarnation: int, *, max_batch: int = 2000,
                 ring_changes: int = 2_000_000, ring_bytes: int = 256 << 20) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.epoch = 0
        self.max_batch = max_batch
        self.ring_changes = ring_changes
        self.ring_bytes = ring_bytes
        self.last_seq = 0  # sequence number of the last change flushed
        self.pending: list = []
        self.stats = OutboxStats()
        self._ring: deque[tuple[int, int, bytes]] = deque()  # (seq_first, count, payload)
        self._ring_count = 0
        self._ring_size = 0
        self.base_ms = 0  # time base for refresh deltas of the pending batch

    def full(self) -> bool:
        return len(self.pending) >= self.max_batch

    def flush(self) -> list[bytes]:
        """Encode everything pending as batches of at most ``max_batch`` changes with
        consecutive sequence numbers. All of them carry the same ``base_ms``, the base the
        pending refreshes' deltas were computed against."""
        out: list[bytes] = []
        pending, self.pending = self.pending, []
        base, self.base_ms = self.base_ms, 0
        st = self.stats
        for start in range(0, len(pending), self.max_batch):
            changes = pending[start:start + self.max_batch]
            seq_first = self.last_seq + 1
            payload = encode_batch(self.node_id, self.incarnation, self.epoch, seq_first, base,
                                   changes)
            self.last_seq += len(changes)
            st.changes += len(changes)
            st.batches += 1
            st.bytes += len(payload)
            self._remember(seq_first, len(changes), payload)
            out.append(payload)
        return out

    def time_base(self) -> int:
        """The base every refresh's ``lm_delta`` in the pending batch is relative to."""
        if not self.base_ms:
            self.base_ms = now_ms()
        return self.base_ms

    def _remember(self, seq_first: int, count: int, payload: bytes) -> None:
        ring = self._ring
        ring.append((seq_first, count, payload))
        self._ring_count += count
        self._ring_size += len(payload)
        while len(ring) > 1 and (self._ring_count > self.ring_changes
                                 or self._ring_size > self.ring_bytes):
            _, c, p = ring.popleft()
            self._ring_count -= c
            self._ring_size -= len(p)
            self.stats.ring_evicted_batches += 1

    def replay_from(self, from_seq: int) -> list[bytes] | None:
        """Encoded batches covering ``from_seq .. last_seq``, or None if the ring no longer
        reaches back that far (the caller then sends a snapshot)."""
        if from_seq > self.last_seq:
            return []
        ring = self._ring
        if not ring or from_seq < ring[0][0] or from_seq < 1:
            return None
        return [p for first, count, p in ring if first + count > from_seq]

    @property
    def ring_first_seq(self) -> int:
        return self._ring[0][0] if self._ring else self.last_seq + 1
