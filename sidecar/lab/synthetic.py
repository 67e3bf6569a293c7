"""Synthetic but realistic registrations for the demo and the benchmarks.

Field sizes follow what phones send (AOR user@domain, contact URI with transport, 32-hex
Call-ID, a handful of user-agent strings, half the phones behind NAT), so memory and wire
figures measured with them mean something for real deployments.
"""

from __future__ import annotations

import time

from ..model import FLAG_NAT, make_record

USER_AGENTS = ("Yealink SIP-T46S 66.86.0.15", "PolycomVVX-VVX_450-UA/6.4.3.5018",
               "Grandstream GXP2170 1.0.11.23", "Linphone/5.2.0 (belle-sip/5.2.0)",
               "Zoiper rv2.10.19.5", "Cisco/SPA504G-7.6.2f")
SOCKET = "udp:203.0.113.10:5060"


def contact(i: int, *, version: int = 1, expires_at: int | None = None,
            nat_ratio: float = 0.5) -> tuple:
    """Contact number *i* (stable AOR and URI), at registration *version* (its CSeq)."""
    nat = (i * 2654435761) % 1000 < nat_ratio * 1000
    private = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    host = private if nat else f"192.0.2.{i % 250 + 1}"
    port = 5060 + i % 2000
    exp = expires_at if expires_at is not None else int(time.time()) + 3600 + i % 600
    return make_record(
        aor=f"u{i:07d}@sip.example.com",
        uri=f"sip:u{i:07d}@{host}:{port};transport=udp",
        received=f"sip:198.51.100.{i % 250 + 1}:{1024 + i % 60000}" if nat else None,
        socket=SOCKET,
        expires=exp,
        callid=f"{i:016x}{i * 7919:016x}"[-32:] + "@phone",
        cseq=version,
        user_agent=USER_AGENTS[i % len(USER_AGENTS)],
        flags=FLAG_NAT if nat else 0,
        methods=8191,
        handle=0,
        last_modified=0,
    )


def contacts(start: int, count: int, **kw) -> list[tuple]:
    return [contact(i, **kw) for i in range(start, start + count)]
