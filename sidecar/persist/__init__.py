"""Local durability: snapshot files + append-only change log (DESIGN §8, issue 5 item 1)."""

from .change_log import Damage, PersistError
from .durability import (
    FSYNC_POLICIES,
    Durability,
    DurabilityStats,
    RestoreReport,
    SnapshotInfo,
    measure_append_rate,
    measure_restore,
)

__all__ = [
    "FSYNC_POLICIES",
    "Damage",
    "Durability",
    "DurabilityStats",
    "PersistError",
    "RestoreReport",
    "SnapshotInfo",
    "measure_append_rate",
    "measure_restore",
]
