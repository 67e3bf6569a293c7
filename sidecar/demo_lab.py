"""`sidecar demo` in the network-namespace lab: real failover of an active/standby pair.

Two proxy hosts (Kamailio + `sidecar run` each) share a VIP; SIPp phones register through a
real nftables NAT to the VIP. The demo kills the active host (kill -9 and unplugged), watches
the standby take the role, the VIP and the NAT pinging, checks every phone is reached through
its existing pinhole, brings the old active back (it stays standby and resyncs), and prints a
timeline. Everything lives in namespaces the lab creates and removes; nothing leaves them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .lab.failover import LabPair, PairSettings, keepalives, wait_for
from .lab.netns import Lab, unavailable_reason

PHONES = 200
PING_INTERVAL = 2


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (not root, tools missing), or None."""
    return unavailable_reason()


def _senders(packets) -> set[str]:
    return {p.src_mac for p in packets}


def run(workdir: Path, phones: int = PHONES) -> bool:
    from .demo import Timeline

    tl = Timeline()
    ok = False
    try:
        with Lab(workdir=workdir, udp_timeout=15, vip_on=None) as lab:
            tl.step("lab up", "hosts A and B, a NAT router, a phones network")
            pair = LabPair(lab, PairSettings(keepalive="proxy", ping_interval_s=PING_INTERVAL,
                                             vip_action="builtin")).start()
            ra, rb = pair.role("a"), pair.role("b")
            tl.step("Kamailio + sidecar on both hosts",
                    f"A {ra['state']} (epoch {ra['epoch']}), B {rb['state']}, "
                    f"VIP on {'A' if pair.holds_vip('a') else 'B'}")
            registered = lab.start_phones(phones).registered()
            tl.step(f"{phones} SIPp phones register through the NAT to the VIP",
                    f"{registered} registered, {len(lab.pinholes())} NAT pinholes")
            wait_for(lambda: pair.proxy_contacts("b") == phones, 20, "B's proxy warm-loaded")
            tl.step("standby warm-loaded", f"B's Kamailio holds {pair.proxy_contacts('b')} "
                                           "contacts (replicated, ul.add)")
            with lab.capture() as cap:
                cap.wait_for(lambda ps: len(keepalives(ps)) > 0, 10, "pings")
                time.sleep(PING_INTERVAL)  # one full ping round, to show who pings
                steady = keepalives(cap.packets())
                tl.step("steady state", f"{len(steady)} NAT keepalives, all from "
                        f"{'A' if _senders(steady) == {lab.host_mac('a')} else _senders(steady)}")
                killed = pair.kill("a")
                tl.step("kill -9 host A (processes killed, link unplugged)", "")
                role = pair.wait_role("b", "active", 15)
                took = time.time() - killed
                tl.step("B takes over", f"active at epoch {role['epoch']} after {took:.1f}s, "
                        f"VIP on B: {pair.holds_vip('b')}")
                cap.wait_for(lambda ps: any(p.src_mac == lab.host_mac("b") and p.ts > killed
                                            for p in keepalives(ps)), 15, "B pings")
                first = min(p.ts for p in keepalives(cap.packets())
                            if p.src_mac == lab.host_mac("b") and p.ts > killed)
                tl.step("B's proxy pings the phones from the VIP",
                        f"first keepalive {first - killed:.1f}s after the kill")
            pair.restart("a")
            back = pair.wait_role("a", "passive", 15)
            wait_for(lambda: pair.mi("a", "sc_digest") == pair.mi("b", "sc_digest"), 20,
                     "resynced")
            with lab.capture() as cap:
                time.sleep(2 * PING_INTERVAL)  # two ping rounds after the return
                after = keepalives(cap.packets())
            from_a = sum(1 for p in after if p.src_mac == lab.host_mac("a"))
            from_b = len(after) - from_a
            tl.step("host A returns", f"stays {back['state']} (no fail-back), resynced "
                    f"{pair.mi('a', 'sc_digest')['count']} contacts; keepalives since: "
                    f"{from_b} from B, {from_a} from A")
            if from_a:
                raise AssertionError("the returned standby sent keepalives")
            ok = True
    except Exception as exc:  # report, never hide, a failure
        tl.step("FAILED", f"{type(exc).__name__}: {exc}")
    print("\nusrloc sidecar demo: failover in a network-namespace lab\n")
    print(tl.table())
    verdict = "OK - the standby took over the VIP, the contacts and the pinging"
    print(f"\nresult: {verdict if ok else 'FAILED'}")
    return ok


def main(phones: int = PHONES) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-lab-demo-") as tmp:
        return 0 if run(Path(tmp), phones) else 1


__all__ = ["lab_unavailable", "main", "run"]
