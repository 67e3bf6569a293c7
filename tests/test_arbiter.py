"""The role arbiter, driven without sockets or sleeps: every rule of DESIGN.md §6 step by step,
then two arbiters exchanging heartbeats through a simulated lossy link under hypothesis."""

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.role.arbiter import (
    ROLE_ACTIVE,
    ROLE_PASSIVE,
    ROLE_STARTING,
    ROLE_YIELDING,
    STAGE_AFTER,
    STAGE_BEFORE,
    STAGE_DEMOTE,
    Arbiter,
    ArbiterConfig,
    ArbiterConfigError,
    BecomeActive,
    BecomePassive,
    EpochChanged,
    Report,
    RequestPeerPromotion,
    RunHooks,
    State,
)


def make(node_id=1, peer_id=2, primary=True, now=0.0, **kw) -> Arbiter:
    kw.setdefault("wait", 3.0)
    kw.setdefault("startup_wait", 5.0)
    kw.setdefault("peer_timeout", 3.0)
    kw.setdefault("backoff_initial", 10.0)
    kw.setdefault("backoff_max", 40.0)
    return Arbiter(ArbiterConfig(node_id, peer_id, primary, **kw), now)


def kinds(actions) -> list[str]:
    return [type(a).__name__ + (f":{a.stage}" if isinstance(a, RunHooks) else "")
            for a in actions]


PROMOTION = ["RunHooks:before_failover", "BecomeActive", "RunHooks:after_failover"]
DEMOTION = ["BecomePassive", "RunHooks:on_demote"]


def active(node_id=1, peer_id=2, epoch_seen=0, primary=True, **kw) -> Arbiter:
    """A node that became active at start (peer heard as starting) and whose failover worked."""
    a = make(node_id, peer_id, primary=primary, **kw)
    a.on_peer_heartbeat(peer_id, epoch_seen, ROLE_STARTING, 0.1)
    if a.state is not State.ACTIVE:
        a.promote(0.1, force=True)
    a.on_failover_result(True, "", 0.2)
    assert a.state is State.ACTIVE and not a.failover_pending
    return a


def passive(node_id=2, peer_id=1, peer_epoch=1, primary=False, **kw) -> Arbiter:
    """A backup that found the peer active at start."""
    a = make(node_id, peer_id, primary=primary, **kw)
    a.on_peer_heartbeat(peer_id, peer_epoch, ROLE_ACTIVE, 0.1)
    assert a.state is State.PASSIVE
    return a


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("kw", [
    {"node_id": 1, "peer_id": 1},
    {"checkpoints": ()},
    {"checkpoints": ("a", "a")},
    {"wait": -1},
    {"backoff_factor": 0.5},
    {"initial_epoch": -3},
])
def test_config_rejects_settings_that_cannot_work(kw):
    base = {"node_id": 1, "peer_id": 2, "primary": True}
    with pytest.raises(ArbiterConfigError):
        ArbiterConfig(**{**base, **kw})


# ---------------------------------------------------------------- start
def test_primary_alone_becomes_active_after_startup_wait():
    a = make(primary=True, initial_epoch=4)
    assert a.heartbeat_role == ROLE_STARTING
    assert a.tick(4.9) == []
    acts = a.tick(5.0)
    assert kinds(acts) == PROMOTION
    assert a.state is State.ACTIVE and a.epoch == 5
    assert acts[1] == BecomeActive(5, acts[1].reason)
    assert "no peer heard" in acts[1].reason
    assert acts[0].required and not acts[2].required


def test_backup_alone_waits_for_the_primary_then_takes_over_after_wait():
    a = make(node_id=2, peer_id=1, primary=False, wait=8.0)
    assert a.on_checkpoint("heartbeat", False, "never heard", 1.0) == []  # still starting
    acts = a.tick(5.0)
    assert kinds(acts) == ["BecomePassive"] and a.state is State.PASSIVE
    assert a.tick(8.9) == []
    assert kinds(a.tick(9.0)) == PROMOTION  # silent since t=1 (first 'gone'), wait 8 s
    assert a.epoch == 1


def test_node_finding_an_active_peer_at_start_becomes_passive_and_adopts_its_epoch():
    a = make(primary=True)
    acts = a.on_peer_heartbeat(2, 7, ROLE_ACTIVE, 1.0)
    assert kinds(acts) == ["EpochChanged", "BecomePassive"]
    assert a.state is State.PASSIVE and a.epoch == 7 and a.heartbeat_role == ROLE_PASSIVE
    assert a.tick(100.0) == []  # no fail-back: the primary stays passive


