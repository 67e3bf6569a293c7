"""Dispatch to one benchmark; each prints a table and writes JSON (with the machine it ran on)."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "replication": "benchmarks.replication",
    "ingest": "benchmarks.ingest",
    "failover": "benchmarks.failover",
    "durability": "benchmarks.durability",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="where to write the JSON results")
    args = parser.parse_args(argv)
    module = importlib.import_module(BENCHMARKS[args.name])
    return module.main(quick=args.quick, json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
