"""An active/standby pair in the network-namespace lab: Kamailio and a `sidecar run` on each
proxy host, the VIP moved by the sidecars' role arbiter, and captures read as "who pinged whom".

:class:`LabPair` is what the failover tests and ``python -m benchmarks failover`` drive. It
configures the two sidecars the way a user would (docs/sidecar.example.toml): replication over
the hosts' own addresses, the admin API on 127.0.0.1 inside each host's namespace, ``[role]``
with the lab's VIP on ``eth0``, ``[proxy]`` warm-loading the local Kamailio over JSON-RPC,
``[keepalive]`` in proxy or sidecar mode and a HEP (or ``ul.dump`` reconcile) source. The lab
starts with nobody holding the VIP: the primary's sidecar takes it, exactly as in production.

Killing a host here means killing a machine: its cable is unplugged and every process in its
namespace gets SIGKILL. Killing only the processes would leave the VIP configured on a live
kernel that keeps answering ARP for it, and the standby's VIP action rightly refuses to take
an address that is in use (see :meth:`LabPair.kill`). A restarted host has forgotten the VIP,
like a rebooted one.

The VIP moves with the role either through the built-in ``[role] vip`` action or, with
``PairSettings(vip_action="hooks")``, through ``before_failover`` / ``on_demote`` hooks that run
the VIP CLI (``python -m sidecar.role.vip``): same ARP probe, same gratuitous ARP, in a
separate process. The lab tests use the hooks while the built-in action fails inside the
daemon (tests/test_failover_lab.py says why).

The second half is sans-I/O: it turns captured packets into keepalives towards the NAT and
into per-sender *spans* (runs of pinging by one host), the evidence for "never two nodes
pinging at the same time" (:func:`overlapping_spans`).
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .netns import (
    HOST_NAMES,
    NAT_PUBLIC_IP,
    RPC_PORT,
    VIP,
    Lab,
    LabError,
    LabKamailio,
    LabProcess,
    Packet,
)
from .nodes import MiError, wait_until

ADMIN_PORT = 8899
PUB_PORT = 7701
SYNC_PORT = 7702
REPLICATION_PORTS = (PUB_PORT, SYNC_PORT)
HEP_PORT = 9060
NODE_IDS = {"a": 1, "b": 2}
VIP_CIDR = f"{VIP}/32"  # what Lab.add_vip puts on a host: the sidecar must use the same
VIP_INTERFACE = "eth0"
VIP_ACQUIRE_TRIES = 4
KEEPALIVE_PREFIXES = (b"OPTIONS ", b"\r\n", b"\x00\x00\x00\x00")


def peer_of(host: str) -> str:
    return "b" if host == "a" else "a"


@dataclass(frozen=True)
class PairSettings:
    """How the pair is configured; defaults keep the tests fast (short waits and intervals).

    ``keepalive``: ``"proxy"`` (Kamailio's nathelper pinger, switched by the sidecar) or
    ``"sidecar"`` (the active sidecar pings from VIP:5060). ``ping_interval_s`` is Kamailio's
    ``natping_interval`` in proxy mode (whole seconds) and ``[keepalive] interval_s`` in
    sidecar mode; Kamailio always gets a natping_interval > 0, else its pinger cannot be
    switched on at all. ``keepalive_kind``: options | crlf | null (sidecar mode).
    ``source``: ``"hep"`` (siptrace mirror) or ``"kamailio"`` (ul.dump reconcile).
    ``vip_action``: ``"builtin"`` (``[role] vip``) or ``"hooks"`` (:func:`vip_hook`).
    """

    keepalive: str = "proxy"
    wait_s: float = 1.0
    startup_wait_s: float = 1.0
    heartbeat_ms: int = 100
    heartbeat_max_age_s: float = 0.5
    peer_timeout_s: float = 1.0
    backoff_initial_s: float = 2.0
    ping_interval_s: float = 1.0
    reassert_s: float = 1.0
    sweep_rate: float = 100_000.0
    keepalive_kind: str = "options"
    source: str = "hep"
    reconcile_interval_s: float = 1.0
    load: str = "warm"
    load_interval_s: float = 0.5
    load_rate: float = 50_000.0
    proxy_timeout_s: float = 30.0
    kamailio_workers: int = 2
    kamailio_shm_mb: int = 64
    kamailio_pkg_mb: int = 16
    log_level: str = "info"
    vip_action: str = "builtin"
    extra_toml: str = ""

    def __post_init__(self) -> None:
        if self.keepalive not in ("proxy", "sidecar"):
            raise ValueError(f"keepalive must be proxy or sidecar, not {self.keepalive!r}")
        if self.source not in ("hep", "kamailio"):
            raise ValueError(f"source must be hep or kamailio, not {self.source!r}")
        if self.vip_action not in ("builtin", "hooks"):
            raise ValueError(f"vip_action must be builtin or hooks, not {self.vip_action!r}")


def vip_hook(action: str, tries: int = VIP_ACQUIRE_TRIES) -> str | list[str]:
    """A hook command moving the VIP with the VIP CLI (``python -m sidecar.role.vip``).
    ``release`` removes it. ``acquire`` probes with ARP, adds it and sends gratuitous ARP;
    while another host answers for the VIP it exits 1, and after ``tries`` attempts 0.2 s
    apart that failure aborts the failover.

    Why several tries: a hook runs *after* the demoting peer has announced "yielding", so the
    peer's ``on_demote`` release may still be under way when our probe goes out (the built-in
    action releases before announcing). A host that really holds the VIP keeps answering and
    the failover still fails, about a second later."""
    argv = [sys.executable, "-m", "sidecar.role.vip", action, "--iface", VIP_INTERFACE,
            "--vip", VIP_CIDR]
    if action != "acquire" or tries <= 1:
        return argv
    once = shlex.join(argv)
    return (f"for try in $(seq {tries}); do {once} && exit 0; sleep 0.2; done; "
            f"echo 'VIP still taken after {tries} tries' >&2; exit 1")


def _toml_hook(cmd: str | Sequence[str]) -> str:
    """One hook command as a TOML value: a shell string stays a string; an argv goes inside
    a list (the hook runner reads a flat list of strings as a single argv)."""
    if isinstance(cmd, str):
        return json.dumps(cmd)
    return "[[" + ", ".join(json.dumps(a) for a in cmd) + "]]"


def sidecar_config(host: str, settings: PairSettings, state_dir: Path) -> str:
    """The TOML of the sidecar on ``host`` (validated by the daemon at start)."""
    me, peer = NODE_IDS[host], NODE_IDS[peer_of(host)]
    ip, peer_ip = Lab.host_ip(host), Lab.host_ip(peer_of(host))
    s = settings
    rpc_url = f"http://127.0.0.1:{RPC_PORT}/RPC"
    if s.vip_action == "builtin":
        vip = f'vip = "{VIP_CIDR}"\nvip_interface = "{VIP_INTERFACE}"\n'
    else:
        vip = (f"[role.hooks]\nbefore_failover = {_toml_hook(vip_hook('acquire'))}\n"
               f"on_demote = {_toml_hook(vip_hook('release'))}\n")
    text = f"""[node]