def test_both_starting_primary_takes_the_role_and_backup_waits():
    p, b = make(1, 2, primary=True), make(2, 1, primary=False)
    assert kinds(p.on_peer_heartbeat(2, 0, ROLE_STARTING, 0.5)) == PROMOTION
    assert kinds(b.on_peer_heartbeat(1, 0, ROLE_STARTING, 0.5)) == ["BecomePassive"]
    assert b.on_peer_heartbeat(1, 1, ROLE_ACTIVE, 1.0) == [EpochChanged(1, "adopted from node 1")]
    assert b.state is State.PASSIVE


# ---------------------------------------------------------------- checkpoints
def test_passive_promotes_only_when_every_checkpoint_says_gone_for_wait():
    b = passive(checkpoints=("heartbeat", "sip"))
    assert b.on_checkpoint("heartbeat", False, "silent 3s", 1.0) == []
    assert b.tick(10.0) == []  # sip has not reported: no evidence is not evidence of death
    assert b.on_checkpoint("sip", False, "timeout", 10.0) == []
    assert b.tick(12.9) == []
    assert b.on_checkpoint("sip", True, "200 OK", 12.95) == []  # one 'alive' resets the streak
    assert b.on_checkpoint("sip", False, "timeout", 13.0) == []
    assert b.tick(15.9) == []
    acts = b.tick(16.0)
    assert kinds(acts) == PROMOTION and b.epoch == 2
    assert "every checkpoint (heartbeat, sip)" in acts[1].reason


def test_dead_proxy_behind_a_live_sidecar_fails_over_without_a_heartbeat_checkpoint():
    a, b = active(1, 2), passive(2, 1, checkpoints=("sip",))
    for t in (1.0, 2.0, 3.0, 4.0):
        b.on_peer_heartbeat(1, 1, ROLE_ACTIVE, t)  # the sidecar is alive ...
        acts = b.on_checkpoint("sip", False, "no answer within 1s", t)  # ... its proxy is not
    assert kinds(acts) == PROMOTION and b.epoch == 2
    assert kinds(a.on_peer_heartbeat(2, b.epoch, b.heartbeat_role, 4.1)) == DEMOTION


def test_unknown_checkpoint_is_counted_and_ignored():
    b = passive()
    assert b.on_checkpoint("nope", False, "", 1.0) == []
    assert b.stats.unknown_checkpoints == 1
    assert "nope" not in b.status(1.0)["checkpoints"]


def test_streak_restarts_after_a_demotion():
    """Reports gathered while active (peer cut off) must not promote the node straight back
    after it has been fenced."""
    a = active()
    a.on_checkpoint("heartbeat", False, "silent", 1.0)
    acts = a.on_peer_heartbeat(2, 2, ROLE_ACTIVE, 50.0)
    assert kinds(acts) == DEMOTION and "fenced" in acts[0].reason
    assert a.tick(50.5) == []
    assert a.tick(52.9) == []
    # the peer really is gone now: promotion needs a full wait after the demotion
    assert kinds(a.tick(53.1)) == PROMOTION
    assert a.epoch == 3


# ---------------------------------------------------------------- epochs and fencing
def test_active_seeing_a_higher_active_epoch_demotes_at_once():
    a = active(epoch_seen=0)
    assert a.epoch == 1
    acts = a.on_peer_heartbeat(2, 5, ROLE_ACTIVE, 2.0)
    assert kinds(acts) == DEMOTION
    assert acts[0] == BecomePassive(5, acts[0].reason) and "higher epoch" in acts[0].reason
    assert acts[1].env["SIDECAR_ROLE"] == ROLE_PASSIVE
    assert a.stats.fenced == 1 and a.heartbeat_role == ROLE_PASSIVE


def test_equal_epochs_lower_node_id_stays_active():
    low, high = active(1, 2, primary=True), active(2, 1, primary=False)
    assert low.epoch == high.epoch == 1
    assert low.on_peer_heartbeat(2, 1, ROLE_ACTIVE, 1.0) == []
    assert low.state is State.ACTIVE
    acts = high.on_peer_heartbeat(1, 1, ROLE_ACTIVE, 1.0)
    assert kinds(acts) == DEMOTION and "lower node id" in acts[0].reason
    assert high.state is State.PASSIVE and high.epoch == 1


