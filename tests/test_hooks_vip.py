"""Failover hooks (real subprocesses) and the VIP action (frames sans-I/O; the real thing only
inside network namespaces this file creates and deletes, never on the host's interfaces)."""

import asyncio
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import ARP, Ether

from sidecar.role.hooks import HookConfigError, HookRunner, run_command
from sidecar.role.vip import (
    Vip,
    VipConfigError,
    conflict_from,
    garp_frames,
    owners_from_ip_json,
    parse_vip,
    probe_frame,
)

ENV = {"SIDECAR_ROLE": "active", "SIDECAR_EPOCH": "7", "SIDECAR_PEER": "2",
       "SIDECAR_REASON": "operator failover to this node", "SIDECAR_NODE": "1"}


def _gone(pid: int) -> bool:
    """Dead or a zombie (a reaper may not have collected it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- hooks
async def test_hook_gets_the_arbiter_environment():
    runner = HookRunner({"after_failover": ["sh", "-c", 'echo "$SIDECAR_ROLE $SIDECAR_EPOCH '
                                            '$SIDECAR_PEER $SIDECAR_NODE $SIDECAR_STAGE '
                                            '$SIDECAR_REASON"']})
    res = await runner.run("after_failover", ENV)
    assert res.ok and len(res.results) == 1
    assert res.results[0].output.strip() == \
        "active 7 2 1 after_failover operator failover to this node"
    assert runner.status()["after_failover"]["ok"] is True


async def test_stage_without_hooks_is_ok():
    res = await HookRunner({}).run("on_demote", ENV)
    assert res.ok and res.results == ()


async def test_hook_failures_are_results_not_exceptions(tmp_path):
    runner = HookRunner({
        "before_failover": [["sh", "-c", "echo no VIP for you; exit 4"],
                            f"touch {tmp_path / 'before'}"],
        "on_demote": [["/nonexistent/hook"], "no-such-command-here",
                      f"touch {tmp_path / 'demote'}"],
    })
    before = await runner.run("before_failover", ENV)
    assert not before.ok and len(before.results) == 1  # stopped at the first failure
    assert before.results[0].returncode == 4 and "no VIP for you" in before.results[0].output
    assert "exit 4" in before.detail and not (tmp_path / "before").exists()
    demote = await runner.run("on_demote", ENV)
    assert not demote.ok and len(demote.results) == 3  # clean-up runs everything
    missing, shell_missing, touch = demote.results
    assert missing.returncode is None and "cannot run" in missing.detail
    assert shell_missing.returncode == 127
    assert touch.ok and (tmp_path / "demote").exists()


async def test_hook_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    res = await run_command(f"sleep 60 & echo $! > {pidfile}; wait", timeout=0.5)
    assert not res.ok and res.returncode is None and res.detail == "timed out after 0.5s"
    assert res.elapsed < 5
    assert _wait_gone(int(pidfile.read_text())), "the hook's child survived the timeout"


async def test_cancelled_hook_is_killed(tmp_path):
    pidfile = tmp_path / "child.pid"
    task = asyncio.create_task(run_command(f"sleep 60 & echo $! > {pidfile}; wait",
                                           timeout=60))
    deadline = time.monotonic() + 5
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _wait_gone(int(pidfile.read_text()))


async def test_hook_output_is_truncated():
    res = await run_command(["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"], timeout=10,
                            max_output=100)
    assert res.ok and res.output.startswith("x" * 100)
    assert res.output.endswith("[199900 more bytes]")


@pytest.mark.parametrize("hooks", [
    {"before_promote": "true"}, {"on_demote": ""}, {"on_demote": 5},
    {"on_demote": [["true"], 7]}, {"on_demote": [[""]]},
])
def test_hook_config_errors(hooks):
    with pytest.raises(HookConfigError):
        HookRunner(hooks)


def test_hook_command_forms():
    r = HookRunner({"before_failover": "echo one", "after_failover": ["/bin/echo", "two"],
                    "on_demote": [["/bin/echo", "a"], "echo b"]})
    assert HookRunner({"on_demote": []}).hooks == {"on_demote": ()}  # none configured
    assert r.hooks == {"before_failover": ("echo one",),
                       "after_failover": (("/bin/echo", "two"),),
                       "on_demote": (("/bin/echo", "a"), "echo b")}


# ---------------------------------------------------------------- VIP frames (sans-I/O)
MAC = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:02"
IP = "10.213.0.100"


def test_parse_vip():
    assert str(parse_vip("10.213.0.100/24")) == "10.213.0.100/24"
    assert parse_vip("10.213.0.100").network.prefixlen == 32
    for bad in ("fd00::1/64", "nonsense", "127.0.0.5/8", "0.0.0.0", "224.0.0.1", "10.0.0.1/33"):
        with pytest.raises(VipConfigError):
            parse_vip(bad)
    with pytest.raises(VipConfigError):
        Vip("10.213.0.100/24", "bad/name")


def test_garp_and_probe_frames():
    req, rep = (Ether(f) for f in garp_frames(MAC, IP))
    assert req.dst == "ff:ff:ff:ff:ff:ff" and req[ARP].op == 1
    assert req[ARP].psrc == req[ARP].pdst == IP and req[ARP].hwsrc == MAC
    assert rep[ARP].op == 2 and rep[ARP].psrc == IP
    probe = Ether(probe_frame(MAC, IP))
    assert probe[ARP].op == 1 and probe[ARP].psrc == "0.0.0.0" and probe[ARP].pdst == IP


def test_conflict_detection():
    reply = bytes(Ether(src=OTHER, dst=MAC) / ARP(op=2, hwsrc=OTHER, psrc=IP, hwdst=MAC,
                                                  pdst="0.0.0.0"))
    assert conflict_from(reply, IP, MAC) == OTHER
    assert conflict_from(garp_frames(OTHER, IP)[0], IP, MAC) == OTHER  # holder announcing
    assert conflict_from(probe_frame(OTHER, IP), IP, MAC) == OTHER  # simultaneous probe
    assert conflict_from(garp_frames(MAC, IP)[0], IP, MAC) is None  # our own frame
    assert conflict_from(garp_frames(OTHER, "10.213.0.7")[0], IP, MAC) is None
    assert conflict_from(b"\x00" * 10, IP, MAC) is None


@given(st.binary(max_size=120))
def test_conflict_from_never_raises(data):
    res = conflict_from(data, IP, MAC)
    assert res is None or isinstance(res, str)


def test_owners_from_ip_json():
    text = json.dumps([
        {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
        {"ifname": "eth0", "addr_info": [{"local": "10.213.0.1"}, {"local": IP}]},
        {"ifname": "eth1", "addr_info": [{"local": IP}]},
    ])
    assert owners_from_ip_json(text, IP) == ["eth0", "eth1"]
    assert owners_from_ip_json(text, "10.9.9.9") == []
    for junk in ("", "not json", "{}", "[1, 2]", '[{"addr_info": [5]}]'):
        assert owners_from_ip_json(junk, IP) == []


# ---------------------------------------------------------------- VIP in network namespaces
SNIFFER = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((sys.argv[1], 0x0806))
s.settimeout(0.2)
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        print(s.recv(2048).hex(), flush=True)
    except TimeoutError:
        pass
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


class Segment:
    """Two namespaces joined by a veth pair: node A (vA, 10.213.0.1) and neighbour B (vB,
    10.213.0.2). Addresses exist only inside these namespaces."""

    def __init__(self) -> None:
        tag = f"sidecar-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.a, self.b = f"{tag}-a", f"{tag}-b"
        self.created: list[str] = []

    def setup(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip("-n", self.a, "link", "add", "vA", "type", "veth", "peer", "name", "vB",
            "netns", self.b)
        for ns, dev, addr in ((self.a, "vA", "10.213.0.1/24"), (self.b, "vB", "10.213.0.2/24")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def cleanup(self) -> None:
        for ns in self.created:
            _ip("netns", "del", ns, check=False)

    def vip(self, action: str, vip: str = f"{IP}/24", *extra: str) -> dict:
        out = subprocess.run(
            ["ip", "netns", "exec", self.a, sys.executable, "-m", "sidecar.role.vip", action,
             "--iface", "vA", "--vip", vip, "--garp-interval", "0.05", "--probe-timeout",
             "0.3", *extra], capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).parent.parent)
        assert out.stdout, out.stderr
        return json.loads(out.stdout)

    def addresses(self, ns: str, dev: str) -> list[str]:
        info = json.loads(_ip("-n", ns, "-j", "-4", "addr", "show", "dev", dev).stdout)
        return [a["local"] for a in info[0]["addr_info"]]

    def mac(self, ns: str, dev: str) -> str:
        return json.loads(_ip("-n", ns, "-j", "link", "show", "dev", dev).stdout)[0]["address"]


@pytest.fixture
def segment():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for network namespaces")
    seg = Segment()
    try:
        try:
            seg.setup()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"network namespaces with veth unavailable: {exc}")
        yield seg
    finally:
        seg.cleanup()
        assert not any(ns in _ip("netns", "list").stdout for ns in seg.created)


class Sniffer:
    """Raw ARP capture on vB inside namespace B, started before the action under test."""

    def __init__(self, seg: Segment) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", seg.b, sys.executable, "-c",
                                      SNIFFER, "vB", "30"], stdout=subprocess.PIPE, bufsize=0)
        assert self._line(10) == "ready"

    def _line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        # unbuffered: select() and readline() then agree on what has been read
        return self.proc.stdout.readline().decode().strip() if ready else None

    def frames_until(self, done, timeout: float = 10) -> list:
        frames: list = []
        deadline = time.monotonic() + timeout
        while not done(frames) and (left := deadline - time.monotonic()) > 0:
            line = self._line(left)
            if line:
                frames.append(Ether(bytes.fromhex(line)))
        return frames

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


def _garps(frames, ip=IP):
    return [f for f in frames if ARP in f and f[ARP].psrc == ip and f[ARP].pdst == ip]


@pytest.mark.slow
def test_vip_acquire_probes_adds_and_announces_then_release(segment):
    sniffer = Sniffer(segment)
    try:
        res = segment.vip("acquire", f"{IP}/24", "--garp-count", "2")
        assert res["ok"], res
        assert res["garp_sent"] == 4 and "added" in res["detail"]
        frames = sniffer.frames_until(lambda fs: len(_garps(fs)) >= 4)
    finally:
        sniffer.stop()
    mac_a = segment.mac(segment.a, "vA")
    probes = [f for f in frames if ARP in f and f[ARP].psrc == "0.0.0.0" and f[ARP].pdst == IP]
    assert probes and probes[0][ARP].hwsrc == mac_a
    garps = _garps(frames)
    assert sorted(f[ARP].op for f in garps) == [1, 1, 2, 2]
    assert all(f[ARP].hwsrc == mac_a and f.dst == "ff:ff:ff:ff:ff:ff" for f in garps)
    assert frames.index(probes[0]) < frames.index(garps[0])  # probe first, then announce
    assert IP in segment.addresses(segment.a, "vA")
    if shutil.which("ping"):  # the neighbour reaches the VIP now
        ping = subprocess.run(["ip", "netns", "exec", segment.b, "ping", "-c", "1", "-W", "2",
                               IP], capture_output=True, timeout=20)
        assert ping.returncode == 0, ping.stderr

    again = segment.vip("acquire")
    assert again["ok"] and "already present" in again["detail"]
    assert segment.vip("status")["present"] is True

    gone = segment.vip("release")
    assert gone["ok"] and "removed" in gone["detail"]
    assert IP not in segment.addresses(segment.a, "vA")
    again = segment.vip("release")
    assert again["ok"] and "not present" in again["detail"]


_BACKGROUND_ACQUIRE = """
import asyncio, json, time
from sidecar.role.vip import Vip