id = {me}
name = "sc-{host}"
state_dir = "{state_dir}"

[replication]
pub = "tcp://{ip}:{PUB_PORT}"
sync = "tcp://{ip}:{SYNC_PORT}"
heartbeat_ms = {s.heartbeat_ms}
sync_timeout_s = 2

[[peers]]
id = {peer}
pub = "tcp://{peer_ip}:{PUB_PORT}"
sync = "tcp://{peer_ip}:{SYNC_PORT}"

[admin]
listen = "127.0.0.1:{ADMIN_PORT}"

[log]
level = "{s.log_level}"

[role]
primary = {"true" if host == "a" else "false"}
wait_s = {s.wait_s}
startup_wait_s = {s.startup_wait_s}
peer_timeout_s = {s.peer_timeout_s}
heartbeat_max_age_s = {s.heartbeat_max_age_s}
backoff_initial_s = {s.backoff_initial_s}
{vip}
[proxy]
type = "kamailio"
rpc_url = "{rpc_url}"
load = "{s.load}"
load_interval_s = {s.load_interval_s}
load_rate = {s.load_rate}
timeout_s = {s.proxy_timeout_s}

[keepalive]
mode = "{s.keepalive}"
reassert_s = {s.reassert_s}
interval_s = {max(0.5, s.ping_interval_s)}
kind = "{s.keepalive_kind}"
sweep_rate = {s.sweep_rate}
"""
    if s.source == "hep":
        text += f"""
[[sources]]
type = "hep"
listen = "127.0.0.1:{HEP_PORT}"
transports = ["udp"]
"""
    else:
        text += f"""