def test_active_ignores_a_lower_active_epoch_the_peer_will_yield():
    a = active(epoch_seen=4)
    assert a.epoch == 5
    assert a.on_peer_heartbeat(2, 3, ROLE_ACTIVE, 1.0) == []
    assert a.state is State.ACTIVE


def test_active_reasserts_above_a_passive_peer_with_a_higher_epoch():
    a = active()
    acts = a.on_peer_heartbeat(2, 6, ROLE_PASSIVE, 1.0)
    assert acts == [EpochChanged(7, acts[0].reason)]
    assert a.state is State.ACTIVE and a.epoch == 7


def test_foreign_and_malformed_heartbeats_change_nothing():
    a = active()
    assert a.on_peer_heartbeat(9, 100, ROLE_ACTIVE, 1.0) == []
    assert a.on_peer_heartbeat(2, -1, ROLE_ACTIVE, 1.0) == []
    assert a.on_peer_heartbeat(2, "7", ROLE_ACTIVE, 1.0) == []  # type: ignore[arg-type]
    assert a.on_peer_heartbeat(2, 7, None, 1.0) == []  # type: ignore[arg-type]
    assert a.state is State.ACTIVE and a.epoch == 1
    assert a.stats.foreign_heartbeats == 1 and a.stats.malformed_heartbeats == 3


def test_returning_old_primary_stays_passive():
    """Primary failed, backup took over with epoch 2; the primary restarts with its persisted
    epoch 1 and must not take the role back, whatever its checkpoints say."""
    p = make(1, 2, primary=True, initial_epoch=1)
    p.on_peer_heartbeat(2, 2, ROLE_ACTIVE, 0.5)
    assert p.state is State.PASSIVE and p.epoch == 2
    for t in range(1, 60):
        p.on_peer_heartbeat(2, 2, ROLE_ACTIVE, float(t))
        assert p.on_checkpoint("heartbeat", True, "fresh", float(t)) == []
        assert p.tick(t + 0.5) == []
    assert p.state is State.PASSIVE


# ---------------------------------------------------------------- vacancy (nobody active)
def test_vacancy_primary_promotes_at_once_backup_after_wait():
    p = passive(1, 2, peer_epoch=3, primary=True)
    p.on_peer_heartbeat(2, 3, ROLE_PASSIVE, 1.0)  # the active stepped down, nobody active
    assert p.state is State.ACTIVE and p.epoch == 4
    b = passive(2, 1, peer_epoch=3, primary=False)
    assert b.on_peer_heartbeat(1, 3, ROLE_PASSIVE, 1.0) == []
    assert b.on_peer_heartbeat(1, 3, ROLE_PASSIVE, 3.0) == []
    assert b.tick(3.9) == []
    assert kinds(b.tick(4.0)) == PROMOTION


def test_vacancy_clock_resets_when_the_peer_goes_silent():
    b = passive(2, 1, primary=False)
    b.on_peer_heartbeat(1, 1, ROLE_PASSIVE, 1.0)
    assert b.tick(4.5) == []  # the peer has not been heard for 3.5 s: no vacancy any more
    b.on_peer_heartbeat(1, 1, ROLE_PASSIVE, 5.0)
    assert b.tick(7.9) == []
    assert kinds(b.tick(8.0)) == PROMOTION


# ---------------------------------------------------------------- failed failover, backoff
def test_failed_failover_demotes_and_backs_off_exponentially_with_a_cap():
    b = passive(backoff_initial=10.0, backoff_max=25.0)
    b.on_checkpoint("heartbeat", False, "silent", 1.0)
    t = 4.0
    delays = []
    for _ in range(4):
        assert kinds(b.tick(t)) == PROMOTION
        acts = b.on_failover_result(False, "VIP already taken", t + 0.1)
        assert kinds(acts) == DEMOTION and "VIP already taken" in acts[0].reason
        delay = b.backoff_until - (t + 0.1)
        delays.append(delay)
        # new checkpoint evidence during the backoff promotes nothing
        b.on_checkpoint("heartbeat", False, "silent", t + 0.2)
        assert b.tick(b.backoff_until - 0.01) == []
        t = max(b.backoff_until, t + 0.2 + 3.0)
    assert delays == pytest.approx([10.0, 20.0, 25.0, 25.0])
    assert kinds(b.tick(t)) == PROMOTION
    assert b.on_failover_result(True, "", t) == []
    assert b.status(t)["next_backoff_s"] == 10.0 and b.stats.failovers_failed == 4


