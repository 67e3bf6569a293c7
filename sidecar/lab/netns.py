"""A network-namespace lab: two proxy hosts behind a VIP and SIP phones behind a real NAT.

Failover and NAT keepalive ownership can only be proven against a real NAT: a keepalive from the
wrong address (the standby's own) must be dropped, and a pinhole that nobody refreshes must
close. This module builds that world from Linux network namespaces, so it needs root, ``ip``
(iproute2) and ``nft`` (nftables), and nothing outside the namespaces it creates is touched::

      ns scA  eth0 10.20.0.11 (+ VIP 10.20.0.100)  --+
      ns scB  eth0 10.20.0.12                      --+-- bridge br0 in ns core ("server LAN")
      ns nat  pub  10.20.0.254                     --+
              priv 192.168.50.254 -- masquerade, short UDP conntrack timeouts
      ns phones eth0 192.168.50.10, default route via 192.168.50.254

The router (ns ``nat``) does nftables ``masquerade random`` for the phone LAN. Only packets that
match an existing conntrack entry are let back in, so a pinhole opened by a phone towards
VIP:5060 accepts packets from VIP:5060 only; anything else arriving on its public side is
counted by the nft counter ``unsolicited`` and dropped (:meth:`Lab.unsolicited_drops`). UDP
conntrack timeouts are lowered (``udp_timeout``) so an unrefreshed pinhole closes within
seconds - which is what makes NAT keepalives matter.

Namespace names carry a prefix, the creating pid and a random suffix, so parallel labs never
collide. :class:`Lab` is a context manager that always removes everything it made (processes
first, then the namespaces, which takes their veths and bridge with them), on exceptions too.

Processes run inside a namespace through ``ip netns exec``; sockets for the test process itself
are created inside a namespace with setns(2) on the calling thread (:func:`in_netns`), so a test
can bind a UDP sender on VIP:5060 in ``scA`` or talk HTTP to a sidecar listening on 127.0.0.1
inside ``scB``.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import ipaddress
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..proxy.kamailio import KamailioRpc
from ..proxy.kamailio_dump import parse_ul_dump

# --- address plan (only ever configured inside the lab's namespaces) -------------------------

LAN_NET = ipaddress.ip_network("10.20.0.0/24")
VIP = "10.20.0.100"
NAT_PUBLIC_IP = "10.20.0.254"
PHONE_NET = ipaddress.ip_network("192.168.50.0/24")
NAT_PRIVATE_IP = "192.168.50.254"
PHONE_IP = "192.168.50.10"
SIP_PORT = 5060
RPC_PORT = 5071
HOST_NAMES = ("a", "b")
_HOST_IPS = {"a": "10.20.0.11", "b": "10.20.0.12"}
# Fixed MACs make captures readable: which host really sent a packet "from the VIP".
_HOST_MACS = {"a": "02:00:0a:14:00:0b", "b": "02:00:0a:14:00:0c"}
NAT_PUBLIC_MAC = "02:00:0a:14:00:fe"

NS_PREFIX = "usl"
_NS_NAME = re.compile(rf"^{NS_PREFIX}(\d+)x[0-9a-f]+-(core|scA|scB|nat|phones)$")
_ROLES = {"core": "core", "a": "scA", "b": "scB", "nat": "nat", "phones": "phones",
          "scA": "scA", "scB": "scB"}

NFT_TABLE = "usl_lab"
UNSOLICITED_COUNTER = "unsolicited"
PARTITION_TABLE = "usl_partition"

REPO = Path(__file__).resolve().parents[2]
KAMAILIO_BIN = "/usr/sbin/kamailio"
KAMAILIO_CFG = REPO / "kamailio-cfg" / "kamailio.cfg"
# Logged by event_route[core:worker-one-init] in kamailio.cfg once every listener is up.
KAMAILIO_READY_MARK = "NAT pinging starts "
POLL_S = 0.02
CLONE_NEWNET = 0x40000000
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux value; Python names it from 3.12


class LabError(RuntimeError):
    """A lab step failed; the message says which command and what it printed."""


def ensure_open_files(needed: int) -> None:
    """Raise this process's open-file limit (inherited by SIPp) to *needed* if lower.

    SIPp holding 50,000 phones needs a socket each and refuses to start when ``-max_socket``
    exceeds ``RLIMIT_NOFILE`` (20,000 on some machines). The lab runs as root, which may
    raise the hard limit too (up to ``fs.nr_open``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError) as exc:
        raise LabError(f"SIPp needs {needed} open files; RLIMIT_NOFILE is {soft}/{hard} and "
                       f"cannot be raised: {exc}") from None


# --- prerequisites ------------------------------------------------------------------------

