"""Keepalive ownership and warm loading with two real Kamailios and two real sidecars on
loopback: only the active node's proxy pings the phones, the standby's proxy already holds
every contact, and after kill -9 of the active the standby's proxy takes over the pinging.
(The network-namespace lab adds the VIP and a real NAT: tests/test_failover_lab.py.)
"""

import asyncio
import signal
import socket
import time

import pytest

from sidecar.lab.nodes import make_pair, wait_until
from tests.kamailio_fixture import (
    KamailioInstance,
    Phone,
    free_port,
    require_kamailio,
    require_sipp,
    sipp_register,
)

pytestmark = pytest.mark.slow

PHONES = 12


def node_toml(primary: bool, kam: KamailioInstance) -> str:
    return f"""
[role]
primary = {"true" if primary else "false"}
wait_s = 1.0
startup_wait_s = 1.0
peer_timeout_s = 1.0
heartbeat_max_age_s = 0.5

[proxy]
type = "kamailio"
rpc_url = "{kam.rpc_url}"
load = "warm"
load_interval_s = 0.5

[keepalive]
mode = "proxy"
reassert_s = 1.0

[[sources]]
type = "kamailio"
rpc_url = "{kam.rpc_url}"
reconcile_interval_s = 0.5
"""


def sources(datagrams: list[tuple[int, tuple]]) -> set[str]:
    return {addr[0] for _, addr in datagrams}


def collect(socks: list[socket.socket], seconds: float,
            until_all: bool = False) -> list[tuple[int, tuple]]:
    """(phone port, sender address) of every datagram the phones receive meanwhile; with
    ``until_all``, stop early once every phone got at least one (seconds is then a limit)."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if until_all and len({port for port, _ in out}) == len(socks):
            break
        for s in socks:
            try:
                while True:
                    _, addr = s.recvfrom(4096)
                    out.append((s.getsockname()[1], addr))
            except BlockingIOError:
                pass
        time.sleep(0.02)
    return out


def test_only_the_active_proxy_pings_and_the_standby_takes_over(tmp_path):
    require_kamailio()
    require_sipp()
    kam_a = KamailioInstance(tmp_path / "ka", sip_ip="127.0.0.1", natping_interval=1)
    kam_b = KamailioInstance(tmp_path / "kb", sip_ip="127.0.0.2", natping_interval=1)
    a, b = make_pair(tmp_path / "nodes")
    phone_socks: list[socket.socket] = []
    with kam_a, kam_b:
        a.extra_toml = node_toml(True, kam_a)
        b.extra_toml = node_toml(False, kam_b)
        try:
            a.start()
            b.start()
            wait_until(lambda: a.mi("sc_role")["state"] == "active"
                       and b.mi("sc_role")["state"] == "passive", 15, what="roles settled")
            # phones behind "NAT": Contact and Via on 127.0.0.9, packets from 127.0.0.1:port
            ports = [free_port("127.0.0.1") for _ in range(PHONES)]

            async def register_all():
                for i, port in enumerate(ports):
                    await sipp_register(Phone(user=f"nat{i}", port=port,
                                              contact=f"<sip:nat{i}@127.0.0.9:{port}>",
                                              via_host="127.0.0.9"), kam_a)

            asyncio.run(register_all())
            for port in ports:  # the phones now listen where the pinholes would be
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("127.0.0.1", port))
                s.setblocking(False)
                phone_socks.append(s)

            wait_until(lambda: b.mi("sc_counters")["contacts"] == PHONES, 15,
                       what="contacts replicated to B")

            async def dump(kam):
                async with kam.http_rpc() as rpc:
                    return await rpc.ul_dump()

            # warm standby: B's proxy holds every contact, with the NAT address
            wait_until(lambda: len(asyncio.run(dump(kam_b))) == PHONES, 15,
                       what="B's Kamailio warm-loaded")
            loaded = asyncio.run(dump(kam_b))
            assert all(c["received"] and c["received"].startswith("sip:127.0.0.1:")
                       for c in loaded)

            # steady state: pings come from A's proxy only
            seen = collect(phone_socks, 15.0, until_all=True)
            seen += collect(phone_socks, 2.0)  # and a while longer: B must stay silent
            assert sources(seen) == {"127.0.0.1"}, sources(seen)
            assert {port for port, _ in seen} == set(ports)
            assert b.mi("sc_ping_stats")["proxy_pinger"]["wanted"] is False

            a.kill(signal.SIGKILL)
            kam_a.stop()
            wait_until(lambda: b.mi("sc_role")["state"] == "active"
                       and not b.mi("sc_role")["failover_pending"], 10, what="B took over")
            assert b.mi("sc_ping_stats")["proxy_pinger"]["wanted"] is True
            collect(phone_socks, 0.5)  # drain
            seen = collect(phone_socks, 15.0, until_all=True)
            assert sources(seen) == {"127.0.0.2"}, sources(seen)
            assert {port for port, _ in seen} == set(ports)  # every phone, from the new active
        finally:
            for s in phone_socks:
                s.close()
            a.kill()
            b.kill()