def test_stray_failover_results_are_ignored():
    a = active()
    assert a.on_failover_result(False, "late", 1.0) == []
    assert a.state is State.ACTIVE and a.stats.stray_results == 1


def test_fenced_during_failover_ignores_the_result():
    b = passive()
    b.on_checkpoint("heartbeat", False, "silent", 1.0)
    assert kinds(b.tick(4.0)) == PROMOTION and b.failover_pending
    b.on_peer_heartbeat(1, 9, ROLE_ACTIVE, 4.1)
    assert b.state is State.PASSIVE and not b.failover_pending
    assert b.on_failover_result(False, "hook", 4.2) == []
    assert b.backoff_until == 0.0


# ---------------------------------------------------------------- operator commands
def test_promote_refused_while_a_live_peer_is_active_unless_forced():
    b = passive()
    (rep,) = b.promote(1.0)
    assert isinstance(rep, Report) and not rep.ok and "force" in rep.detail
    assert b.state is State.PASSIVE
    acts = b.promote(1.0, force=True)
    assert kinds(acts) == [*PROMOTION, "Report"] and acts[-1].ok
    assert b.epoch == 2 and "forced" in acts[1].reason
    (again,) = b.promote(1.1)
    assert again.ok and again.detail == "already active"


def test_promote_ignores_backoff():
    b = passive()
    b.on_checkpoint("heartbeat", False, "silent", 1.0)
    b.tick(4.0)
    b.on_failover_result(False, "hook", 4.0)
    assert b.backoff_until > 5.0
    assert kinds(b.promote(5.0)) == [*PROMOTION, "Report"]


def test_demote_yields_and_the_peer_takes_over_at_once():
    a, b = active(1, 2), passive(2, 1)
    acts = a.demote(1.0)
    assert kinds(acts) == [*DEMOTION, "Report"]
    assert a.held and a.heartbeat_role == ROLE_YIELDING
    acts = b.on_peer_heartbeat(1, a.epoch, a.heartbeat_role, 1.1)
    assert kinds(acts) == PROMOTION and "yields" in acts[1].reason and b.epoch == 2
    # a held node never promotes by itself, whatever its checkpoints say ...
    a.on_checkpoint("heartbeat", False, "silent", 1.0)
    assert a.tick(30.0) == []
    # ... until it has seen the peer active
    a.on_peer_heartbeat(2, 2, ROLE_ACTIVE, 30.0)
    assert not a.held and a.heartbeat_role == ROLE_PASSIVE
    (rep,) = a.demote(30.0)
    assert rep.ok and rep.detail == "already passive"


def test_failover_check_only_changes_nothing_and_explains():
    b = passive(checkpoints=("heartbeat", "sip"))
    b.on_checkpoint("heartbeat", False, "silent 4s", 1.0)
    b.on_checkpoint("sip", True, "200 OK", 1.0)
    before = b.status(2.0)
    (rep,) = b.failover(2.0, check_only=True)
    assert b.status(2.0) == before and b.state is State.PASSIVE and b.epoch == 1
    assert rep.ok and rep.status["would_succeed"] and rep.status["check_only"]
    assert rep.status["target"] == 2
    assert rep.status["checkpoints"]["sip"]["ok"] is True
    assert rep.status["checkpoints"]["heartbeat"]["detail"] == "silent 4s"
    assert rep.status["peer_state"]["role"] == ROLE_ACTIVE
    assert "promotes with epoch 2" in rep.detail
    assert any("not every checkpoint" in n for n in rep.status["notes"])


def test_failover_to_self_promotes():
    b = passive()
    acts = b.failover(1.0, target=2)
    assert kinds(acts) == [*PROMOTION, "Report"] and b.epoch == 2


def test_failover_to_a_live_passive_peer_demotes_and_asks_it():
    a = active(1, 2)
    a.on_peer_heartbeat(2, 1, ROLE_PASSIVE, 1.0)
    acts = a.failover(1.5)
    assert kinds(acts) == [*DEMOTION, "RequestPeerPromotion", "Report"]
    assert acts[2] == RequestPeerPromotion(2, 1, acts[2].reason)
    assert a.heartbeat_role == ROLE_YIELDING


