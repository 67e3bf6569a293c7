"""asyncio glue around the sans-I/O :class:`Arbiter`: feeds it heartbeats, probe results and
ticks, and carries out the actions it returns (hooks, VIP, epoch, keepalive owner switch).

Actions of one decision run strictly in order under a lock, so a promotion's
``before_failover`` hooks, VIP acquisition and ``after_failover`` hooks never interleave with
a demotion. Every outcome of a failover is reported back to the arbiter (success or failure),
which is what arms its backoff. The epoch is saved in ``state_dir/epoch`` on every change and
read back at start, so a restarted node never reuses an epoch it already held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arbiter import (
    Arbiter,
    ArbiterConfig,
    BecomeActive,
    BecomePassive,
    EpochChanged,
    Report,
    RequestPeerPromotion,
    RunHooks,
)
from .checkpoints import CheckpointRunner, HeartbeatCheckpoint, build_checkpoint
from .hooks import HookRunner
from .vip import Vip

log = logging.getLogger(__name__)

Switch = Callable[[bool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RoleSettings:
    """The ``[role]`` table (validated in sidecar.config)."""

    primary: bool
    wait_s: float = 3.0
    startup_wait_s: float = 5.0
    peer_timeout_s: float = 3.0
    heartbeat_max_age_s: float = 1.0
    backoff_initial_s: float = 10.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 600.0
    checkpoints: tuple[dict[str, Any], ...] = ()
    hooks: dict[str, Any] = field(default_factory=dict)
    hook_timeout_s: float = 10.0
    vip: str | None = None
    vip_interface: str | None = None
    redis_lease: bool = False  # hold a Redis lease while active (needs [redis])
    lease_ttl_ms: int = 3000


def load_epoch(state_dir: Path) -> int:
    try:
        text = (state_dir / "epoch").read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def save_epoch(state_dir: Path, epoch: int) -> None:
    path = state_dir / "epoch"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(f"{epoch}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RoleService:
    def __init__(self, settings: RoleSettings, *, node_id: int, peer_id: int, state_dir: Path,
                 set_epoch: Callable[[int], None], announce: Callable[[], None],
                 lease: Any = None) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self._set_epoch = set_epoch  # publisher epoch (fencing token in every frame)
        self._announce = announce  # send a heartbeat now (role changed)
        self.switches: list[Switch] = []  # e.g. keepalive owner: called True/False on role change
        self.clock = time.monotonic
        self.heartbeat = HeartbeatCheckpoint("heartbeat", max_age=settings.heartbeat_max_age_s,
                                             interval=0.2)
        extra = [build_checkpoint(spec) for spec in settings.checkpoints]
        # A Redis lease (sidecar.role.redis_lease.RedisLease): the active node holds it, so a
        # node can only take the role when the lease is free, and the peer's holding it is one
        # more checkpoint saying "the active is alive".
        self.lease = lease
        if lease is not None:
            from .redis_lease import LeaseCheckpoint

            extra.append(LeaseCheckpoint("redis_lease", lease, interval=0.5))
        names = ("heartbeat", *(cp.name for cp in extra))
        self.arbiter = Arbiter(ArbiterConfig(
            node_id=node_id, peer_id=peer_id, primary=settings.primary, checkpoints=names,
            wait=settings.wait_s, startup_wait=settings.startup_wait_s,
            peer_timeout=settings.peer_timeout_s, backoff_initial=settings.backoff_initial_s,
            backoff_factor=settings.backoff_factor, backoff_max=settings.backoff_max_s,
            initial_epoch=load_epoch(state_dir)), self.clock())
        self.runner = CheckpointRunner([self.heartbeat, *extra], self._on_probe, clock=self.clock)
        self.hooks = HookRunner(settings.hooks, timeout=settings.hook_timeout_s)
        self.vip = (Vip(settings.vip, settings.vip_interface, repeat_in_background=True)
                    if settings.vip and settings.vip_interface else None)
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self.last_error = ""
        self.active = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._set_epoch(self.arbiter.epoch)
        await self.runner.start()
        self._tasks.append(asyncio.create_task(self._ticks(), name="role-tick"))
        if self.lease is not None:
            self._tasks.append(asyncio.create_task(self._renew_lease(), name="role-lease"))

    async def _renew_lease(self) -> None:
        """While active, keep the lease. Lost to another node (expired and taken): step down.
        Redis unreachable: stay active and say so (demoting would leave nobody serving)."""
        from .redis_lease import LeaseError

        while True:
            await asyncio.sleep(self.lease.ttl_ms / 3000)
            if not self.active or self.lease.epoch is None:
                continue
            try:
                if not await self.lease.renew():
                    self.last_error = "Redis lease taken by another node: stepping down"
                    log.error("%s", self.last_error)
                    self._schedule(self.arbiter.demote(self.clock()))
            except LeaseError as exc:
                self.last_error = f"Redis lease not renewed: {exc}"

    async def stop(self) -> None:
        for t in [*self._tasks, *self._pending]:
            t.cancel()
        for t in [*self._tasks, *self._pending]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.runner.stop()

    @property
    def role(self) -> str:
        return self.arbiter.heartbeat_role

    @property
    def epoch(self) -> int:
        return self.arbiter.epoch

    # ------------------------------------------------------------ inputs
    def on_peer_heartbeat(self, peer_id: int, epoch: int, role: str) -> None:
        now = self.clock()
        if peer_id == self.arbiter.cfg.peer_id:
            self.heartbeat.heard(now)
        self._schedule(self.arbiter.on_peer_heartbeat(peer_id, epoch, role, now))

    def _on_probe(self, name: str, ok: bool, detail: str, now: float) -> None:
        self._schedule(self.arbiter.on_checkpoint(name, ok, detail, now))

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._schedule(self.arbiter.tick(self.clock()))

    async def command(self, name: str, **kw: Any) -> dict:
        """sc_promote / sc_demote / sc_failover: run the actions, return the Report."""
        now = self.clock()
        if name == "promote":
            actions = self.arbiter.promote(now, force=kw.get("force", False))
        elif name == "demote":
            actions = self.arbiter.demote(now)
        else:
            actions = self.arbiter.failover(now, check_only=kw.get("check_only", False),
                                            target=kw.get("target"))
        report = next((a for a in actions if isinstance(a, Report)), None)
        ok = await self._execute([a for a in actions if not isinstance(a, Report)])
        status = self.status()
        if report is not None:  # the arbiter's report (check_only, target, notes, ...) first
            status = {**status, **report.status}
        out = {"ok": report.ok if report else ok, "command": name,
               "detail": report.detail if report else "", "status": status}
        if not ok:
            out["ok"] = False
            out["detail"] = f"{out['detail']}; carried out with errors: {self.last_error}"
        return out

    def status(self) -> dict:
        st = self.arbiter.status(self.clock())
        st["hooks"] = self.hooks.status()
        st["vip"] = None if self.vip is None else {
            "address": self.vip.vip.with_prefixlen, "interface": self.vip.interface,
            "last": None if self.vip.last is None else self.vip.last.detail}
        st["last_error"] = self.last_error
        if self.lease is not None:
            st["lease"] = {"held_epoch": self.lease.epoch, "highest_seen": self.lease.highest_seen,
                           "ttl_ms": self.lease.ttl_ms}
        return st

    # ------------------------------------------------------------ carrying out actions
    def _schedule(self, actions: list) -> None:
        if not actions:
            return
        task = asyncio.create_task(self._execute(actions))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _execute(self, actions: list) -> bool:
        """Run one decision's actions in order; report a promotion's outcome to the arbiter."""
        async with self._lock:
            promoting = any(isinstance(a, BecomeActive) for a in actions)
            ok, detail = True, ""
            for a in actions:
                if isinstance(a, RunHooks):
                    res = await self.hooks.run(a.stage, a.env)
                    if not res.ok:
                        log.warning("hooks %s failed: %s", a.stage, res.detail)
                        self.last_error = f"{a.stage}: {res.detail}"
                        if a.required:
                            ok, detail = False, self.last_error
                            break
                elif isinstance(a, BecomeActive):
                    self._epoch(a.epoch)
                    if self.lease is not None:
                        failure = await self._take_lease(a.epoch)
                        if failure is not None:
                            self.last_error = f"lease: {failure}"
                            ok, detail = False, self.last_error
                            break
                        if self.arbiter.adopt_fencing_epoch(
                                self.lease.epoch, "Redis lease epoch (fencing token)"):
                            self._epoch(self.arbiter.epoch)
                    if self.vip is not None:
                        try:
                            res = await self.vip.acquire()
                            failure = None if res.ok else res.detail
                        except Exception as exc:  # a broken VIP action is a failed failover
                            log.exception("VIP acquire failed")
                            failure = f"{type(exc).__name__}: {exc}"
                        if failure is not None:
                            self.last_error = f"VIP: {failure}"
                            ok, detail = False, self.last_error
                            break
                    self.active = True
                    await self._switch(True)
                    log.warning("ACTIVE at epoch %d (%s)", self.arbiter.epoch, a.reason)
                    self._announce()
                elif isinstance(a, BecomePassive):
                    was_active = self.active
                    self.active = False
                    await self._switch(False)
                    if self.lease is not None and self.lease.epoch is not None:
                        with contextlib.suppress(Exception):
                            await self.lease.release()
                    if self.vip is not None:
                        try:
                            res = await self.vip.release()
                            if not res.ok:
                                self.last_error = f"VIP release: {res.detail}"
                        except Exception as exc:
                            log.exception("VIP release failed")
                            self.last_error = f"VIP release: {type(exc).__name__}: {exc}"
                    self._epoch(a.epoch)
                    if was_active:
                        log.warning("PASSIVE at epoch %d (%s)", a.epoch, a.reason)
                    self._announce()
                elif isinstance(a, EpochChanged):
                    self._epoch(a.epoch)
                elif isinstance(a, RequestPeerPromotion):
                    log.info("asking peer %d to take over (%s)", a.peer_id, a.reason)
                    self._announce()  # the "yielding" heartbeat carries the request
            if promoting:
                follow = self.arbiter.on_failover_result(ok, detail, self.clock())
                if follow:
                    # run after releasing the lock (the follow-up is a demotion)
                    self._schedule(follow)
            return ok

    async def _take_lease(self, epoch: int) -> str | None:
        from .redis_lease import LeaseError

        try:
            if await self.lease.acquire(min_epoch=epoch) is None:
                holder = await self.lease.holder()
                return f"held by node {holder.node if holder else '?'}"
        except LeaseError as exc:
            return str(exc)
        return None

    def _epoch(self, epoch: int) -> None:
        self._set_epoch(epoch)
        try:
            save_epoch(self.state_dir, epoch)
        except OSError as exc:
            self.last_error = f"cannot save epoch: {exc}"
            log.error("%s", self.last_error)

    async def _switch(self, on: bool) -> None:
        for switch in self.switches:
            try:
                await switch(on)
            except Exception as exc:  # a failing keepalive switch must not stop the role change
                self.last_error = f"switch {getattr(switch, '__name__', switch)}: {exc}"
                log.exception("role switch failed")
