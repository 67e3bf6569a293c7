"""One TOML file configures a node; it is validated completely before anything starts.

Every error names the offending key (``replication.heartbeat_ms``) and says why, and unknown
keys are errors too: a typo in a failover setting must not be silently ignored.
The annotated example is ``docs/sidecar.example.toml``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import MAX_NODE_ID


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: int
    pub: str
    sync: str
    public_key: Path | None = None


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    pub: str = "tcp://127.0.0.1:7701"
    sync: str = "tcp://127.0.0.1:7702"
    heartbeat_ms: int = 200
    max_batch: int = 2000
    ring_changes: int = 2_000_000
    sndhwm: int = 10_000
    rcvhwm: int = 10_000
    sync_timeout_s: float = 5.0
    snapshot_chunk: int = 5000
    apply_delay_ms: float = 0.0
    tcp_buffer: int = 0
    antientropy_interval_s: float = 30.0  # 0 = no periodic rounds (sc_antientropy still works)
    antientropy_buckets: int = 1024  # power of two, 1..65536


@dataclass(frozen=True, slots=True)
class CurveSettings:
    enabled: bool = False
    secret_key: Path | None = None
    authorized_keys: Path | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 8899
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    node_id: int
    node_name: str
    state_dir: Path
    replication: ReplicationConfig
    peers: tuple[PeerConfig, ...]
    curve: CurveSettings
    admin: AdminConfig
    tombstone_ttl_s: float = 300.0
    expiry_interval_ms: int = 500
    ingest_endpoint: str | None = None
    log_level: str = "info"
    sources: tuple[Any, ...] = ()  # parsed settings objects, one per [[sources]] table
    role: Any = None  # sidecar.role.service.RoleSettings when [role] is configured
    proxy: Any = None  # sidecar.ownership.ProxySettings when [proxy] is configured
    keepalive: Any = None  # sidecar.ownership.KeepaliveSettings when [keepalive] is configured
    durability: Any = None  # DurabilitySettings when [durability] is configured
    redis: Any = None  # RedisConfig when [redis] is configured
    source_path: Path | None = field(default=None, compare=False)


_ENDPOINT_PREFIXES = ("tcp://", "ipc://", "inproc://")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class Section:
    """Reads typed keys out of one TOML table and rejects the ones nobody asked for.

    Sources parse their own ``[[sources]]`` table with it, so their errors look the same.
    """

    def __init__(self, name: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table, got {type(data).__name__}")
        self.name = name
        self.data = data
        self.used: set[str] = set()

    def _get(self, key: str, types: tuple[type, ...], default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.name}.{key}: required key is missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{self.name}.{key}: expected {types[0].__name__}, got a boolean")
        if not isinstance(value, types):
            raise ConfigError(f"{self.name}.{key}: expected {types[0].__name__}, "
                              f"got {type(value).__name__} {value!r}")
        return value

    def int(self, key: str, default: int | None = None, *, lo: int = 0, hi: int = 1 << 62,
            required: bool = False) -> int:
        v = self._get(key, (int,), default, required)
        if not lo <= v <= hi:
            raise ConfigError(f"{self.name}.{key}: {v} is outside {lo}..{hi}")
        return v

    def num(self, key: str, default: float, *, lo: float = 0.0, hi: float = 1e9) -> float:
        v = float(self._get(key, (int, float), default, False))
        if not lo <= v <= hi:
            raise ConfigError(f"{self.name}.{key}: {v} is outside {lo}..{hi}")
        return v

    def str(self, key: str, default: str | None = None, *, required: bool = False,
            choices: tuple[str, ...] | None = None) -> str | None:
        v = self._get(key, (str,), default, required)
        if choices is not None and v not in choices:
            raise ConfigError(f"{self.name}.{key}: {v!r} is not one of {', '.join(choices)}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, (bool,), default, False)

    def endpoint(self, key: str, default: str | None = None, *, required: bool = False
                 ) -> str | None:
        v = self.str(key, default, required=required)
        if v is not None and not v.startswith(_ENDPOINT_PREFIXES):
            raise ConfigError(f"{self.name}.{key}: {v!r} is not a ZeroMQ endpoint "
                              "(tcp://HOST:PORT, ipc://PATH)")
        return v

    def path(self, key: str, base: Path) -> Path | None:
        v = self.str(key)
        if not v:
            return None
        p = Path(v)
        return p if p.is_absolute() else base / p

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.name}.{unknown[0]}: unknown key")


def parse_config(data: dict[str, Any], base: Path = Path(".")) -> Config:
    top = Section("(top level)", data)
    for key in data:
        if key not in ("node", "replication", "peers", "curve", "admin", "store", "ingest",
                       "log", "sources", "role", "proxy", "keepalive", "durability",
                       "redis"):
            raise ConfigError(f"{key}: unknown section")
    node = Section("node", data.get("node", {}))
    top.used.add("node")
    node_id = node.int("id", lo=1, hi=MAX_NODE_ID, required=True)
    node_name = node.str("name", f"node{node_id}")
    state_dir = node.path("state_dir", base) or Path("/var/lib/usrloc-sidecar")
    node.done()

    r = Section("replication", data.get("replication", {}))
    d = ReplicationConfig()
    rep = ReplicationConfig(
        pub=r.endpoint("pub", d.pub),
        sync=r.endpoint("sync", d.sync),
        heartbeat_ms=r.int("heartbeat_ms", d.heartbeat_ms, lo=10, hi=60_000),
        max_batch=r.int("max_batch", d.max_batch, lo=1, hi=100_000),
        ring_changes=r.int("ring_changes", d.ring_changes, lo=1000, hi=100_000_000),
        sndhwm=r.int("sndhwm", d.sndhwm, lo=1, hi=10_000_000),
        rcvhwm=r.int("rcvhwm", d.rcvhwm, lo=1, hi=10_000_000),
        sync_timeout_s=r.num("sync_timeout_s", d.sync_timeout_s, lo=0.1, hi=3600),
        snapshot_chunk=r.int("snapshot_chunk", d.snapshot_chunk, lo=1, hi=1_000_000),
        apply_delay_ms=r.num("apply_delay_ms", d.apply_delay_ms, lo=0, hi=10_000),
        tcp_buffer=r.int("tcp_buffer", d.tcp_buffer, lo=0, hi=1 << 30),
        antientropy_interval_s=r.num("antientropy_interval_s", d.antientropy_interval_s, lo=0,
                                     hi=86400),
        antientropy_buckets=r.int("antientropy_buckets", d.antientropy_buckets, lo=1,
                                  hi=65536),
    )
    if rep.antientropy_buckets & (rep.antientropy_buckets - 1):
        raise ConfigError(f"replication.antientropy_buckets: {rep.antientropy_buckets} is not "
                          "a power of two")
    r.done()

    peers_raw = data.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("peers: must be an array of tables ([[peers]])")
    peers = []
    seen_ids = {node_id}
    for i, p in enumerate(peers_raw):
        ps = Section(f"peers[{i}]", p)
        pid = ps.int("id", lo=1, hi=MAX_NODE_ID, required=True)
        if pid in seen_ids:
            raise ConfigError(f"peers[{i}].id: node id {pid} is used twice")
        seen_ids.add(pid)
        peers.append(PeerConfig(pid, ps.endpoint("pub", required=True),
                                ps.endpoint("sync", required=True), ps.path("public_key", base)))
        ps.done()

    c = Section("curve", data.get("curve", {}))
    curve = CurveSettings(c.bool("enabled", False), c.path("secret_key", base),
                          c.path("authorized_keys", base))
    c.done()
    if curve.enabled:
        if curve.secret_key is None:
            raise ConfigError("curve.secret_key: required when curve.enabled is true")
        for i, p in enumerate(peers):
            if p.public_key is None:
                raise ConfigError(f"peers[{i}].public_key: required when curve.enabled is true")

    a = Section("admin", data.get("admin", {}))
    listen = a.str("listen", "127.0.0.1:8899")
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535 or not host:
        raise ConfigError(f"admin.listen: {listen!r} is not HOST:PORT")
    token = a.str("token")
    token_file = a.path("token_file", base)
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin.token_file: cannot read {token_file}: {exc}") from None
    a.done()

    s = Section("store", data.get("store", {}))
    tomb = s.num("tombstone_ttl_s", 300.0, lo=0, hi=86400 * 7)
    expiry_ms = s.int("expiry_interval_ms", 500, lo=10, hi=60_000)
    s.done()

    ing = Section("ingest", data.get("ingest", {}))
    ingest = ing.endpoint("endpoint")
    ing.done()

    lg = Section("log", data.get("log", {}))
    level = lg.str("level", "info", choices=_LOG_LEVELS)
    lg.done()

    from .sources.registry import parse_source  # sources validate their own keys

    sources_raw = data.get("sources", [])
    if not isinstance(sources_raw, list):
        raise ConfigError("sources: must be an array of tables ([[sources]])")
    sources = tuple(parse_source(Section(f"sources[{i}]", t), base)
                    for i, t in enumerate(sources_raw))

    role = _parse_role(data["role"], len(peers)) if "role" in data else None
    proxy = _parse_proxy(data["proxy"]) if "proxy" in data else None
    keepalive = _parse_keepalive(data["keepalive"], proxy) if "keepalive" in data else None
    durability = _parse_durability(data["durability"]) if "durability" in data else None
    redis_cfg = _parse_redis(data["redis"]) if "redis" in data else None
    if role is not None and role.redis_lease and redis_cfg is None:
        raise ConfigError("role.redis_lease: needs a [redis] table (where the lease lives)")
    if role is not None and role.redis_lease and redis_cfg.mode == "cluster":
        raise ConfigError('role.redis_lease: not available with redis.mode = "cluster" (the '
                          "lease needs one Redis or Sentinel)")

    return Config(node_id, node_name, state_dir, rep, tuple(peers), curve,
                  AdminConfig(host.strip("[]"), int(port_s), token or None), tomb, expiry_ms,
                  ingest, level, sources, role, proxy, keepalive, durability, redis_cfg)


def _parse_role(data: Any, n_peers: int) -> Any:
    from .role.checkpoints import CheckpointConfigError, build_checkpoint
    from .role.hooks import HOOK_STAGES
    from .role.service import RoleSettings

    r = Section("role", data)
    if n_peers != 1:
        raise ConfigError(f"role: arbitration needs exactly one [[peers]] entry, found {n_peers}")
    d = RoleSettings(primary=True)
    primary = r.bool("primary", False)
    if "primary" not in r.data:
        raise ConfigError("role.primary: required key is missing (true on one node, false on "
                          "the other)")
    hooks_raw = r._get("hooks", (dict,), {}, False)
    hooks: dict[str, Any] = {}
    for stage, cmd in hooks_raw.items():
        if stage not in HOOK_STAGES:
            raise ConfigError(f"role.hooks.{stage}: unknown hook stage; use one of "
                              f"{', '.join(HOOK_STAGES)}")
        ok = isinstance(cmd, str) or (isinstance(cmd, list) and all(
            isinstance(c, str | list) for c in cmd))
        if not ok or not cmd:
            raise ConfigError(f"role.hooks.{stage}: a command string or a list of commands")
        hooks[stage] = cmd
    checkpoints_raw = r._get("checkpoints", (list,), [], False)
    checkpoints = []
    for i, spec in enumerate(checkpoints_raw):
        if not isinstance(spec, dict):
            raise ConfigError(f"role.checkpoints[{i}]: must be a table")
        try:
            cp = build_checkpoint(spec)
        except (CheckpointConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"role.checkpoints[{i}]: {exc}") from None
        if cp.name == "heartbeat":
            raise ConfigError(f"role.checkpoints[{i}].name: 'heartbeat' is built in")
        checkpoints.append(dict(spec))
    settings = RoleSettings(
        primary=primary,
        wait_s=r.num("wait_s", d.wait_s, lo=0.1, hi=3600),
        startup_wait_s=r.num("startup_wait_s", d.startup_wait_s, lo=0, hi=3600),
        peer_timeout_s=r.num("peer_timeout_s", d.peer_timeout_s, lo=0.1, hi=3600),
        heartbeat_max_age_s=r.num("heartbeat_max_age_s", d.heartbeat_max_age_s, lo=0.05,
                                  hi=3600),
        backoff_initial_s=r.num("backoff_initial_s", d.backoff_initial_s, lo=0, hi=86400),
        backoff_factor=r.num("backoff_factor", d.backoff_factor, lo=1, hi=100),
        backoff_max_s=r.num("backoff_max_s", d.backoff_max_s, lo=0, hi=86400),
        checkpoints=tuple(checkpoints),
        hooks=hooks,
        hook_timeout_s=r.num("hook_timeout_s", d.hook_timeout_s, lo=0.1, hi=3600),
        vip=r.str("vip"),
        vip_interface=r.str("vip_interface"),
        redis_lease=r.bool("redis_lease", False),
        lease_ttl_ms=r.int("lease_ttl_ms", 3000, lo=100, hi=600_000),
    )
    if (settings.vip is None) != (settings.vip_interface is None):
        raise ConfigError("role.vip: vip and vip_interface go together")
    if settings.vip is not None:
        from .role.vip import VipConfigError, parse_vip

        try:
            parse_vip(settings.vip)
        except (VipConfigError, ValueError) as exc:
            raise ConfigError(f"role.vip: {exc}") from None
    r.done()
    return settings


@dataclass(frozen=True, slots=True)
class DurabilitySettings:
    """``[durability]``: local snapshot files + change log under ``node.state_dir``."""

    enabled: bool = True
    fsync: str = "interval"  # always | interval | never
    fsync_interval_s: float = 0.1
    snapshot_interval_s: float = 300.0
    retention: int = 3


def _parse_durability(data: Any) -> DurabilitySettings:
    d = Section("durability", data)
    base = DurabilitySettings()
    settings = DurabilitySettings(
        enabled=d.bool("enabled", True),
        fsync=d.str("fsync", base.fsync, choices=("always", "interval", "never")),
        fsync_interval_s=d.num("fsync_interval_s", base.fsync_interval_s, lo=0.001, hi=60),
        snapshot_interval_s=d.num("snapshot_interval_s", base.snapshot_interval_s, lo=1,
                                  hi=86400),
        retention=d.int("retention", base.retention, lo=1, hi=1000))
    d.done()
    return settings


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """``[redis]``: the shared backend (change stream + snapshots), optionally via Sentinel."""

    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = "mymaster"
    cluster: str = "usrloc"
    stream_maxlen: int = 1_000_000
    snapshot_interval_s: float = 300.0
    restore_at_start: bool = True
    # mode = "cluster": the shared contact directory in a Redis Cluster (no stream/snapshots)
    mode: str = "single"  # single | sentinel | cluster
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    directory: bool = True
    directory_backlog: int = 1_000_000
    directory_tombstone_ttl_s: float = 300.0


_REDIS_MODES = ("single", "sentinel", "cluster")
_REDIS_CLUSTER_ONLY = ("cluster_nodes", "directory", "directory_backlog",
                       "directory_tombstone_ttl_s")
_REDIS_STREAM_ONLY = ("url", "sentinels", "master_name", "stream_maxlen", "snapshot_interval_s",
                      "restore_at_start")


def _parse_redis_cluster(r: Section) -> RedisConfig:
    """``mode = "cluster"``: only the directory keys; the stream/snapshot ones are errors."""
    for key in _REDIS_STREAM_ONLY:
        if key in r.data:
            raise ConfigError(f'redis.{key}: not used with redis.mode = "cluster" (the change '
                              "stream, snapshots and Sentinel need one Redis; cluster mode "
                              "shares contacts through the directory)")
    raw = r._get("cluster_nodes", (list,), None, True)
    if not raw:
        raise ConfigError("redis.cluster_nodes: give at least one HOST:PORT of the cluster")
    nodes = []
    for i, item in enumerate(raw):
        host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"redis.cluster_nodes[{i}]: {item!r} is not HOST:PORT")
        nodes.append((host.strip("[]"), int(port)))
    d = RedisConfig()
    cluster = r.str("cluster", d.cluster)
    if not cluster or "{" in cluster or "}" in cluster:
        raise ConfigError(f"redis.cluster: {cluster!r} must be non-empty and without braces "
                          "(they would break the keys' hash tags)")
    cfg = RedisConfig(mode="cluster", cluster=cluster, cluster_nodes=tuple(nodes),
                      directory=r.bool("directory", d.directory),
                      directory_backlog=r.int("directory_backlog", d.directory_backlog, lo=1,
                                              hi=100_000_000),
                      directory_tombstone_ttl_s=r.num("directory_tombstone_ttl_s",
                                                      d.directory_tombstone_ttl_s, lo=0,
                                                      hi=86400 * 7))
    r.done()
    return cfg


def _parse_redis(data: Any) -> RedisConfig:
    r = Section("redis", data)
    mode = r.str("mode") if "mode" in r.data else None  # absent: inferred from sentinels
    if mode is not None and mode not in _REDIS_MODES:
        raise ConfigError(f"redis.mode: {mode!r} is not one of {', '.join(_REDIS_MODES)}")
    if mode == "cluster":
        return _parse_redis_cluster(r)
    for key in _REDIS_CLUSTER_ONLY:
        if key in r.data:
            raise ConfigError(f'redis.{key}: only used with redis.mode = "cluster"')
    d = RedisConfig()
    url = r.str("url", d.url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"redis.url: {url!r} is not a redis:// URL")
    sentinels_raw = r._get("sentinels", (list,), [], False)
    sentinels = []
    for i, item in enumerate(sentinels_raw):
        host, sep, port = str(item).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"redis.sentinels[{i}]: {item!r} is not HOST:PORT")
        sentinels.append((host, int(port)))
    if mode == "sentinel" and not sentinels:
        raise ConfigError('redis.sentinels: required with redis.mode = "sentinel"')
    if mode == "single" and sentinels:
        raise ConfigError('redis.sentinels: not used with redis.mode = "single" (use "sentinel")')
    cfg = RedisConfig(url=url, sentinels=tuple(sentinels),
                      mode="sentinel" if sentinels else "single",
                      master_name=r.str("master_name", d.master_name),
                      cluster=r.str("cluster", d.cluster),
                      stream_maxlen=r.int("stream_maxlen", d.stream_maxlen, lo=1000, hi=10**9),
                      snapshot_interval_s=r.num("snapshot_interval_s", d.snapshot_interval_s,
                                                lo=1, hi=86400),
                      restore_at_start=r.bool("restore_at_start", True))
    r.done()
    return cfg


def _hostport(section: Section, key: str) -> tuple[str, int] | None:
    text = section.str(key)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{section.name}.{key}: {text!r} is not IP:PORT")
    return host.strip("[]"), int(port)


def _parse_proxy(data: Any) -> Any:
    from .ownership import ProxySettings

    p = Section("proxy", data)
    kind = p.str("type", required=True, choices=("kamailio", "opensips"))
    url, fifo = p.str("rpc_url"), p.str("fifo")
    if (url is None) == (fifo is None):
        raise ConfigError("proxy.rpc_url: give exactly one of rpc_url (HTTP) or fifo")
    d = ProxySettings(type=kind)
    settings = ProxySettings(
        type=kind, rpc_url=url, fifo=fifo, table=p.str("table", d.table),
        load=p.str("load", d.load, choices=("off", "warm", "on_promotion")),
        load_interval_s=p.num("load_interval_s", d.load_interval_s, lo=0.1, hi=3600),
        load_rate=p.num("load_rate", d.load_rate, lo=0, hi=1e6),
        timeout_s=p.num("timeout_s", d.timeout_s, lo=0.1, hi=600),
        **_parse_replay(p, d))
    p.done()
    return settings


def _parse_replay(p: Section, d: Any) -> dict[str, Any]:
    """``[proxy]`` keys of REGISTER-replay loading (``load_method = "register"``)."""
    import ipaddress

    method = p.str("load_method", d.load_method, choices=("rpc", "register"))
    target = p.str("replay_target", "udp:{}:{}".format(*d.replay_target))
    proto, _, hostport = target.partition(":")
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        ok = proto == "udp" and sep and port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"proxy.replay_target: {target!r} is not udp:IP:PORT (an IP address: "
                          "the replay route's UDP socket)")
    source = p.str("replay_source", d.replay_source)
    try:
        ipaddress.ip_address(source)
    except ValueError:
        raise ConfigError(f"proxy.replay_source: {source!r} is not an IP address (the address "
                          "replays are sent from, which the proxy trusts)") from None
    return {"load_method": method, "replay_target": (host, int(port)), "replay_source": source,
            "replay_window": p.int("replay_window", d.replay_window, lo=1, hi=4096)}


def _parse_keepalive(data: Any, proxy: Any) -> Any:
    from .ownership import KeepaliveSettings

    k = Section("keepalive", data)
    d = KeepaliveSettings()
    mode = k.str("mode", d.mode, choices=("proxy", "sidecar", "off"))
    if mode in ("proxy", "sidecar") and proxy is None:
        raise ConfigError(f"keepalive.mode: {mode!r} needs a [proxy] table (the proxy's pinger "
                          "is switched through its management interface)")
    settings = KeepaliveSettings(
        mode=mode,
        reassert_s=k.num("reassert_s", d.reassert_s, lo=0.5, hi=3600),
        interval_s=k.num("interval_s", d.interval_s, lo=0.5, hi=3600),
        kind=k.str("kind", d.kind, choices=("options", "crlf", "null")),
        source=_hostport(k, "source"),
        reply_via=_hostport(k, "reply_via"),
        max_lost=k.int("max_lost", d.max_lost, lo=1, hi=1000),
        sweep_rate=k.num("sweep_rate", d.sweep_rate, lo=1, hi=1e7),
        from_uri=k.str("from_uri", d.from_uri))
    k.done()
    return settings


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    cfg = parse_config(data, p.resolve().parent)
    return Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                     "source_path": p})
