"""Keepalive scheduler (sans-I/O): spreading, sweep, loss counting, enable/disable, and the
record -> target mapping it is fed with. Time is integer ticks here (tick=1), so every check
is exact."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.keepalive.scheduler import KeepaliveScheduler, ReplyMode
from sidecar.keepalive.targets import (
    PingTarget,
    TargetError,
    keepalive_key,
    parse_sip_hostport,
    parse_socket,
    target_from_record,
)
from sidecar.model import FLAG_NAT, make_record


def key(i: int) -> tuple[str, str]:
    return (f"user{i}", f"sip:user{i}@10.0.0.1:5060")


def target(i: int, version: int = 1) -> PingTarget:
    return PingTarget(f"sip:user{i}@10.0.0.1:5060", ("127.0.0.9", 20000 + i % 40000),
                      ("127.0.0.2", 5060), f"call-{i}", version)


def filled(n: int, slots: int, **kw) -> KeepaliveScheduler:
    sched = KeepaliveScheduler(interval=slots, tick=1, **kw)
    for i in range(n):
        sched.upsert(key(i), target(i))
    return sched


def run(sched: KeepaliveScheduler, ticks: range) -> list[list]:
    return [sched.due(t) for t in ticks]


# --- spreading ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 400), slots=st.integers(1, 60))
def test_static_set_each_contact_once_per_interval_and_load_bounded(n: int, slots: int) -> None:
    sched = filled(n, slots)
    sched.set_enabled(True, 0, sweep=False)
    per_tick = run(sched, range(3 * slots))
    bound = math.ceil(n / slots)
    assert all(len(p) <= bound for p in per_tick)
    # every window of one interval (slots consecutive ticks) pings every contact exactly once
    for start in range(0, 2 * slots + 1):
        counts = Counter(p.key for tick in per_tick[start:start + slots] for p in tick)
        assert len(counts) == n
        assert set(counts.values()) <= {1}


@settings(max_examples=300, deadline=None)
@given(
    slots=st.integers(1, 30),
    initial=st.integers(0, 150),
    ops=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40),
                           st.one_of(st.none(), st.integers(0, 29))), min_size=1, max_size=90),
)
def test_churn_never_late_and_load_bounded(slots: int, initial: int,
                                           ops: list[tuple[int, int, int | None]]) -> None:
    """Adds and removes between ticks: a contact is never pinged later than one interval after
    its previous ping (or its add), only present contacts are pinged, and a tick never sends
    more than ceil(N/S)+1 for the largest N so far (a slot filled before removals can only be
    thinned by emptier slots pulling from it, never by delaying its pings). Once the churn
    stops, one round of pulls brings every tick back under ceil(N/S)+1 for the current N."""
    sched = filled(initial, slots)
    present = {key(i) for i in range(initial)}
    added_at = dict.fromkeys(present, -1)
    last_ping: dict = {}
    next_id = initial
    sizes = [initial]
    sched.set_enabled(True, 0, sweep=False)
    for t, (adds, removes, from_slot) in enumerate(ops):
        if from_slot is None:
            victims = sorted(present)[:removes]
        else:  # adversarial: empty one slot (e.g. the one the hand just left)
            victims = [k for k, s in sched._slot_of.items() if s == from_slot % slots][:removes]
        for victim in victims:
            assert sched.remove(victim)
            present.discard(victim)
            last_ping.pop(victim, None)
            added_at.pop(victim, None)
        for _ in range(adds):
            k = key(next_id)
            sched.upsert(k, target(next_id))
            present.add(k)
            added_at[k] = t
            next_id += 1
        assert len(sched) == len(present)
        sizes.append(len(present))
        pings = sched.due(t)
        assert len(pings) <= math.ceil(max(sizes) / slots) + 1
        assert {p.key for p in pings} <= present
        for p in pings:
            last_ping[p.key] = t
        for k in present:
            since = last_ping.get(k, added_at[k])
            assert t - since < slots + (1 if k not in last_ping else 0), (k, t, since)
    # churn stops: after one interval to finish the round and one of pulls, the load follows N
    end = len(ops)
    run(sched, range(end, end + 2 * slots))
    settled = run(sched, range(end + 2 * slots, end + 3 * slots))
    assert max(map(len, settled)) <= math.ceil(len(present) / slots) + 1
    assert {p.key for tick in settled for p in tick} == present


def test_mass_removal_rebalances_within_one_interval() -> None:
    slots, n = 10, 100
    sched = filled(n, slots)
    sched.set_enabled(True, 0, sweep=False)
    run(sched, range(slots))
    # empty the five slots the hand reaches first
    for k, s in list(sched._slot_of.items()):
        if s < 5:
            sched.remove(k)
    assert len(sched) == 50
    per_tick = run(sched, range(slots, 3 * slots))
    assert max(len(p) for p in per_tick[slots:]) <= math.ceil(50 / slots)
    assert max(sched.slot_loads()) - min(sched.slot_loads()) <= 1
    assert sched.stats.rebalanced > 0


def test_late_caller_gets_one_round_not_a_burst_of_repeats() -> None:
    sched = filled(30, 10)
    sched.set_enabled(True, 0, sweep=False)
    sched.due(0)
    pings = sched.due(100)  # 100 ticks late
    assert Counter(p.key for p in pings) == Counter({key(i): 1 for i in range(30)})
    assert sched.stats.skipped_ticks == 100 - 10


def test_update_keeps_phase_and_new_contacts_join_least_loaded_slot() -> None:
    sched = filled(20, 10)
    slot_before = sched._slot_of[key(3)]
    assert not sched.upsert(key(3), target(3, version=2))
    assert sched._slot_of[key(3)] == slot_before
    assert sched.target(key(3)).cseq == 2
    assert sched.slot_loads() == [2] * 10
    assert sched.upsert(key(99), target(99))
    assert sorted(sched.slot_loads()) == [2] * 9 + [3]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 100), slots=st.integers(1, 20), on=st.lists(st.booleans(), max_size=40))
def test_disabled_never_pings(n: int, slots: int, on: list[bool]) -> None:
    sched = filled(n, slots, reply_mode=ReplyMode.TOKEN)
    for t, enabled in enumerate(on):
        sched.set_enabled(enabled, t)
        pings = sched.due(t)
        if not enabled:
            assert pings == []
            assert sched.outstanding == 0
    sched.set_enabled(False, len(on))
    assert all(sched.due(t) == [] for t in range(len(on), len(on) + 2 * slots))
    assert not sched.sweeping


# --- sweep ------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 500), slots=st.integers(1, 40), rate=st.integers(1, 200))
def test_sweep_pings_everyone_fast_within_rate_cap(n: int, slots: int, rate: int) -> None:
    sched = filled(n, slots, sweep_rate=rate)
    sched.set_enabled(True, 0)  # sweeps by default
    assert sched.sweeping
    seen: set = set()
    t = 0
    regular_bound = math.ceil(n / slots)
    while sched.sweeping:
        before = sched.stats.sweep_sent
        pings = sched.due(t)
        swept = sched.stats.sweep_sent - before
        # one tick's worth of sweep credit is granted up front
        assert swept <= rate * (2 if t == 0 else 1)
        assert len(pings) <= regular_bound + swept
        seen.update(p.key for p in pings)
        t += 1
        assert t <= slots + 1  # a sweep never takes longer than one interval
    assert seen == {key(i) for i in range(n)}
    assert t <= max(1, math.ceil(n / rate)) + 1
    assert sched.stats.sweeps_completed == 1
    assert sched.stats.last_sweep_seconds == t - 1
    # afterwards the regular schedule alone: everyone once per interval
    later = run(sched, range(t, t + slots))
    assert Counter(p.key for tick in later for p in tick) == Counter(
        {key(i): 1 for i in range(n)})


def test_sweep_skips_contacts_removed_meanwhile_and_reports_progress() -> None:
    sched = filled(100, 10, sweep_rate=10)
    sched.set_enabled(True, 0)
    first = sched.due(0)
    assert 0 < sched.snapshot()["sweep_progress"] < 1
    for i in range(100):
        if i % 2:
            sched.remove(key(i))
    rest = [p for t in range(1, 12) for p in sched.due(t)]
    assert all(int(p.key[0][4:]) % 2 == 0 for p in rest)
    assert {p.key for p in first + rest} >= {key(i) for i in range(0, 100, 2)}
    assert not sched.sweeping


def test_reasserting_enabled_does_not_restart_the_sweep() -> None:
    sched = filled(10, 5, sweep_rate=1000)
    sched.set_enabled(True, 0)
    sched.due(0)
    sched.set_enabled(True, 1)
    assert sched.stats.sweeps_started == 1


# --- replies and losses ---------------------------------------------------------------------

def test_silent_contacts_dropped_after_max_lost_answered_ones_kept() -> None:
    slots = 5
    sched = filled(20, slots, reply_mode=ReplyMode.TOKEN, reply_timeout=2, max_lost=3)
    silent = {key(i) for i in range(0, 20, 4)}
    sched.set_enabled(True, 0, sweep=False)
    drops = []
    for t in range(4 * slots + 3):
        for p in sched.due(t):
            assert p.key not in {d.key for d in drops}
            if p.key not in silent:
                assert sched.reply(p.ping_id)
        drops += sched.take_drops()
    assert {d.key for d in drops} == silent
    assert all(d.lost == 3 for d in drops)
    assert len(sched) == 15
    assert sched.stats.dropped == 5
    assert sched.stats.lost == 15
    assert not sched.reply(10**9)
    assert sched.stats.unmatched_replies == 1


def test_one_reply_resets_the_loss_count() -> None:
    sched = filled(1, 1, reply_mode=ReplyMode.TOKEN, reply_timeout=0.5, max_lost=3)
    sched.set_enabled(True, 0, sweep=False)
    for t in range(20):
        (p,) = sched.due(t)
        if t % 2:  # every other ping answered: never 3 in a row
            sched.reply(p.ping_id)
    assert sched.take_drops() == []
    assert sched.losses(key(0)) in (0, 1)


def test_reregistration_forgets_losses_and_old_pings_do_not_count() -> None:
    sched = filled(1, 1, reply_mode=ReplyMode.TOKEN, reply_timeout=5, max_lost=2)
    sched.set_enabled(True, 0, sweep=False)
    sched.due(0)
    sched.due(1)  # two pings outstanding
    sched.upsert(key(0), target(0, version=2))  # the phone registered again
    sched.due(10)  # both old pings time out: they must not drop the new version
    assert key(0) in sched
    assert sched.take_drops() == []


def test_address_mode_any_packet_from_the_phone_answers() -> None:
    sched = filled(2, 1, reply_mode=ReplyMode.ADDRESS, reply_timeout=0.5, max_lost=2)
    sched.set_enabled(True, 0, sweep=False)
    for t in range(4):
        sched.due(t)
        assert sched.heard_from(target(1).dest) == 1
    sched.due(4)
    drops = sched.take_drops()
    assert [d.key for d in drops] == [key(0)]
    assert sched.heard_from(("192.0.2.1", 1)) == 0


def test_disable_clears_outstanding_so_reenable_starts_clean() -> None:
    sched = filled(3, 1, reply_mode=ReplyMode.TOKEN, reply_timeout=1, max_lost=1)
    sched.set_enabled(True, 0, sweep=False)
    pings = sched.due(0)
    assert sched.outstanding == 3
    sched.set_enabled(False, 0.5)
    assert sched.outstanding == 0
    sched.set_enabled(True, 100, sweep=False)
    assert sched.due(100) and sched.take_drops() == []
    assert not sched.reply(pings[0].ping_id)


def test_none_mode_tracks_nothing() -> None:
    sched = filled(5, 1, max_lost=1)
    sched.set_enabled(True, 0, sweep=False)
    for t in range(10):
        sched.due(t)
    assert sched.outstanding == 0 and sched.take_drops() == [] and len(sched) == 5


def test_bad_configuration_is_refused() -> None:
    for kwargs in ({"interval": 0}, {"interval": 1, "tick": 0}, {"interval": 1, "max_lost": -1},
                   {"interval": 1, "sweep_rate": 0}, {"interval": 1, "reply_timeout": 0}):
        with pytest.raises(ValueError):
            KeepaliveScheduler(**kwargs)


# --- records -> targets -----------------------------------------------------------------------

def rec(**kw) -> tuple:
    base = {"aor": "alice@example.com", "uri": "sip:alice@192.168.1.20:5060", "callid": "c1",
            "cseq": 7, "expires": 0, "handle": 1, "last_modified": 1,
            "received": "sip:198.51.100.7:40000", "socket": "udp:203.0.113.10:5060",
            "flags": FLAG_NAT}
    base.update(kw)
    return make_record(**base)


def test_target_from_record() -> None:
    t = target_from_record(rec())
    assert t == PingTarget("sip:alice@192.168.1.20:5060", ("198.51.100.7", 40000),
                           ("203.0.113.10", 5060), "c1", 7)
    assert target_from_record(rec(flags=0)) is None
    assert target_from_record(rec(flags=0), require_nat=False) is not None
    assert target_from_record(rec(received="sip:198.51.100.7:40000;transport=tcp")) is None
    assert target_from_record(rec(socket="tcp:203.0.113.10:5060")) is None
    assert target_from_record(rec(received="sip:phone.example.com:5060")) is None
    no_socket = target_from_record(rec(socket=None))
    assert no_socket is not None and no_socket.source is None
    # without received, the contact URI is where the phone is
    assert target_from_record(rec(received=None)).dest == ("192.168.1.20", 5060)
    v6 = target_from_record(rec(received="sip:[2001:db8::7]:5062", socket="udp:[2001:db8::1]:5060"))
    assert v6.dest == ("2001:db8::7", 5062) and v6.source == ("2001:db8::1", 5060)
    assert target_from_record(rec(received="sip:[2001:db8::7]:5062")) is None  # v4 socket


def test_hostport_and_socket_parsing() -> None:
    assert parse_sip_hostport("sip:bob;x=1@10.1.2.3;transport=UDP") == ("10.1.2.3", 5060, "udp")
    assert parse_sip_hostport("<sips:10.1.2.3>") == ("10.1.2.3", 5061, "tls")
    assert parse_sip_hostport("sip:[::1]:7000") == ("::1", 7000, "udp")
    assert parse_socket("UDP:10.0.0.1:5060") == ("udp", "10.0.0.1", 5060)
    for bad in ("", "tel:+123", "sip:10.0.0.1:0", "sip:10.0.0.1:99999", "sip:[::1", "sip:a.b",
                "sip:10.0.0.1:5x"):
        with pytest.raises(TargetError):
            parse_sip_hostport(bad)
    for bad in ("udp", "udp:10.0.0.1", "udp:host:5060", ""):
        with pytest.raises(TargetError):
            parse_socket(bad)


@settings(max_examples=500, deadline=None)
@given(received=st.one_of(st.none(), st.text(max_size=60)),
       socket=st.one_of(st.none(), st.text(max_size=40)), uri=st.text(min_size=1, max_size=60))
def test_target_from_record_never_raises_on_garbage(received, socket, uri) -> None:
    r = rec(received=received, socket=socket, uri=uri)
    t = target_from_record(r)
    assert t is None or (0 < t.dest[1] < 65536 and t.uri == uri)


def test_rebuild_follows_the_store() -> None:
    sched = KeepaliveScheduler(interval=10, tick=1)
    records = [rec(aor=f"u{i}@x", uri=f"sip:u{i}@192.168.0.{i}:5060",
                   flags=FLAG_NAT if i % 3 else 0) for i in range(30)]
    assert sched.rebuild(records) == 20
    kept = keepalive_key(records[1])
    slot = sched._slot_of[kept]
    assert sched.rebuild(records[:15]) == 10
    assert sched._slot_of[kept] == slot
    assert not sched.update_record(records[1]._replace(flags=0)
                                   if hasattr(records[1], "_replace")
                                   else (*records[1][:10], 0, *records[1][11:]))
    assert kept not in sched
    assert sched.update_record(records[1]) and kept in sched
    assert sched.remove_record(records[1]) and kept not in sched


def test_snapshot_is_json_ready() -> None:
    import json

    sched = filled(10, 5, reply_mode="token")
    sched.set_enabled(True, 0)
    sched.due(0)
    snap = json.loads(json.dumps(sched.snapshot()))
    assert snap["contacts"] == 10 and snap["enabled"] and snap["reply_mode"] == "token"
    assert snap["sent"] >= 2 and snap["slots"] == 5


def test_pings_spread_evenly_at_scale() -> None:
    """10k contacts, 20 s interval, 0.1 s ticks: 50 per tick, exactly."""
    sched = KeepaliveScheduler(interval=20, tick=0.1)
    for i in range(10_000):
        sched.upsert(key(i), target(i))
    sched.set_enabled(True, 0.0, sweep=False)
    loads = [len(sched.due(k * 0.1)) for k in range(200)]
    assert loads == [50] * 200
    assert sched.stats.sent == 10_000
    per_key = defaultdict(int)
    for k in range(200, 400):
        for p in sched.due(k * 0.1):
            per_key[p.key] += 1
    assert len(per_key) == 10_000 and set(per_key.values()) == {1}


_OCTET = st.one_of(st.integers(0, 255).map(str), st.text("0123456789", min_size=1, max_size=4))


@given(st.one_of(
    st.lists(_OCTET, min_size=1, max_size=5).map(".".join),
    st.text("0123456789.:abcdef%x[] ", max_size=24),
    st.ip_addresses().map(str),
))
@settings(max_examples=500, deadline=None)
def test_ip_literal_fast_path_agrees_with_ipaddress(host):
    """The inet_pton shortcut for dotted IPv4 accepts and rewrites exactly what the
    ipaddress module does (3.11 rejects leading zeros, so both keep the text as is)."""
    import ipaddress

    from sidecar.keepalive.targets import TargetError, _ip_literal

    try:
        want = str(ipaddress.ip_address(host))
    except ValueError:
        want = None
    try:
        got = _ip_literal(host)
    except TargetError:
        got = None
    assert got == want


def test_socket_parse_is_remembered_and_bad_sockets_still_fail():
    from sidecar.keepalive.targets import TargetError, parse_socket

    assert parse_socket("UDP:10.20.0.100:5060") == ("udp", "10.20.0.100", 5060)
    assert parse_socket("UDP:10.20.0.100:5060") is parse_socket("UDP:10.20.0.100:5060")
    assert parse_socket("udp:[2001:db8::1]:5060") == ("udp", "2001:db8::1", 5060)
    for bad in ("udp:10.20.0.100", "10.20.0.100:5060", "udp:010.1.1.1:5060", "udp:x:5060"):
        with pytest.raises(TargetError):
            parse_socket(bad)
        with pytest.raises(TargetError):  # failures are not remembered as answers
            parse_socket(bad)
