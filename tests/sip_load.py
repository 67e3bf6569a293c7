"""A bounded SIPp REGISTER load of N distinct phones against a real Kamailio, plus checks.

Reusable by any test or benchmark that needs a realistic, large location table quickly:

    from tests.sip_load import compare, plan_load, proxy_dump, run_load

    plan = plan_load(10_000, phone_port=free_port())
    report = await run_load(plan, kam, workdir=tmp_path)      # both phases, ~10 s
    dump = await proxy_dump(kam)
    assert plan.check_proxy(dump, kam.sip_socket) == []
    assert compare(sidecar_contacts, dump) == []

The mix (deterministic by user index, see :func:`plan_load`): plain phones; phones behind NAT
(Contact and Via on ``nat_ip`` while the packets come from ``phone_ip``, so Kamailio stores a
``received``); phones with two contacts (two registrations, different Contact URIs and
Call-IDs). Then a second phase unregisters some: a single contact with ``Expires: 0``, and
``Contact: *`` with ``Expires: 0`` for some two-contact phones.

One SIPp process per phase sends one REGISTER per line of an injection file
(``tests/sipp/register_load.xml``) at a fixed rate from one UDP socket, with ``-m`` (calls),
``-timeout`` (wall time) and a per-REGISTER reply timeout, so it always exits by itself; a
second phase starts only after the first finished, so a phone's unregistration can never
overtake its registration. Only 127.0.0.x addresses are used.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.model import to_dict
from sidecar.proxy.kamailio_dump import parse_ul_dump
from sidecar.sources.kamailio_source import dump_clock
from tests.kamailio_fixture import SIPP_DIR, KamailioInstance, require_sipp

LOAD_SCENARIO = SIPP_DIR / "register_load.xml"
DEFAULT_RATE = 2000  # REGISTERs per second
USER_AGENT = "sipp-load"


@dataclass(frozen=True, slots=True)
class LoadRow:
    """One REGISTER of the load (one line of SIPp's injection file)."""

    user: str
    contact: str  # whole Contact value: "<sip:...>" or "*"
    via: str  # host:port the phone believes it has
    expires: int
    cseq: int = 1

    def csv_line(self) -> str:
        for value in (self.user, self.contact, self.via):
            if ";" in value or "\n" in value:
                raise ValueError(f"{value!r}: SIPp injection fields cannot hold ';'")
        return f"{self.user};{self.contact};{self.via};{self.expires};{self.cseq}"


@dataclass(frozen=True, slots=True)
class ExpectedBinding:
    """What the registrar should hold for one binding once both phases ran."""

    aor: str
    uri: str
    callid: str
    expires: int  # seconds granted (relative)
    received: str | None


@dataclass
class LoadPlan:
    """Rows of both phases and the table they must leave behind."""

    n_users: int
    phone_ip: str
    phone_port: int
    nat_ip: str
    tag: str  # makes this plan's Call-IDs unique
    register: list[LoadRow] = field(default_factory=list)
    unregister: list[LoadRow] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # user kind -> how many

    def callid_pattern(self, phase: str) -> str:
        """SIPp -cid_str of a phase; %u is the 1-based line number of the injection file."""
        return f"{self.tag}{phase}-%u@load"

    def callid(self, phase: str, index: int) -> str:
        return self.callid_pattern(phase).replace("%u", str(index + 1))

    def expected(self) -> dict[tuple[str, str], ExpectedBinding]:
        """Bindings left after both phases, keyed by (aor, contact uri)."""
        out: dict[tuple[str, str], ExpectedBinding] = {}
        for i, row in enumerate(self.register):
            uri = row.contact.strip("<>")
            received = (None if row.via.startswith(f"{self.phone_ip}:")
                        else f"sip:{self.phone_ip}:{self.phone_port}")
            out[(row.user, uri)] = ExpectedBinding(row.user, uri, self.callid("r", i),
                                                   row.expires, received)
        for row in self.unregister:
            if row.contact == "*":
                for key in [k for k in out if k[0] == row.user]:
                    del out[key]
            else:
                out.pop((row.user, row.contact.strip("<>")), None)
        return out

    def check_proxy(self, dump: Iterable[Mapping[str, Any]], socket: str) -> list[str]:
        """Differences between the proxy's ``ul.dump`` and :meth:`expected` (sanity check of
        the load itself: every phone registered and unregistered as planned)."""
        want = self.expected()
        diffs: list[str] = []
        seen: set[tuple[str, str]] = set()
        for c in dump:
            key = (c["aor"], c["uri"])
            seen.add(key)
            exp = want.get(key)
            if exp is None:
                diffs.append(f"unexpected binding in the proxy: {key}")
                continue
            for name, value in (("callid", exp.callid), ("received", exp.received),
                                ("socket", socket)):
                if c.get(name) != value:
                    diffs.append(f"{key}: proxy {name} {c.get(name)!r}, planned {value!r}")
        diffs += [f"planned binding missing in the proxy: {k}" for k in want if k not in seen]
        return diffs


def plan_load(n_users: int, *, phone_port: int, phone_ip: str = "127.0.0.1",
              nat_ip: str = "127.0.0.9", prefix: str = "u", tag: str | None = None) -> LoadPlan:
    """N distinct phones; by user index ``i``:

    * ``i % 10 in (0, 1)``: behind NAT (Contact/Via ``nat_ip:5060+i%1000``);
    * ``i % 10 in (2, 3)``: two contacts (``<sip:uI@ip:port>`` and ``<sip:uI-2@ip:port>``),
      the second registered after every first registration;
    * otherwise a plain phone.

    Phase two: ``i % 20 == 4`` (plain) and ``i % 20 == 1`` (NAT) remove their contact with
    Expires 0; ``i % 20 == 2`` sends ``Contact: *`` with Expires 0; ``i % 20 == 3`` removes only
    its second contact. Expires granted vary between 300 and 3599 s.
    """
    if not phone_ip.startswith("127.") or not nat_ip.startswith("127."):
        raise ValueError("the load only uses loopback addresses")
    plan = LoadPlan(n_users, phone_ip, phone_port, nat_ip, tag or secrets.token_hex(3))
    seconds: list[LoadRow] = []
    kinds = {"plain": 0, "nat": 0, "two_contacts": 0, "unregister_one": 0,
             "unregister_wildcard": 0}
    here = f"{phone_ip}:{phone_port}"
    for i in range(n_users):
        user = f"{prefix}{i}"
        expires = 300 + (i * 37) % 3300
        kind = i % 10
        if kind in (0, 1):
            kinds["nat"] += 1
            nat = f"{nat_ip}:{5060 + i % 1000}"
            row = LoadRow(user, f"<sip:{user}@{nat}>", nat, expires)
        else:
            row = LoadRow(user, f"<sip:{user}@{here}>", here, expires)
            if kind in (2, 3):
                kinds["two_contacts"] += 1
                seconds.append(LoadRow(user, f"<sip:{user}-2@{here}>", here, expires))
            else:
                kinds["plain"] += 1
        plan.register.append(row)
        phase2 = i % 20
        if phase2 in (1, 4):
            kinds["unregister_one"] += 1
            plan.unregister.append(LoadRow(user, row.contact, row.via, 0))
        elif phase2 == 2:
            kinds["unregister_wildcard"] += 1
            plan.unregister.append(LoadRow(user, "*", here, 0))
        elif phase2 == 3:
            kinds["unregister_one"] += 1
            plan.unregister.append(LoadRow(user, f"<sip:{user}-2@{here}>", here, 0))
    plan.register += seconds
    plan.kinds = kinds
    return plan


@dataclass(frozen=True, slots=True)
class SippRun:
    rows: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """REGISTERs per second, each answered by a 200 (SIPp fails the run otherwise)."""
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LoadReport:
    register: SippRun
    unregister: SippRun | None


async def run_rows(rows: Sequence[LoadRow], proxy: KamailioInstance, *, phone_ip: str,
                   phone_port: int, callid_pattern: str, workdir: str | os.PathLike[str],
                   rate: int = DEFAULT_RATE, timeout_s: float | None = None,
                   name: str = "load") -> SippRun:
    """Send ``rows`` with one SIPp process; every REGISTER must get a 200 (AssertionError
    otherwise, with SIPp's error log). Bounded: -m rows, -timeout, per-reply timeout."""
    sipp = require_sipp()
    if not rows:
        return SippRun(0, 0.0)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    csv = work / f"{name}.csv"
    csv.write_text("SEQUENTIAL\n" + "\n".join(r.csv_line() for r in rows) + "\n")
    errors = work / f"{name}_errors.log"
    limit = timeout_s if timeout_s is not None else 20 + 2 * len(rows) / rate
    cmd = [sipp, f"{proxy.sip_ip}:{proxy.sip_port}", "-sf", str(LOAD_SCENARIO),
           "-inf", str(csv), "-i", phone_ip, "-p", str(phone_port), "-t", "u1",
           "-m", str(len(rows)), "-r", str(rate), "-rp", "1000", "-l", str(len(rows)),
           "-timeout", f"{int(limit)}s", "-timeout_error", "-nostdin", "-nd",
           "-buff_size", str(4 * 1024 * 1024), "-cid_str", callid_pattern,
           "-trace_err", "-error_file", str(errors)]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=work)
    try:
        async with asyncio.timeout(limit + 10):
            _, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"sipp {name} did not exit within {limit + 10} s") from None
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        try:
            log = errors.read_text(errors="replace")[-3000:]
        except OSError:
            log = ""
        raise AssertionError(f"sipp {name}: exit {proc.returncode} (some REGISTERs failed)\n"
                             f"{stderr.decode(errors='replace')[-1000:]}\n{log}")
    return SippRun(len(rows), elapsed)