def test_failover_to_a_dead_or_unknown_peer_is_refused():
    a = active(1, 2)
    (rep,) = a.failover(10.0, target=2)  # last heard at 0.1
    assert not rep.ok and "not alive" in rep.detail and a.state is State.ACTIVE
    (rep,) = a.failover(10.0, target=7)
    assert not rep.ok and "unknown node 7" in rep.detail


def test_failover_to_peer_from_passive_when_nobody_is_active():
    b = passive(2, 1, primary=False)
    b.on_peer_heartbeat(1, 1, ROLE_PASSIVE, 1.0)
    acts = b.failover(1.0, target=1)
    assert kinds(acts) == ["RequestPeerPromotion", "Report"] and b.held
    (rep,) = b.failover(1.0, target=1, check_only=True)
    assert rep.ok


def test_hook_environment():
    a = make(3, 4, primary=True)
    acts = a.tick(5.0)
    env = acts[0].env
    assert acts[0].stage == STAGE_BEFORE and acts[2].stage == STAGE_AFTER
    assert env == {"SIDECAR_ROLE": "active", "SIDECAR_EPOCH": "1", "SIDECAR_PEER": "4",
                   "SIDECAR_REASON": acts[1].reason, "SIDECAR_NODE": "3"}
    acts = a.demote(6.0)
    assert acts[1].stage == STAGE_DEMOTE and acts[1].env["SIDECAR_ROLE"] == "passive"


# ---------------------------------------------------------------- two nodes, lossy link
class Pair:
    """Two arbiters (1 = primary, 2 = backup) exchanging heartbeats over an in-order link that
    may lose any message (ZeroMQ keeps order; high-water marks and reconnects lose frames).
    Each node's 'heartbeat' checkpoint is what HeartbeatCheckpoint computes: the age of the
    last heartbeat it received."""

    HB_TIMEOUT = 3.0

    def __init__(self):
        self.now = 0.0
        cfg = dict(wait=3.0, startup_wait=2.0, peer_timeout=3.0, backoff_initial=2.0,
                   backoff_max=8.0)
        self.n = {1: Arbiter(ArbiterConfig(1, 2, True, **cfg), 0.0),
                  2: Arbiter(ArbiterConfig(2, 1, False, **cfg), 0.0)}
        self.link = {1: deque(), 2: deque()}  # outgoing messages of each node
        self.heard = {1: None, 2: None}
        self.sent = 0
        self.pending = {1: False, 2: False}
        self.max_epoch = {1: 0, 2: 0}
        self.tie = None  # (epoch, first send counter) while both are active with equal epochs
        self.fresh_delivered = {1: False, 2: False}

    def other(self, i):
        return 3 - i

    def run(self, i, actions):
        for a in actions:
            if isinstance(a, BecomeActive):
                self.pending[i] = True
            elif isinstance(a, BecomePassive):
                self.pending[i] = False

    def step(self, op):
        kind, i, arg = op
        node = self.n[i]
        if kind == "time":
            self.now += arg
            self.run(i, node.tick(self.now))
        elif kind == "send":
            self.sent += 1
            if not arg:  # arg = lost
                self.link[i].append((self.sent, node.epoch, node.heartbeat_role))
        elif kind == "deliver":
            if self.link[i]:
                seq, epoch, role = self.link[i].popleft()
                j = self.other(i)
                self.heard[j] = self.now
                if self.tie is not None and seq >= self.tie[1]:
                    self.fresh_delivered[i] = True
                self.run(j, self.n[j].on_peer_heartbeat(i, epoch, role, self.now))
        elif kind == "probe":
            h = self.heard[i]
            ok = h is not None and self.now - h <= self.HB_TIMEOUT
            self.run(i, node.on_checkpoint("heartbeat", ok, "", self.now))
        elif kind == "result":
            if self.pending[i]:
                self.pending[i] = False
                self.run(i, node.on_failover_result(arg, "simulated", self.now))
        elif kind == "promote":
            self.run(i, node.promote(self.now, force=arg))
        elif kind == "demote":
            self.run(i, node.demote(self.now))
        elif kind == "failover":
            self.run(i, node.failover(self.now, target=arg))
        self.check()

    def check(self):
        for i, node in self.n.items():
            assert node.epoch >= self.max_epoch[i], "epochs only grow"
            self.max_epoch[i] = node.epoch
        a, b = self.n[1], self.n[2]
        both = a.state is State.ACTIVE and b.state is State.ACTIVE and a.epoch == b.epoch
        if not both:
            self.tie = None
            self.fresh_delivered = {1: False, 2: False}
        elif self.tie is None or self.tie[0] != a.epoch:
            self.tie = (a.epoch, self.sent + 1)
            self.fresh_delivered = {1: False, 2: False}
        else:
            # A heartbeat of the lower node sent during the tie has reached the higher node:
            # the tie must be over (so certainly after one exchange in both directions).
            assert not self.fresh_delivered[1], "equal-epoch split brain survived a heartbeat"

    def settle(self, rounds=40):
        """Reliable link, failovers succeed: heartbeats both ways, probes and ticks."""
        for _ in range(rounds):
            for i in (1, 2):
                self.step(("send", i, False))
                self.step(("deliver", i, None))
            for i in (1, 2):
                self.step(("probe", i, None))
                self.step(("result", i, True))
                self.step(("time", i, 0.5))


