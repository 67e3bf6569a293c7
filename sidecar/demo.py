"""`sidecar demo`: an active/standby pair of real sidecar processes on this machine.

Steps: start node A (active) and node B (standby) on 127.0.0.1, register a bounded synthetic
load through A, check B holds exactly the same contacts (digest of every field), refresh and
de-register some, kill -9 B, keep registering on A, restart B and watch it resync, then kill -9
A and restart it empty: it gets every contact back from B. A summary table closes the run.
Only loopback addresses are used; every wait has a deadline.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from .lab.nodes import NodeProcess, make_pair, wait_until
from .lab.synthetic import contact, contacts

BATCH = 2000


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.rows: list[tuple[float, str, str]] = []

    def step(self, what: str, result: str = "") -> None:
        t = time.monotonic() - self.t0
        self.rows.append((t, what, result))
        print(f"[{t:6.2f}s] {what}{': ' + result if result else ''}", flush=True)

    def table(self) -> str:
        w = max(len(r[1]) for r in self.rows)
        lines = [f"{'t (s)':>7}  {'step'.ljust(w)}  result", f"{'-' * 7}  {'-' * w}  {'-' * 30}"]
        lines += [f"{t:7.2f}  {what.ljust(w)}  {res}" for t, what, res in self.rows]
        return "\n".join(lines)


def _same(a: NodeProcess, b: NodeProcess, count: int) -> bool:
    da, db = a.mi("sc_digest"), b.mi("sc_digest")
    return da == db and da["count"] == count


def _register(node: NodeProcess, start: int, count: int) -> float:
    t = time.perf_counter()
    for i in range(start, start + count, BATCH):
        node.push(contacts(i, min(BATCH, start + count - i)))
    return time.perf_counter() - t


def run(workdir: Path, n: int) -> bool:
    tl = Timeline()
    a, b = make_pair(workdir)
    try:
        a.start()
        b.start()
        tl.step("start node A (active) and node B (standby)",
                f"A admin :{a.admin_port}, B admin :{b.admin_port}")
        wait_until(lambda: b.mi("sc_status")["peers"][0]["state"] == "live", 20,
                   what="B follows A")
        tl.step("replication link up", "B live on A's stream")

        t = time.perf_counter()
        _register(a, 0, n)
        wait_until(lambda: _same(a, b, n), 60, what="B equals A")
        tl.step(f"register {n:,} phones on A (half behind NAT)",
                f"B identical after {time.perf_counter() - t:.2f}s")

        refreshed = n // 4
        before = a.mi("sc_status")["publisher"]
        a.push([contact(i, version=2) for i in range(refreshed)])
        wait_until(lambda: a.mi("sc_status")["publisher"]["changes"] >= before["changes"]
                   + refreshed, 30, what="refreshes published")
        after = a.mi("sc_status")["publisher"]
        per_refresh = (after["bytes"] - before["bytes"]) / (after["changes"] - before["changes"])
        gone = [contact(i) for i in range(n - 100, n)]
        a.push([(c[0], c[1], c[7], 3) for c in gone])
        wait_until(lambda: _same(a, b, n - 100), 30, what="refresh/delete replicated")
        st = b.mi("sc_status")
        tl.step(f"re-register {refreshed:,} and de-register 100",
                f"B identical; {st['store']['refreshes']:,} refreshes at "
                f"{per_refresh:.1f} bytes each on the wire")

        b.kill(signal.SIGKILL)
        tl.step("kill -9 node B", "")
        _register(a, n, n // 4)
        tl.step(f"register {n // 4:,} more phones on A while B is down", "")
        t = time.perf_counter()
        b.start()
        total = n - 100 + n // 4
        wait_until(lambda: _same(a, b, total), 60, what="B resynced")
        tl.step("restart node B", f"resynced {total:,} contacts in "
                f"{time.perf_counter() - t:.2f}s, digests equal")

        a.kill(signal.SIGKILL)
        tl.step("kill -9 node A", "")
        t = time.perf_counter()
        a.start()
        wait_until(lambda: _same(a, b, total), 60, what="A restored")
        tl.step("restart node A with empty memory",
                f"got all {total:,} contacts back from B in {time.perf_counter() - t:.2f}s")
        ok = True
    except Exception as exc:  # the demo reports, never hides, a failure
        tl.step("FAILED", str(exc))
        for node in (a, b):
            if node.log_path.exists():
                print(f"--- {node.log_path} (tail) ---")
                print(node.log_path.read_text()[-2000:])
        ok = False
    finally:
        a.kill()
        b.kill()
    print("\nusrloc sidecar demo: active/standby pair on 127.0.0.1\n")
    print(tl.table())
    print(f"\nresult: {'OK - no contact lost' if ok else 'FAILED'}")
    return ok


def main(contacts: int = 50_000) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        return 0 if run(Path(tmp), contacts) else 1


if __name__ == "__main__":
    sys.exit(main())
