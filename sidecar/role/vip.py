"""The built-in VIP action: move a virtual IPv4 address to this node and tell the segment.

On promotion the daemon calls :meth:`Vip.acquire`: refuse if the address is already on another
local interface or if another host answers an ARP probe for it (RFC 5227) — taking an address
that is in use would black-hole the live proxy — then ``ip addr add`` it and send gratuitous
ARP (request and reply forms, a few times) so that the router and phones' gateways switch their
ARP caches at once instead of after minutes. On demotion :meth:`Vip.release` removes it.

Packets are built and parsed with scapy but sent and received on a plain non-blocking
AF_PACKET socket driven by asyncio: scapy's own ``sendp``/``sniff`` block the event loop, and
this daemon uses no threads. The proxy should listen on the VIP with a non-local bind
(``net.ipv4.ip_nonlocal_bind=1``) so that it keeps running while the address comes and goes.

Every outcome is a :class:`VipResult`; nothing here raises into the daemon except
:class:`VipConfigError` for a VIP that can never work (bad address, IPv6).

Also a small CLI for operators and the namespace tests:
``python -m sidecar.role.vip acquire|release|status --iface IF --vip A.B.C.D/P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from scapy.layers.l2 import ARP, Ether

from .hooks import run_command

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4  # sll_pkttype of frames this host sent (seen by its own packet sockets)
BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"


class VipConfigError(ValueError):
    """A VIP setting that can never work."""


@dataclass(frozen=True, slots=True)
class VipResult:
    ok: bool
    detail: str
    garp_sent: int = 0
    conflict_mac: str | None = None  # the host that answered for the address, if any


def parse_vip(text: str) -> ipaddress.IPv4Interface:
    """``"10.0.0.100/24"`` (no prefix = /32). IPv4 only: IPv6 would need unsolicited NA."""
    try:
        vip = ipaddress.ip_interface(text.strip())
    except ValueError as exc:
        raise VipConfigError(f"bad VIP {text!r}: {exc}") from None
    if not isinstance(vip, ipaddress.IPv4Interface):
        raise VipConfigError(f"VIP {text!r}: only IPv4 is supported")
    if vip.ip.is_unspecified or vip.ip.is_loopback or vip.ip.is_multicast:
        raise VipConfigError(f"VIP {text!r} cannot be announced")
    return vip


# ---------------------------------------------------------------- frames (sans-I/O)
def garp_frames(mac: str, ip: str) -> list[bytes]:
    """One gratuitous ARP in each form: request (RFC 5227 announcement) and reply; some
    routers only act on one of them."""
    request = Ether(src=mac, dst=BROADCAST) / ARP(op=1, hwsrc=mac, psrc=ip, hwdst=ZERO_MAC,
                                                   pdst=ip)
    reply = Ether(src=mac, dst=BROADCAST) / ARP(op=2, hwsrc=mac, psrc=ip, hwdst=BROADCAST,
                                                 pdst=ip)
    return [bytes(request), bytes(reply)]


def probe_frame(mac: str, ip: str) -> bytes:
    """RFC 5227 ARP probe: "who has ip?" from sender address 0.0.0.0, so that no cache learns
    anything from it."""
    return bytes(Ether(src=mac, dst=BROADCAST) / ARP(op=1, hwsrc=mac, psrc="0.0.0.0",
                                                      hwdst=ZERO_MAC, pdst=ip))


def conflict_from(frame: bytes, ip: str, own_mac: str) -> str | None:
    """MAC of another host that claims ``ip`` in this frame (RFC 5227 §2.1.1), else None."""
    try:
        pkt = Ether(frame)
    except Exception:  # scapy raises many types on truncated input
        return None
    if ARP not in pkt:
        return None
    arp = pkt[ARP]
    sender = str(arp.hwsrc).lower()
    if sender == own_mac.lower():
        return None
    if arp.psrc == ip:
        return sender  # a reply to our probe, or the holder announcing itself
    if arp.op == 1 and arp.psrc == "0.0.0.0" and arp.pdst == ip:
        return sender  # another node probing for the same address right now
    return None


def owners_from_ip_json(text: str, ip: str) -> list[str]:
    """Interfaces that hold ``ip`` according to ``ip -j -4 addr show`` output."""
    try:
        links = json.loads(text or "[]")
    except ValueError:
        return []
    owners = []
    for link in links if isinstance(links, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            if isinstance(info, dict) and info.get("local") == ip:
                owners.append(str(link.get("ifname")))
    return owners


# ---------------------------------------------------------------- I/O
def _packet_socket(interface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        s.bind((interface, ETH_P_ARP))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _recvfrom(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    size: int) -> tuple[bytes, Any]:
    """``loop.sock_recvfrom`` for any event loop: uvloop (the daemon's loop) lacks it."""
    while True:
        try:
            return sock.recvfrom(size)
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


class Vip:
    """One VIP on one interface."""

    def __init__(self, address: str, interface: str, *, garp_count: int = 3,
                 garp_interval: float = 0.2, probe: bool = True, probe_count: int = 2,
                 probe_timeout: float = 0.5, command_timeout: float = 5.0,
                 repeat_in_background: bool = False) -> None:
        self.vip = parse_vip(address)
        if not interface or "/" in interface or len(interface) > 15:
            raise VipConfigError(f"bad interface name {interface!r}")
        if garp_count < 0 or probe_count < 1 or garp_interval < 0 or probe_timeout <= 0:
            raise VipConfigError("garp_count >= 0, probe_count >= 1, timings > 0")
        self.interface = interface
        self.ip = str(self.vip.ip)
        self.garp_count = garp_count
        self.garp_interval = garp_interval
        self.probe = probe
        self.probe_count = probe_count
        self.probe_timeout = probe_timeout
        self.command_timeout = command_timeout
        # In the daemon the address is usable after the first announcement: the repeats (for
        # neighbours that missed it) go out from a task, so pinging starts ~garp_interval *
        # (garp_count - 1) sooner. A one-shot CLI must wait for them instead.
        self.repeat_in_background = repeat_in_background
        self._repeats: asyncio.Task | None = None
        self.last: VipResult | None = None

    def __repr__(self) -> str:
        return f"Vip({self.vip.with_prefixlen} on {self.interface})"

    async def owners(self) -> list[str] | None:
        """Local interfaces holding the address; None if ``ip`` could not tell."""
        res = await run_command(["ip", "-j", "-4", "addr", "show"],
                                timeout=self.command_timeout, max_output=1 << 22)
        if not res.ok:
            return None
        return owners_from_ip_json(res.output, self.ip)

    async def mac(self) -> str:
        res = await run_command(["ip", "-j", "link", "show", "dev", self.interface],
                                timeout=self.command_timeout, max_output=1 << 16)
        try:
            mac = json.loads(res.output)[0]["address"] if res.ok else None
        except (ValueError, LookupError, TypeError):
            mac = None
        if not mac:
            raise OSError(f"interface {self.interface}: {res.detail} {res.output.strip()}")
        return str(mac)

    async def arp_probe(self, mac: str) -> str | None:
        """MAC of another host answering for the VIP within the probe time, else None."""
        loop = asyncio.get_running_loop()
        with _packet_socket(self.interface) as s:
            frame = probe_frame(mac, self.ip)
            deadline = time.monotonic() + self.probe_timeout
            gap = self.probe_timeout / self.probe_count
            next_send = 0.0
            while (left := deadline - time.monotonic()) > 0:
                if time.monotonic() >= next_send:
                    await loop.sock_sendall(s, frame)
                    next_send = time.monotonic() + gap
                wait = min(left, max(0.0, next_send - time.monotonic()))
                try:
                    data, addr = await asyncio.wait_for(_recvfrom(loop, s, 2048), wait)
                except TimeoutError:
                    continue
                if addr[2] == PACKET_OUTGOING:
                    continue
                if (owner := conflict_from(data, self.ip, mac)) is not None:
                    return owner
        return None

    async def announce(self, mac: str, rounds: int | None = None) -> int:
        """Send *rounds* (default ``garp_count``) gratuitous ARP rounds, ``garp_interval``
        apart; returns how many frames went out."""
        loop = asyncio.get_running_loop()
        sent = 0
        with _packet_socket(self.interface) as s:
            frames = garp_frames(mac, self.ip)
            for i in range(self.garp_count if rounds is None else rounds):
                if i:
                    await asyncio.sleep(self.garp_interval)
                for frame in frames:
                    await loop.sock_sendall(s, frame)
                    sent += 1
        return sent

    async def acquire(self) -> VipResult:
        started = time.perf_counter()
        self.last = res = await self._acquire()
        # the duration is what a failover timeline needs (probe + add + gratuitous ARPs)
        (log.warning if res.ok else log.error)("%r acquire in %.3fs: %s", self, time.perf_counter()
                                               - started, res.detail)
        return res

    async def release(self) -> VipResult:
        self.last = res = await self._release()
        (log.info if res.ok else log.error)("%r release: %s", self, res.detail)
        return res

    async def _acquire(self) -> VipResult:
        owners = await self.owners()
        if owners is None:
            return VipResult(False, "cannot list local addresses (`ip -j addr show` failed)")
        others = [o for o in owners if o != self.interface]
        if others:
            return VipResult(False, f"VIP {self.ip} is already on local interface "
                                    f"{', '.join(others)}; refusing to add it to "
                                    f"{self.interface}")
        try:
            mac = await self.mac()
        except OSError as exc:
            return VipResult(False, f"cannot use interface {self.interface}: {exc}")
        if self.interface in owners:
            detail = f"VIP {self.ip} already present on {self.interface}"
        else:
            if self.probe:
                try:
                    owner = await self.arp_probe(mac)
                except OSError as exc:
                    return VipResult(False, f"ARP probe for {self.ip} on {self.interface} "
                                            f"failed: {exc}")
                if owner is not None:
                    return VipResult(False, f"VIP {self.ip} already taken: {owner} answers "
                                            f"for it on {self.interface}", conflict_mac=owner)
            res = await run_command(["ip", "addr", "add", self.vip.with_prefixlen, "dev",
                                     self.interface], timeout=self.command_timeout)
            if not res.ok:
                return VipResult(False, f"ip addr add {self.vip.with_prefixlen} dev "
                                        f"{self.interface}: {res.detail} {res.output.strip()}")
            detail = f"added {self.vip.with_prefixlen} to {self.interface}"
        background = self.repeat_in_background and self.garp_count > 1
        try:
            sent = await self.announce(mac, 1 if background else None)
        except OSError as exc:
            # The address works; neighbours just learn it later. Not worth failing over again.
            return VipResult(True, f"{detail}; gratuitous ARP failed: {exc}")
        if background:
            self._cancel_repeats()
            self._repeats = asyncio.create_task(self._repeat(mac), name="vip-garp-repeats")
            detail += f"; {self.garp_count - 1} more rounds follow"
        return VipResult(True, f"{detail}; {sent} gratuitous ARP frames sent", garp_sent=sent)

    async def _repeat(self, mac: str) -> None:
        await asyncio.sleep(self.garp_interval)
        try:
            await self.announce(mac, self.garp_count - 1)
        except OSError as exc:
            log.warning("%r: repeated gratuitous ARP failed: %s", self, exc)

    def _cancel_repeats(self) -> None:
        if self._repeats is not None and not self._repeats.done():
            self._repeats.cancel()
        self._repeats = None

    async def _release(self) -> VipResult:
        self._cancel_repeats()
        owners = await self.owners()
        if owners is not None and self.interface not in owners:
            return VipResult(True, f"VIP {self.ip} not present on {self.interface}")
        res = await run_command(["ip", "addr", "del", self.vip.with_prefixlen, "dev",
                                 self.interface], timeout=self.command_timeout)
        if not res.ok:
            return VipResult(False, f"ip addr del {self.vip.with_prefixlen} dev "
                                    f"{self.interface}: {res.detail} {res.output.strip()}")
        return VipResult(True, f"removed {self.vip.with_prefixlen} from {self.interface}")

    async def status(self) -> dict:
        owners = await self.owners()
        return {"vip": self.vip.with_prefixlen, "interface": self.interface,
                "present": None if owners is None else self.interface in owners,
                "local_owners": owners,
                "last": None if self.last is None else asdict(self.last)}


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sidecar.role.vip",
                                 description="Add/remove a VIP with ARP probe and GARP.")
    ap.add_argument("action", choices=["acquire", "release", "status"])
    ap.add_argument("--iface", required=True)
    ap.add_argument("--vip", required=True, help="A.B.C.D/PREFIX")
    ap.add_argument("--garp-count", type=int, default=3)
    ap.add_argument("--garp-interval", type=float, default=0.2)
    ap.add_argument("--probe-timeout", type=float, default=0.5)
    ap.add_argument("--no-probe", action="store_true")
    args = ap.parse_args(argv)
    try:
        vip = Vip(args.vip, args.iface, garp_count=args.garp_count,
                  garp_interval=args.garp_interval, probe=not args.no_probe,
                  probe_timeout=args.probe_timeout)
    except VipConfigError as exc:
        print(json.dumps({"ok": False, "detail": str(exc)}))
        return 2

    async def run() -> dict:
        if args.action == "status":
            return {"ok": True, **await vip.status()}
        res = await (vip.acquire() if args.action == "acquire" else vip.release())
        return asdict(res)

    out = asyncio.run(run())
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