async def run_load(plan: LoadPlan, proxy: KamailioInstance, *,
                   workdir: str | os.PathLike[str], rate: int = DEFAULT_RATE,
                   unregister: bool = True) -> LoadReport:
    """Phase one (every registration), then phase two (the unregistrations)."""
    common = {"phone_ip": plan.phone_ip, "phone_port": plan.phone_port, "workdir": workdir,
              "rate": rate}
    reg = await run_rows(plan.register, proxy, callid_pattern=plan.callid_pattern("r"),
                         name=f"{plan.tag}-register", **common)
    unreg = None
    if unregister:
        unreg = await run_rows(plan.unregister, proxy, callid_pattern=plan.callid_pattern("u"),
                               name=f"{plan.tag}-unregister", **common)
    return LoadReport(reg, unreg)


# --- comparing a replica with the proxy -----------------------------------------------------

async def proxy_dump(proxy: KamailioInstance, *, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The proxy's whole location table (``ul.dump`` over HTTP), with absolute expiries taken
    against the second Kamailio most likely computed them in (see ``dump_clock``)."""
    async with proxy.http_rpc(timeout) as rpc:
        started = time.time()
        result = await rpc.call("ul.dump")
        finished = time.time()
    return parse_ul_dump(result, now=dump_clock(started, finished))


def _as_dict(rec: tuple | Mapping[str, Any]) -> Mapping[str, Any]:
    return to_dict(rec) if isinstance(rec, tuple) else rec


def compare(replica_records: Iterable[tuple | Mapping[str, Any]],
            kamailio_dump: Iterable[Mapping[str, Any]], tolerance_s: float = 1, *,
            fields: Sequence[str] = ("received", "socket")) -> list[str]:
    """Differences between a sidecar's contacts and a proxy's ``ul.dump`` (empty = equal).

    ``replica_records`` are model tuples or their dict form (``to_dict``, the admin
    ``ul_dump`` contacts); ``kamailio_dump`` is :func:`parse_ul_dump` output. Bindings are
    matched by (aor, uri); each must agree on ``fields`` and on expires within
    ``tolerance_s`` (0 = permanent must match exactly).
    """
    ours: dict[tuple[str, str], Mapping[str, Any]] = {}
    diffs: list[str] = []
    for rec in replica_records:
        d = _as_dict(rec)
        key = (d["aor"], d["uri"])
        if key in ours:
            diffs.append(f"{key}: twice in the replica")
        ours[key] = d
    theirs: dict[tuple[str, str], Mapping[str, Any]] = {}
    for c in kamailio_dump:
        key = (c["aor"], c["uri"])
        if key in theirs:
            diffs.append(f"{key}: twice in the proxy dump")
        theirs[key] = c
    for key in theirs.keys() - ours.keys():
        diffs.append(f"{key}: in the proxy, missing from the replica")
    for key in ours.keys() - theirs.keys():
        diffs.append(f"{key}: in the replica, not in the proxy")
    for key in ours.keys() & theirs.keys():
        a, b = ours[key], theirs[key]
        for name in fields:
            if a.get(name) != b.get(name):
                diffs.append(f"{key}: {name} replica {a.get(name)!r} != proxy {b.get(name)!r}")
        ea, eb = a["expires"], b["expires"]
        if ((ea == 0 or eb == 0) and ea != eb) or abs(ea - eb) > tolerance_s:
            diffs.append(f"{key}: expires replica {ea} vs proxy {eb}")
    return sorted(diffs)


def node_contacts(node: Any, page: int = 10_000) -> list[dict[str, Any]]:
    """Every contact a running ``sidecar run`` holds, read through its admin ``ul_dump``
    (paged; ``node`` is a :class:`sidecar.lab.nodes.NodeProcess`)."""
    out: list[dict[str, Any]] = []
    for offset in itertools.count(0, page):
        reply = node.mi("ul_dump", {"offset": offset, "limit": page})
        for aor in reply["AORs"]:
            out.extend(aor["Contacts"])
        if reply["next_offset"] is None:
            return out
    raise AssertionError("unreachable")
