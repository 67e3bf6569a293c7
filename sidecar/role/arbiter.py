"""Sans-I/O role arbiter: decides whether this node is ACTIVE or PASSIVE (Binary-Star style).

The daemon feeds it what it observes — peer heartbeats, checkpoint probe results, a clock tick,
operator commands, the outcome of a failover it carried out — and executes the actions it
returns. Nothing here sleeps, probes or touches a socket, so every rule below is unit-tested
and property-tested with a simulated clock and a simulated lossy link.

Rules (DESIGN.md §6):

* **Start.** A node starts STARTING and waits ``startup_wait`` for a peer heartbeat. A peer that
  says "active" makes it PASSIVE. A peer that is heard but not active makes the *primary* ACTIVE
  at once and the *backup* PASSIVE (it waits for the primary). Nobody heard within
  ``startup_wait``: the primary becomes ACTIVE; the backup becomes PASSIVE and takes over through
  the ordinary checkpoint rule once the primary has been silent for ``wait`` since start.
* **Automatic failover.** A PASSIVE node promotes only when *every* configured checkpoint reports
  the active gone, continuously, for ``wait`` seconds. Any single "alive" report resets the
  streak (the counter of the background documents, measured in seconds). A checkpoint that has
  not reported yet counts as "alive": no evidence is not evidence of death. Peer heartbeats
  count as evidence only through the ``heartbeat`` checkpoint (in the default list): leave it
  out and a node takes over when, say, the peer's *proxy* stops answering OPTIONS although its
  sidecar still sends heartbeats — the live sidecar is then fenced by the higher epoch.
* **No active node.** A PASSIVE node that hears a live peer which is not active either (both
  passive, e.g. after a failed failover) fills the vacancy: at once if the peer *yields* (an
  operator demoted it) or if this node is the primary, after ``wait`` if it is the backup.
* **Epochs.** Every promotion sets ``epoch = max(every epoch seen) + 1``; epochs never go down.
  ``epoch`` is always the highest epoch this node knows; an active node keeps it the highest in
  the cluster (it re-asserts above a passive peer that shows a higher one).
* **Fencing.** An ACTIVE node that hears a peer claiming "active" with a higher epoch demotes at
  once. On *equal* epochs (both promoted without hearing each other) the node with the **lower
  node id stays active** and the higher one demotes. Both sides apply the same rule, so the tie is
  gone as soon as one heartbeat of the lower node reaches the higher one.
* **No automatic fail-back.** A returning old primary hears an active peer (or a higher epoch) and
  stays PASSIVE; nothing moves the role back except an operator.
* **Failed failover.** A promotion is carried out by the daemon (``before_failover`` hooks, VIP,
  ``after_failover`` hooks) and reported back with :meth:`Arbiter.on_failover_result`. A failure
  demotes back and blocks *automatic* promotion for a backoff that grows exponentially up to a
  cap; a success resets the backoff. Operator commands ignore the backoff.
* **Operator.** ``promote`` (refused while a live peer is active unless forced), ``demote``
  (becomes PASSIVE and *yields*: it will not promote by itself until it has seen the peer active,
  and its heartbeat role "yielding" tells the peer to take over at once), and ``failover`` with
  ``check_only`` (a report, no change) and ``target`` (move the role to a given node).

Heartbeat roles this module produces and understands: ``starting``, ``active``, ``passive``,
``yielding`` (passive, and asking the peer to take over). Unknown roles count as not active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

ROLE_STARTING = "starting"
ROLE_ACTIVE = "active"
ROLE_PASSIVE = "passive"
ROLE_YIELDING = "yielding"

STAGE_BEFORE = "before_failover"
STAGE_AFTER = "after_failover"
STAGE_DEMOTE = "on_demote"


Plan = Callable[[], list] | None
"""What a planned operator failover does when carried out (None: nothing to do)."""


class State(Enum):
    STARTING = "starting"
    ACTIVE = "active"
    PASSIVE = "passive"


class ArbiterConfigError(ValueError):
    """The arbiter's settings cannot work (e.g. no checkpoint, same id for node and peer)."""


