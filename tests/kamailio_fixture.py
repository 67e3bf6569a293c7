"""A real Kamailio (Debian's 5.6) on loopback for tests, plus a SIPp REGISTER helper.

Reusable by any test that needs a live registrar:

    from tests.kamailio_fixture import KamailioInstance, Phone, require_kamailio, sipp_register

    async def test_x(tmp_path):
        require_kamailio()
        async with KamailioInstance(tmp_path, sip_ip="127.0.0.2") as kam:
            await sipp_register(Phone(user="alice", port=free_port("127.0.0.1")), kam)
            async with kam.http_rpc() as rpc:
                contacts = await rpc.ul_dump()

It runs ``kamailio-cfg/kamailio.cfg`` in the foreground (``-DD -E``) with every path inside
the given directory (runtime dir, pid file, FIFOs, log), picks free ports unless told, waits
for readiness by polling (JSON-RPC answers over HTTP, the FIFO exists and the config's start-up
hook has set the NAT pinger's initial state), and stops it with
SIGTERM, then SIGKILL for its process group. Both a sync (``with``) and an async
(``async with``) form exist. Tests are skipped with a clear message when the kamailio or sipp
binary is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.proxy.kamailio import KamailioRpc, ProxyRpcError

KAMAILIO_BIN = Path("/usr/sbin/kamailio")
REPO = Path(__file__).resolve().parents[1]
KAMAILIO_CFG = REPO / "kamailio-cfg" / "kamailio.cfg"
SIPP_DIR = Path(__file__).resolve().parent / "sipp"
REGISTER_SCENARIO = SIPP_DIR / "register_phone.xml"
# Logged by event_route[core:worker-one-init] in kamailio.cfg once the pinger state is set.
PING_STATE_MARK = "NAT pinging starts "
POLL_INTERVAL = 0.02


def require_kamailio() -> None:
    if not KAMAILIO_BIN.exists():
        pytest.skip(f"{KAMAILIO_BIN} not installed (apt-get install kamailio)")


def require_sipp() -> str:
    path = shutil.which("sipp")
    if path is None:
        pytest.skip("sipp not installed (apt-get install sip-tester)")
    return path


def free_port(ip: str = "127.0.0.1", kind: int = socket.SOCK_DGRAM) -> int:
    """A port that is free on ``ip`` for ``kind`` right now (and for TCP too when UDP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port on {ip}")


class KamailioStartError(RuntimeError):
    """Kamailio exited or did not become ready in time; the message ends with its log."""


class KamailioInstance:
    """One Kamailio process with its own directory, sockets and FIFO."""

    def __init__(self, tmpdir: str | os.PathLike[str], *, sip_ip: str = "127.0.0.1",
                 sip_port: int | None = None, rpc_port: int | None = None,
                 hep_dst: tuple[str, int] | None = None, natping_interval: int = 20,
                 natping_on: bool = False, workers: int = 1, debug_level: int = 2,
                 pkg_mb: int = 8, shm_mb: int = 64, extra_defines: Sequence[str] = ()) -> None:
        self.sip_ip = sip_ip
        self.sip_port = sip_port or free_port(sip_ip, socket.SOCK_DGRAM)
        self.rpc_ip = sip_ip
        self.rpc_port = rpc_port or free_port(self.rpc_ip, socket.SOCK_STREAM)
        self.hep_dst = hep_dst
        self.natping_interval = natping_interval
        self.natping_on = natping_on
        self.workers = workers
        self.debug_level = max(1, debug_level)  # the readiness mark is logged at NOTICE
        self.pkg_mb = pkg_mb
        self.shm_mb = shm_mb
        self.extra_defines = tuple(extra_defines)
        # Short names: Kamailio limits reply-FIFO paths to 127 bytes.
        self.dir = Path(tmpdir) / f"k{sip_ip.rsplit('.', 1)[-1]}p{self.sip_port}"
        self.run_dir = self.dir / "run"
        self.reply_dir = self.dir / "r"
        self.log_path = self.dir / "kamailio.log"
        self.pid_path = self.run_dir / "kamailio.pid"
        self.fifo_path = self.run_dir / "kamailio_rpc.fifo"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- addresses ------------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return f"http://{self.rpc_ip}:{self.rpc_port}/RPC"

    @property
    def sip_socket(self) -> str:
        """The SIP socket as Kamailio names it in ul.dump ("udp:IP:PORT")."""
        return f"udp:{self.sip_ip}:{self.sip_port}"

    def http_rpc(self, timeout: float = 5.0) -> KamailioRpc:
        return KamailioRpc(url=self.rpc_url, timeout=timeout)

    def fifo_rpc(self, timeout: float = 5.0) -> KamailioRpc:
        return KamailioRpc(fifo_path=self.fifo_path, reply_dir=self.reply_dir, timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def command(self) -> list[str]:
        defines = [
            f"LISTEN_IP={self.sip_ip}", f"SIP_PORT={self.sip_port}",
            f"RPC_IP={self.rpc_ip}", f"RPC_PORT={self.rpc_port}",
            f'FIFO_REPLY_DIR="{self.reply_dir}/"',
            f"NATPING_INTERVAL={self.natping_interval}", f"DEBUG_LEVEL={self.debug_level}",
        ]
        if self.hep_dst is not None:
            defines += ["WITH_HEP", f'HEP_URI="sip:{self.hep_dst[0]}:{self.hep_dst[1]}"']
        if self.natping_on:
            defines.append("WITH_NATPING_ON")
        defines += self.extra_defines
        cmd = [str(KAMAILIO_BIN), "-f", str(KAMAILIO_CFG), "-DD", "-E", "-n", str(self.workers),
               "-Y", str(self.run_dir), "-P", str(self.pid_path), "-w", str(self.dir),
               "-M", str(self.pkg_mb), "-m", str(self.shm_mb)]
        for define in defines:
            cmd += ["-A", define]
        return cmd

    # --- lifecycle ------------------------------------------------------------------------

    def _spawn(self) -> None:
        require_kamailio()
        if self.proc is not None:
            raise RuntimeError("already started")
        for d in (self.dir, self.run_dir, self.reply_dir):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise KamailioStartError(f"kamailio exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()[-4000:]}")

    def _files_ready(self) -> bool:
        if not self.fifo_path.exists():
            return False
        return PING_STATE_MARK in self.log_text()

    def _http_ready(self) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "method": "core.version", "id": 1}).encode()
        request = urllib.request.Request(self.rpc_url, data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=0.5) as resp:
                return b"result" in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 15.0) -> KamailioInstance:
        self._spawn()
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self._files_ready() and self._http_ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise KamailioStartError(f"kamailio not ready after {timeout} s:\n"
                                         f"{self.log_text()[-4000:]}")
            time.sleep(POLL_INTERVAL)

    async def astart(self, timeout: float = 15.0) -> KamailioInstance:
        self._spawn()
        deadline = time.monotonic() + timeout
        async with KamailioRpc(url=self.rpc_url, timeout=0.5) as rpc:
            while True:
                self._check_alive()
                if self._files_ready():
                    with contextlib.suppress(ProxyRpcError):
                        await rpc.call("core.version")
                        return self
                if time.monotonic() > deadline:
                    await self.astop()
                    raise KamailioStartError(f"kamailio not ready after {timeout} s:\n"
                                             f"{self.log_text()[-4000:]}")
                await asyncio.sleep(POLL_INTERVAL)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        if sig == signal.SIGKILL:
            # The whole group we created (start_new_session): the main process and its forks.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
        elif self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (None if not run)."""
        if self.proc is None:
            return None
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout)
        self._signal(signal.SIGKILL)  # stragglers of the group, if any
        return self.proc.returncode

    async def astop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self._signal(signal.SIGKILL)
                deadline = time.monotonic() + timeout
            await asyncio.sleep(POLL_INTERVAL)
        self._signal(signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> KamailioInstance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> KamailioInstance:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.astop()


# --- SIPp ---------------------------------------------------------------------------------

@dataclass
class Phone:
    """One REGISTER sent by SIPp from ``ip:port``.

    ``via_host``/``via_port`` default to where the packets really come from; set them to
    another address to look like a phone behind NAT. ``contact`` is the whole Contact header
    value (several contacts separated by commas are fine); by default ``<sip:user@ip:port>``.
    """

    user: str
    port: int
    ip: str = "127.0.0.1"
    contact: str | None = None
    via_host: str | None = None
    via_port: int | None = None
    expires: int = 600
    callid: str | None = None
    cseq: int = 1
    user_agent: str = "sipp-phone"
    domain: str | None = None

    def contact_header(self) -> str:
        return self.contact or f"<sip:{self.user}@{self.ip}:{self.port}>"

    def call_id(self) -> str:
        return self.callid or f"{self.user}-{self.port}@sipp"


async def sipp_register(phone: Phone, proxy: KamailioInstance, *, timeout: float = 10.0,
                        cwd: str | os.PathLike[str] | None = None) -> None:
    """Send one REGISTER with real SIPp and require its 200 OK (raises AssertionError)."""
    sipp = require_sipp()
    keys = {
        "aor_user": phone.user,
        "domain": phone.domain or proxy.sip_ip,
        "via_host": phone.via_host or phone.ip,
        "via_port": str(phone.via_port or phone.port),
        "contact": phone.contact_header(),
        "expires": str(phone.expires),
        "reg_cseq": str(phone.cseq),
        "user_agent": phone.user_agent,
    }
    cmd = [sipp, f"{proxy.sip_ip}:{proxy.sip_port}", "-sf", str(REGISTER_SCENARIO),
           "-i", phone.ip, "-p", str(phone.port), "-t", "u1", "-m", "1", "-l", "1",
           "-timeout", f"{max(1, int(timeout))}s", "-timeout_error", "-nostdin",
           "-cid_str", phone.call_id()]
    for key, value in keys.items():
        cmd += ["-key", key, value]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=cwd or proxy.dir)
    try:
        async with asyncio.timeout(timeout + 5):
            output, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"sipp for {phone.user} did not finish") from None
    assert proc.returncode == 0, (
        f"sipp REGISTER for {phone.user} failed ({proc.returncode}):\n"
        f"{output.decode(errors='replace')[-3000:]}")
