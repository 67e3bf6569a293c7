"""Failover benchmark in the network-namespace lab: kill -9 the active machine of a pair that
pings 10,000 (``--quick``) or 100,000 NATed contacts, and time what follows.

Setup (sidecar.lab.failover): Kamailio + `sidecar run` on each proxy host, ``[role] wait_s = 3``,
NAT keepalives sent by the active sidecar from VIP:5060 (``[keepalive] mode = "sidecar"``,
interval 10 s, sweep cap 1,000,000/s), contacts learned over HEP, warm-loaded into the
standby's Kamailio; SIPp phones behind the lab's NAT. The VIP is moved by the built-in VIP
action (``[role] vip``: ARP probe, address add, gratuitous ARPs from inside the daemon).

One lab phone address has ~64k source ports, so up to 50,000 contacts get a socket (a
pinhole) each and the rest register in groups of 5,000 from a few fixed ports (one pinhole
per group, like a PBX with many lines). ``--quick`` is 10,000 phones, a pinhole each.

Timeline (t = 0: the active host's cable is pulled and its processes get SIGKILL):

* ``detect_s``: the standby's heartbeat checkpoint reports the active gone;
* ``promote_s``: the standby's arbiter decides to take over (after ``wait_s``);
* ``vip_s``: the router sends VIP traffic to the standby (its ARP entry was switched);
  ``vip_acquire_s``: how long the built-in VIP action took (ARP probe, add, gratuitous ARPs);
* ``first_ping_s``: the first keepalive from the new active leaves (capture);
* ``reachable_s``: the first phone's answer reaches the new active through its pinhole;
* ``sweep_s``: from the first keepalive until every contact was pinged once (capture), and
  ``sweep_pps`` = contacts / ``sweep_s``. ``raw_path_pps`` is a bare ``sendto`` loop from
  VIP:5060 on the new active to the same pinholes right afterwards: every datagram crosses
  veth, bridge, NAT and a phone socket inside the sender's syscall on the same few CPUs, so
  this lab caps any sender well below what it reaches towards a real NIC;
  ``sender_loopback_pps`` is the sidecar's OPTIONS sender loop alone, on loopback;
  ``reply_match_per_s``: phones' answers to OPTIONS recognised per CPU-second (in-process,
  what a node spends on replies when ``reply_via`` brings them to the sidecar);
* ``double_ping_events``: keepalives sent while the other host was also pinging (capture,
  per-sender spans), must be 0; ``contacts_lost``: contacts missing from the new active's
  store or Kamailio, must be 0.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sidecar.keepalive.messages import OptionsPinger
from sidecar.keepalive.sender import measure_sender_rate
from sidecar.lab.failover import (
    LabPair,
    PairSettings,
    keepalives,
    overlapping_spans,
    ping_target,
    sender_spans,
    wait_for,
)
from sidecar.lab.netns import NAT_PUBLIC_IP, VIP, Lab, Packet, tool_missing, unavailable_reason

from .report import print_table, write_json

WAIT_S = 3.0
INTERVAL_S = 10.0
SWEEP_RATE = 1_000_000.0
UDP_TIMEOUT = 60  # longer than registration + the first round of pings of 100k phones
SOCKET_PHONES = 50_000  # phones with a socket (pinhole) each; the rest share fixed ports
SOCKETS_PER_SIPP = 12_500  # below a 20,000 open-file limit, with room for SIPp's own
SHARED_GROUP = 5_000
SHARED_PORT_BASE = 5100
MAX_GAP_S = 1.0  # a sender silent this long has stopped (the wheel pings every 0.1 s)
REACHABLE_TARGET_S = 5.0
SWEEP_TARGET_PPS = 100_000


def phone_groups(n: int) -> list[tuple[list[str], int | None]]:
    """Users and their phone port: a socket each for the first ``SOCKET_PHONES``, then groups
    of ``SHARED_GROUP`` sharing one fixed port."""
    names = [f"phone{i}" for i in range(n)]
    groups: list[tuple[list[str], int | None]] = []
    rest = names[SOCKET_PHONES:]
    for i in range(0, len(rest), SHARED_GROUP):
        groups.append((rest[i:i + SHARED_GROUP], SHARED_PORT_BASE + i // SHARED_GROUP))
    # after the fixed ports are taken; one SIPp per SOCKETS_PER_SIPP phones with their own
    # socket, since SIPp needs an open file per socket and RLIMIT_NOFILE may be 20,000
    own = names[:SOCKET_PHONES]
    for i in range(0, len(own), SOCKETS_PER_SIPP):
        groups.append((own[i:i + SOCKETS_PER_SIPP], None))
    return groups


def first_pinged(pings: list[Packet], mac: str) -> dict[str, float]:
    """When ``mac`` first pinged each contact (by OPTIONS Request-URI, else pinhole)."""
    first: dict[str, float] = {}
    for p in pings:
        if p.src_mac == mac:
            first.setdefault(ping_target(p), p.ts)
    return first


def sweep_profile(pings: list[Packet], seconds: float = 1.0, step: float = 0.05) -> list[int]:
    """Keepalives per ``step`` during the first ``seconds`` after the first one: how evenly
    the sweep left."""
    if not pings:
        return []
    start = pings[0].ts
    bins = [0] * int(seconds / step)
    for p in pings:
        k = int((p.ts - start) / step)
        if k < len(bins):
            bins[k] += 1
    while bins and bins[-1] == 0:
        bins.pop()
    return bins


def double_ping_events(pings: list[Packet]) -> int:
    """Keepalives that left while another host was pinging too (inside overlapping spans)."""
    events = 0
    for a, b in overlapping_spans(sender_spans(pings, MAX_GAP_S)):
        lo, hi = max(a.first, b.first), min(a.last, b.last)
        events += sum(1 for p in pings if lo <= p.ts <= hi and p.src_mac in (a.mac, b.mac))
    return events


def _replies_to(packets: list[Packet], mac: str, after: float) -> list[Packet]:
    return [p for p in packets if p.ts > after and p.src == NAT_PUBLIC_IP and p.dst == VIP
            and p.dst_mac == mac and p.payload.startswith(b"SIP/2.0 200")]


def run(n: int, workdir: Path, kind: str = "options") -> dict[str, Any]:
    """Build the lab, register ``n`` phones, kill the active and measure; the results."""
    settings = PairSettings(keepalive="sidecar", keepalive_kind=kind, wait_s=WAIT_S,
                            ping_interval_s=INTERVAL_S, sweep_rate=SWEEP_RATE,
                            vip_action="builtin", load_interval_s=1.0,
                            kamailio_shm_mb=128 if n <= 20_000 else 512,
                            kamailio_pkg_mb=32, proxy_timeout_s=120.0)
    out: dict[str, Any] = {"contacts": n, "mode": "sidecar", "kind": kind, "wait_s": WAIT_S,
                           "interval_s": INTERVAL_S, "sweep_rate_cap": SWEEP_RATE}
    with Lab(workdir=workdir, udp_timeout=UDP_TIMEOUT, vip_on=None) as lab:
        pair = LabPair(lab, settings).start()
        out.update(_prepare(pair, lab, n))
        with lab.capture(snaplen=300) as cap:
            cap.wait_for(lambda ps: len(ps) > 1000, 2 * INTERVAL_S, "steady-state pinging")
            killed = pair.kill("a")  # the machine dies: cable out, then kill -9
            out.update(_follow_takeover(pair, lab, killed))
            # Parsing the capture competes with the sweep for the CPU: wait on the sidecar's
            # own counter (cheap) and read the capture once, afterwards.
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: pair.mi("b", "sc_ping_stats")["sidecar_pings"]["sender"]
                         ["sent"] >= n, 30, "the new active sent its sweep", interval=0.2)
            time.sleep(0.5)
            packets = cap.stop()
            out["capture_kernel_drops"] = cap.kernel_drops()
        out.update(_analyse(packets, killed, n, lab.host_mac("a"), lab.host_mac("b")))
        stats_b = pair.mi("b", "sc_ping_stats")["sidecar_pings"]
        out["sweep_s_scheduler"] = stats_b.get("last_sweep_seconds")
        out["sender_blocked"] = stats_b["sender"]["blocked"]
        out["sender_errors"] = stats_b["sender"]["send_errors"]
        have = min(pair.store_contacts("b"), pair.proxy_contacts("b", timeout=120))
        out["contacts_lost"] = n - have
        took = re.search(r"acquire in ([\d.]+)s", pair.log_text("b"))
        out["vip_acquire_s"] = float(took.group(1)) if took else None
        out["raw_path_pps"] = raw_path_rate(lab, n)
    return out


def _prepare(pair: LabPair, lab: Lab, n: int) -> dict[str, Any]:
    """Register the phones and wait until the pair is in steady state: every contact
    replicated, warm-loaded into the standby's Kamailio and on the active's ping wheel."""
    out: dict[str, Any] = {}
    start = time.monotonic()
    for users, port in phone_groups(n):
        lab.start_phones(users, local_port=port, rate=2000, timeout=max(60.0, n / 500))
    out["register_s"] = round(time.monotonic() - start, 2)
    out["pinholes"] = len(lab.pinholes())
    wait_for(lambda: pair.store_contacts("b") == n, 120, "replicated to the standby",
             interval=0.5)
    start = time.monotonic()
    wait_for(lambda: pair.mi("b", "sc_ping_stats")["proxy_load"]["loaded"] >= n,
             max(120.0, n / 200), "warm-loaded into the standby's Kamailio", interval=0.5)
    out["warm_load_s"] = round(time.monotonic() - start, 2)
    wait_for(lambda: pair.mi("a", "sc_ping_stats")["sidecar_pings"]["contacts"] == n,
             3 * INTERVAL_S, "the active pings every contact", interval=0.5)
    return out


def _analyse(packets: list[Packet], killed: float, n: int, mac_a: str, mac_b: str
             ) -> dict[str, Any]:
    """Everything the capture says about the takeover (times relative to ``killed``)."""
    pings = keepalives(packets)
    from_b = [p for p in pings if p.src_mac == mac_b]
    replies = _replies_to(packets, mac_b, killed)
    first = first_pinged(pings, mac_b)
    out: dict[str, Any] = {
        "first_ping_s": round(from_b[0].ts - killed, 3) if from_b else None,
        "reachable_s": round(min(p.ts for p in replies) - killed, 3) if replies else None,
        "pinholes_answering_b": len({p.sport for p in replies}),
        "contacts_pinged_by_b": len(first),
        "sweep_s": None, "sweep_pps": None,
        "sweep_pings_per_50ms": sweep_profile(from_b),
        "steady_senders": sorted({p.src_mac for p in pings if p.ts < killed}),
        "double_ping_events": double_ping_events(pings),
        "pings_from_dead_host": sum(1 for p in pings if p.ts > killed and p.src_mac == mac_a),
    }
    if from_b and len(first) >= n:
        sweep = max(first.values()) - from_b[0].ts
        out["sweep_s"] = round(sweep, 3)
        out["sweep_pps"] = round(n / sweep) if sweep > 0 else None
    return out


def raw_path_rate(lab: Lab, n: int) -> int:
    """Datagrams/s of a bare ``sendto`` loop from VIP:5060 on B to the same pinholes (a CRLF
    each): the ceiling of this lab's kernel path (veth, bridge, NAT, the phones' sockets, all
    on the same CPUs), to read ``sweep_pps`` against."""
    dests = [p.public for p in lab.pinholes()]
    if not dests:
        return 0
    sock = lab.udp_socket("b", (VIP, 5060), reuse=True)
    with contextlib.closing(sock):
        sock.setblocking(False)
        sent = 0
        started = time.perf_counter()
        for i in range(n):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(b"\r\n\r\n", dests[i % len(dests)])
                sent += 1
        return round(sent / (time.perf_counter() - started))


def phone_answer(request: bytes, status: int = 200) -> bytes:
    """A phone's response to an OPTIONS: Via, From, Call-ID and CSeq copied, a To tag added
    (RFC 3261 §8.2.6), a Server header as desk phones send."""
    lines = request.split(b"\r\n")
    kept = [line + b";tag=ph0ne" if line.startswith(b"To:") else line for line in lines[1:]
            if line.split(b":", 1)[0] in (b"Via", b"From", b"To", b"Call-ID", b"CSeq")]
    return b"\r\n".join([b"SIP/2.0 %d OK" % status, *kept, b"Server: Yealink SIP-T46S",
                          b"Content-Length: 0", b"", b""])


def reply_match_rate(n: int, runs: int = 5) -> float:
    """Median replies per CPU-second through ``OptionsPinger.match`` (ids checked)."""
    pinger = OptionsPinger(tag="5c1dec4r")
    replies = [phone_answer(pinger.build(i, f"sip:u{i}@198.51.100.7:5060",
                                         ("203.0.113.10", 5060))) for i in range(1, n + 1)]
    rates = []
    for _ in range(runs):
        match = pinger.match
        started = time.process_time()
        ids = [match(r) for r in replies]
        rates.append(n / (time.process_time() - started))
        if ids != list(range(1, n + 1)):
            raise RuntimeError("reply matching returned wrong ping ids")
    return statistics.median(rates)


def _follow_takeover(pair: LabPair, lab: Lab, killed: float) -> dict[str, Any]:
    """Poll the standby's sc_role and the router's ARP entry until B is active with the VIP
    and the router points at it; times are seconds after ``killed`` (wall clock)."""
    found: dict[str, Any] = {"detect_s": None, "promote_s": None, "vip_s": None,
                             "active_s": None}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = time.time()
        role = pair.role("b")
        hb = role["checkpoints"]["heartbeat"]
        if found["detect_s"] is None and hb["ok"] is False and hb["gone_for_s"] is not None:
            found["detect_s"] = round(now - hb["gone_for_s"] - killed, 3)
        if found["promote_s"] is None and role["state"] == "active":
            found["promote_s"] = round(now - role["last_change"]["ago_s"] - killed, 3)
        if found["active_s"] is None and role["state"] == "active" \
                and not role["failover_pending"]:
            found["active_s"] = round(time.time() - killed, 3)
        if found["vip_s"] is None and lab.router_vip_mac() == lab.host_mac("b"):
            found["vip_s"] = round(time.time() - killed, 3)
        if None not in found.values():
            break
        time.sleep(0.02)
    return found


def _ok(value: Any, good: bool) -> str:
    return "ok" if value is not None and good else "MISSED"


def main(quick: bool = False, json_path: str | None = None) -> int:
    reason = unavailable_reason()
    for tool in ("kamailio", "sipp", "tcpdump"):
        reason = reason or tool_missing(tool)
    if reason:
        print(f"failover benchmark needs the namespace lab: {reason}")
        return 2
    n = 10_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="usl-failover-") as tmp:
        results = run(n, Path(tmp))
    rate = measure_sender_rate(100_000, kind="options")  # loopback, the lab is gone by now
    results["sender_loopback_pps"] = round(rate.sent / rate.seconds)
    results["reply_match_per_s"] = round(reply_match_rate(20_000 if quick else 100_000))
    reach = results.get("reachable_s")
    pps = results.get("sweep_pps")
    rows = [
        ("contacts", results["contacts"], f"{results['pinholes']:,} pinholes"),
        ("register_s", results["register_s"], "SIPp through the NAT"),
        ("warm_load_s", results["warm_load_s"], "standby Kamailio holds every contact"),
        ("detect_s", results["detect_s"], "heartbeat checkpoint says gone"),
        ("promote_s", results["promote_s"], f"arbiter decides (wait_s = {WAIT_S:g})"),
        ("vip_s", results["vip_s"], "router sends VIP traffic to the standby"),
        ("vip_acquire_s", results["vip_acquire_s"],
         "built-in VIP action: ARP probe, add, gratuitous ARPs"),
        ("active_s", results["active_s"], "hooks done, pinging switched on"),
        ("first_ping_s", results["first_ping_s"], "first keepalive from the new active"),
        ("reachable_s", reach,
         f"<= {REACHABLE_TARGET_S:g} s: "
         f"{_ok(reach, reach is not None and reach <= REACHABLE_TARGET_S)}"),
        ("sweep_s", results["sweep_s"], "every contact pinged once (capture)"),
        ("sweep_s_scheduler", results["sweep_s_scheduler"], "scheduler hands all out at once"),
        ("sweep_pps", pps, f">= {SWEEP_TARGET_PPS:,}: "
                           f"{_ok(pps, pps is not None and pps >= SWEEP_TARGET_PPS)}"),
        ("raw_path_pps", results["raw_path_pps"], "bare sendto to the same pinholes: "
                                                  "the lab path's ceiling"),
        ("sender_loopback_pps", results["sender_loopback_pps"],
         "the sidecar's OPTIONS sender alone, loopback"),
        ("reply_match_per_s", results["reply_match_per_s"],
         "phones' OPTIONS answers recognised per CPU-second"),
        ("pinholes_answering_b", results["pinholes_answering_b"],
         "pinholes whose phone answered the new active"),
        ("double_ping_events", results["double_ping_events"],
         f"must be 0: {_ok(0, results['double_ping_events'] == 0)}"),
        ("contacts_lost", results["contacts_lost"],
         f"must be 0: {_ok(0, results['contacts_lost'] == 0)}"),
        ("capture_kernel_drops", results["capture_kernel_drops"], "tcpdump"),
    ]
    print_table(f"failover, {n:,} NATed contacts, sidecar keepalives", rows)
    write_json("failover", quick, results, json_path)
    return 0
