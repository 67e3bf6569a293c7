"""Machine description, result tables and JSON files shared by every benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(ValueError, OSError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(title: str, rows: list[tuple[str, Any, str]]) -> None:
    """rows: (key, value, target or note)."""
    width = max(len(r[0]) for r in rows)
    vw = max(len(_fmt(r[1])) for r in rows)
    print(f"\n{title}")
    print(f"{'metric'.ljust(width)}  {'value'.rjust(vw)}  target / note")
    print(f"{'-' * width}  {'-' * vw}  {'-' * 20}")
    for key, value, note in rows:
        print(f"{key.ljust(width)}  {_fmt(value).rjust(vw)}  {note}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_json(name: str, quick: bool, results: dict[str, Any], path: str | None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "quick": quick, "machine": machine(), **results}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON written to {out}")
    return out
