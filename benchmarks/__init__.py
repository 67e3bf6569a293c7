"""Benchmark runner: `python -m benchmarks NAME [--quick] [--json PATH]`."""
