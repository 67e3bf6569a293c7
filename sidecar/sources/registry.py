"""Source types a node can run, configured as ``[[sources]]`` tables with a ``type`` key.

Each source module provides ``parse_settings(section, base) -> settings`` (validating its own
keys with :class:`sidecar.config.Section`, so errors name the key) and
``build(settings, ctx) -> Source``. Modules are imported only when configured, so a node that
does not capture packets never imports the capture code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq.asyncio

from ..replica import Replica

SOURCE_MODULES: dict[str, str] = {
    "hep": "sidecar.sources.hep_source",
    "capture": "sidecar.sources.capture_source",
    "opensips": "sidecar.sources.opensips_source",
    "kamailio": "sidecar.sources.kamailio_source",
}


@dataclass(slots=True)
class SourceContext:
    """What every source gets from the daemon."""

    replica: Replica
    kick: Callable[[], None]  # call after local changes so the publisher flushes them
    zmq: zmq.asyncio.Context
    node_id: int
    # True while this node serves the phones (always, without [role]): a passive node's proxy
    # is not authoritative for deletions.
    is_active: Callable[[], bool] = lambda: True


class Source(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """Counters for sc_status and /metrics: messages, parse_errors, changes, drops..."""
        ...


@dataclass(frozen=True, slots=True)
class SourceConfig:
    type: str
    settings: Any


def parse_source(section: Any, base: Path) -> SourceConfig:
    from ..config import ConfigError

    kind = section.str("type", required=True)
    module_name = SOURCE_MODULES.get(kind)
    if module_name is None:
        raise ConfigError(f"{section.name}.type: {kind!r} is not one of "
                          f"{', '.join(sorted(SOURCE_MODULES))}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{section.name}.type: source {kind!r} is not available: {exc}"
                          ) from None
    settings = module.parse_settings(section, base)
    section.done()
    return SourceConfig(kind, settings)


def build_source(cfg: SourceConfig, ctx: SourceContext) -> Source:
    module = importlib.import_module(SOURCE_MODULES[cfg.type])
    return module.build(cfg.settings, ctx)
