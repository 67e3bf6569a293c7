"""Run operator commands (failover hooks, command checkpoints, `ip`) safely from asyncio.

A hook is the operator's code: it may hang, fork children, print megabytes or not exist at
all. None of that may stall or crash the daemon in the middle of a failover, so every command
here is time-limited (the whole process group is killed on timeout, children included), its
output is captured and truncated, and every failure comes back as a :class:`CommandResult`
with a readable ``detail`` — never as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Command = str | Sequence[str]
"""A shell string (run by /bin/sh -c) or an argv list (run directly, no shell)."""

HOOK_STAGES = ("before_failover", "after_failover", "on_demote")
DEFAULT_MAX_OUTPUT = 4096
_KILL_GRACE = 1.0  # after SIGKILL, how long to wait for the pipe to close


class HookConfigError(ValueError):
    """A hook definition that can never run (unknown stage, empty command, bad type)."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    ok: bool  # exit status 0 within the time limit
    command: str  # for logs and status, shell-quoted
    detail: str  # "exit 0", "exit 3", "timed out after 5s", "cannot run: ..."
    returncode: int | None  # None if it never ran or was killed for the timeout
    output: str  # stdout+stderr, truncated to max_output bytes
    elapsed: float


def describe(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def _argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    return [str(part) for part in cmd]


class _Capture:
    """Reads a pipe to the end, keeping only the first ``limit`` bytes: the child must never
    block on a full pipe, and a chatty hook must not fill our memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.total += len(chunk)
            room = self.limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def text(self) -> str:
        out = self.kept.decode("utf-8", "replace")
        if self.total > len(self.kept):
            out += f"... [{self.total - len(self.kept)} more bytes]"
        return out


async def run_command(cmd: Command, *, timeout: float, env: Mapping[str, str] | None = None,
                      max_output: int = DEFAULT_MAX_OUTPUT) -> CommandResult:
    """Run ``cmd`` with ``env`` added to this process's environment; never raises (except
    CancelledError, after killing the process group)."""
    start = time.monotonic()
    text = describe(cmd)
    full_env = {**os.environ, **(env or {})}
    try:
        argv = _argv(cmd)
        if not argv or not argv[0]:
            raise ValueError("empty command")
        proc = await _spawn(argv, full_env)
    except (OSError, ValueError) as exc:
        return CommandResult(False, text, f"cannot run: {exc}", None, "",
                             time.monotonic() - start)
    capture = _Capture(max_output)
    assert proc.stdout is not None
    reader = asyncio.create_task(capture.drain(proc.stdout))
    try:
        try:
            rc: int | None = await asyncio.wait_for(proc.wait(), timeout)
            detail = f"exit {rc}" if rc >= 0 else f"killed by signal {-rc}"
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            rc, detail = None, f"timed out after {timeout:g}s"
        # A grandchild that left the process group may hold the pipe open: stop waiting.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), _KILL_GRACE)
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _KILL_GRACE)
        raise
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return CommandResult(rc == 0, text, detail, rc, capture.text(), time.monotonic() - start)


async def _spawn(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``argv`` as the leader of a new process group.

    Shielded: if the caller is cancelled while asyncio is still wiring the pipes, asyncio
    would kill only the direct child and leave its children running; instead the start is
    completed and the whole group killed.
    """
    spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True))
    try:
        return await asyncio.shield(spawn)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError, ValueError):
            proc = await spawn
            _kill_group(proc)
            await proc.wait()
        raise


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class HookResult:
    stage: str
    results: tuple[CommandResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def detail(self) -> str:
        failed = [r for r in self.results if not r.ok]
        if not failed:
            return f"{self.stage}: {len(self.results)} hook(s) ok"
        return "; ".join(f"{self.stage} hook {r.command!r}: {r.detail}" for r in failed)


class HookRunner:
    """Runs the commands configured for each stage, in order, with the arbiter's environment.

    ``before_failover`` stops at its first failure (its failure aborts the failover, so
    later commands would act on a failover that is not happening); the other stages run every
    command so that clean-up and alerting get as far as they can.
    """

    def __init__(self, hooks: Mapping[str, Sequence[Command] | Command], *,
                 timeout: float = 10.0, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self.timeout = timeout
        self.max_output = max_output
        self.hooks: dict[str, tuple[Command, ...]] = {}
        for stage, cmds in hooks.items():
            if stage not in HOOK_STAGES:
                raise HookConfigError(f"unknown hook stage {stage!r}; use one of "
                                      f"{', '.join(HOOK_STAGES)}")
            self.hooks[stage] = _commands(stage, cmds)
        self.last: dict[str, HookResult] = {}

    async def run(self, stage: str, env: Mapping[str, str]) -> HookResult:
        results: list[CommandResult] = []
        for cmd in self.hooks.get(stage, ()):
            res = await run_command(cmd, timeout=self.timeout, env={**env, "SIDECAR_STAGE": stage},
                                    max_output=self.max_output)
            results.append(res)
            if res.ok:
                log.info("hook %s %r: %s in %.2fs", stage, res.command, res.detail, res.elapsed)
            else:
                log.error("hook %s %r failed: %s; output: %s", stage, res.command, res.detail,
                          res.output.strip()[-500:])
                if stage == "before_failover":
                    break
        out = HookResult(stage, tuple(results))
        self.last[stage] = out
        return out

    def status(self) -> dict:
        return {stage: {"ok": r.ok, "detail": r.detail} for stage, r in self.last.items()}


def _commands(stage: str, cmds: Sequence[Command] | Command) -> tuple[Command, ...]:
    """A shell string, an argv list of strings, or a list of those (a list whose items are all
    strings is one argv; write ``[["a.sh"], "b.sh --flag"]`` or ``"a.sh && b.sh"`` for two)."""
    if isinstance(cmds, str):
        items: list = [cmds]
    elif isinstance(cmds, Sequence) and cmds and all(isinstance(c, str) for c in cmds):
        items = [list(cmds)]  # a single argv list
    elif isinstance(cmds, Sequence):
        items = list(cmds)
    else:
        raise HookConfigError(f"{stage}: expected a command string or list")
    out: list[Command] = []
    for c in items:
        if isinstance(c, str) and c.strip():
            out.append(c)
        elif (isinstance(c, Sequence) and not isinstance(c, str) and c
              and all(isinstance(p, str) for p in c) and c[0]):
            out.append(tuple(c))
        else:
            raise HookConfigError(f"{stage}: bad command {c!r}")
    return tuple(out)