@dataclass(frozen=True, slots=True)
class ArbiterConfig:
    """Settings of one node's arbiter; times in seconds of the clock passed as ``now``."""

    node_id: int
    peer_id: int
    primary: bool
    checkpoints: tuple[str, ...] = ("heartbeat",)
    wait: float = 3.0  # every checkpoint must say "gone" this long before a promotion
    startup_wait: float = 5.0  # how long a starting node listens for the peer
    peer_timeout: float = 3.0  # a peer heard within this is "alive" (vacancy, failover target)
    backoff_initial: float = 10.0  # after a failed failover, no automatic attempt for this long
    backoff_factor: float = 2.0
    backoff_max: float = 600.0
    initial_epoch: int = 0  # the last epoch this node knew (persisted by the daemon)

    def __post_init__(self) -> None:
        if self.node_id == self.peer_id:
            raise ArbiterConfigError("node_id and peer_id must differ")
        if not self.checkpoints:
            raise ArbiterConfigError("at least one checkpoint is needed, else a passive node "
                                     "would promote with no evidence at all")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ArbiterConfigError("checkpoint names must be unique")
        for name in ("wait", "startup_wait", "peer_timeout", "backoff_initial", "backoff_max"):
            if getattr(self, name) < 0:
                raise ArbiterConfigError(f"{name} must be >= 0")
        if self.backoff_factor < 1:
            raise ArbiterConfigError("backoff_factor must be >= 1")
        if self.initial_epoch < 0:
            raise ArbiterConfigError("initial_epoch must be >= 0")


# ----- actions returned to the daemon (executed in list order)
@dataclass(frozen=True, slots=True)
class RunHooks:
    """Run the configured hooks of ``stage`` with ``env`` added to the environment.

    ``required``: if the hooks fail, stop executing this action list and report
    ``on_failover_result(False, ...)`` (only ``before_failover`` is required: a failed
    ``after_failover`` must not take a serving node down again).
    """

    stage: str
    env: dict[str, str]
    required: bool = False


@dataclass(frozen=True, slots=True)
class BecomeActive:
    """Take the role: publisher epoch := ``epoch``, acquire the VIP (+ gratuitous ARP), start
    NAT keepalives. Part of a failover: its failure is reported as a failed failover."""

    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class BecomePassive:
    """Give up the role: stop keepalives first, then release the VIP (idempotent; also sent when
    a node first settles as passive, to clean up after a crash that left the VIP behind)."""

    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """The epoch moved without a role change (adopted from the peer, or re-asserted)."""

    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestPeerPromotion:
    """Ask the peer to take the role (e.g. ``sc_promote`` on its admin API). Best effort: this
    node's heartbeat role "yielding" tells the peer the same thing over the replication link."""

    peer_id: int
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    """Answer to an operator command. ``status`` is :meth:`Arbiter.status` plus details."""

    ok: bool
    command: str
    detail: str
    status: dict[str, Any]


@dataclass(slots=True)
class ArbiterStats:
    promotions: int = 0
    demotions: int = 0
    fenced: int = 0
    failovers_ok: int = 0
    failovers_failed: int = 0
    foreign_heartbeats: int = 0
    malformed_heartbeats: int = 0
    unknown_checkpoints: int = 0
    stray_results: int = 0


@dataclass(slots=True)
class CheckpointState:
    ok: bool | None = None  # None: no report yet
    detail: str = ""
    at: float | None = None
    gone_since: float | None = None


@dataclass(slots=True)
class PeerState:
    role: str | None = None
    epoch: int = 0
    heard: float | None = None


