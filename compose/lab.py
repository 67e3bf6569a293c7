"""Bring the namespace lab up by hand, or clean up after a run that was killed.

    python -m compose.lab up [--kamailio] [--phones N] [--udp-timeout S] [--vip a|b|none]
    python -m compose.lab list
    python -m compose.lab clean
    python -m compose.lab scenario PATH [--hold-s S]
    python -m compose.lab garp IFACE IP

``up`` builds the lab (see :mod:`sidecar.lab.netns`), optionally starts Kamailio on both proxy
hosts and registers N SIPp phones through the NAT, prints the namespace names and a few
commands to explore it, and keeps everything until Ctrl-C or SIGTERM, then removes it all.
``clean`` removes lab namespaces whose creating process no longer exists (a test run that was
killed with SIGKILL cannot clean up after itself). ``scenario`` writes the SIPp phone scenario
the lab uses and ``garp`` announces an address from this host (docker-compose's services
use both).

Needs root, iproute2 and nftables; Kamailio, SIPp and tcpdump for the optional parts.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from sidecar.lab.netns import (
    NAT_PUBLIC_IP,
    PHONE_IP,
    VIP,
    Capture,
    Lab,
    LabError,
    LabKamailio,
    Packet,
    PcapReader,
    Phones,
    Pinhole,
    Registration,
    count_by_source,
    gratuitous_arp,
    in_netns,
    list_namespaces,
    ns_socket,
    register_scenario,
    remove_stale,
    stale_namespaces,
    unavailable_reason,
)

__all__ = [
    "NAT_PUBLIC_IP", "PHONE_IP", "VIP", "Capture", "Lab", "LabError", "LabKamailio", "Packet",
    "PcapReader", "Phones", "Pinhole", "Registration", "count_by_source", "in_netns", "main",
    "ns_socket",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compose.lab", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the lab and keep it until Ctrl-C")
    up.add_argument("--kamailio", action="store_true", help="start Kamailio on both hosts")
    up.add_argument("--phones", type=int, default=0,
                    help="N SIPp phones that register and stay (needs --kamailio)")
    up.add_argument("--udp-timeout", type=int, default=30, help="NAT UDP conntrack timeout (s)")
    up.add_argument("--vip", choices=("a", "b", "none"), default="a", help="initial VIP holder")
    sub.add_parser("list", help="lab namespaces on this machine")
    sub.add_parser("clean", help="remove namespaces of labs whose creator is gone")
    scen = sub.add_parser("scenario", help="write the SIPp phone scenario to PATH")
    scen.add_argument("path")
    scen.add_argument("--hold-s", type=float, default=0.0,
                      help="stay registered this long, answering OPTIONS (with sipp -aa)")
    garp = sub.add_parser("garp", help="send gratuitous ARP for IP from IFACE (needs root)")
    garp.add_argument("iface")
    garp.add_argument("ip")
    return p


def _send_garp(iface: str, ip: str) -> None:
    """Announce ``ip`` at ``iface``'s MAC, in both ARP forms (what the lab's move_vip does)."""
    with open(f"/sys/class/net/{iface}/address") as f:
        mac = f.read().strip()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for reply in (False, True):
            sock.send(gratuitous_arp(mac, ip, reply=reply))


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM without polling; the ``with`` around us tears down."""
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        signal.sigwait(signals)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def _up(args: argparse.Namespace) -> int:
    with Lab(udp_timeout=args.udp_timeout, vip_on=None if args.vip == "none" else args.vip) as lab:
        print(f"lab up in {lab.timings['up_s']:.2f} s; workdir {lab.workdir}")
        for role in ("core", "a", "b", "nat", "phones"):
            print(f"  {role:7} ip netns exec {lab.ns(role)} ...")
        print(f"  VIP {VIP} on {lab.vip_holder()}; host a {lab.host_ip('a')}, "
              f"b {lab.host_ip('b')}; NAT public {NAT_PUBLIC_IP}; phones {PHONE_IP}")
        if args.kamailio:
            for host in ("a", "b"):
                kam = lab.start_kamailio(host)
                print(f"  kamailio on {host}: log {kam.process.log_path if kam.process else '-'}")
        if args.phones:
            phones = lab.start_phones(args.phones)
            print(f"  {len(phones.users)} phones registered in {phones.elapsed_s:.2f} s; "
                  f"{len(lab.pinholes())} pinholes; SIPp log {phones.dir / 'sipp.log'}")
        print(f"try: ip netns exec {lab.ns('nat')} cat /proc/net/nf_conntrack")
        print(f"     ip netns exec {lab.ns('core')} tcpdump -ni port-nat udp")
        print("Ctrl-C removes the lab.")
        sys.stdout.flush()
        _wait_for_signal()
    print(f"lab down in {lab.timings['down_s']:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "scenario":
        with open(args.path, "w") as f:
            f.write(register_scenario(int(args.hold_s * 1000) or None))
        return 0
    if args.command == "garp":
        _send_garp(args.iface, args.ip)
        return 0
    if args.command == "list":
        for name in list_namespaces():
            stale = " (stale)" if name in stale_namespaces() else ""
            if name.startswith("usl"):
                print(name + stale)
        return 0
    if args.command == "up" and args.phones and not args.kamailio:
        print("--phones needs --kamailio (someone must answer the REGISTERs)", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason:
        print(f"cannot build the lab: {reason}", file=sys.stderr)
        return 2
    if args.command == "clean":
        for name in remove_stale():
            print(f"removed {name}")
        return 0
    try:
        return _up(args)
    except LabError as e:
        print(f"lab failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
