"""Checkpoints: independent ways of asking "is the active peer still there?".

The background documents' lesson is that one probe lies (a rebooting switch, a busy process),
so the arbiter promotes only when *every* configured checkpoint says the active is gone for
``wait`` seconds. Each checkpoint here is one asyncio probe with its own interval and time
limit, returning a :class:`ProbeResult` (ok = the peer answered) and never raising:

* ``heartbeat`` — the age of the last replication heartbeat (fed by the daemon);
* ``sip_options`` — a SIP OPTIONS over UDP to the peer proxy; any SIP response is "alive";
* ``tcp`` — a TCP connect; ``http`` — a GET answered 2xx/3xx; ``command`` — exit status 0.

:class:`CheckpointRunner` runs them and hands every result to a callback (the daemon feeds it
to :meth:`sidecar.role.arbiter.Arbiter.on_checkpoint`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..sip.parser import SipParseError, SipResponse, parse_message
from .hooks import Command, run_command

log = logging.getLogger(__name__)

ReportFn = Callable[[str, bool, str, float], object]
"""``report(name, ok, detail, now)`` — the signature of Arbiter.on_checkpoint."""


class CheckpointConfigError(ValueError):
    """A checkpoint definition that cannot be probed (unknown type, missing host, ...)."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool  # the checkpoint sees the peer alive
    detail: str


class Checkpoint:
    """One probe. Subclasses implement :meth:`probe`; :meth:`check` adds the time limit and
    turns every exception into a "gone" result with the reason."""

    kind = "checkpoint"

    def __init__(self, name: str, *, interval: float = 1.0, timeout: float = 1.0) -> None:
        if not name:
            raise CheckpointConfigError("a checkpoint needs a name")
        if interval <= 0 or timeout <= 0:
            raise CheckpointConfigError(f"{name}: interval and timeout must be > 0")
        self.name = name
        self.interval = interval
        self.timeout = timeout

    async def probe(self) -> ProbeResult:
        raise NotImplementedError

    async def check(self) -> ProbeResult:
        try:
            return await asyncio.wait_for(self.probe(), self.timeout)
        except TimeoutError:
            return ProbeResult(False, f"no answer within {self.timeout:g}s")
        except (OSError, aiohttp.ClientError, ValueError) as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- heartbeat age
class HeartbeatCheckpoint(Checkpoint):
    """Gone when no peer heartbeat arrived for ``max_age`` seconds. The daemon calls
    :meth:`heard` for every heartbeat of the peer; the probe itself does no I/O."""

    kind = "heartbeat"

    def __init__(self, name: str = "heartbeat", *, max_age: float = 3.0, interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, interval=interval, timeout=max(interval, 1.0))
        if max_age <= 0:
            raise CheckpointConfigError(f"{name}: max_age must be > 0")
        self.max_age = max_age
        self.clock = clock
        self.last: float | None = None

    def heard(self, now: float | None = None) -> None:
        self.last = self.clock() if now is None else now

    async def probe(self) -> ProbeResult:
        return self.evaluate(self.clock())

    def evaluate(self, now: float) -> ProbeResult:
        if self.last is None:
            return ProbeResult(False, "no heartbeat heard yet")
        age = now - self.last
        if age > self.max_age:
            return ProbeResult(False, f"no heartbeat for {age:.1f}s (> {self.max_age:g}s)")
        return ProbeResult(True, f"heartbeat {age:.1f}s ago")


