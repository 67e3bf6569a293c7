"""When to ping which NATed contact: a balanced timing wheel, a post-promotion sweep, and loss
tracking (sans-I/O: the caller passes ``now`` and gets pings and drops back, nothing is sent).

Why a wheel with *balanced* slots and not one hashed phase per contact: a hash spreads contacts
only statistically (a slot gets N/S ± sqrt(N/S)), and the brief needs a hard bound on the pings
sent per tick. Here the interval is cut into ``S = interval / tick`` slots; a new contact goes
into the least loaded slot, so while contacts only arrive no slot holds more than ceil(N/S) and
a tick never sends more than that. Each contact stays in its slot, so it is pinged exactly once
per interval - never late, which is what keeps a NAT pinhole open.

Removals can leave slots unbalanced (everyone in slots 0-4 de-registers). A slot is topped up
from the fullest slot *when the hand reaches it*: at that moment every other slot comes later
in the round, so a moved contact is only ever pinged early, never late. The price of never
being late: while contacts keep leaving, a slot filled earlier still sends what it holds, so a
tick is bounded by ceil(N_peak/S)+1 rather than the current N; once removals stop, one round of
top-ups brings every tick under ceil(N/S)+1 again (the property tests check all of this).

Sweep: right after a promotion the pinholes towards the VIP may be close to their timeout (the
old active's last ping was up to an interval ago), so every contact is pinged once as fast as
``sweep_rate`` allows. The sweep walks the slots from the hand's position onward, skipping
any the hand has meanwhile pinged, and ends when sweep and hand together have covered every slot
once. The wheel keeps running meanwhile, so no contact's regular ping is ever delayed by the
sweep; the price is at most one extra ping per contact.

Loss tracking (``reply_mode``): ``TOKEN`` - each ping has an id the reply echoes (SIP OPTIONS
Call-ID), fed back with :meth:`KeepaliveScheduler.reply`; ``ADDRESS`` - any packet from the
pinged address answers every outstanding ping to it (:meth:`heard_from`); ``NONE`` - fire and
forget (CRLF or 4-byte null over a port shared with the proxy: the answer, if any, goes to the
proxy). A ping unanswered after ``reply_timeout`` is lost; ``max_lost`` consecutive losses drop
the contact from the wheel and report it through :meth:`take_drops` so the daemon can replicate
the removal as a delete.

Only the active node pings: while disabled, :meth:`due` returns nothing and no outstanding
state is kept, but contacts are still tracked so that enabling is instant.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import NamedTuple

from .targets import Address, PingKey, PingTarget, keepalive_key, target_from_record

__all__ = [
    "Drop",
    "KeepaliveScheduler",
    "Ping",
    "ReplyMode",
    "SchedulerStats",
]

_EPS = 1e-9  # float slack when turning elapsed time into whole ticks


class ReplyMode(StrEnum):
    NONE = "none"
    TOKEN = "token"
    ADDRESS = "address"


class Ping(NamedTuple):
    """One keepalive to send now. ``ping_id`` is unique per scheduler (OPTIONS token)."""

    ping_id: int
    key: PingKey
    target: PingTarget


class Drop(NamedTuple):
    """A contact that missed ``lost`` replies in a row; the wheel has already forgotten it."""

    key: PingKey
    target: PingTarget
    lost: int


@dataclass(slots=True)
class SchedulerStats:
    """Counters for sc_ping_stats and /metrics (monotonic except the sweep_* snapshot)."""

    sent: int = 0  # every ping handed out, regular and sweep
    sweep_sent: int = 0
    replies: int = 0
    unmatched_replies: int = 0  # reply to an unknown, answered or timed-out ping
    lost: int = 0
    dropped: int = 0
    rebalanced: int = 0  # contacts moved to an emptier slot (each pinged early once)
    skipped_ticks: int = 0  # ticks not run because the caller fell a whole interval behind
    sweeps_started: int = 0
    sweeps_completed: int = 0
    sweep_total: int = 0  # contacts on the wheel when the current/last sweep started
    sweep_started_at: float | None = None
    last_sweep_seconds: float | None = None


class _LoadIndex:
    """Slots bucketed by load: the least and the most loaded slot in O(1).

    Buckets are lists with swap-remove (a slot's index in its bucket is kept in ``_pos``), so
    neither lookup scans anything - ``next(iter(set))`` would walk empty hash slots.
    """

    def __init__(self, slots: int) -> None:
        self.loads = [0] * slots
        self._buckets: dict[int, list[int]] = {0: list(range(slots))}
        self._pos = list(range(slots))
        self.min = 0
        self.max = 0

    def _take(self, slot: int, load: int) -> None:
        bucket = self._buckets[load]
        i = self._pos[slot]
        last = bucket.pop()
        if last != slot:
            bucket[i] = last
            self._pos[last] = i
        if not bucket:
            del self._buckets[load]

    def _put(self, slot: int, load: int) -> None:
        bucket = self._buckets.setdefault(load, [])
        self._pos[slot] = len(bucket)
        bucket.append(slot)
        self.loads[slot] = load

    def inc(self, slot: int) -> None:
        load = self.loads[slot]
        self._take(slot, load)
        self._put(slot, load + 1)
        if load + 1 > self.max:
            self.max = load + 1
        if load == self.min and load not in self._buckets:
            self.min = load + 1

    def dec(self, slot: int) -> None:
        load = self.loads[slot]
        self._take(slot, load)
        self._put(slot, load - 1)
        if load - 1 < self.min:
            self.min = load - 1
        if load == self.max and load not in self._buckets:
            self.max = load - 1

    def least(self) -> int:
        return self._buckets[self.min][-1]

    def most(self) -> int:
        return self._buckets[self.max][-1]


class KeepaliveScheduler:
    """Decides which contacts to ping at each tick; see the module docstring for the why.

    ``interval`` and ``tick`` are in the same unit as the ``now`` values passed in (seconds of
    ``time.monotonic()`` in the daemon; any unit in tests). The effective interval is
    ``slots * tick`` with ``slots = round(interval / tick)``.
    """

    def __init__(self, interval: float, *, tick: float = 0.1, max_lost: int = 3,
                 reply_mode: ReplyMode | str = ReplyMode.NONE,
                 reply_timeout: float | None = None, sweep_rate: float = 100_000.0) -> None:
        if not interval > 0 or not tick > 0:
            raise ValueError("interval and tick must be > 0")
        if max_lost < 0:
            raise ValueError("max_lost must be >= 0 (0 = never drop)")
        if not sweep_rate > 0:
            raise ValueError("sweep_rate must be > 0 pings per time unit")
        self.interval = interval
        self.tick = tick
        self.slots = max(1, round(interval / tick))
        self.max_lost = max_lost
        self.reply_mode = ReplyMode(reply_mode)
        self.reply_timeout = (min(interval / 2, 5.0) if reply_timeout is None
                              else float(reply_timeout))
        if not self.reply_timeout > 0:
            raise ValueError("reply_timeout must be > 0")
        self.sweep_rate = float(sweep_rate)
        self.stats = SchedulerStats()

        self._wheel: list[dict[PingKey, PingTarget]] = [{} for _ in range(self.slots)]
        self._slot_of: dict[PingKey, int] = {}
        self._loads = _LoadIndex(self.slots)

        self._enabled = False
        self._epoch = 0.0
        self._next_tick = 0  # number of the next tick to run (tick k is due at epoch + k*tick)
        self._next_id = 1

        # loss tracking
        self._outstanding: dict[int, tuple[PingKey, PingTarget]] = {}
        # (deadline, first id, last id) per due() call, in deadline order
        self._deadlines: deque[tuple[float, int, int]] = deque()
        self._by_dest: dict[Address, list[int]] = {}  # ADDRESS mode: outstanding ids per dest
        self._losses: dict[PingKey, int] = {}  # consecutive losses, only non-zero entries
        self._drops: list[Drop] = []

        # sweep state
        self._sweeping = False
        self._sweep_pos = 0  # absolute tick number of the next slot the sweep loads
        self._sweep_end = 0
        self._sweep_keys: list[PingKey] = []  # keys of the slot being swept
        self._sweep_index = 0
        self._sweep_from = 0  # that slot
        self._sweep_from_tick = 0  # and its absolute tick number
        self._sweep_credit = 0.0
        self._sweep_last = 0.0

    # ------------------------------------------------------------------ contacts
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def target(self, key: PingKey) -> PingTarget | None:
        slot = self._slot_of.get(key)
        return None if slot is None else self._wheel[slot][key]

    def upsert(self, key: PingKey, target: PingTarget) -> bool:
        """Track a contact (True if new). An update keeps its slot (its phase) and, when the
        target changed (a new REGISTER), forgets its losses: the phone just proved alive."""
        slot = self._slot_of.get(key)
        if slot is not None:
            wheel_slot = self._wheel[slot]
            if wheel_slot[key] != target:
                wheel_slot[key] = target
                self._losses.pop(key, None)
            return False
        slot = self._loads.least()
        self._wheel[slot][key] = target
        self._slot_of[key] = slot
        self._loads.inc(slot)
        return True

    def remove(self, key: PingKey) -> bool:
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return False
        del self._wheel[slot][key]
        self._loads.dec(slot)
        self._losses.pop(key, None)
        return True

    def update_record(self, rec: tuple) -> bool:
        """Follow a stored contact: track it if pingable, forget it otherwise. True if tracked."""
        target = target_from_record(rec)
        if target is None:
            self.remove(keepalive_key(rec))
            return False
        self.upsert(keepalive_key(rec), target)
        return True

    def remove_record(self, rec: tuple) -> bool:
        return self.remove(keepalive_key(rec))

    def rebuild(self, records: Iterable[tuple]) -> int:
        """Make the wheel hold exactly the pingable contacts among ``records`` (e.g. the whole
        store after a resync). Contacts already tracked keep their slots. Returns the count."""
        for _ in self.rebuild_in_slices(records, slice_size=0):
            pass
        return len(self._slot_of)

    def rebuild_in_slices(self, records: Iterable[tuple], slice_size: int = 5000
                          ) -> Iterator[int]:
        """:meth:`rebuild` as a generator that pauses after every ``slice_size`` steps
        (records read, contacts removed or placed; 0 = never), yielding the steps done, so
        an event loop can run between slices: at 100,000 contacts a rebuild is ~0.5 s of
        CPU. Pass a copy of the table (``store.records()``), not the live store. A contact
        dropped for lost pings between slices may be placed again by the slices after; the
        daemon deletes it from the table, and the next rebuild removes it."""
        wanted: dict[PingKey, PingTarget] = {}
        step = 0
        for rec in records:
            target = target_from_record(rec)
            if target is not None:
                wanted[keepalive_key(rec)] = target
            step += 1
            if slice_size and not step % slice_size:
                yield step
        for key in [k for k in self._slot_of if k not in wanted]:
            self.remove(key)
            step += 1
            if slice_size and not step % slice_size:
                yield step
        for key, target in wanted.items():
            self.upsert(key, target)
            step += 1
            if slice_size and not step % slice_size:
                yield step

    def slot_loads(self) -> list[int]:
        """Contacts per slot (for tests and diagnostics)."""
        return list(self._loads.loads)

    # ------------------------------------------------------------------ role
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def sweeping(self) -> bool:
        return self._sweeping

    def set_enabled(self, enabled: bool, now: float, *, sweep: bool = True) -> None:
        """Start (active node) or stop (passive node) pinging. Enabling an enabled scheduler
        changes nothing (so it can be re-asserted); enabling starts a sweep unless told not to.
        Disabling forgets outstanding pings, loss counts and any sweep."""
        if enabled == self._enabled:
            return
        self._enabled = enabled
        if enabled:
            self._epoch = now
            self._next_tick = 0
            if sweep:
                self.start_sweep(now)
            return
        self._outstanding.clear()
        self._deadlines.clear()
        self._by_dest.clear()
        self._losses.clear()
        self._drops.clear()
        self._stop_sweep()

    def start_sweep(self, now: float) -> None:
        """Ping every contact once, rate-capped, on top of the regular schedule."""
        self._sweeping = True
        # Slots are counted in absolute tick numbers: the regular hand covers [start, next_tick)
        # and the sweep [start, _sweep_pos); the sweep is done when together they cover S slots.
        self._sweep_pos = self._next_tick
        self._sweep_end = self._next_tick + self.slots
        self._sweep_keys = []
        self._sweep_index = 0
        # one tick's worth up front, so the first sweep pings leave with the first due()
        self._sweep_credit = self.sweep_rate * self.tick
        self._sweep_last = now
        self.stats.sweeps_started += 1
        self.stats.sweep_total = len(self._slot_of)
        self.stats.sweep_started_at = now
        self.stats.sweep_sent = 0

    def _stop_sweep(self) -> None:
        self._sweeping = False
        self._sweep_keys = []
        self._sweep_credit = 0.0

    # ------------------------------------------------------------------ ticking
    def due(self, now: float) -> list[Ping]:
        """Pings to send now: the regular slots whose tick has come, then the sweep's share.

        Timed-out pings are settled first, so a contact dropped now is not pinged again.
        A caller late by more than one interval gets one full round, not a burst of repeats.
        """
        if not self._enabled:
            return []
        out: list[Ping] = []
        if self._deadlines:
            self._expire(now)
        ticks_due = math.floor((now - self._epoch) / self.tick + _EPS) + 1
        todo = ticks_due - self._next_tick
        if todo > self.slots:
            self.stats.skipped_ticks += todo - self.slots
            self._next_tick += todo - self.slots
            todo = self.slots
        for _ in range(max(0, todo)):
            slot = self._next_tick % self.slots
            self._next_tick += 1
            self._run_slot(slot, now, out)
        if self._sweeping:
            self._run_sweep(now, out)
        if out:
            self.stats.sent += len(out)
            if self.reply_mode is not ReplyMode.NONE:
                # the ids of one call are consecutive and share a deadline: one entry for all
                self._deadlines.append((now + self.reply_timeout, out[0].ping_id,
                                        out[-1].ping_id))
        return out

    def _ping(self, key: PingKey, target: PingTarget, now: float) -> Ping:
        ping_id = self._next_id
        self._next_id = ping_id + 1
        if self.reply_mode is not ReplyMode.NONE:
            self._outstanding[ping_id] = (key, target)
            if self.reply_mode is ReplyMode.ADDRESS:
                ids = self._by_dest.get(target.dest)
                if ids is None:
                    self._by_dest[target.dest] = [ping_id]
                else:
                    ids.append(ping_id)
        return Ping(ping_id, key, target)

    def _run_slot(self, slot: int, now: float, out: list[Ping]) -> None:
        loads = self._loads
        share = -(-len(self._slot_of) // self.slots)  # ceil(N / S)
        wheel = self._wheel
        here = wheel[slot]
        # Top this slot up from the fullest one: every other slot comes later in the round, so
        # the moved contact is pinged early (now), never late.
        while loads.loads[slot] < share and loads.max > loads.loads[slot] + 1:
            donor = loads.most()
            key, target = wheel[donor].popitem()
            here[key] = target
            self._slot_of[key] = slot
            loads.dec(donor)
            loads.inc(slot)
            self.stats.rebalanced += 1
        ping = self._ping
        for key, target in here.items():
            out.append(ping(key, target, now))

    def _run_sweep(self, now: float, out: list[Ping]) -> None:
        self._sweep_credit += self.sweep_rate * max(0.0, now - self._sweep_last)
        self._sweep_last = now
        budget = int(self._sweep_credit)
        sent = 0
        keys, index = self._sweep_keys, self._sweep_index
        if self._sweep_from_tick < self._next_tick:
            keys, index = [], 0  # the regular hand has pinged the rest of that slot
        wheel = self._wheel
        ping = self._ping
        while sent < budget:
            if index >= len(keys):
                # skip what the regular hand has covered since the sweep began
                pos = max(self._sweep_pos, self._next_tick)
                if pos >= self._sweep_end:
                    self._finish_sweep(now)
                    break
                self._sweep_from_tick = pos
                self._sweep_from = pos % self.slots
                keys, index = list(wheel[self._sweep_from]), 0
                self._sweep_pos = pos + 1
                continue
            key = keys[index]
            index += 1
            target = wheel[self._sweep_from].get(key)
            if target is None:  # removed (or moved) since the slot was loaded
                continue
            out.append(ping(key, target, now))
            sent += 1
        if self._sweeping:
            self._sweep_keys, self._sweep_index = keys, index
            self._sweep_credit -= sent
            if index >= len(keys) and max(self._sweep_pos, self._next_tick) >= self._sweep_end:
                self._finish_sweep(now)
        self.stats.sweep_sent += sent

    def _finish_sweep(self, now: float) -> None:
        self._stop_sweep()
        self.stats.sweeps_completed += 1
        if self.stats.sweep_started_at is not None:
            self.stats.last_sweep_seconds = now - self.stats.sweep_started_at

    # ------------------------------------------------------------------ replies and losses
    def reply(self, ping_id: int) -> bool:
        """A reply echoing ``ping_id`` arrived (TOKEN mode). False if not outstanding."""
        entry = self._outstanding.pop(ping_id, None)
        if entry is None:
            self.stats.unmatched_replies += 1
            return False
        key, target = entry
        if self.reply_mode is ReplyMode.ADDRESS:
            self._unindex_dest(target.dest, ping_id)
        self._losses.pop(key, None)
        self.stats.replies += 1
        return True

    def heard_from(self, dest: Address) -> int:
        """A packet came back from ``dest`` (ADDRESS mode): it answers every outstanding ping
        to that address. Returns how many pings it answered."""
        ids = self._by_dest.pop(dest, None)
        if not ids:
            return 0
        answered = 0
        for ping_id in ids:
            entry = self._outstanding.pop(ping_id, None)
            if entry is not None:
                self._losses.pop(entry[0], None)
                answered += 1
        self.stats.replies += answered
        return answered

    def _unindex_dest(self, dest: Address, ping_id: int) -> None:
        ids = self._by_dest.get(dest)
        if ids is None:
            return
        try:
            ids.remove(ping_id)
        except ValueError:
            return
        if not ids:
            del self._by_dest[dest]

    def _expire(self, now: float) -> None:
        deadlines, outstanding = self._deadlines, self._outstanding
        while deadlines and deadlines[0][0] <= now:
            _, first, last = deadlines.popleft()
            for ping_id in range(first, last + 1):
                entry = outstanding.pop(ping_id, None)
                if entry is None:
                    continue  # answered
                key, target = entry
                if self.reply_mode is ReplyMode.ADDRESS:
                    self._unindex_dest(target.dest, ping_id)
                self.stats.lost += 1
                if self.target(key) != target:
                    continue  # forgotten, or re-registered since: this loss says nothing now
                lost = self._losses.get(key, 0) + 1
                if self.max_lost and lost >= self.max_lost:
                    self.remove(key)
                    self._drops.append(Drop(key, target, lost))
                    self.stats.dropped += 1
                else:
                    self._losses[key] = lost

    def take_drops(self) -> list[Drop]:
        """Contacts dropped for lost pings since the last call (the caller deletes them)."""
        drops, self._drops = self._drops, []
        return drops

    def losses(self, key: PingKey) -> int:
        return self._losses.get(key, 0)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def snapshot(self) -> dict:
        """Stats plus state, JSON-ready (sc_ping_stats)."""
        out = asdict(self.stats)
        out.update(
            enabled=self._enabled, contacts=len(self._slot_of), outstanding=self.outstanding,
            sweeping=self._sweeping, interval=self.slots * self.tick, tick=self.tick,
            slots=self.slots, reply_mode=str(self.reply_mode), max_lost=self.max_lost,
            max_slot_load=self._loads.max,
            sweep_progress=(1.0 if not self._sweeping or not self.stats.sweep_total
                            else min(1.0, self.stats.sweep_sent / self.stats.sweep_total)),
        )
        return out
