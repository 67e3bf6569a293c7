"""Real redis-server / redis-sentinel processes on 127.0.0.1 for tests.

    from tests.redis_fixture import RedisServer, SentinelSet, require_redis

    def test_x(tmp_path):
        require_redis()
        with RedisServer(tmp_path) as srv:
            url = srv.url          # redis://127.0.0.1:<free port>/0
            srv.stop(); srv.start()  # same port, same (empty) data: persistence is off

Every server runs in the foreground with ``--save '' --appendonly no`` and its own temp dir,
readiness is polled with a raw ``PING`` (no sleeps), and every process is killed in ``finally``
(``__exit__``). :class:`SentinelSet` adds one replica and three sentinels for failover tests.
Tests are skipped with a clear message when the binaries are missing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
SENTINEL_BIN = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
HOST = "127.0.0.1"


def require_redis() -> None:
    if not Path(REDIS_BIN).exists():
        pytest.skip(f"{REDIS_BIN} not installed (apt-get install redis-server)")


def require_sentinel() -> None:
    require_redis()
    if not Path(SENTINEL_BIN).exists():
        pytest.skip(f"{SENTINEL_BIN} not installed (apt-get install redis-sentinel)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one inline command, return the raw reply (enough for PING / SENTINEL / INFO)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(" ".join(args).encode() + b"\r\n")
        data = b""
        s.settimeout(timeout)
        while True:
            chunk = s.recv(65536)
            data += chunk
            if not chunk or _complete(data):
                return data


def _complete(data: bytes) -> bool:
    if data[:1] in (b"+", b"-", b":"):
        return data.endswith(b"\r\n")
    if data[:1] == b"$":
        head, _, rest = data.partition(b"\r\n")
        n = int(head[1:])
        return n < 0 or len(rest) >= n + 2
    # arrays: good enough for the short replies used here
    time.sleep(0.02)
    return data.endswith(b"\r\n")


def wait_until(pred, timeout: float, what: str, poll: float = 0.02):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except OSError as exc:
            last_exc = exc
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


class _Proc:
    def __init__(self, directory: Path, name: str, port: int | None) -> None:
        self.dir = directory / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "log.txt"

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_ping(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.dir.name} exited: {self.log.read_text()[-2000:]}")
            return command(self.port, "PING").startswith(b"+PONG")
        wait_until(ready, timeout, f"{self.dir.name} on port {self.port}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisServer(_Proc):
    """One redis-server on 127.0.0.1; ``replicaof`` makes it a replica of another port."""

    def __init__(self, directory: Path, port: int | None = None, name: str = "redis",
                 replicaof: int | None = None) -> None:
        super().__init__(Path(directory), name, port)
        self.replicaof = replicaof

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def extra_args(self) -> list[str]:
        """What this kind of server adds to the common command line."""
        return ["--replicaof", HOST, str(self.replicaof)] if self.replicaof else []

    def start(self) -> RedisServer:
        require_redis()
        argv = [REDIS_BIN, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--protected-mode", "no", *self.extra_args()]
        self._spawn(argv)
        try:
            self._wait_ping()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sentinel(_Proc):
    def __init__(self, directory: Path, name: str, master_port: int, quorum: int = 2) -> None:
        super().__init__(Path(directory), name, None)
        self.master_port = master_port
        self.quorum = quorum

    def start(self) -> Sentinel:
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind {HOST}\ndaemonize no\nprotected-mode no\n"
            f"dir {self.dir}\n"
            f"sentinel monitor mymaster {HOST} {self.master_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds mymaster 1000\n"
            f"sentinel failover-timeout mymaster 5000\n"
            f"sentinel parallel-syncs mymaster 1\n")
        self._spawn([SENTINEL_BIN, str(conf)])
        try:
            self._wait_ping()
        except BaseException:
            self.stop()
            raise
        return self

    def master_port_seen(self) -> int:
        reply = command(self.port, "SENTINEL", "get-master-addr-by-name", "mymaster")
        parts = reply.split(b"\r\n")
        return int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else 0


class SentinelSet:
    """1 master, 1 replica, 3 sentinels (quorum 2), all on 127.0.0.1 free ports."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.master = RedisServer(self.dir, name="master")
        self.replica: RedisServer | None = None
        self.sentinels: list[Sentinel] = []

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple((HOST, s.port) for s in self.sentinels)

    def __enter__(self) -> SentinelSet:
        require_sentinel()
        try:
            self.master.start()
            self.replica = RedisServer(self.dir, name="replica",
                                       replicaof=self.master.port).start()
            wait_until(lambda: b"master_link_status:up" in command(
                self.replica.port, "INFO", "replication"), 10, "replica in sync")
            for i in range(3):
                self.sentinels.append(Sentinel(self.dir, f"sentinel{i}",
                                               self.master.port).start())
            wait_until(self._sentinels_ready, 15, "sentinels to see the replica and each other",
                       poll=0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            info = command(s.port, "SENTINEL", "master", "mymaster")
            if b"num-slaves\r\n$1\r\n1" not in info or b"num-other-sentinels\r\n$1\r\n2" \
                    not in info:
                return False
        return True

    def failover(self, timeout: float = 20.0) -> int:
        """Force a failover; returns the new master's port once every sentinel reports it,
        it accepts writes and the old master has become its replica."""
        assert self.replica is not None
        old = self.master.port
        reply = command(self.sentinels[0].port, "SENTINEL", "FAILOVER", "mymaster")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"SENTINEL FAILOVER: {reply!r}")
        new = self.replica.port

        def switched() -> bool:
            # also wait for the old master to be turned into a replica: until then it still
            # accepts writes that the resync will discard (Redis' asynchronous replication)
            return (all(s.master_port_seen() == new for s in self.sentinels)
                    and b"role:master" in command(new, "INFO", "replication")
                    and b"role:slave" in command(old, "INFO", "replication"))
        wait_until(switched, timeout, "sentinels to switch to the replica", poll=0.05)
        assert new != old
        return new

    def __exit__(self, *exc: object) -> None:
        for s in self.sentinels:
            s.stop()
        if self.replica is not None:
            self.replica.stop()
        self.master.stop()


