"""A node's incarnation number: strictly increasing across restarts, even within one second
or after the clock steps back.

Peers tell a restarted node from a continuing one by its incarnation (a new one means "my
sequence numbers and my memory start over"), and binding handles embed it, so reusing one would
let a refresh land on the wrong contact. The last value is kept in ``STATE_DIR/incarnation``
and written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FILE_NAME = "incarnation"
MAX_INCARNATION = 0xFFFFFFFF  # 32 bits in a handle


class IncarnationError(RuntimeError):
    """The state directory cannot be read or written."""


def next_incarnation(state_dir: Path, now: float | None = None, minimum: int = 0) -> int:
    """Record and return a new incarnation: max(now, last + 1, minimum)."""
    path = state_dir / FILE_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        last = 0
        if path.exists():
            text = path.read_text().strip()
            last = int(text) if text.isdigit() else 0
        value = max(int(time.time() if now is None else now), last + 1, minimum)
        if value > MAX_INCARNATION:
            raise IncarnationError(f"{path}: incarnation {value} does not fit in 32 bits")
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{value}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise IncarnationError(f"cannot keep the node state in {state_dir}: {exc}") from None
    return value