async def main():
    vip = Vip("{ip}/24", "vA", garp_count=3, garp_interval=0.3, probe_timeout=0.2,
              repeat_in_background=True)
    started = time.perf_counter()
    res = await vip.acquire()
    took = time.perf_counter() - started
    pending = vip._repeats is not None and not vip._repeats.done()
    await vip._repeats
    print(json.dumps({{"ok": res.ok, "sent": res.garp_sent, "took": took, "pending": pending}}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_daemon_vip_returns_after_the_first_announcement_and_repeats_in_background(segment):
    """The daemon's VIP action must not hold the failover for the repeated gratuitous ARPs:
    acquire returns after the first round, the other rounds still go out."""
    sniffer = Sniffer(segment)
    try:
        out = subprocess.run(["ip", "netns", "exec", segment.a, sys.executable, "-c",
                              _BACKGROUND_ACQUIRE.format(ip=IP)], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).parent.parent)
        assert out.stdout, out.stderr
        res = json.loads(out.stdout)
        frames = sniffer.frames_until(lambda fs: len(_garps(fs)) >= 6)
    finally:
        sniffer.stop()
    assert res["ok"] and res["sent"] == 2 and res["pending"]
    assert res["took"] < 0.3 + 0.2 + 0.25  # probe + add + one round, not the 0.6 s of repeats
    assert sorted(f[ARP].op for f in _garps(frames)) == [1, 1, 1, 2, 2, 2]


@pytest.mark.slow
def test_vip_already_taken_on_the_segment_is_a_clear_error(segment):
    _ip("-n", segment.b, "addr", "add", f"{IP}/24", "dev", "vB")
    res = segment.vip("acquire")
    assert not res["ok"] and "already taken" in res["detail"]
    assert res["conflict_mac"] == segment.mac(segment.b, "vB")
    assert IP not in segment.addresses(segment.a, "vA")


@pytest.mark.slow
def test_vip_on_another_local_interface_is_refused(segment):
    _ip("-n", segment.a, "addr", "add", f"{IP}/32", "dev", "lo")
    res = segment.vip("acquire")
    assert not res["ok"] and "already on local interface lo" in res["detail"]
    assert IP not in segment.addresses(segment.a, "vA")


@pytest.mark.slow
def test_vip_on_a_missing_interface_is_a_clear_error(segment):
    out = subprocess.run(
        ["ip", "netns", "exec", segment.a, sys.executable, "-m", "sidecar.role.vip", "acquire",
         "--iface", "nope0", "--vip", f"{IP}/24"], capture_output=True, text=True, timeout=60)
    res = json.loads(out.stdout)
    assert out.returncode == 1 and not res["ok"] and "cannot use interface nope0" in res["detail"]