REDIS_CLI_BIN = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def require_redis_cli() -> None:
    require_redis()
    if not Path(REDIS_CLI_BIN).exists():
        pytest.skip(f"{REDIS_CLI_BIN} not installed (apt-get install redis-tools)")


def distinct_ports(n: int) -> list[int]:
    """*n* ports the kernel just handed out, held open together so they all differ."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ClusterMaster(RedisServer):
    """One ``--cluster-enabled`` redis-server. Its cluster config file (node id, slots) lives
    in its own directory and survives :meth:`stop`, so :meth:`start` on the same port rejoins
    the cluster with the same slots (and, persistence being off, no data)."""

    def __init__(self, directory: Path, name: str, node_timeout_ms: int, port: int,
                 bus_port: int) -> None:
        super().__init__(directory, port=port, name=name)
        self.node_timeout_ms = node_timeout_ms
        # the bus port defaults to port + 10000, which may be taken or above 65535
        self.bus_port = bus_port

    def extra_args(self) -> list[str]:
        return ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-port", str(self.bus_port)]


class RedisClusterSet:
    """A real Redis Cluster of *masters* masters (no replicas) on 127.0.0.1 free ports.

    Created with ``redis-cli --cluster create``; ready once every master reports
    ``cluster_state:ok``. A short ``cluster-node-timeout`` makes a stopped master count as
    failed (and a restarted one as back) within a few seconds, so outage tests stay fast.
    """

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.dir = Path(directory)
        ports = distinct_ports(2 * masters)
        self.masters = [ClusterMaster(self.dir, f"master{i}", node_timeout_ms,
                                      ports[2 * i], ports[2 * i + 1])
                        for i in range(masters)]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(HOST, m.port) for m in self.masters]

    @property
    def node_strings(self) -> list[str]:
        return [f"{HOST}:{m.port}" for m in self.masters]

    def __enter__(self) -> RedisClusterSet:
        require_redis_cli()
        try:
            for m in self.masters:
                m.start()
            out = subprocess.run(
                [REDIS_CLI_BIN, "--cluster", "create", *self.node_strings,
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: "
                                   f"{(out.stdout + out.stderr).decode()[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.__exit__()
            raise
        return self

    def state_ok(self, port: int) -> bool:
        return b"cluster_state:ok" in command(port, "CLUSTER", "INFO")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every running master says cluster_state:ok and knows all masters' slots."""
        def ok() -> bool:
            return all(self.state_ok(m.port) for m in self.masters if m.running)
        wait_until(ok, timeout, "cluster_state:ok on every master", poll=0.05)

    def stop_master(self, i: int) -> None:
        self.masters[i].stop()

    def start_master(self, i: int) -> None:
        self.masters[i].start()

    def dbsize(self, i: int) -> int:
        reply = command(self.masters[i].port, "DBSIZE")
        return int(reply[1:].strip())

    def __exit__(self, *exc: object) -> None:
        for m in self.masters:
            m.stop()