# ---------------------------------------------------------------- SIP OPTIONS
def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_options(target_host: str, target_port: int, local_host: str, local_port: int, *,
                  call_id: str, branch: str, tag: str) -> bytes:
    """A minimal, valid OPTIONS request (RFC 3261 §11) that any proxy answers, usually 200."""
    target = f"{_host(target_host)}:{target_port}"
    local = f"{_host(local_host)}:{local_port}"
    return (
        f"OPTIONS sip:{target} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:sidecar@{local}>;tag={tag}\r\n"
        f"To: <sip:{target}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Contact: <sip:sidecar@{local}>\r\n"
        f"Accept: application/sdp\r\n"
        f"User-Agent: usrloc-sidecar checkpoint\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def response_status(data: bytes, call_id: str) -> int | None:
    """Status code if ``data`` is a SIP response to our request ``call_id``, else None."""
    try:
        msg = parse_message(data)
    except SipParseError:
        return None
    if isinstance(msg, SipResponse) and msg.call_id == call_id:
        return msg.status
    return None


class _OptionsProtocol(asyncio.DatagramProtocol):
    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.answer: asyncio.Future[ProbeResult] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        status = response_status(data, self.call_id)
        if status is not None and not self.answer.done():
            self.answer.set_result(ProbeResult(True, f"SIP {status} from {addr[0]}:{addr[1]}"))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected UDP socket: the proxy is not listening.
        if not self.answer.done():
            self.answer.set_result(ProbeResult(False, f"{type(exc).__name__}: {exc}"))


class SipOptionsCheckpoint(Checkpoint):
    """OPTIONS over UDP to the peer proxy; any SIP response (even 4xx/5xx) means the proxy is
    alive. Resent with doubling gaps within the time limit, like an RFC 3261 timer A."""

    kind = "sip_options"

    def __init__(self, name: str, host: str, port: int = 5060, *, interval: float = 1.0,
                 timeout: float = 1.0, retransmit: float = 0.25) -> None:
        super().__init__(name, interval=interval, timeout=timeout)
        if not host or not 0 < int(port) < 65536:
            raise CheckpointConfigError(f"{name}: host and a port 1-65535 are needed")
        self.host, self.port = host, int(port)
        self.retransmit = retransmit

    async def probe(self) -> ProbeResult:
        loop = asyncio.get_running_loop()
        call_id = f"{secrets.token_hex(12)}@sidecar"
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _OptionsProtocol(call_id), remote_addr=(self.host, self.port))
        try:
            lhost, lport = transport.get_extra_info("sockname")[:2]
            request = build_options(self.host, self.port, lhost, lport, call_id=call_id,
                                    branch=secrets.token_hex(8), tag=secrets.token_hex(4))
            gap = self.retransmit
            while True:
                transport.sendto(request)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(proto.answer), gap)
                gap = min(gap * 2, 4.0)
        finally:
            transport.close()


# ---------------------------------------------------------------- TCP, HTTP, command
class TcpCheckpoint(Checkpoint):
    kind = "tcp"

    def __init__(self, name: str, host: str, port: int, *, interval: float = 1.0,
                 timeout: float = 1.0) -> None:
        super().__init__(name, interval=interval, timeout=timeout)
        if not host or not 0 < int(port) < 65536:
            raise CheckpointConfigError(f"{name}: host and a port 1-65535 are needed")
        self.host, self.port = host, int(port)

    async def probe(self) -> ProbeResult:
        start = time.monotonic()
        _, writer = await asyncio.open_connection(self.host, self.port)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(True, f"connected to {self.host}:{self.port} in "
                                 f"{(time.monotonic() - start) * 1000:.1f} ms")


class HttpCheckpoint(Checkpoint):
    """GET ``url``; 2xx and 3xx (redirects are not followed) mean alive."""

    kind = "http"

    def __init__(self, name: str, url: str, *, interval: float = 1.0,
                 timeout: float = 1.0) -> None:
        super().__init__(name, interval=interval, timeout=timeout)
        if not url.startswith(("http://", "https://")):
            raise CheckpointConfigError(f"{name}: url must start with http:// or https://")
        self.url = url

    async def probe(self) -> ProbeResult:
        limit = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=limit) as session, \
                session.get(self.url, allow_redirects=False) as resp:
            ok = 200 <= resp.status < 400
            return ProbeResult(ok, f"HTTP {resp.status} {resp.reason or ''}".rstrip())


