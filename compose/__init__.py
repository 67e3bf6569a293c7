"""The lab topology: network namespaces for tests (``compose.lab``), docker-compose for users.

The importable code lives in :mod:`sidecar.lab.netns` so that installed code (the demo, the
benchmarks) can use it; ``compose.lab`` re-exports it and adds a command line.
"""