[[sources]]
type = "kamailio"
rpc_url = "{rpc_url}"
reconcile_interval_s = {s.reconcile_interval_s}
timeout_s = {s.proxy_timeout_s}
"""
    return text + s.extra_toml


def _settled(active: dict, passive: dict) -> bool:
    return (active["state"] == "active" and not active["failover_pending"]
            and passive["state"] == "passive"
            and passive["peer_state"]["role"] == "active"
            and active["peer_state"]["role"] in ("passive", "yielding"))


@dataclass
class LabPair:
    """Two proxy hosts of ``lab``, each with Kamailio and a sidecar. ``start()`` brings them up
    and returns once A is active (holding the VIP) and B passive."""

    lab: Lab
    settings: PairSettings = field(default_factory=PairSettings)
    sidecars: dict[str, LabProcess] = field(default_factory=dict)

    # --- paths and configuration -----------------------------------------------------------

    def dir(self, host: str) -> Path:
        assert self.lab.workdir is not None
        d = self.lab.workdir / f"sidecar-{host}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def config_path(self, host: str) -> Path:
        return self.dir(host) / "sidecar.toml"

    def log_path(self, host: str) -> Path:
        return self.dir(host) / "sidecar.log"

    def log_text(self, host: str) -> str:
        try:
            return self.log_path(host).read_text(errors="replace")
        except OSError:
            return ""

    def kamailio(self, host: str) -> LabKamailio:
        return self.lab.kamailio[host]

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> LabPair:
        for host in HOST_NAMES:
            self.start_kamailio(host)
        for host in HOST_NAMES:
            self.start_sidecar(host)
        self.wait_settled("a", timeout)
        return self

    def start_kamailio(self, host: str) -> LabKamailio:
        s = self.settings
        return self.lab.start_kamailio(
            host, natping_interval=max(1, round(s.ping_interval_s)), natping_on=False,
            hep_uri=f"sip:127.0.0.1:{HEP_PORT}" if s.source == "hep" else None,
            workers=s.kamailio_workers, shm_mb=s.kamailio_shm_mb, pkg_mb=s.kamailio_pkg_mb)

    def start_sidecar(self, host: str, timeout: float = 20.0) -> LabProcess:
        old = self.sidecars.get(host)
        if old is not None and old.alive:
            raise LabError(f"the sidecar on {host} is already running")
        path = self.config_path(host)
        state = self.dir(host) / "state"
        state.mkdir(exist_ok=True)
        path.write_text(sidecar_config(host, self.settings, state))
        proc = self.lab.popen(host, [sys.executable, "-m", "sidecar", "run", "--config",
                                     str(path)], name=f"sidecar-{host}",
                              log_path=self.log_path(host),
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.sidecars[host] = proc
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive:
                raise LabError(f"sidecar on {host} exited:\n{self.log_text(host)[-3000:]}")
            try:
                status, _ = self.lab.http_json(host, "127.0.0.1", ADMIN_PORT, "/health",
                                               timeout=1.0)
                if status == 200:
                    return proc
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise LabError(f"sidecar on {host} not ready in {timeout} s:\n"
                               f"{self.log_text(host)[-3000:]}")
            time.sleep(0.05)

    def kill(self, host: str, *, unplug: bool = True) -> float:
        """The machine dies: cable out (``unplug``), then kill -9 of Kamailio, the sidecar and
        everything else in its namespace. With ``unplug=False`` only the processes die; the
        host keeps the VIP on its interface and keeps answering ARP for it.

        Returns the wall-clock time (comparable with capture timestamps) at which the host
        went silent: when the cable was out, else when the kill began."""
        if unplug:
            self.lab.set_link(host, False)
        died = time.time()
        self.lab.kill(host)
        return died

    def restart(self, host: str, timeout: float = 20.0) -> None:
        """The machine comes back: without the VIP (a reboot forgets it), cable in, then
        Kamailio and the sidecar with the same configuration and state directory."""
        self.lab.remove_vip(host)
        self.lab.set_link(host, True)
        self.start_kamailio(host)
        self.start_sidecar(host, timeout)

    # --- admin API -------------------------------------------------------------------------

    def mi(self, host: str, method: str, params: dict[str, Any] | None = None,
           timeout: float = 30.0) -> Any:
        """One JSON-RPC call to the sidecar on ``host``; :class:`MiError` on an error reply."""
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params is not None:
            body["params"] = params
        status, reply = self.lab.http_json(host, "127.0.0.1", ADMIN_PORT, "/mi", body,
                                           timeout=timeout)
        if not isinstance(reply, dict):
            raise LabError(f"sidecar {host} {method} -> HTTP {status}: {reply!r:.300}")
        if "error" in reply:
            raise MiError(reply["error"])
        return reply["result"]

    def role(self, host: str) -> dict:
        return self.mi(host, "sc_role")

    def wait_role(self, host: str, state: str, timeout: float = 15.0, *,
                  epoch_above: int | None = None) -> dict:
        """Poll until ``host`` is ``state`` with no failover in progress (and an epoch above
        ``epoch_above``); returns its sc_role."""
        def ok() -> dict | None:
            r = self.role(host)
            if r["state"] != state or r["failover_pending"]:
                return None
            if epoch_above is not None and r["epoch"] <= epoch_above:
                return None
            return r
        return wait_for(ok, timeout, f"{host} {state}"
                        + (f" above epoch {epoch_above}" if epoch_above is not None else ""))

    def wait_settled(self, active: str, timeout: float = 15.0) -> tuple[dict, dict]:
        """Poll until ``active`` is active and its peer passive, each knowing the other's role;
        returns both sc_role replies (active first)."""
        passive = peer_of(active)

        def ok() -> tuple[dict, dict] | None:
            ra, rp = self.role(active), self.role(passive)
            return (ra, rp) if _settled(ra, rp) else None
        return wait_for(ok, timeout, f"{active} active and {passive} passive")

    def proxy_contacts(self, host: str, timeout: float = 30.0) -> int:
        """Contacts in the Kamailio of ``host``: usrloc's own ``location_contacts`` counter.

        Not ``ul.dump``: at 100,000 contacts the dump is ~55 MB of JSON built in Kamailio's
        package memory, which the lab's Kamailio neither has nor should need for a count."""
        lines = self.kamailio(host).rpc("stats.get_statistics", "usrloc:", timeout=timeout)
        for line in lines if isinstance(lines, list) else []:
            name, _, value = str(line).partition(" = ")
            if name.strip() == "usrloc:location_contacts" and value.strip().isdigit():
                return int(value)
        raise LabError(f"{host}: no usrloc:location_contacts in {str(lines)[:200]}")

    def holds_vip(self, host: str) -> bool:
        """The VIP is configured on ``host``'s interface (an unplugged host may still have it:
        :meth:`Lab.vip_holder` would name it first)."""
        out = self.lab.run(host, ["ip", "-o", "-4", "addr", "show", "dev", VIP_INTERFACE]).stdout
        return f" {VIP}/" in out

    def store_contacts(self, host: str) -> int:
        return int(self.mi(host, "sc_counters")["contacts"])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """:func:`sidecar.lab.nodes.wait_until` with the description before the interval."""
    return wait_until(predicate, timeout, interval=interval, what=what)