def unavailable_reason() -> str | None:
    """Why a lab cannot be built here (None if it can): tests skip with this text."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (ip netns, nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2 nftables)"
    if not Path("/proc/thread-self/ns/net").exists():
        return "no network namespaces in this kernel"
    return None


def tool_missing(name: str) -> str | None:
    """Why an optional tool of the lab (kamailio, sipp, tcpdump) is not usable, or None."""
    paths = {"kamailio": KAMAILIO_BIN}
    found = Path(paths[name]).exists() if name in paths else shutil.which(name) is not None
    hints = {"kamailio": "kamailio", "sipp": "sip-tester", "tcpdump": "tcpdump"}
    return None if found else f"{name} not installed (apt-get install {hints.get(name, name)})"


# --- sockets inside a namespace -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the calling thread into network namespace ``ns`` for the ``with`` body.

    Sockets keep the namespace they were created in, so create them inside and use them
    anywhere. Only this thread moves (setns acts per thread), and the body must not await
    or yield to other code: anything else run meanwhile would land in the namespace too.
    """
    with open("/proc/thread-self/ns/net", "rb") as own, open(f"/run/netns/{ns}", "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(own.fileno())


def ns_socket(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM,
              proto: int = 0) -> socket.socket:
    """A new socket that lives in namespace ``ns``."""
    with in_netns(ns):
        return socket.socket(family, kind, proto)


# --- sans-I/O helpers: ARP frames, pcap, conntrack, nft counters ----------------------------

def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def gratuitous_arp(mac: str, ip: str, *, reply: bool = False) -> bytes:
    """An Ethernet broadcast announcing ``ip`` is at ``mac`` (ARP request or reply form).

    Senders send both forms: some stacks update their caches only from one of them.
    """
    ip_b = socket.inet_aton(ip)
    sender = _mac_bytes(mac)
    target_mac = sender if reply else b"\x00" * 6
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2 if reply else 1)
    arp += sender + ip_b + target_mac + ip_b
    return b"\xff" * 6 + sender + b"\x08\x06" + arp


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured frame; IPv4 fields are empty strings / 0 for other protocols."""

    ts: float
    src_mac: str
    dst_mac: str
    ethertype: int
    src: str = ""
    dst: str = ""
    proto: int = 0
    sport: int = 0
    dport: int = 0
    payload: bytes = b""


class PcapError(ValueError):
    """The data is not a pcap stream this reader understands (classic pcap, Ethernet)."""


def _fmt_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_frame(ts: float, frame: bytes) -> Packet | None:
    """An Ethernet frame as a :class:`Packet` (None if it is too short to be one)."""
    if len(frame) < 14:
        return None
    dst_mac, src_mac = _fmt_mac(frame[0:6]), _fmt_mac(frame[6:12])
    (ethertype,) = struct.unpack("!H", frame[12:14])
    ip = frame[14:]
    if ethertype != 0x0800 or len(ip) < 20 or ip[0] >> 4 != 4:
        return Packet(ts, src_mac, dst_mac, ethertype)
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    body = ip[ihl:max(ihl, min(total, len(ip)))]
    if proto in (6, 17) and len(body) >= 4:
        sport, dport = struct.unpack("!HH", body[:4])
        data_off = 8 if proto == 17 else (body[12] >> 4) * 4 if len(body) >= 13 else len(body)
        return Packet(ts, src_mac, dst_mac, ethertype, src, dst, proto, sport, dport,
                      bytes(body[data_off:]))
    return Packet(ts, src_mac, dst_mac, ethertype, src, dst, proto, payload=bytes(body))


_PCAP_FORMATS = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
                 b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
_PCAP_MAX_RECORD = 262144


class PcapReader:
    """Incremental reader of a classic pcap stream: :meth:`feed` the bytes as they are
    written and get the packets completed so far; a partial record waits for the rest. So a
    capture of 100,000 keepalives is parsed once, not at every poll."""

    def __init__(self) -> None:
        self._buf = b""
        self._header: tuple[str, float] | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """Packets completed by ``data``; :class:`PcapError` if the stream is not pcap."""
        buf = self._buf + data
        pos = 0
        if self._header is None:
            if len(buf) < 24:
                self._buf = buf
                return []
            if buf[:4] not in _PCAP_FORMATS:
                raise PcapError(f"not a pcap stream (magic {buf[:4].hex()})")
            endian, frac = _PCAP_FORMATS[buf[:4]]
            linktype = struct.unpack(endian + "I", buf[20:24])[0]
            if linktype != 1:
                raise PcapError(f"link type {linktype} is not Ethernet")
            self._header = (endian, frac)
            pos = 24
        endian, frac = self._header
        out: list[Packet] = []
        while pos + 16 <= len(buf):
            sec, sub, caplen, _ = struct.unpack(endian + "IIII", buf[pos:pos + 16])
            if caplen > _PCAP_MAX_RECORD:
                raise PcapError(f"record of {caplen} bytes")
            if pos + 16 + caplen > len(buf):
                break
            packet = parse_frame(sec + sub * frac, buf[pos + 16:pos + 16 + caplen])
            if packet is not None:
                out.append(packet)
            pos += 16 + caplen
        self._buf = buf[pos:]
        return out


def parse_pcap(data: bytes) -> list[Packet]:
    """Packets of a whole classic pcap stream (a record cut short at the end is ignored).
    Raises :class:`PcapError` for anything that is not Ethernet pcap."""
    return PcapReader().feed(data)


@dataclass(frozen=True, slots=True)
class Pinhole:
    """A UDP conntrack entry of the NAT: phone ``private`` -> ``remote``, seen as ``public``."""

    private: tuple[str, int]
    remote: tuple[str, int]
    public: tuple[str, int]
    timeout_s: int
    replied: bool


_CT_FIELD = re.compile(r"(src|dst|sport|dport)=(\S+)")


def parse_conntrack(text: str) -> list[Pinhole]:
    """The UDP entries of ``/proc/net/nf_conntrack``; other lines are skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[2] != "udp":
            continue
        fields = _CT_FIELD.findall(line)
        if len(fields) < 8:
            continue
        orig = dict(fields[:4])
        reply = dict(fields[4:8])
        try:
            out.append(Pinhole(private=(orig["src"], int(orig["sport"])),
                               remote=(orig["dst"], int(orig["dport"])),
                               public=(reply["dst"], int(reply["dport"])),
                               timeout_s=int(parts[4]),
                               replied="[UNREPLIED]" not in parts))
        except (KeyError, ValueError):
            continue
    return out


# --- processes --------------------------------------------------------------------------------

@dataclass
class LabProcess:
    """A process the lab started in a namespace; ``owner`` is the host it dies with."""

    name: str
    ns: str
    owner: str | None
    proc: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (``start_new_session``: the process and its forks)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --- capture ------------------------------------------------------------------------------

