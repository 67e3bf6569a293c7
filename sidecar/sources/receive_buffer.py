"""A big kernel receive buffer for the sources' sockets, so bursts wait instead of dropping.

Plain ``SO_RCVBUF`` is silently capped at ``net.core.rmem_max`` (4 MiB on Debian: about 0.2 s
of HEP at 20k messages/s — the ingest benchmark lost a registration storm to exactly that).
``SO_RCVBUFFORCE`` ignores the cap when the process has CAP_NET_ADMIN (root, or the
capability granted by systemd); without it we fall back to the capped value.
"""

from __future__ import annotations

import contextlib
import socket

SO_RCVBUFFORCE = 33  # Linux; not exported by Python's socket module


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for *size* bytes; returns what the kernel granted (it reports double, see man 7
    socket). Never raises."""
    if size <= 0:
        return 0
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError:
        return 0
