"""Start real `sidecar run` processes on loopback and talk to them (demo, tests, benchmarks).

Only 127.0.0.1 endpoints are used. Every wait polls with a deadline instead of sleeping a
fixed time, so slow machines are slower but not flaky.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ..sources.ingest import encode_ingest


def free_ports(n: int) -> list[int]:
    """Ports the kernel just handed out (kept open together so they are distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MiError(RuntimeError):
    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error


@dataclass
class NodeProcess:
    node_id: int
    workdir: Path
    extra_replication: dict[str, Any] = field(default_factory=dict)
    extra_toml: str = ""  # appended verbatim (e.g. a [curve] table)
    external_peers: list[tuple[int, str, str, str | None]] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pub_port, self.sync_port, self.admin_port, self.ingest_port = free_ports(4)
        self.peers: list[NodeProcess] = []
        self._push: zmq.Socket | None = None
        self._ctx: zmq.Context | None = None
        self.public_key: str | None = None  # set when CURVE keys are made for this node

    @property
    def pub(self) -> str:
        return f"tcp://127.0.0.1:{self.pub_port}"

    @property
    def sync(self) -> str:
        return f"tcp://127.0.0.1:{self.sync_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"node{self.node_id}.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"node{self.node_id}.log"

    def write_config(self) -> Path:
        lines = [
            "[node]", f"id = {self.node_id}", f'name = "node{self.node_id}"',
            f'state_dir = "{self.workdir / "state"}"', "",
            "[replication]", f'pub = "{self.pub}"', f'sync = "{self.sync}"',
            "heartbeat_ms = 100", "sync_timeout_s = 2",
        ]
        for k, v in self.extra_replication.items():
            lines.append(f"{k} = {json.dumps(v)}")
        lines += ["", "[admin]", f'listen = "127.0.0.1:{self.admin_port}"', "",
                  "[ingest]", f'endpoint = "tcp://127.0.0.1:{self.ingest_port}"', "",
                  "[log]", 'level = "info"', ""]
        peers = [(p.node_id, p.pub, p.sync, p.public_key) for p in self.peers]
        for pid, pub, sync, key in peers + self.external_peers:
            lines += ["[[peers]]", f"id = {pid}", f'pub = "{pub}"', f'sync = "{sync}"']
            if key:
                lines.append(f'public_key = "{key}"')
            lines.append("")
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_toml)
        return self.config_path

    def start(self, wait: float = 20.0) -> NodeProcess:
        self.write_config()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.wait_ready(wait)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited with {self.proc.returncode}; "
                                   f"log:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/health",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"node {self.node_id} not ready after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.close_push()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mi(self, method: str, params: Any = None, timeout: float = 60.0) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params is not None:
            body["params"] = params
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/mi",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            reply = json.loads(r.read())
        if "error" in reply:
            raise MiError(reply["error"])
        return reply["result"]

    def push(self, changes: list, chunk: int = 2000) -> None:
        """Send changes to the node's ingest socket (blocking if its queue is full)."""
        if self._push is None:
            self._ctx = zmq.Context()
            self._push = self._ctx.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 2000)
            self._push.setsockopt(zmq.SNDHWM, 100)
            self._push.connect(f"tcp://127.0.0.1:{self.ingest_port}")
        for i in range(0, len(changes), chunk):
            self._push.send(encode_ingest(changes[i:i + chunk]))

    def close_push(self) -> None:
        if self._push is not None:
            self._push.close(2000)
            self._ctx.term()
            self._push = None
            self._ctx = None


def make_pair(workdir: Path, extra_a: dict | None = None, extra_b: dict | None = None
              ) -> tuple[NodeProcess, NodeProcess]:
    a = NodeProcess(1, workdir / "a", extra_a or {})
    b = NodeProcess(2, workdir / "b", extra_b or {})
    a.peers, b.peers = [b], [a]
    return a, b


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout}s (last: {last!r})")