node_ids = st.sampled_from([1, 2])
automatic_ops = st.one_of(
    st.tuples(st.just("time"), node_ids, st.floats(0.0, 4.0)),
    st.tuples(st.just("send"), node_ids, st.booleans()),
    st.tuples(st.just("deliver"), node_ids, st.none()),
    st.tuples(st.just("probe"), node_ids, st.none()),
    st.tuples(st.just("result"), node_ids, st.booleans()),
)
operator_ops = st.one_of(
    st.tuples(st.just("promote"), node_ids, st.booleans()),
    st.tuples(st.just("demote"), node_ids, st.none()),
    st.tuples(st.just("failover"), node_ids, st.sampled_from([None, 1, 2])),
)


@given(st.lists(st.one_of(automatic_ops, automatic_ops, automatic_ops, operator_ops),
                max_size=300))
def test_property_no_lasting_equal_epoch_split_brain_and_epochs_grow(ops):
    pair = Pair()
    for op in ops:
        pair.step(op)
    pair.settle(10)


@given(st.lists(automatic_ops, max_size=200))
def test_property_a_healed_link_converges_to_exactly_one_active(ops):
    pair = Pair()
    for op in ops:
        pair.step(op)
    pair.settle()
    a, b = pair.n[1], pair.n[2]
    assert [a.state, b.state].count(State.ACTIVE) == 1
    assert a.epoch == b.epoch
    assert not a.failover_pending and not b.failover_pending


def test_pair_scenario_kill_active_backup_takes_over_old_primary_stays_passive():
    pair = Pair()
    pair.settle(10)
    p, b = pair.n[1], pair.n[2]
    assert p.state is State.ACTIVE and b.state is State.PASSIVE and b.epoch == p.epoch == 1
    # the primary dies: only the backup keeps ticking and probing
    for _ in range(20):
        pair.step(("probe", 2, None))
        pair.step(("result", 2, True))
        pair.step(("time", 2, 0.5))
    assert b.state is State.ACTIVE and b.epoch == 2
    # the primary comes back as a new process with its persisted epoch
    pair.n[1] = p = Arbiter(ArbiterConfig(1, 2, True, wait=3.0, startup_wait=2.0,
                                          initial_epoch=1), pair.now)
    pair.link[1].clear()
    pair.heard[1] = None
    pair.settle()
    assert p.state is State.PASSIVE and b.state is State.ACTIVE and p.epoch == 2


def test_fencing_epoch_from_the_lease_only_raises_the_epoch():
    a = make(initial_epoch=3)
    assert a.adopt_fencing_epoch(9, "lease") == [EpochChanged(9, "lease")]
    assert a.epoch == 9
    assert a.adopt_fencing_epoch(5, "lease") == [] and a.epoch == 9  # never goes down
    assert a.adopt_fencing_epoch("10", "lease") == [] and a.epoch == 9  # not an int
    # the next promotion builds on the fencing epoch, not on the peer's older one
    acts = a.on_peer_heartbeat(2, 4, ROLE_PASSIVE, 1.0)
    assert "BecomeActive" in kinds(acts) and a.epoch == 10