class Capture:
    """``tcpdump -w`` inside a namespace; :meth:`packets` reads what it has written so far."""

    def __init__(self, lab: Lab, ns: str, iface: str, bpf: str, path: Path,
                 snaplen: int = 2048) -> None:
        self.lab, self.ns, self.iface, self.bpf, self.path = lab, ns, iface, bpf, path
        self.snaplen = snaplen
        self._err_path = path.with_suffix(".err")
        self._process: LabProcess | None = None
        self._reader = PcapReader()
        self._offset = 0
        self._packets: list[Packet] = []

    def start(self, timeout: float = 10.0) -> Capture:
        reason = tool_missing("tcpdump")
        if reason:
            raise LabError(reason)
        # -U/--immediate-mode: each packet reaches the file at once (tests poll it); -B: a
        # 64 MB kernel buffer so a sweep of 100k keepalives/s is not dropped.
        argv = ["tcpdump", "-i", self.iface, "-U", "--immediate-mode", "-n", "-Z", "root",
                "-B", "65536", "-s", str(self.snaplen), "-w", "-", *self.bpf.split()]
        out = open(self.path, "wb")  # noqa: SIM115 - handed to the child process
        err = open(self._err_path, "wb")  # noqa: SIM115
        try:
            self._process = self.lab.popen(self.ns, argv, name=f"tcpdump:{self.iface}",
                                           stdout=out, stderr=err, owner=None)
        finally:
            out.close()
            err.close()
        self.lab._captures.append(self)
        deadline = time.monotonic() + timeout
        while b"listening on" not in self._read_err():
            if not self._process.alive or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"tcpdump on {self.ns}/{self.iface} did not start: "
                               f"{self._read_err().decode(errors='replace')}")
            time.sleep(POLL_S)
        return self

    def _read_err(self) -> bytes:
        try:
            return self._err_path.read_bytes()
        except OSError:
            return b""

    def packets(self) -> list[Packet]:
        """Everything captured so far (only the bytes written since the last call are read)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return list(self._packets)
        self._offset += len(data)
        self._packets.extend(self._reader.feed(data))
        return list(self._packets)

    def kernel_drops(self) -> int | None:
        """Packets the kernel dropped before tcpdump saw them (known after :meth:`stop`)."""
        m = re.search(rb"(\d+) packets? dropped by kernel", self._read_err())
        return int(m.group(1)) if m else None

    def wait_for(self, predicate: Callable[[list[Packet]], bool], timeout: float,
                 what: str = "packets") -> list[Packet]:
        """Poll until ``predicate(packets)`` holds; raise TimeoutError with a summary if not."""
        deadline = time.monotonic() + timeout
        while True:
            packets = self.packets()
            if predicate(packets):
                return packets
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not seen on {self.ns}/{self.iface} in {timeout} s; "
                                   f"{len(packets)} captured")
            time.sleep(POLL_S)

    def stop(self) -> list[Packet]:
        """Stop tcpdump (it flushes on SIGINT) and return everything it captured."""
        if self._process is not None and self._process.alive:
            self._process.kill(signal.SIGINT)
            try:
                self._process.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.proc.wait(5)
        return self.packets()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def count_by_source(packets: Sequence[Packet]) -> dict[tuple[str, str], int]:
    """Packets per (source MAC, source IP): who really sent them, also when both use the VIP."""
    counts: dict[tuple[str, str], int] = {}
    for p in packets:
        key = (p.src_mac, p.src)
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- Kamailio in a host namespace ---------------------------------------------------------

@dataclass
class LabKamailio:
    """Kamailio (kamailio-cfg/kamailio.cfg) on a lab host: SIP on VIP:5060 (free bind, so it
    also runs on the host without the VIP) and on the host's own address, JSON-RPC over HTTP on
    127.0.0.1:5071 inside the host's namespace and over a FIFO in ``dir``."""

    lab: Lab
    host: str
    dir: Path
    sip_port: int
    rpc_port: int
    process: LabProcess | None = None

    @property
    def sip_socket(self) -> str:
        """The VIP listener as Kamailio names it in ``ul.dump`` / ``ul.add``."""
        return f"udp:{VIP}:{self.sip_port}"

    @property
    def own_socket(self) -> str:
        return f"udp:{self.lab.host_ip(self.host)}:{self.sip_port}"

    @property
    def fifo_path(self) -> Path:
        return self.dir / "run" / "kamailio_rpc.fifo"

    @property
    def reply_dir(self) -> Path:
        return self.dir / "r"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def rpc(self, method: str, *params: Any, timeout: float = 5.0) -> Any:
        """A JSON-RPC call over HTTP inside the host's namespace; raises LabError on errors."""
        status, reply = self.lab.http_json(self.host, "127.0.0.1", self.rpc_port, "/RPC",
                                           {"jsonrpc": "2.0", "method": method,
                                            "params": list(params), "id": 1}, timeout=timeout)
        if not isinstance(reply, dict) or "error" in reply or "result" not in reply:
            raise LabError(f"kamailio {self.host} {method} -> HTTP {status}: {reply!r}")
        return reply["result"]

    def fifo_rpc(self, timeout: float = 5.0) -> KamailioRpc:
        """The sidecar's async client on this instance's FIFO (works from any namespace)."""
        return KamailioRpc(fifo_path=self.fifo_path, reply_dir=self.reply_dir, timeout=timeout)

    def contacts(self) -> list[dict[str, Any]]:
        """Every contact of ``ul.dump`` (flattened from its AoR records)."""
        return parse_ul_dump(self.rpc("ul.dump"), now=int(time.time()))

    def enable_ping(self, on: bool) -> None:
        self.rpc("nathelper.enable_ping", 1 if on else 0)

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None:
            return
        self.process.kill(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.proc.wait(timeout)
        self.process.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.proc.wait(timeout)


# --- SIPp phones ----------------------------------------------------------------------------

_SIPP_REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<!-- Written by sidecar.lab.netns: one REGISTER per call, the user from the injection file
     (field0), Via/Contact naming the phone's private address so the proxy sees it NATed.
     HOLD is empty, or a pause that keeps the call (and with -t un its socket) open so
     SIPp's -aa answers the proxy's OPTIONS keepalives like a live phone. -->
<scenario name="lab phone register">
  <send retrans="500">
    <![CDATA[

      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:[field0]@[remote_ip]>;tag=[pid]lab[call_number]
      To: <sip:[field0]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Expires: [expires]
      User-Agent: usl-lab-phone
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" timeout="5000"/>HOLD
</scenario>
"""


def register_scenario(hold_ms: int | None = None) -> str:
    """The SIPp scenario the lab's phones run (``-inf`` users, ``-key expires``)."""
    hold = f'\n  <pause milliseconds="{hold_ms}"/>' if hold_ms else ""
    return _SIPP_REGISTER.replace("HOLD", hold)


@dataclass(frozen=True, slots=True)
class Registration:
    """What :meth:`Lab.sipp_register` did: the users, from where, and SIPp's output."""

    users: tuple[str, ...]
    phone_ip: str
    local_port: int | None  # the one phone port (transport "u1"); None: a port per user
    elapsed_s: float
    output: str


@dataclass
class Phones:
    """A running SIPp that registered ``users`` and answers keepalives (from
    :meth:`Lab.start_phones`)."""

    users: tuple[str, ...]
    local_port: int | None
    process: LabProcess
    dir: Path
    elapsed_s: float = 0.0

    def _counts(self) -> dict[str, int]:
        """The last row of SIPp's ``-trace_counts`` file (written every second)."""
        files = sorted(self.dir.glob("*_counts.csv"))
        if not files:
            return {}
        lines = [ln for ln in files[-1].read_text(errors="replace").splitlines() if ln.strip()]
        if len(lines) < 2:
            return {}
        head, last = lines[0].split(";"), lines[-1].split(";")
        return {k: int(v) for k, v in zip(head, last, strict=False) if v.isdigit()}

    def registered(self) -> int:
        return next((v for k, v in self._counts().items() if k.endswith("_200_Recv")), 0)

    def failed(self) -> int:
        return sum(v for k, v in self._counts().items()
                   if k.endswith(("_200_Timeout", "_200_Unexp")))

    @property
    def alive(self) -> bool:
        return self.process.alive

    def stop(self) -> None:
        self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.proc.wait(5)


# --- the lab --------------------------------------------------------------------------------

@dataclass
class Lab:
    """Build the topology on ``__enter__``, remove every trace of it on ``__exit__``.

    ``udp_timeout`` is the router's UDP conntrack timeout in seconds (both the unreplied and
    the replied/"stream" value): a pinhole nobody refreshes for that long closes. ``vip_on``
    is the host that gets the VIP at start (None: nobody). ``workdir`` holds logs, FIFOs and
    captures; a temporary directory (removed afterwards) when not given.
    """

    workdir: Path | None = None
    udp_timeout: int = 30
    vip_on: str | None = "a"
    prefix: str = NS_PREFIX
    _tag: str = field(init=False)
    _own_workdir: bool = field(init=False, default=False)
    _procs: list[LabProcess] = field(init=False, default_factory=list)
    _captures: list[Capture] = field(init=False, default_factory=list)
    _created: list[str] = field(init=False, default_factory=list)
    kamailio: dict[str, LabKamailio] = field(init=False, default_factory=dict)
    timings: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._tag = f"{self.prefix}{os.getpid()}x{secrets.token_hex(3)}"

    # --- names and addresses ------------------------------------------------------------

    def ns(self, where: str) -> str:
        """The namespace for a host ("a", "b") or role ("core", "nat", "phones", "scA", ...);
        full namespace names pass through."""
        if where.startswith(self._tag + "-"):
            return where
        try:
            return f"{self._tag}-{_ROLES[where]}"
        except KeyError:
            raise LabError(f"no namespace {where!r} in this lab") from None

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ("core", "a", "b", "nat", "phones")]

    @staticmethod
    def host_ip(host: str) -> str:
        return _HOST_IPS[_check_host(host)]

    @staticmethod
    def host_mac(host: str) -> str:
        return _HOST_MACS[_check_host(host)]

    def host_of_mac(self, mac: str) -> str | None:
        return next((h for h, m in _HOST_MACS.items() if m == mac), None)

    def pids(self, where: str) -> set[int]:
        """Every process in ``where``'s namespace, the lab's or not."""
        return pids_in(self.ns(where))

    def exec_prefix(self, where: str) -> list[str]:
        """argv prefix that runs a command inside ``where``'s namespace."""
        return ["ip", "netns", "exec", self.ns(where)]

    # --- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> Lab:
        reason = unavailable_reason()
        if reason:
            raise LabError(reason)
        start = time.monotonic()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="usl-lab-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
            if self.vip_on is not None:
                self.add_vip(self.vip_on)
        except BaseException:
            self.down()
            raise
        self.timings["up_s"] = time.monotonic() - start
        return self

    def _build(self) -> None:
        names = self.namespaces
        core, a, b, nat, phones = names
        self._created = list(names)
        self._ip_batch(None, [f"netns add {n}" for n in names])
        self._ip_batch(None, [
            f"link add name port-a netns {core} type veth peer name eth0 netns {a}",
            f"link add name port-b netns {core} type veth peer name eth0 netns {b}",
            f"link add name port-nat netns {core} type veth peer name pub netns {nat}",
            f"link add name priv netns {nat} type veth peer name eth0 netns {phones}",
        ])
        for n in names:  # IPv6 off: no DAD or router solicitations in the captures
            self.run(n, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                         "net.ipv6.conf.default.disable_ipv6=1"])
        self._ip_batch(core, [
            "link set dev lo up", "link add name br0 type bridge stp_state 0",
            "link set dev br0 up",
            *[f"link set dev {p} master br0" for p in ("port-a", "port-b", "port-nat")],
            *[f"link set dev {p} up" for p in ("port-a", "port-b", "port-nat")],
        ])
        for host in HOST_NAMES:
            self._ip_batch(self.ns(host), [
                "link set dev lo up", f"link set dev eth0 address {_HOST_MACS[host]}",
                "link set dev eth0 up",
                f"addr add {_HOST_IPS[host]}/{LAN_NET.prefixlen} dev eth0",
            ])
        self._ip_batch(nat, [
            "link set dev lo up", f"link set dev pub address {NAT_PUBLIC_MAC}",
            "link set dev pub up", "link set dev priv up",
            f"addr add {NAT_PUBLIC_IP}/{LAN_NET.prefixlen} dev pub",
            f"addr add {NAT_PRIVATE_IP}/{PHONE_NET.prefixlen} dev priv",
        ])
        self._ip_batch(phones, [
            "link set dev lo up", "link set dev eth0 up",
            f"addr add {PHONE_IP}/{PHONE_NET.prefixlen} dev eth0",
            f"route add default via {NAT_PRIVATE_IP}",
        ])
        # A socket, so a pinhole, per phone: give SIPp the widest port range there is.
        self.run(phones, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])
        self.run(nat, ["nft", "-f", "-"], input=self._nat_ruleset())
        self.run(nat, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.set_udp_timeout(self.udp_timeout)

    def set_udp_timeout(self, seconds: int) -> None:
        """Set the NAT's UDP conntrack timeouts (unreplied and replied alike). A pinhole takes
        the new value when it is next opened or refreshed by a packet."""
        if seconds < 1:
            raise LabError("udp_timeout must be at least 1 s")
        self.run("nat", ["sysctl", "-q", "-w",
                         f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                         f"net.netfilter.nf_conntrack_udp_timeout_stream={seconds}"])
        self.udp_timeout = seconds

    def _nat_ruleset(self) -> str:
        """Masquerade the phone LAN; let in from the server LAN only what conntrack knows."""
        count_drop = f'counter name "{UNSOLICITED_COUNTER}" drop'
        return f"""
table ip {NFT_TABLE} {{
    counter {UNSOLICITED_COUNTER} {{ }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pub" ip saddr {PHONE_NET} masquerade random
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "pub" ct state established,related accept
        iifname "pub" {count_drop}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "priv" oifname "pub" accept
        iifname "pub" oifname "priv" ct state established,related accept
        iifname "pub" {count_drop}
    }}
}}
"""

    def down(self) -> None:
        """Kill every process in the lab, delete its namespaces; never raises for leftovers
        that are already gone, raises LabError if a namespace could not be removed."""
        start = time.monotonic()
        for cap in self._captures:
            with contextlib.suppress(Exception):
                cap.stop()
        for proc in self._procs:
            proc.kill()
        existing = set(list_namespaces())
        for n in self._created:
            if n in existing:
                _kill_pids_in(n)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(5)
        leftover = [n for n in self._created if n in existing]
        if leftover:
            self._ip_batch(None, [f"netns del {n}" for n in leftover], check=False)
        still = [n for n in self._created if n in set(list_namespaces())]
        self._created = []
        self._procs = []
        self._captures = []
        self.kamailio = {}
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["down_s"] = time.monotonic() - start
        if still:
            raise LabError(f"namespaces left behind: {still}")

    # --- running things -----------------------------------------------------------------

    def _ip_batch(self, ns: str | None, lines: Sequence[str], check: bool = True) -> None:
        argv = ["ip", "-batch", "-"] if ns is None else ["ip", "-n", ns, "-batch", "-"]
        result = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                                text=True, timeout=30)
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed: {result.stderr.strip()}\n"
                           + "\n".join(lines))

    def run(self, where: str, argv: Sequence[str], *, check: bool = True,
            timeout: float = 30.0, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``where``; LabError if it fails and ``check``."""
        cmd = [*self.exec_prefix(where), *argv]
        try:
            result = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{' '.join(cmd)} timed out after {timeout} s") from e
        if check and result.returncode != 0:
            raise LabError(f"{' '.join(cmd)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def popen(self, where: str, argv: Sequence[str], *, name: str | None = None,
              owner: str | None = "", log_path: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              stdout: Any = None, stderr: Any = None) -> LabProcess:
        """Start ``argv`` inside ``where`` in its own process group, tracked by the lab.

        ``owner`` is the host whose :meth:`kill` ends it (default: ``where`` if it is a host).
        Output goes to ``log_path`` (or the given ``stdout``/``stderr``).
        """
        if owner == "":
            owner = where if where in HOST_NAMES else None
        log = None
        if log_path is not None and stdout is None:
            log = open(log_path, "ab")  # noqa: SIM115 - handed to the child process
            stdout, stderr = log, subprocess.STDOUT
        try:
            proc = subprocess.Popen([*self.exec_prefix(where), *argv], stdin=subprocess.DEVNULL,
                                    stdout=stdout if stdout is not None else subprocess.DEVNULL,
                                    stderr=stderr if stderr is not None else subprocess.DEVNULL,
                                    env=env, cwd=cwd, start_new_session=True)
        finally:
            if log is not None:
                log.close()
        handle = LabProcess(name or Path(argv[0]).name, self.ns(where), owner, proc, log_path)
        self._procs.append(handle)
        return handle

    def kill(self, host: str, *, timeout: float = 5.0) -> list[str]:
        """kill -9 everything running on ``host``: the lab's processes owned by it and any
        other process in its namespace (forks, hooks), except the lab's own captures.
        Returns when they are all gone, with the names of the lab processes killed."""
        ns = self.ns(_check_host(host))
        captures = {c._process.proc.pid for c in self._captures if c._process is not None}
        killed = []
        for proc in self._procs:
            if proc.owner == host and proc.alive:
                proc.kill()
                killed.append(proc.name)
        deadline = time.monotonic() + timeout
        while True:
            _kill_pids_in(ns, spare=captures)
            for proc in self._procs:
                if proc.proc.pid not in captures:
                    proc.proc.poll()  # reap our own children so they leave the namespace
            if not pids_in(ns) - captures:
                return killed
            if time.monotonic() > deadline:
                raise LabError(f"processes on {host} survive kill -9: {pids_in(ns) - captures}")
            time.sleep(POLL_S)

    def set_link(self, host: str, up: bool) -> None:
        """Unplug (``up=False``) or replug ``host``'s LAN cable: unlike :meth:`kill`, the
        host disappears from the network the way a dead machine does, VIP and all (its
        addresses stay configured, so replugging a host that still holds the VIP makes a
        duplicate until one side removes it)."""
        self._ip_batch(self.ns(_check_host(host)),
                       [f"link set dev eth0 {'up' if up else 'down'}"])

    # --- sockets and HTTP into a namespace ---------------------------------------------------

    def udp_socket(self, where: str, bind: tuple[str, int] | None = None, *,
                   freebind: bool = False, reuse: bool = False) -> socket.socket:
        """A UDP socket in ``where``; ``freebind`` binds to an address the host does not have
        (IP_FREEBIND), ``reuse`` shares a port another socket holds (SO_REUSEADDR on both)."""
        sock = ns_socket(self.ns(where))
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if freebind:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            if bind is not None:
                sock.bind(bind)
        except BaseException:
            sock.close()
            raise
        return sock

    def tcp_connect(self, where: str, addr: tuple[str, int],
                    timeout: float = 5.0) -> socket.socket:
        sock = ns_socket(self.ns(where), kind=socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def http_json(self, where: str, host: str, port: int, path: str, payload: Any = None,
                  *, method: str | None = None, headers: dict[str, str] | None = None,
                  timeout: float = 5.0) -> tuple[int, Any]:
        """One HTTP request to ``host:port`` as seen from inside ``where`` (e.g. a sidecar's
        admin API on 127.0.0.1 in its namespace). Returns (status, decoded JSON or text)."""
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = self.tcp_connect(where, (host, port), timeout)
        try:
            body = None if payload is None else json.dumps(payload).encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method or ("GET" if body is None else "POST"), path, body, hdrs)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")

    def wait_http(self, where: str, port: int, path: str = "/health", *,
                  host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        """Poll until ``GET path`` answers 200 inside ``where`` (a process's readiness)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                status, last = self.http_json(where, host, port, path, timeout=1.0)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException) as e:
                last = e
            time.sleep(0.05)
        raise LabError(f"http://{host}:{port}{path} in {where} not ready in {timeout} s: "
                       f"{last!r:.300}")

    # --- the VIP ------------------------------------------------------------------------------

    def vip_holder(self) -> str | None:
        """The host that has the VIP on its interface now (None: nobody)."""
        for host in HOST_NAMES:
            out = self.run(host, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
            if f" {VIP}/" in out:
                return host
        return None

    def add_vip(self, host: str) -> None:
        self._ip_batch(self.ns(_check_host(host)), [f"addr replace {VIP}/32 dev eth0"])
        self.send_garp(host)

    def remove_vip(self, host: str) -> None:
        self._ip_batch(self.ns(_check_host(host)), [f"addr del {VIP}/32 dev eth0"], check=False)

    def send_garp(self, host: str) -> None:
        """Gratuitous ARP for the VIP from ``host`` (request and reply forms)."""
        sock = ns_socket(self.ns(_check_host(host)), socket.AF_PACKET, socket.SOCK_RAW)
        with sock:
            sock.bind(("eth0", 0))
            for reply in (False, True):
                sock.send(gratuitous_arp(_HOST_MACS[host], VIP, reply=reply))

    def router_vip_mac(self) -> str | None:
        """The MAC the router would send VIP-bound packets to now (None: not resolved)."""
        out = self.run("nat", ["ip", "-4", "neigh", "show", VIP, "dev", "pub"]).stdout
        m = re.search(r"lladdr (\S+)", out)
        return m.group(1).lower() if m and "FAILED" not in out else None

    def move_vip(self, to_host: str, *, timeout: float = 5.0) -> float:
        """Take the VIP from the other host, put it on ``to_host`` and announce it until the
        router's ARP entry points at ``to_host`` (or it has none, and will ask). Gratuitous ARP
        is resent every 0.2 s: the kernel ignores an update within ``locktime`` (1 s) of the
        previous one. Returns the seconds it took."""
        start = time.monotonic()
        _check_host(to_host)
        for other in HOST_NAMES:
            if other != to_host:
                self.remove_vip(other)
        self.add_vip(to_host)
        want = _HOST_MACS[to_host]
        deadline = start + timeout
        next_garp = time.monotonic() + 0.2
        while True:
            mac = self.router_vip_mac()
            if mac is None or mac == want:
                break
            if time.monotonic() > deadline:
                raise LabError(f"router still sends VIP traffic to {mac}, not {to_host} ({want})")
            if time.monotonic() >= next_garp:
                self.send_garp(to_host)
                next_garp = time.monotonic() + 0.2
            time.sleep(POLL_S)
        elapsed = time.monotonic() - start
        self.timings["move_vip_s"] = elapsed
        return elapsed

    # --- the NAT ------------------------------------------------------------------------------

    def pinholes(self) -> list[Pinhole]:
        """The router's UDP conntrack entries opened from the phone LAN."""
        text = self.run("nat", ["cat", "/proc/net/nf_conntrack"]).stdout
        return [p for p in parse_conntrack(text)
                if ipaddress.ip_address(p.private[0]) in PHONE_NET]

    def pinhole(self, public_port: int) -> Pinhole | None:
        return next((p for p in self.pinholes() if p.public[1] == public_port), None)

    def unsolicited_drops(self) -> int:
        """Packets from the server LAN that the NAT dropped because no pinhole matched."""
        out = self.run("nat", ["nft", "-j", "list", "counter", "ip", NFT_TABLE,
                               UNSOLICITED_COUNTER]).stdout
        for item in json.loads(out).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"counter {UNSOLICITED_COUNTER} not found: {out[:200]}")

    def partition(self, a: str = "a", b: str = "b", *, tcp_ports: Sequence[int] = ()) -> None:
        """Cut the link between the two hosts' own addresses: each drops what arrives from
        the other (only TCP to or from ``tcp_ports`` when given, e.g. the replication ports).
        Packets still leave the sender, as over a broken link; dropping them on output
        instead would fail the sender's send() with EPERM, which no real partition does.
        VIP and phone traffic is untouched. :meth:`heal` undoes it."""
        ports = ", ".join(str(p) for p in tcp_ports)
        matches = [f"tcp dport {{ {ports} }}", f"tcp sport {{ {ports} }}"] if ports else [""]
        for me, peer in ((a, b), (b, a)):
            peer_ip = self.host_ip(peer)
            inbound = "\n        ".join(f"ip saddr {peer_ip} {m} drop" for m in matches)
            self.run(me, ["nft", "-f", "-"], input=f"""
table ip {PARTITION_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        {inbound}
    }}
}}
""")

    def heal(self) -> None:
        for host in HOST_NAMES:
            self.run(host, ["nft", "delete", "table", "ip", PARTITION_TABLE], check=False)

    # --- capture ------------------------------------------------------------------------------

    def capture(self, where: str = "core", iface: str = "port-nat", bpf: str = "udp",
                *, snaplen: int = 2048, timeout: float = 10.0) -> Capture:
        """Start capturing (tcpdump) on ``iface`` in ``where``; the default, the router's
        bridge port, sees every packet between the proxy hosts and the NAT, with the real
        sender's MAC (see :func:`count_by_source`). Stop it with ``with`` or ``.stop()``."""
        assert self.workdir is not None
        path = self.workdir / f"cap-{where}-{iface}-{secrets.token_hex(3)}.pcap"
        return Capture(self, self.ns(where), iface, bpf, path, snaplen).start(timeout)

    # --- Kamailio and SIPp ------------------------------------------------------------------

    def start_kamailio(self, host: str, *, sip_port: int = SIP_PORT, rpc_port: int = RPC_PORT,
                       natping_interval: int = 20, natping_on: bool = False,
                       hep_uri: str | None = None, workers: int = 2, debug_level: int = 2,
                       pkg_mb: int = 16, shm_mb: int = 64, extra_defines: Sequence[str] = (),
                       timeout: float = 20.0) -> LabKamailio:
        """Start Kamailio on ``host``: SIP on VIP:``sip_port`` (free bind) and on the host's
        own address, RPC on 127.0.0.1:``rpc_port`` inside the host namespace. Returns when it
        answers JSON-RPC. ``hep_uri`` (e.g. ``"sip:127.0.0.1:9060"``) turns HEP on."""
        reason = tool_missing("kamailio")
        if reason:
            raise LabError(reason)
        _check_host(host)
        old = self.kamailio.get(host)
        if old is not None and old.alive:
            raise LabError(f"kamailio already runs on {host}")
        assert self.workdir is not None
        kdir = self.workdir / f"kam-{host}"
        for d in (kdir, kdir / "run", kdir / "r"):
            d.mkdir(parents=True, exist_ok=True)
        (kdir / "run" / "kamailio_rpc.fifo").unlink(missing_ok=True)
        kam = LabKamailio(self, host, kdir, sip_port, rpc_port)
        defines = [f"LISTEN_IP={VIP}", f"SIP_PORT={sip_port}", "WITH_FREE_BIND",
                   "RPC_IP=127.0.0.1", f"RPC_PORT={rpc_port}",
                   f'FIFO_REPLY_DIR="{kam.reply_dir}/"',
                   f"NATPING_INTERVAL={natping_interval}", f"DEBUG_LEVEL={max(1, debug_level)}"]
        if natping_on:
            defines.append("WITH_NATPING_ON")
        if hep_uri:
            defines += ["WITH_HEP", f'HEP_URI="{hep_uri}"']
        defines += extra_defines
        argv = [KAMAILIO_BIN, "-f", str(KAMAILIO_CFG), "-DD", "-E", "-n", str(workers),
                "-Y", str(kdir / "run"), "-P", str(kdir / "run" / "kamailio.pid"),
                "-w", str(kdir), "-M", str(pkg_mb), "-m", str(shm_mb),
                "-l", f"udp:{self.host_ip(host)}:{sip_port}"]
        for d in defines:
            argv += ["-A", d]
        log_path = kdir / "kamailio.log"
        log_path.write_bytes(b"")
        kam.process = self.popen(host, argv, name="kamailio", log_path=log_path, cwd=kdir)
        self.kamailio[host] = kam
        deadline = time.monotonic() + timeout
        while True:
            if not kam.alive:
                raise LabError(f"kamailio on {host} exited:\n{kam.log_text()[-3000:]}")
            if KAMAILIO_READY_MARK in kam.log_text() and kam.fifo_path.exists():
                with contextlib.suppress(OSError, LabError, http.client.HTTPException):
                    kam.rpc("core.version", timeout=1.0)
                    return kam
            if time.monotonic() > deadline:
                kam.stop()
                raise LabError(f"kamailio on {host} not ready in {timeout} s:\n"
                               f"{kam.log_text()[-3000:]}")
            time.sleep(POLL_S)

    def _sipp_argv(self, names: Sequence[str], *, expires: int, local_port: int | None,
                   rate: int, target: tuple[str, int], timeout: float,
                   hold_ms: int | None) -> tuple[list[str], Path]:
        reason = tool_missing("sipp")
        if reason:
            raise LabError(reason)
        if not names:
            raise LabError("no users to register")
        assert self.workdir is not None
        sdir = self.workdir / f"sipp-{secrets.token_hex(3)}"
        sdir.mkdir()
        scenario = sdir / "register.xml"
        scenario.write_text(register_scenario(hold_ms))
        inf = sdir / "users.csv"
        inf.write_text("SEQUENTIAL\n" + "".join(f"{u};\n" for u in names))
        concurrent = len(names) if hold_ms else max(1, min(len(names), rate))
        max_socket = min(60000, len(names) + 100)
        ensure_open_files(max_socket + 1000)
        argv = ["sipp", f"{target[0]}:{target[1]}", "-sf", str(scenario), "-inf", str(inf),
                "-i", PHONE_IP, "-m", str(len(names)), "-r", str(rate), "-l", str(concurrent),
                "-key", "expires", str(expires), "-nostdin",
                "-max_socket", str(max_socket)]
        argv += ["-t", "u1", "-p", str(local_port)] if local_port else ["-t", "un"]
        if hold_ms:
            argv += ["-aa", "-trace_counts", "-fd", "1"]
        else:
            argv += ["-timeout", f"{max(1, int(timeout))}s", "-timeout_error"]
        return argv, sdir

    @staticmethod
    def _names(users: int | Sequence[str]) -> list[str]:
        return [f"phone{i}" for i in range(users)] if isinstance(users, int) else list(users)

    def sipp_register(self, users: int | Sequence[str] = 1, *, expires: int = 600,
                      local_port: int | None = None, rate: int = 500,
                      target: tuple[str, int] = (VIP, SIP_PORT),
                      timeout: float = 30.0) -> Registration:
        """Register phones with SIPp from the phones namespace through the NAT to ``target``
        and return when all got their 200 OK (LabError with SIPp's output otherwise).

        ``users`` is a count (users ``phone0``, ``phone1``...) or a list of names. With
        ``local_port`` every REGISTER comes from that one port (one pinhole, like one phone
        with many lines); without it SIPp uses a socket, so a pinhole, per user. SIPp exits
        afterwards: nothing answers the proxy's keepalives (see :meth:`start_phones`).
        """
        names = self._names(users)
        argv, sdir = self._sipp_argv(names, expires=expires, local_port=local_port, rate=rate,
                                     target=target, timeout=timeout, hold_ms=None)
        start = time.monotonic()
        try:
            result = subprocess.run([*self.exec_prefix("phones"), *argv], cwd=sdir,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=timeout + 10)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"sipp REGISTER of {len(names)} users hung") from e
        elapsed = time.monotonic() - start
        output = result.stdout[-3000:] + result.stderr[-2000:]
        if result.returncode != 0:
            raise LabError(f"sipp REGISTER of {len(names)} users failed "
                           f"({result.returncode}):\n{output}")
        return Registration(tuple(names), PHONE_IP, local_port, elapsed, output)

    def start_phones(self, users: int | Sequence[str] = 1, *, expires: int = 3600,
                     local_port: int | None = None, rate: int = 500,
                     target: tuple[str, int] = (VIP, SIP_PORT), hold_s: float = 86400.0,
                     timeout: float = 30.0) -> Phones:
        """Phones that stay: SIPp registers ``users`` (as :meth:`sipp_register`) and then
        keeps running for ``hold_s``, answering every OPTIONS keepalive with 200 OK (``-aa``)
        on the socket it registered from. Returns once all are registered. Stop it with
        ``.stop()``; :meth:`down` kills it too."""
        names = self._names(users)
        argv, sdir = self._sipp_argv(names, expires=expires, local_port=local_port, rate=rate,
                                     target=target, timeout=timeout,
                                     hold_ms=max(1, int(hold_s * 1000)))
        start = time.monotonic()
        proc = self.popen("phones", argv, name="sipp-phones", owner=None, cwd=sdir,
                          log_path=sdir / "sipp.log")
        phones = Phones(tuple(names), local_port, proc, sdir)
        deadline = start + timeout
        while (done := phones.registered()) < len(names):
            failed = phones.failed()
            if failed or not proc.alive or time.monotonic() > deadline:
                phones.stop()
                raise LabError(f"{done}/{len(names)} phones registered, {failed} failed:\n"
                               f"{proc.log_text()[-3000:]}")
            time.sleep(0.1)
        phones.elapsed_s = time.monotonic() - start
        return phones


# --- helpers ---------------------------------------------------------------------------------

def _check_host(host: str) -> str:
    if host not in HOST_NAMES:
        raise LabError(f"unknown host {host!r} (hosts: {', '.join(HOST_NAMES)})")
    return host


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def pids_in(ns: str) -> set[int]:
    """Processes in namespace ``ns`` (``ip netns pids``, run from outside it)."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                            timeout=10)
    return {int(w) for w in result.stdout.split() if w.isdigit()}


def _kill_pids_in(ns: str, spare: frozenset[int] | set[int] = frozenset()) -> None:
    for pid in pids_in(ns) - set(spare) - {os.getpid()}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stale_namespaces() -> list[str]:
    """Lab namespaces whose creating process is gone (left by a run that was killed)."""
    out = []
    for name in list_namespaces():
        m = _NS_NAME.match(name)
        if m and not _process_alive(int(m.group(1))):
            out.append(name)
    return out


def _process_alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a killed creator may not be reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def remove_stale() -> list[str]:
    """Kill the processes in stale lab namespaces and delete them; returns their names."""
    names = stale_namespaces()
    for name in names:
        _kill_pids_in(name)
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return names