class Arbiter:
    """Role state machine of one node in a two-node pair. All times are ``now`` arguments."""

    def __init__(self, cfg: ArbiterConfig, now: float) -> None:
        self.cfg = cfg
        self.state = State.STARTING
        self.epoch = cfg.initial_epoch
        self.held = False  # demoted by an operator: no automatic promotion, role "yielding"
        self.started = now
        self.peer = PeerState()
        self.checkpoints = {name: CheckpointState() for name in cfg.checkpoints}
        self.stats = ArbiterStats()
        self.last_reason = "starting"
        self.last_change = now
        self.backoff_until = 0.0
        self._backoff = cfg.backoff_initial
        self._pending = False  # a promotion is being carried out by the daemon
        self._streak_floor = now  # "gone" reports before this do not count (see _demote)
        self._vacancy_since: float | None = None

    # ------------------------------------------------------------ read-only views
    @property
    def heartbeat_role(self) -> str:
        """The role string this node puts in its heartbeats."""
        if self.state is State.PASSIVE and self.held:
            return ROLE_YIELDING
        return self.state.value

    @property
    def failover_pending(self) -> bool:
        return self._pending

    def peer_alive(self, now: float) -> bool:
        return self.peer.heard is not None and now - self.peer.heard <= self.cfg.peer_timeout

    def all_gone_since(self) -> float | None:
        """Start of the current streak in which every checkpoint reports the active gone."""
        starts = [cp.gone_since for cp in self.checkpoints.values()]
        if any(s is None for s in starts):
            return None
        return max(max(starts), self._streak_floor)  # type: ignore[type-var]

    def status(self, now: float) -> dict[str, Any]:
        """Everything an operator needs to see why the node is in its role (``sc_role``)."""
        since = self.all_gone_since()
        gone_for = None if since is None else round(now - since, 3)
        return {
            "node": self.cfg.node_id,
            "peer": self.cfg.peer_id,
            "configured": "primary" if self.cfg.primary else "backup",
            "state": self.state.value,
            "role": self.heartbeat_role,
            "epoch": self.epoch,
            "held": self.held,
            "failover_pending": self._pending,
            "backoff_remaining_s": round(max(0.0, self.backoff_until - now), 3),
            "next_backoff_s": self._backoff,
            "last_change": {"ago_s": round(now - self.last_change, 3),
                            "reason": self.last_reason},
            "peer_state": {
                "role": self.peer.role,
                "epoch": self.peer.epoch,
                "heard_s_ago": None if self.peer.heard is None
                else round(now - self.peer.heard, 3),
                "alive": self.peer_alive(now),
            },
            "checkpoints": {
                name: {"ok": cp.ok, "detail": cp.detail,
                       "age_s": None if cp.at is None else round(now - cp.at, 3),
                       "gone_for_s": None if cp.gone_since is None
                       else round(now - cp.gone_since, 3)}
                for name, cp in self.checkpoints.items()},
            "all_gone_for_s": gone_for,
            "wait_s": self.cfg.wait,
            "stats": {k: getattr(self.stats, k) for k in self.stats.__slots__},
        }

    # ------------------------------------------------------------ inputs
    def on_peer_heartbeat(self, peer_id: int, epoch: int, role: str, now: float) -> list:
        if peer_id != self.cfg.peer_id:
            self.stats.foreign_heartbeats += 1
            return []
        if type(epoch) is not int or epoch < 0 or not isinstance(role, str):
            self.stats.malformed_heartbeats += 1
            return []
        self.peer.heard, self.peer.role, self.peer.epoch = now, role, epoch
        peer_active = role == ROLE_ACTIVE
        if self.state is State.ACTIVE:
            if peer_active and (epoch > self.epoch
                                or (epoch == self.epoch and peer_id < self.cfg.node_id)):
                why = "higher epoch" if epoch > self.epoch else "equal epoch, lower node id"
                self.epoch = epoch
                self.stats.fenced += 1
                return self._demote(now, f"fenced: node {peer_id} is active with epoch "
                                         f"{epoch} ({why})", held=False)
            if not peer_active and epoch > self.epoch:
                # Keep the active's epoch the highest in the cluster, so the peer cannot fence
                # us with a stale term and every reader can order the terms.
                self.epoch = epoch + 1
                return [EpochChanged(self.epoch, f"re-asserted above node {peer_id}'s epoch "
                                                 f"{epoch}")]
            return []
        actions: list = []
        if epoch > self.epoch:
            self.epoch = epoch
            actions.append(EpochChanged(epoch, f"adopted from node {peer_id}"))
        if peer_active:
            self.held = False  # the hand-over we yielded for is done
            self._vacancy_since = None
            if self.state is State.STARTING:
                actions += self._settle_passive(now, f"node {peer_id} is active")
            return actions
        if self.state is State.STARTING:
            if self.cfg.primary:
                return actions + self._promote(now, f"primary start: node {peer_id} is "
                                                    f"{role}, nobody is active")
            return actions + self._settle_passive(now, f"backup start: waiting for primary "
                                                       f"node {peer_id} ({role})")
        if self._vacancy_since is None:
            self._vacancy_since = now
        return actions + self._maybe_promote(now)

    def on_checkpoint(self, name: str, ok: bool, detail: str, now: float) -> list:
        """One probe result: ``ok`` = this checkpoint sees the active peer alive."""
        cp = self.checkpoints.get(name)
        if cp is None:
            self.stats.unknown_checkpoints += 1
            return []
        cp.ok, cp.detail, cp.at = bool(ok), str(detail), now
        if ok:
            cp.gone_since = None
        elif cp.gone_since is None:
            cp.gone_since = now
        return self._maybe_promote(now)

    def tick(self, now: float) -> list:
        if self.state is State.STARTING:
            if now - self.started < self.cfg.startup_wait:
                return []
            if self.cfg.primary:
                return self._promote(now, f"primary start: no peer heard within "
                                          f"{self.cfg.startup_wait:g}s")
            # The backup's "silent for wait" clock starts at start, not now.
            return self._settle_passive(now, f"backup start: no peer heard within "
                                             f"{self.cfg.startup_wait:g}s",
                                        floor=self.started)
        if self._vacancy_since is not None and not self.peer_alive(now):
            self._vacancy_since = None
        return self._maybe_promote(now)

    def on_failover_result(self, ok: bool, detail: str, now: float) -> list:
        """Outcome of the before-hooks + BecomeActive the daemon carried out."""
        if not self._pending:
            self.stats.stray_results += 1  # fenced meanwhile, or a duplicate report
            return []
        self._pending = False
        if ok:
            self.stats.failovers_ok += 1
            self._backoff = self.cfg.backoff_initial
            return []
        self.stats.failovers_failed += 1
        delay = self._backoff
        self.backoff_until = now + delay
        self._backoff = min(self.cfg.backoff_max, self._backoff * self.cfg.backoff_factor)
        return self._demote(now, f"failover failed: {detail}; no automatic attempt for "
                                 f"{delay:g}s", held=False)

    # ------------------------------------------------------------ operator commands
    def promote(self, now: float, force: bool = False) -> list:
        if self.state is State.ACTIVE:
            return [self._report(True, "promote", "already active", now)]
        if not force and self.peer_alive(now) and self.peer.role == ROLE_ACTIVE:
            return [self._report(False, "promote",
                                 f"node {self.cfg.peer_id} is active and alive (epoch "
                                 f"{self.peer.epoch}); use force to take over anyway", now)]
        actions = self._promote(now, "operator promote" + (" (forced)" if force else ""))
        return actions + [self._report(True, "promote", f"promoting with epoch {self.epoch}",
                                       now)]

    def demote(self, now: float) -> list:
        if self.state is State.PASSIVE:
            return [self._report(True, "demote", "already passive", now)]
        actions = self._demote(now, "operator demote", held=True)
        return actions + [self._report(True, "demote", "passive; yielding to node "
                                                       f"{self.cfg.peer_id}", now)]

    def failover(self, now: float, check_only: bool = False, target: int | None = None) -> list:
        """Move the role to ``target`` (default: to the node that does not hold it).

        ``check_only`` returns the same report without acting: whether it would succeed, why,
        and the evidence (checkpoints, epochs, peer state).
        """
        me, peer = self.cfg.node_id, self.cfg.peer_id
        if target is None:
            target = peer if self.state is State.ACTIVE else me
        notes: list[str] = []
        execute: Plan = None
        if target not in (me, peer):
            ok, detail = False, f"unknown node {target}; this pair is {me} and {peer}"
        elif target == me:
            ok, detail, execute = self._plan_self(now, notes)
        else:
            ok, detail, execute = self._plan_peer(now, notes)
        report = self._report(ok, "failover", detail, now,
                              check_only=check_only, target=target, would_succeed=ok,
                              notes=notes)
        if check_only or not ok or execute is None:
            return [report]
        return [*execute(), report]

    # ------------------------------------------------------------ internals
    def _plan_self(self, now: float, notes: list[str]) -> tuple[bool, str, Plan]:
        if self.state is State.ACTIVE:
            return True, "already active here", None
        epoch = max(self.epoch, self.peer.epoch) + 1
        if self.peer_alive(now) and self.peer.role == ROLE_ACTIVE:
            notes.append(f"node {self.cfg.peer_id} is active and alive; it steps down when it "
                         f"hears epoch {epoch}")
        if now < self.backoff_until:
            notes.append("an operator failover ignores the automatic backoff")
        since = self.all_gone_since()
        notes.append("every checkpoint reports the active gone" if since is not None
                     else "not every checkpoint reports the active gone")
        return (True, f"node {self.cfg.node_id} promotes with epoch {epoch}",
                lambda: self._promote(now, "operator failover to this node"))

    def _plan_peer(self, now: float, notes: list[str]) -> tuple[bool, str, Plan]:
        peer = self.cfg.peer_id
        if not self.peer_alive(now):
            heard = "never heard" if self.peer.heard is None \
                else f"last heard {now - self.peer.heard:.1f}s ago"
            return False, f"node {peer} is not alive ({heard}); it cannot take over", None
        if self.state is not State.ACTIVE:
            if self.peer.role == ROLE_ACTIVE:
                return True, f"node {peer} is already active", None
            notes.append("nobody is active; this node yields and asks the peer to promote")
            return (True, f"node {peer} is asked to promote",
                    lambda: self._yield(now, f"operator failover to node {peer}"))
        if self.peer.role not in (ROLE_PASSIVE, ROLE_YIELDING):
            return False, f"node {peer} is {self.peer.role}, not passive; it cannot take over", \
                None
        notes.append(f"this node demotes and yields; node {peer} promotes with epoch "
                     f"{self.epoch + 1} when it hears that")
        return (True, f"moving the role to node {peer}",
                lambda: self._demote(now, f"operator failover to node {peer}", held=True)
                + [RequestPeerPromotion(peer, self.epoch, f"operator failover from node "
                                                          f"{self.cfg.node_id}")])

    def _yield(self, now: float, reason: str) -> list:
        self.held = True
        self.last_reason, self.last_change = reason, now
        return [RequestPeerPromotion(self.cfg.peer_id, self.epoch, reason)]

    def _maybe_promote(self, now: float) -> list:
        if (self.state is not State.PASSIVE or self.held or self._pending
                or now < self.backoff_until):
            return []
        since = self.all_gone_since()
        if since is not None and now - since >= self.cfg.wait:
            names = ", ".join(self.checkpoints)
            return self._promote(now, f"every checkpoint ({names}) reports the active gone "
                                      f"for {now - since:.1f}s")
        if not self.peer_alive(now) or self.peer.role == ROLE_ACTIVE:
            return []
        peer = self.cfg.peer_id
        if self.peer.role == ROLE_YIELDING:
            return self._promote(now, f"node {peer} yields the role")
        if self.cfg.primary:
            return self._promote(now, f"no active node (node {peer} is {self.peer.role}); "
                                      f"the primary takes over")
        if self._vacancy_since is not None and now - self._vacancy_since >= self.cfg.wait:
            return self._promote(now, f"no active node for {now - self._vacancy_since:.1f}s "
                                      f"(node {peer} is {self.peer.role})")
        return []

    def adopt_fencing_epoch(self, epoch: int, reason: str) -> list:
        """Raise the epoch to a fencing token handed out elsewhere (the Redis lease's INCR
        counter) so the epoch in every frame is the lease's: a stale holder whose lease
        expired then carries a lower epoch than the node that took the lease over. Epochs
        never go down, so a lower token changes nothing."""
        if type(epoch) is not int or epoch <= self.epoch:
            return []
        self.epoch = epoch
        return [EpochChanged(epoch, reason)]

    def _promote(self, now: float, reason: str) -> list:
        self.epoch = max(self.epoch, self.peer.epoch) + 1
        self.state = State.ACTIVE
        self.held = False
        self._pending = True
        self._vacancy_since = None
        self.stats.promotions += 1
        self.last_reason, self.last_change = reason, now
        env = self._env(ROLE_ACTIVE, reason)
        return [RunHooks(STAGE_BEFORE, env, required=True), BecomeActive(self.epoch, reason),
                RunHooks(STAGE_AFTER, env)]

    def _demote(self, now: float, reason: str, held: bool) -> list:
        self.state = State.PASSIVE
        self.held = held
        self._pending = False
        self._vacancy_since = None
        # Checkpoint results gathered while active (about a peer that was passive or cut off)
        # must not promote us straight back: the streak restarts now.
        self._streak_floor = now
        self.stats.demotions += 1
        self.last_reason, self.last_change = reason, now
        return [BecomePassive(self.epoch, reason),
                RunHooks(STAGE_DEMOTE, self._env(ROLE_PASSIVE, reason))]

    def _settle_passive(self, now: float, reason: str, floor: float | None = None) -> list:
        """STARTING -> PASSIVE: no hooks (nothing was demoted), but a BecomePassive so the
        daemon drops a VIP a crashed previous run may have left on the interface."""
        self.state = State.PASSIVE
        self._streak_floor = now if floor is None else floor
        self.last_reason, self.last_change = reason, now
        return [BecomePassive(self.epoch, reason)]

    def _env(self, role: str, reason: str) -> dict[str, str]:
        return {"SIDECAR_ROLE": role, "SIDECAR_EPOCH": str(self.epoch),
                "SIDECAR_PEER": str(self.cfg.peer_id), "SIDECAR_REASON": reason,
                "SIDECAR_NODE": str(self.cfg.node_id)}

    def _report(self, ok: bool, command: str, detail: str, now: float, **extra: Any) -> Report:
        return Report(ok, command, detail, {**self.status(now), **extra})
