"""Switch the proxy's own NAT pinger on (active node) or off (passive node, or when the sidecar
pings itself), and keep it that way.

* Kamailio: RPC ``nathelper.enable_ping 0|1``. It only works when nathelper started with
  ``natping_interval`` > 0 - otherwise the pinger does not exist and Kamailio answers
  ``500 NATping disabled``; there is no RPC to read the state back.
* OpenSIPS: MI ``nh_enable_ping`` with one positional parameter (0/1) sets it; without
  parameters it returns ``{"Status": 0|1}`` (shared/opensips-samples/mi/nh_enable_ping_A.json),
  which is used to check the change took. Same ``natping_interval`` caveat.

Why re-assert: a proxy that restarts comes back with its configured default (kamailio-cfg
starts with pinging off, but OpenSIPS defaults to on), and a standby that starts pinging from
the VIP is exactly the double-ping the sidecar exists to prevent. :class:`ProxyPingingKeeper`
re-applies the wanted state every ``period`` seconds and reports failures clearly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from sidecar.proxy.kamailio import KamailioRpc, ProxyRpcError

__all__ = [
    "KamailioPinger",
    "MiCaller",
    "OpensipsPinger",
    "ProxyPinger",
    "ProxyPingerError",
    "ProxyPingingKeeper",
]

log = logging.getLogger(__name__)

_DISABLED_HINT = ("the proxy's NAT pinger does not exist: set nathelper natping_interval > 0 "
                  "and restart the proxy (it cannot be switched on at run time otherwise)")


class ProxyPingerError(Exception):
    """The proxy refused or did not answer the pinger switch.

    ``pinger_missing`` is True when the proxy says its NAT pinger is disabled for good
    (``natping_interval`` 0): retrying will not help until the proxy is reconfigured.
    """

    def __init__(self, proxy: str, message: str, *, pinger_missing: bool = False) -> None:
        super().__init__(f"{proxy}: {message}")
        self.proxy = proxy
        self.message = message
        self.pinger_missing = pinger_missing


def _is_pinger_missing(text: str) -> bool:
    lowered = text.lower()
    return "natping" in lowered and "disabled" in lowered


class ProxyPinger(Protocol):
    name: str

    async def set_proxy_pinging(self, enabled: bool) -> None: ...


class MiCaller(Protocol):
    """Anything with ``async call(method, params)`` - e.g. sidecar.proxy.opensips_mi.OpensipsMi."""

    async def call(self, method: str, params: Any = None) -> Any: ...


class KamailioPinger:
    name = "kamailio"

    def __init__(self, rpc: KamailioRpc) -> None:
        self.rpc = rpc

    async def set_proxy_pinging(self, enabled: bool) -> None:
        try:
            await self.rpc.call("nathelper.enable_ping", 1 if enabled else 0)
        except ProxyRpcError as exc:
            if _is_pinger_missing(exc.message):
                raise ProxyPingerError(self.name, f"{exc} - {_DISABLED_HINT}",
                                       pinger_missing=True) from None
            raise ProxyPingerError(self.name, f"nathelper.enable_ping failed: {exc}") from None


class OpensipsPinger:
    name = "opensips"

    def __init__(self, mi: MiCaller) -> None:
        self.mi = mi

    async def _call(self, params: Any) -> Any:
        try:
            return await self.mi.call("nh_enable_ping", params)
        except Exception as exc:  # the MI client's own error type is not ours to know
            text = str(exc)
            if _is_pinger_missing(text):
                raise ProxyPingerError(self.name, f"{text} - {_DISABLED_HINT}",
                                       pinger_missing=True) from None
            raise ProxyPingerError(self.name, f"nh_enable_ping failed: "
                                              f"{text or type(exc).__name__}") from None

    async def pinging_state(self) -> bool:
        """What OpenSIPS says its pinger is doing now."""
        result = await self._call(None)
        status = result.get("Status") if isinstance(result, dict) else None
        try:
            return int(status) != 0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ProxyPingerError(self.name, f"nh_enable_ping returned {result!r:.200}, "
                                              "expected {'Status': 0|1}") from None

    async def set_proxy_pinging(self, enabled: bool) -> None:
        await self._call([1 if enabled else 0])
        if await self.pinging_state() != enabled:
            raise ProxyPingerError(self.name, f"nh_enable_ping {int(enabled)} accepted but the "
                                              "pinger state did not change")


@dataclass(slots=True)
class KeeperStatus:
    wanted: bool | None = None
    ok: bool | None = None  # did the last attempt succeed
    last_error: str | None = None
    pinger_missing: bool = False
    attempts: int = 0
    failures: int = 0
    last_ok_at: float | None = None


class ProxyPingingKeeper:
    """Holds the wanted proxy-pinging state and re-applies it every ``period`` seconds."""

    def __init__(self, pinger: ProxyPinger, *, period: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not period > 0:
            raise ValueError("period must be > 0")
        self.pinger = pinger
        self.period = period
        self.clock = clock
        self.status = KeeperStatus()
        self._lock = asyncio.Lock()

    async def apply(self, enabled: bool) -> bool:
        """Make ``enabled`` the wanted state and apply it now. False (and logged, and in
        :meth:`snapshot`) when the proxy refused or did not answer; never raises."""
        self.status.wanted = enabled
        return await self.reassert()

    async def reassert(self) -> bool:
        """Apply the wanted state again (what :meth:`run` does every period)."""
        wanted = self.status.wanted
        if wanted is None:
            return True
        async with self._lock:
            st = self.status
            st.attempts += 1
            try:
                await self.pinger.set_proxy_pinging(wanted)
            except ProxyPingerError as exc:
                st.failures += 1
                if st.last_error != str(exc):  # log changes, not every retry
                    log.error("cannot switch %s NAT pinging %s: %s", self.pinger.name,
                              "on" if wanted else "off", exc)
                st.ok, st.last_error, st.pinger_missing = False, str(exc), exc.pinger_missing
                return False
            if st.ok is False:
                log.info("%s NAT pinging is %s again", self.pinger.name,
                         "on" if wanted else "off")
            st.ok, st.last_error, st.pinger_missing = True, None, False
            st.last_ok_at = self.clock()
            return True

    async def run(self) -> None:
        """Re-assert forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.period)
            await self.reassert()

    def snapshot(self) -> dict:
        out = asdict(self.status)
        out["proxy"] = self.pinger.name
        return out