# --- reading captures (sans-I/O) ----------------------------------------------------------

def is_keepalive(p: Packet) -> bool:
    """A NAT keepalive towards a phone's pinhole: UDP to the router's public address carrying
    an OPTIONS request, a CRLF or a 4-byte null (registrar replies are not keepalives)."""
    return (p.proto == 17 and p.dst == NAT_PUBLIC_IP
            and p.payload.startswith(KEEPALIVE_PREFIXES))


def keepalives(packets: Iterable[Packet]) -> list[Packet]:
    return [p for p in packets if is_keepalive(p)]


def ping_target(p: Packet) -> str:
    """What one keepalive was for: the Request-URI of an OPTIONS (a contact), else the
    destination port (a pinhole)."""
    if p.payload.startswith(b"OPTIONS "):
        return p.payload.split(b" ", 2)[1].decode(errors="replace")
    return f"{p.dst}:{p.dport}"


def phone_replies(packets: Iterable[Packet]) -> list[Packet]:
    """200 OKs the phones sent back through the NAT (to the VIP, hence to its holder)."""
    return [p for p in packets if p.proto == 17 and p.src == NAT_PUBLIC_IP
            and p.payload.startswith(b"SIP/2.0 200") and b"OPTIONS" in p.payload[:2048]]


class Span(NamedTuple):
    """A run of keepalives from one sender (MAC) without a pause longer than the gap."""

    mac: str
    first: float
    last: float
    count: int


def sender_spans(pings: Sequence[Packet], max_gap: float) -> list[Span]:
    """Per sender MAC, cut its keepalives into spans wherever it paused longer than
    ``max_gap`` (choose a bit more than the ping interval). Sorted by start time."""
    by_mac: dict[str, list[float]] = {}
    for p in pings:
        by_mac.setdefault(p.src_mac, []).append(p.ts)
    spans = []
    for mac, times in by_mac.items():
        times.sort()
        start = prev = times[0]
        n = 1
        for t in times[1:]:
            if t - prev > max_gap:
                spans.append(Span(mac, start, prev, n))
                start, n = t, 0
            prev = t
            n += 1
        spans.append(Span(mac, start, prev, n))
    return sorted(spans, key=lambda s: (s.first, s.mac))


def overlapping_spans(spans: Sequence[Span], tolerance: float = 0.0
                      ) -> list[tuple[Span, Span]]:
    """Pairs of spans of *different* senders that overlap in time by more than ``tolerance``
    seconds: moments when two nodes were pinging phones. A clean handover has none (the old
    active's last ping comes before the new active's first)."""
    out = []
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if b.first > a.last + tolerance:
                continue
            if a.mac != b.mac and min(a.last, b.last) - max(a.first, b.first) > tolerance:
                out.append((a, b))
    return out

