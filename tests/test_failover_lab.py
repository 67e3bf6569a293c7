"""Failover proven in the network-namespace lab: two proxy hosts (Kamailio + `sidecar run`),
a VIP moved by the sidecars, and SIPp phones behind a real NAT (sidecar.lab.failover).

Each slow scenario builds one lab, runs a story (steady state, kill, return; or partition,
check-only, manual failover) while tcpdump watches the router's server-side port, and the
tests assert on what was recorded: which host (by MAC) sent keepalives when, who holds the
VIP, roles and epochs, what each proxy holds. "Never two nodes pinging" is checked on the
capture: keepalives are cut into per-sender spans and no two spans of different hosts may
overlap (:func:`sidecar.lab.failover.overlapping_spans`).

Most stories move the VIP with the `before_failover` / `on_demote` hooks running the VIP CLI
(``python -m sidecar.role.vip``); ``test_builtin_vip_action_takes_the_vip`` covers the built-in
``[role] vip`` action.

The capture analysis and the generated configuration are tested without root.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.config import parse_config
from sidecar.lab.failover import (
    REPLICATION_PORTS,
    LabPair,
    PairSettings,
    Span,
    is_keepalive,
    keepalives,
    overlapping_spans,
    phone_replies,
    ping_target,
    sender_spans,
    sidecar_config,
    wait_for,
)
from sidecar.lab.netns import (
    NAT_PUBLIC_IP,
    PHONE_IP,
    VIP,
    Lab,
    Packet,
    tool_missing,
    unavailable_reason,
)

PHONES = 20
PING_INTERVAL = 1.0
MAX_GAP = 2.5 * PING_INTERVAL  # a sender pausing longer than this has stopped pinging
UDP_TIMEOUT = 15
MAC = {"a": Lab.host_mac("a"), "b": Lab.host_mac("b")}
HOOK_VIP = dict(vip_action="hooks")


def _require_lab() -> None:
    reason = unavailable_reason()
    for tool in ("kamailio", "sipp", "tcpdump"):
        reason = reason or tool_missing(tool)
    if reason:
        pytest.skip(reason)


def _senders(pings: list[Packet]) -> set[str]:
    return {p.src_mac for p in pings}


def _reached_ports(packets: list[Packet], after: float) -> set[int]:
    """Phone ports that received something from the VIP after ``after`` (phone-side capture:
    the packet went through the NAT's pinhole)."""
    return {p.dport for p in packets
            if p.ts > after and p.src == VIP and p.dst == PHONE_IP and p.proto == 17}


# --- story 1: proxy pinging; steady state, kill -9 of the active machine, its return ----------

@dataclass
class KillStory:
    """What happened, recorded by the fixture; the tests judge it."""

    phone_ports: set[int] = field(default_factory=set)
    roles_before: tuple[dict, dict] | None = None
    steady: list[Packet] = field(default_factory=list)  # keepalives before the kill
    killed_at: float = 0.0
    b_role: dict = field(default_factory=dict)
    b_holds_vip: bool = False
    b_proxy_contacts: int = 0
    b_store_contacts: int = 0
    reached: set[int] = field(default_factory=set)
    drops: tuple[int, int] = (0, 0)
    pinholes: tuple[set, set] = (set(), set())
    failover_pings: list[Packet] = field(default_factory=list)  # whole capture up to return
    a_role_back: dict = field(default_factory=dict)
    b_role_back: dict = field(default_factory=dict)
    digests: tuple[dict, dict] = ({}, {})
    a_holds_vip_back: bool = True
    returned_pings: list[Packet] = field(default_factory=list)
    a_proxy_contacts_back: int = -1


@pytest.fixture(scope="module")
def kill_story(tmp_path_factory) -> Iterator[KillStory]:
    _require_lab()
    story = KillStory()
    workdir: Path = tmp_path_factory.mktemp("kill")
    with Lab(workdir=workdir, udp_timeout=UDP_TIMEOUT, vip_on=None) as lab:
        pair = LabPair(lab, PairSettings(keepalive="proxy", ping_interval_s=PING_INTERVAL,
                                         **HOOK_VIP)).start()
        story.roles_before = (pair.role("a"), pair.role("b"))
        phones = lab.start_phones(PHONES)
        assert phones.registered() == PHONES
        wait_for(lambda: pair.proxy_contacts("b") == PHONES, 15, "B's proxy warm-loaded")
        story.pinholes = ({p.public for p in lab.pinholes()}, set())
        drops = lab.unsolicited_drops()
        with lab.capture() as cap, lab.capture("phones", "eth0") as at_phones:
            story.phone_ports = {p.private[1] for p in lab.pinholes()}
            cap.wait_for(lambda ps: len(_senders(keepalives(ps))) >= 1
                         and time.time() - keepalives(ps)[0].ts > 2 * PING_INTERVAL,
                         10, "steady-state pinging")
            story.steady = keepalives(cap.packets())
            story.killed_at = pair.kill("a")
            story.b_role = pair.wait_role("b", "active", 15)
            story.b_holds_vip = pair.holds_vip("b")
            wait_for(lambda: len(_reached_ports(at_phones.packets(), story.killed_at))
                     >= PHONES, 10, "every phone reached from the new active")
            story.reached = _reached_ports(at_phones.packets(), story.killed_at)
            story.b_proxy_contacts = pair.proxy_contacts("b")
            story.b_store_contacts = pair.store_contacts("b")
            story.drops = (drops, lab.unsolicited_drops())
            story.pinholes = (story.pinholes[0], {p.public for p in lab.pinholes()})

            pair.restart("a")
            story.a_role_back = pair.wait_role("a", "passive", 15)
            wait_for(lambda: pair.role("a")["epoch"] == pair.role("b")["epoch"], 10,
                     "the returned node knows the epoch")
            wait_for(lambda: pair.mi("a", "sc_digest") == pair.mi("b", "sc_digest"), 15,
                     "resynced")
            story.digests = (pair.mi("a", "sc_digest"), pair.mi("b", "sc_digest"))
            story.a_role_back, story.b_role_back = pair.role("a"), pair.role("b")
            story.a_holds_vip_back = pair.holds_vip("a")
            returned = time.time()
            cap.wait_for(lambda ps: time.time() - returned > 3 * PING_INTERVAL, 10, "pings")
            all_pings = keepalives(cap.packets())
        story.failover_pings = all_pings
        story.returned_pings = [p for p in all_pings if p.ts > returned]
        story.a_proxy_contacts_back = wait_for_value(lambda: pair.proxy_contacts("a"),
                                                    PHONES, 3.0)
    yield story


def wait_for_value(read, want: int, timeout: float) -> int:
    """Poll ``read()`` until it returns ``want`` or the time is up; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.slow
def test_a_in_steady_state_only_the_active_pings_from_the_vip(kill_story: KillStory) -> None:
    active, passive = kill_story.roles_before
    assert active["state"] == "active" and passive["state"] == "passive"
    assert kill_story.steady, "no keepalives before the kill"
    assert _senders(kill_story.steady) == {MAC["a"]}
    assert {p.src for p in kill_story.steady} == {VIP}
    assert {p.dport for p in kill_story.steady} == {d for _, d in kill_story.pinholes[0]}


@pytest.mark.slow
def test_a_across_the_failover_never_two_nodes_ping(kill_story: KillStory) -> None:
    pings = kill_story.failover_pings
    spans = sender_spans(pings, MAX_GAP)
    assert overlapping_spans(spans) == [], spans
    last_a = max(p.ts for p in pings if p.src_mac == MAC["a"])
    first_b = min(p.ts for p in pings if p.src_mac == MAC["b"])
    assert last_a <= kill_story.killed_at < first_b


@pytest.mark.slow
def test_b_standby_takes_over_with_the_vip_and_every_contact(kill_story: KillStory) -> None:
    before = kill_story.roles_before[0]["epoch"]
    assert kill_story.b_role["state"] == "active" and kill_story.b_role["epoch"] > before
    assert kill_story.b_holds_vip
    assert kill_story.b_proxy_contacts == PHONES  # warm loading: the proxy already had them
    assert kill_story.b_store_contacts == PHONES


@pytest.mark.slow
def test_b_the_new_actives_keepalives_reach_every_phone_through_its_pinhole(
        kill_story: KillStory) -> None:
    assert kill_story.reached == kill_story.phone_ports
    assert kill_story.pinholes[1] == kill_story.pinholes[0]  # the same pinholes, still open
    assert kill_story.drops[1] == kill_story.drops[0]  # nothing the NAT had to drop


@pytest.mark.slow
def test_d_the_old_active_returns_passive_resynced_and_silent(kill_story: KillStory) -> None:
    a, b = kill_story.a_role_back, kill_story.b_role_back
    assert a["state"] == "passive" and b["state"] == "active"
    assert a["epoch"] == b["epoch"] == kill_story.b_role["epoch"]
    assert a["peer_state"]["role"] == "active"
    assert kill_story.digests[0] == kill_story.digests[1]
    assert kill_story.digests[0]["count"] == PHONES
    assert not kill_story.a_holds_vip_back
    assert kill_story.returned_pings and _senders(kill_story.returned_pings) == {MAC["b"]}


@pytest.mark.slow
def test_b_the_new_active_proxy_pings_with_sip_options(kill_story: KillStory) -> None:
    from_b = [p for p in kill_story.failover_pings if p.src_mac == MAC["b"]]
    assert from_b and all(p.payload.startswith(b"OPTIONS ") for p in from_b)


@pytest.mark.slow
def test_d_the_returned_nodes_proxy_is_loaded_with_every_contact(kill_story: KillStory) -> None:
    assert kill_story.a_proxy_contacts_back == PHONES


# --- story 2: sidecar pinging (OPTIONS from VIP:5060 by the active sidecar) -------------------

@dataclass
class SidecarStory:
    steady: list[Packet] = field(default_factory=list)
    pings: list[Packet] = field(default_factory=list)
    replies: list[Packet] = field(default_factory=list)
    killed_at: float = 0.0
    contacts: set[str] = field(default_factory=set)
    b_role: dict = field(default_factory=dict)
    b_stats: dict = field(default_factory=dict)
    a_stats_before: dict = field(default_factory=dict)
    b_stats_before: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def sidecar_story(tmp_path_factory) -> Iterator[SidecarStory]:
    _require_lab()
    story = SidecarStory()
    with Lab(workdir=tmp_path_factory.mktemp("sidecar"), udp_timeout=UDP_TIMEOUT,
             vip_on=None) as lab:
        pair = LabPair(lab, PairSettings(keepalive="sidecar", ping_interval_s=PING_INTERVAL,
                                         **HOOK_VIP)).start()
        lab.start_phones(PHONES)
        wait_for(lambda: pair.store_contacts("b") == PHONES, 15, "replicated to B")
        story.contacts = {c["uri"] for c in lab.kamailio["a"].contacts()}
        with lab.capture() as cap:
            # the active sidecar's wheel picks the contacts up at its next refresh
            cap.wait_for(lambda ps: {ping_target(p) for p in keepalives(ps)} >= story.contacts,
                         10, "A's sidecar pings every contact")
            story.a_stats_before = pair.mi("a", "sc_ping_stats")
            story.b_stats_before = pair.mi("b", "sc_ping_stats")
            story.steady = keepalives(cap.packets())
            story.killed_at = pair.kill("a")
            story.b_role = pair.wait_role("b", "active", 15)
            cap.wait_for(lambda ps: {p.sport for p in phone_replies(ps)
                                     if p.ts > story.killed_at} >= {
                p.public[1] for p in lab.pinholes()}, 10, "every phone answers B")
            story.b_stats = pair.mi("b", "sc_ping_stats")
            packets = cap.stop()
        story.pings = keepalives(packets)
        story.replies = [p for p in phone_replies(packets) if p.ts > story.killed_at]
    yield story


@pytest.mark.slow
def test_a_sidecar_mode_only_the_active_sidecar_pings(sidecar_story: SidecarStory) -> None:
    s = sidecar_story
    assert _senders(s.steady) == {MAC["a"]} and {p.src for p in s.steady} == {VIP}
    assert all(b"pinger@localhost" in p.payload for p in s.pings)  # the sidecar's, not Kamailio's
    assert s.a_stats_before["sidecar_pings"]["enabled"] is True
    assert s.b_stats_before["sidecar_pings"]["enabled"] is False
    for stats in (s.a_stats_before, s.b_stats_before):
        assert stats["proxy_pinger"]["wanted"] is False  # Kamailio's pinger off everywhere
    assert overlapping_spans(sender_spans(s.pings, MAX_GAP)) == []


@pytest.mark.slow
def test_b_sidecar_mode_new_active_sweeps_and_every_phone_answers(
        sidecar_story: SidecarStory) -> None:
    s = sidecar_story
    assert s.b_role["state"] == "active"
    after = [p for p in s.pings if p.ts > s.killed_at]
    assert _senders(after) == {MAC["b"]} and {p.src for p in after} == {VIP}
    assert {ping_target(p) for p in after} >= s.contacts
    pings = s.b_stats["sidecar_pings"]
    assert pings["sweeps_started"] >= 1 and pings["sender"]["sent"] >= PHONES
    # the answers came back through the NAT to the VIP, i.e. to B
    assert len({p.sport for p in s.replies}) == PHONES
    assert {p.dst_mac for p in s.replies} == {MAC["b"]} and {p.dst for p in s.replies} == {VIP}


# --- story 3: partition, check-only, manual failover there and back ------------------------

@dataclass
class PartitionStory:
    before: dict = field(default_factory=dict)
    during: list[tuple[str, str, bool, bool]] = field(default_factory=list)
    b_during: dict = field(default_factory=dict)
    after: tuple[dict, dict] | None = None
    pings: list[Packet] = field(default_factory=list)
    partitioned: tuple[float, float] = (0.0, 0.0)
    check: dict = field(default_factory=dict)
    unchanged: tuple[tuple, tuple] | None = None
    moved: tuple[dict, dict] | None = None
    moved_vip: tuple[bool, bool] = (False, False)
    back: tuple[dict, dict] | None = None
    back_vip: tuple[bool, bool] = (False, False)
    handover_pings: list[Packet] = field(default_factory=list)
    switched: tuple[float, float] = (0.0, 0.0)
    b_proxy_contacts: int = 0


def _snapshot(pair: LabPair) -> tuple:
    ra, rb = pair.role("a"), pair.role("b")
    return (ra["state"], ra["epoch"], rb["state"], rb["epoch"], pair.holds_vip("a"),
            pair.holds_vip("b"))


@pytest.fixture(scope="module")
def partition_story(tmp_path_factory) -> Iterator[PartitionStory]:
    _require_lab()
    story = PartitionStory()
    with Lab(workdir=tmp_path_factory.mktemp("partition"), udp_timeout=UDP_TIMEOUT,
             vip_on=None) as lab:
        pair = LabPair(lab, PairSettings(keepalive="proxy", ping_interval_s=PING_INTERVAL,
                                         backoff_initial_s=1.0, **HOOK_VIP)).start()
        lab.start_phones(PHONES)
        wait_for(lambda: pair.proxy_contacts("b") == PHONES, 15, "B's proxy warm-loaded")
        story.before = pair.role("a")
        with lab.capture() as cap:
            start = time.time()
            lab.partition("a", "b", tcp_ports=REPLICATION_PORTS)
            # B loses A's heartbeats, tries to promote, and its VIP probe finds A holding it.
            deadline = time.monotonic() + 15
            while pair.role("b")["stats"]["failovers_failed"] < 2:
                story.during.append((pair.role("a")["state"], pair.role("b")["state"],
                                     pair.holds_vip("a"), pair.holds_vip("b")))
                assert time.monotonic() < deadline, pair.role("b")
                time.sleep(0.1)
            story.b_during = pair.role("b")
            lab.heal()
            story.partitioned = (start, time.time())
            story.after = pair.wait_settled("a", 15)
            wait_for(lambda: pair.role("a")["epoch"] == pair.role("b")["epoch"], 10,
                     "one epoch again")
            story.after = (pair.role("a"), pair.role("b"))
            healed = time.time()
            cap.wait_for(lambda ps: time.time() - healed > 2 * PING_INTERVAL, 10, "pings")

            # (e) check-only changes nothing
            before = _snapshot(pair)
            story.check = pair.mi("a", "sc_failover", {"check_only": 1})
            time.sleep(0.5)  # a failover would have started within this
            story.unchanged = (before, _snapshot(pair))

            # (f) manual failover to B, then back to A by target
            t1 = time.time()
            pair.mi("a", "sc_failover")
            story.moved = pair.wait_settled("b", 15)
            story.moved_vip = (pair.holds_vip("a"), pair.holds_vip("b"))
            story.b_proxy_contacts = pair.proxy_contacts("b")
            cap.wait_for(lambda ps: any(p.src_mac == MAC["b"] and p.ts > t1
                                        for p in keepalives(ps))
                         and time.time() - t1 > 3 * PING_INTERVAL, 10, "B pings")
            t2 = time.time()
            pair.mi("b", "sc_failover", {"target": 1})
            story.back = pair.wait_settled("a", 15)
            story.back_vip = (pair.holds_vip("a"), pair.holds_vip("b"))
            cap.wait_for(lambda ps: any(p.src_mac == MAC["a"] and p.ts > t2
                                        for p in keepalives(ps))
                         and time.time() - t2 > 3 * PING_INTERVAL, 10, "A pings again")
            story.switched = (t1, t2)
            packets = cap.stop()
        all_pings = keepalives(packets)
        story.pings = [p for p in all_pings if p.ts < t1]
        story.handover_pings = [p for p in all_pings if p.ts >= t1]
    yield story


@pytest.mark.slow
def test_c_partition_no_split_brain(partition_story: PartitionStory) -> None:
    """While the replication link is cut, B decides A is gone and promotes (its epoch goes
    up), but its VIP action's ARP probe finds A answering for the VIP: the before_failover
    hook fails, the failover is aborted before B's pinger is switched on, and B steps back
    with a backoff (and tries again). A stays active with the VIP throughout. When the link
    heals, A hears B's higher epoch from a passive node and re-asserts its own above it; B
    adopts it. So the two never ping at once and the VIP is only ever on A."""
    s = partition_story
    assert s.during, "nothing observed during the partition"
    assert all(a == "active" and a_vip and not b_vip for a, _, a_vip, b_vip in s.during)
    stats = s.b_during["stats"]
    assert stats["promotions"] >= 2 and stats["failovers_failed"] >= 2
    assert stats["failovers_ok"] == 0
    assert "before_failover" in s.b_during["last_error"]
    assert s.b_during["epoch"] > s.before["epoch"]  # each attempt bumped B's epoch
    a, b = s.after
    assert a["state"] == "active" and b["state"] == "passive"
    assert a["epoch"] == b["epoch"] >= s.b_during["epoch"]  # A re-asserted above B
    assert s.pings and _senders(s.pings) == {MAC["a"]}
    assert overlapping_spans(sender_spans(s.pings, MAX_GAP)) == []


@pytest.mark.slow
def test_e_check_only_failover_changes_nothing(partition_story: PartitionStory) -> None:
    s = partition_story
    assert s.check["ok"] is True and s.check["command"] == "failover"
    assert s.check["detail"] == "moving the role to node 2"
    before, after = s.unchanged
    assert before == after
    assert before[0] == "active" and before[2] == "passive" and before[4:] == (True, False)


@pytest.mark.slow
def test_f_manual_failover_moves_role_vip_and_pinging_and_back(
        partition_story: PartitionStory) -> None:
    s = partition_story
    b = s.moved[0]
    assert b["epoch"] > s.after[0]["epoch"] and s.moved_vip == (False, True)
    assert s.b_proxy_contacts == PHONES
    a2 = s.back[0]
    assert a2["epoch"] > b["epoch"] and s.back_vip == (True, False)
    pings = s.handover_pings
    assert overlapping_spans(sender_spans(pings, MAX_GAP)) == []
    # in order: A until the first command, then B, then A again - each hand-over clean
    owners = [p.src_mac for p in sorted(pings, key=lambda p: p.ts)]
    runs = [m for i, m in enumerate(owners) if i == 0 or owners[i - 1] != m]
    assert runs in ([MAC["a"], MAC["b"], MAC["a"]], [MAC["b"], MAC["a"]])
    assert {p.src for p in pings} == {VIP}


# --- gaps that have their own lab -----------------------------------------------------------

@pytest.mark.slow
def test_builtin_vip_action_takes_the_vip(tmp_path) -> None:
    _require_lab()
    with Lab(workdir=tmp_path, udp_timeout=UDP_TIMEOUT, vip_on=None) as lab:
        pair = LabPair(lab, PairSettings(keepalive="proxy", vip_action="builtin"))
        for host in ("a", "b"):
            pair.start_kamailio(host)
            pair.start_sidecar(host)
        with contextlib.suppress(TimeoutError):
            pair.wait_settled("a", 8)
        role = pair.role("a")
        assert role["state"] == "active" and not role["failover_pending"], role
        assert pair.holds_vip("a")


@pytest.mark.slow
def test_returning_node_with_reconcile_source_loses_no_contact(tmp_path) -> None:
    _require_lab()
    with Lab(workdir=tmp_path, udp_timeout=UDP_TIMEOUT, vip_on=None) as lab:
        pair = LabPair(lab, PairSettings(keepalive="proxy", source="kamailio",
                                         **HOOK_VIP)).start()
        lab.start_phones(PHONES)
        wait_for(lambda: pair.proxy_contacts("b") == PHONES, 15, "B's proxy warm-loaded")
        pair.kill("a")
        pair.wait_role("b", "active", 15)
        pair.restart("a")
        pair.wait_role("a", "passive", 15)
        # three reconcile passes of the returned node (interval 1 s) and a load pass of B
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert pair.store_contacts("b") == PHONES
            assert pair.proxy_contacts("b") == PHONES
            time.sleep(0.2)


# --- no root: the capture analysis and the generated configuration ----------------------------

def _pkt(ts: float, mac: str, payload: bytes = b"OPTIONS sip:u@h SIP/2.0\r\n",
         dst: str = NAT_PUBLIC_IP, dport: int = 40000) -> Packet:
    return Packet(ts, mac, "02:00:0a:14:00:fe", 0x0800, VIP, dst, 17, 5060, dport, payload)


def test_keepalives_are_requests_towards_the_nat_not_registrar_replies() -> None:
    assert is_keepalive(_pkt(1, "m", b"OPTIONS sip:a@b SIP/2.0\r\n"))
    assert is_keepalive(_pkt(1, "m", b"\x00\x00\x00\x00"))
    assert is_keepalive(_pkt(1, "m", b"\r\n\r\n"))
    assert not is_keepalive(_pkt(1, "m", b"SIP/2.0 200 OK\r\n"))
    assert not is_keepalive(_pkt(1, "m", dst="10.20.0.12"))
    assert ping_target(_pkt(1, "m", b"OPTIONS sip:u1@192.168.50.10:5 SIP/2.0\r\n")) == \
        "sip:u1@192.168.50.10:5"
    assert ping_target(_pkt(1, "m", b"\x00\x00\x00\x00", dport=7)) == f"{NAT_PUBLIC_IP}:7"


def test_spans_cut_at_pauses_and_a_clean_handover_has_no_overlap() -> None:
    pings = [_pkt(t, "A") for t in (0.0, 1.0, 2.0, 2.5)] + [_pkt(t, "B") for t in (6.0, 7.0)]
    spans = sender_spans(pings, max_gap=1.5)
    assert spans == [Span("A", 0.0, 2.5, 4), Span("B", 6.0, 7.0, 2)]
    assert overlapping_spans(spans) == []
    # A pauses longer than the gap and comes back: two spans of A
    assert [s.count for s in sender_spans([_pkt(0, "A"), _pkt(5, "A")], 1.5)] == [1, 1]


def test_two_nodes_pinging_at_once_is_an_overlap() -> None:
    pings = [_pkt(t, "A") for t in (0.0, 1.0, 2.0, 3.0)] + [_pkt(t, "B") for t in (1.5, 2.5)]
    spans = sender_spans(pings, max_gap=1.5)
    assert overlapping_spans(spans) == [(Span("A", 0.0, 3.0, 4), Span("B", 1.5, 2.5, 2))]
    # touching at one instant, or within a tolerance, is not an overlap
    touching = sender_spans([_pkt(0, "A"), _pkt(1, "A"), _pkt(1, "B"), _pkt(2, "B")], 1.5)
    assert overlapping_spans(touching) == []
    assert overlapping_spans(spans, tolerance=1.0) == []


@pytest.mark.parametrize("keepalive", ["proxy", "sidecar"])
@pytest.mark.parametrize("source", ["hep", "kamailio"])
@pytest.mark.parametrize("vip_action", ["builtin", "hooks"])
def test_generated_configs_pass_the_daemons_validation(tmp_path, keepalive, source,
                                                        vip_action) -> None:
    import tomllib

    settings = PairSettings(keepalive=keepalive, source=source, vip_action=vip_action)
    for host, peer_ip in (("a", "10.20.0.12"), ("b", "10.20.0.11")):
        cfg = parse_config(tomllib.loads(sidecar_config(host, settings, tmp_path)), tmp_path)
        assert cfg.role.primary is (host == "a")
        assert cfg.peers[0].pub == f"tcp://{peer_ip}:7701"
        assert cfg.admin.host == "127.0.0.1"
        assert cfg.keepalive.mode == keepalive and cfg.proxy.load == "warm"
        if vip_action == "builtin":
            assert (cfg.role.vip, cfg.role.vip_interface) == (f"{VIP}/32", "eth0")
        else:
            assert cfg.role.vip is None
            # a shell loop of VIP CLI attempts, and one argv (a flat list would be one argv)
            assert "sidecar.role.vip acquire" in cfg.role.hooks["before_failover"]
            [release] = cfg.role.hooks["on_demote"]
            assert release[-5:] == ["release", "--iface", "eth0", "--vip", f"{VIP}/32"]


def test_benchmark_phone_plan_and_double_ping_count() -> None:
    from benchmarks.failover import (
        SHARED_GROUP,
        SOCKET_PHONES,
        SOCKETS_PER_SIPP,
        double_ping_events,
        phone_groups,
    )

    plan = phone_groups(100_000)
    assert sum(len(users) for users, _ in plan) == 100_000
    assert len({u for users, _ in plan for u in users}) == 100_000
    assert [port for _, port in plan][-1] is None  # sockets last: the fixed ports are taken
    assert all(len(users) == SHARED_GROUP for users, port in plan if port is not None)
    own = [users for users, port in plan if port is None]  # several SIPps: one fd a socket
    assert sum(map(len, own)) == SOCKET_PHONES and max(map(len, own)) <= SOCKETS_PER_SIPP
    assert phone_groups(10_000) == [([f"phone{i}" for i in range(10_000)], None)]

    clean = [_pkt(t / 10, "A") for t in range(10)] + [_pkt(2 + t / 10, "B") for t in range(5)]
    assert double_ping_events(clean) == 0
    both = clean + [_pkt(0.35, "B"), _pkt(0.45, "B")]  # B pinged while A did
    assert double_ping_events(sorted(both, key=lambda p: p.ts)) > 0