class CommandCheckpoint(Checkpoint):
    """Runs a command; exit 0 means alive. Output (truncated) goes into the detail."""

    kind = "command"

    def __init__(self, name: str, command: Command, *, interval: float = 5.0,
                 timeout: float = 3.0, env: Mapping[str, str] | None = None,
                 max_output: int = 512) -> None:
        super().__init__(name, interval=interval, timeout=timeout)
        if not command:
            raise CheckpointConfigError(f"{name}: command is empty")
        self.command = command
        self.env = dict(env or {})
        self.max_output = max_output

    async def probe(self) -> ProbeResult:
        res = await run_command(self.command, timeout=self.timeout, env=self.env,
                                max_output=self.max_output)
        out = res.output.strip()
        return ProbeResult(res.ok, f"{res.detail}: {out}" if out else res.detail)

    async def check(self) -> ProbeResult:
        # run_command enforces the time limit itself and kills the process group; an outer
        # wait_for would cancel it first and report less.
        try:
            return await self.probe()
        except (OSError, ValueError) as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- config and runner
_KINDS = ("heartbeat", "sip_options", "tcp", "http", "command")


def build_checkpoint(spec: Mapping[str, Any]) -> Checkpoint:
    """A checkpoint from its config table, e.g. ``{"type": "tcp", "name": "proxy",
    "host": "10.0.0.2", "port": 5060, "interval": 1, "timeout": 0.5}``."""
    kind = spec.get("type")
    if kind not in _KINDS:
        raise CheckpointConfigError(f"checkpoint type {kind!r}; use one of {', '.join(_KINDS)}")
    name = str(spec.get("name") or kind)
    timing = {k: float(spec[k]) for k in ("interval", "timeout") if k in spec}
    try:
        if kind == "heartbeat":
            return HeartbeatCheckpoint(name, max_age=float(spec.get("max_age", 3.0)),
                                       interval=timing.get("interval", 0.5))
        if kind == "sip_options":
            return SipOptionsCheckpoint(name, str(spec["host"]), int(spec.get("port", 5060)),
                                        **timing)
        if kind == "tcp":
            return TcpCheckpoint(name, str(spec["host"]), int(spec["port"]), **timing)
        if kind == "http":
            return HttpCheckpoint(name, str(spec["url"]), **timing)
        return CommandCheckpoint(name, spec["command"], **timing)
    except KeyError as exc:
        raise CheckpointConfigError(f"checkpoint {name!r} ({kind}) needs {exc}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointConfigError):
            raise
        raise CheckpointConfigError(f"checkpoint {name!r}: {exc}") from None


class CheckpointRunner:
    """Probes every checkpoint on its own interval and reports each result.

    A probe's duration counts against its interval (a slow probe is not followed by a full
    extra interval), and a failing ``report`` callback is logged, not fatal to the loop.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], report: ReportFn, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [cp.name for cp in checkpoints]
        if len(set(names)) != len(names):
            raise CheckpointConfigError("checkpoint names must be unique")
        self.checkpoints = list(checkpoints)
        self.report = report
        self.clock = clock
        self.last: dict[str, tuple[ProbeResult, float]] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for cp in self.checkpoints:
            self._tasks.append(asyncio.create_task(self._loop(cp), name=f"checkpoint-{cp.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def probe_all(self) -> dict[str, ProbeResult]:
        """One round of every probe now, in parallel (start-up, tests, check-only)."""
        results = await asyncio.gather(*(cp.check() for cp in self.checkpoints))
        for cp, res in zip(self.checkpoints, results, strict=True):
            self._deliver(cp, res)
        return {cp.name: res for cp, res in zip(self.checkpoints, results, strict=True)}

    def status(self) -> dict:
        now = self.clock()
        return {name: {"ok": res.ok, "detail": res.detail, "age_s": round(now - at, 3)}
                for name, (res, at) in self.last.items()}

    async def _loop(self, cp: Checkpoint) -> None:
        while True:
            started = self.clock()
            self._deliver(cp, await cp.check())
            await asyncio.sleep(max(0.0, cp.interval - (self.clock() - started)))

    def _deliver(self, cp: Checkpoint, res: ProbeResult) -> None:
        now = self.clock()
        self.last[cp.name] = (res, now)
        try:
            self.report(cp.name, res.ok, res.detail, now)
        except Exception:
            log.exception("checkpoint %s: report callback failed", cp.name)

