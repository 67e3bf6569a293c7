"""Kamailio reconcile source: the rules of one reconcile, settings, failures, and the proof.

The first tests run :func:`reconcile` on a real Replica with ``ul.dump`` results shaped as
Kamailio 5.6 sends them (parsed by the real ``parse_ul_dump``). The ``slow`` tests start
Debian's Kamailio with kamailio-cfg, register 10,000 SIPp phones, then start a fresh
``sidecar run`` whose only source is this one and require its table to equal ``ul.dump``, also
after some phones unregister.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.lab.nodes import NodeProcess, wait_until
from sidecar.model import (
    CSEQ,
    EXPIRES,
    FLAG_NAT,
    FLAGS,
    HANDLE,
    LAST_MODIFIED,
    RECEIVED,
    handle_origin,
    make_record,
    now_ms,
)
from sidecar.proxy.kamailio_dump import UL_ADD_CALLID, parse_ul_dump
from sidecar.replica import Replica
from sidecar.sources.kamailio_source import (
    KamailioSettings,
    KamailioSource,
    dump_clock,
    reconcile,
)
from sidecar.sources.registry import SourceContext
from tests.kamailio_fixture import (
    KamailioInstance,
    Phone,
    free_port,
    require_kamailio,
    require_sipp,
    sipp_register,
)
from tests.sip_load import (
    LoadRow,
    compare,
    node_contacts,
    plan_load,
    proxy_dump,
    run_load,
    run_rows,
)

SOCK = "udp:127.0.0.2:5060"
PEER_HANDLE = (2 << 56) | (1 << 24) | 1  # a binding node 2 created (replicated to us)


def kam_contact(uri: str, *, callid: str = "c1@phone", cseq: int = 1, remaining: int = 600,
                received: str | None = None, cflags: int = 0, instance: str | None = None,
                reg_id: int = 0, socket: str | None = SOCK) -> dict[str, Any]:
    """One contact object exactly as Kamailio 5.6 ``ul.dump`` writes it."""
    unset = "[not set]"
    return {"Contact": {
        "Address": uri, "Expires": remaining, "Q": -1, "Call-ID": callid, "CSeq": cseq,
        "User-Agent": "phone", "Received": received or unset, "Path": unset,
        "State": "CS_NEW", "Flags": 0, "CFlags": cflags, "Socket": socket or unset,
        "Methods": 4294967295, "Ruid": "uloc-1", "Instance": instance or unset,
        "Reg-Id": reg_id, "Server-Id": 0, "Tcpconn-Id": -1, "Keepalive": 0,
        "Last-Keepalive": 0, "KA-Roundtrip": 0, "Last-Modified": 1}}


def dump(aors: dict[str, list[dict]], *, table: str = "location", now: int | None = None
         ) -> list[dict[str, Any]]:
    result = {"Domains": [{"Domain": {"Domain": table, "Size": 1024, "AoRs": [
        {"Info": {"AoR": aor, "HashID": 1, "Contacts": contacts}}
        for aor, contacts in aors.items()], "Stats": {"Records": len(aors)}}}]}
    return parse_ul_dump(result, now=int(time.time()) if now is None else now)


def own_record(replica: Replica, aor: str, uri: str, *, lm: int, callid: str = "old@phone",
               expires_in: int = 600) -> tuple:
    rec = make_record(aor=aor, uri=uri, callid=callid, cseq=1,
                      expires=int(time.time()) + expires_in, handle=0, last_modified=lm,
                      socket=SOCK)
    assert replica.local_put(rec) == "put"
    return replica.store.get(aor, uri)


def peer_record(replica: Replica, aor: str, uri: str, *, callid: str = "peer@phone",
                cseq: int = 1) -> tuple:
    """A binding that arrived by replication (origin = node 2)."""
    rec = make_record(aor=aor, uri=uri, callid=callid, cseq=cseq,
                      expires=int(time.time()) + 600, handle=PEER_HANDLE,
                      last_modified=now_ms() - 10_000, socket="udp:127.0.0.3:5060")
    assert replica.store.put(rec)
    return rec


ALICE = "sip:alice@127.0.0.1:5062"
NAT = "sip:natphone@127.0.0.77:5060"
OUTBOUND = "sip:bob@127.0.0.1:5064;ob"
INSTANCE = "<urn:uuid:00000000-0000-1000-8000-000000000001>"


def sample_dump(**alice) -> list[dict[str, Any]]:
    return dump({
        "alice": [kam_contact(ALICE, **alice)],
        "natphone": [kam_contact(NAT, received="sip:127.0.0.1:5063", cflags=192)],
        "bob": [kam_contact(OUTBOUND, instance=INSTANCE, reg_id=1)],
        "carol": [kam_contact("sip:carol@127.0.0.9", callid=UL_ADD_CALLID, socket=None)],
    })


# --- reconcile rules ------------------------------------------------------------------------

def test_fresh_replica_takes_every_registered_contact():
    replica = Replica(1)
    start = now_ms()
    c = reconcile(replica, sample_dump(), dump_start_ms=start)
    assert (c.contacts_seen, c.puts, c.loaded_by_rpc, c.deletes) == (4, 3, 1, 0)
    store = replica.store
    assert len(store) == 3 and store.get("carol", "sip:carol@127.0.0.9") is None
    nat = store.get("natphone", NAT)
    assert nat[RECEIVED] == "sip:127.0.0.1:5063" and nat[FLAGS] & FLAG_NAT
    assert store.get("bob", f"{INSTANCE}\x1f1") is not None  # outbound binding key
    for rec in store:
        assert handle_origin(rec[HANDLE]) == 1 and rec[LAST_MODIFIED] == start
    assert len(replica.outbox.pending) == 3  # queued for the peers


def test_second_reconcile_is_unchanged_despite_expires_wobble():
    replica = Replica(1)
    reconcile(replica, sample_dump(), dump_start_ms=now_ms() - 1000)
    queued = len(replica.outbox.pending)
    again = reconcile(replica, sample_dump(remaining=601), dump_start_ms=now_ms())
    assert (again.unchanged, again.puts, again.refreshes, again.deletes) == (3, 0, 0, 0)
    assert len(replica.outbox.pending) == queued  # nothing new to publish


def test_re_registration_and_changed_fields_are_taken():
    replica = Replica(1)
    reconcile(replica, sample_dump(), dump_start_ms=now_ms() - 2000)
    c = reconcile(replica, sample_dump(cseq=2, remaining=1200), dump_start_ms=now_ms() - 1000)
    assert (c.refreshes, c.unchanged) == (1, 2)
    alice = replica.store.get("alice", ALICE)
    assert alice[CSEQ] == 2 and abs(alice[EXPIRES] - (time.time() + 1200)) <= 2
    c = reconcile(replica, sample_dump(cseq=2, remaining=1200, received="sip:127.0.0.1:9"),
                  dump_start_ms=now_ms())
    assert c.puts == 1
    assert replica.store.get("alice", ALICE)[RECEIVED] == "sip:127.0.0.1:9"


def test_own_binding_gone_from_kamailio_is_deleted_only_if_older_than_the_dump():
    replica = Replica(1)
    start = now_ms()
    own_record(replica, "gone", "sip:gone@127.0.0.1:1", lm=start - 5000)
    own_record(replica, "fresh", "sip:fresh@127.0.0.1:1", lm=start + 50)  # learned mid-dump
    own_record(replica, "dying", "sip:dying@127.0.0.1:1", lm=start - 5000, expires_in=1)
    c = reconcile(replica, sample_dump(), dump_start_ms=start)
    assert c.deletes == 1 and c.newer_here == 1
    store = replica.store
    assert store.get("gone", "sip:gone@127.0.0.1:1") is None
    assert store.get("fresh", "sip:fresh@127.0.0.1:1") is not None
    # About to expire: Kamailio already calls it expired, the store's expiry removes it.
    assert store.get("dying", "sip:dying@127.0.0.1:1") is not None
    assert replica.outbox.pending[-1][:3] == ("gone", "sip:gone@127.0.0.1:1", "old@phone")


def test_peer_bindings_are_never_deleted_and_warm_loaded_copies_are_not_taken_over():
    replica = Replica(1)
    peer_only = peer_record(replica, "remote", "sip:remote@127.0.0.3:1")
    carol = peer_record(replica, "carol", "sip:carol@127.0.0.9")
    c = reconcile(replica, sample_dump(), dump_start_ms=now_ms())
    assert c.deletes == 0 and c.loaded_by_rpc == 1
    assert replica.store.get("remote", "sip:remote@127.0.0.3:1") == peer_only
    assert replica.store.get("carol", "sip:carol@127.0.0.9") == carol


def test_peer_binding_the_proxy_now_holds_itself_is_taken_over():
    replica = Replica(1)
    peer_record(replica, "alice", ALICE, callid="c1@phone", cseq=1)
    c = reconcile(replica, sample_dump(cseq=5), dump_start_ms=now_ms())
    assert c.puts == 3
    rec = replica.store.get("alice", ALICE)
    assert rec[CSEQ] == 5 and handle_origin(rec[HANDLE]) == 1


def test_binding_changed_after_the_dump_started_is_left_alone():
    replica = Replica(1)
    start = now_ms()
    newer = own_record(replica, "alice", ALICE, lm=start + 100, callid="new@phone")
    c = reconcile(replica, sample_dump(), dump_start_ms=start)
    assert c.newer_here == 1
    assert replica.store.get("alice", ALICE) == newer


def test_other_tables_domains_and_invalid_contacts():
    replica = Replica(1)
    other = dump({"x": [kam_contact("sip:x@127.0.0.1:1")]}, table="other")
    assert reconcile(replica, other, dump_start_ms=now_ms()).contacts_seen == 0
    with_domain = dump({"dave@example.org": [kam_contact("sip:dave@127.0.0.1:1")],
                        "eve": [kam_contact("sip:eve@127.0.0.1:1", callid="")]})
    c = reconcile(replica, with_domain, dump_start_ms=now_ms(), use_domain=False)
    assert (c.puts, c.invalid) == (1, 1)
    assert replica.store.get("dave", "sip:dave@127.0.0.1:1") is not None
    c = reconcile(Replica(1), with_domain, dump_start_ms=now_ms(), use_domain=True)
    assert c.puts == 1


def test_dump_clock_is_exact_within_one_second_and_midpoint_across():
    assert dump_clock(1000.1, 1000.9) == 1000
    assert dump_clock(1000.6, 1001.9) == 1001
    assert dump_clock(1000.9, 1003.0) == 1002


# --- settings -------------------------------------------------------------------------------

def source_config(**table) -> KamailioSettings:
    return parse_config({"node": {"id": 1}, "sources": [{"type": "kamailio", **table}]},
                        Path("/etc/sidecar")).sources[0].settings


def test_settings_values_and_relative_fifo():
    s = source_config(rpc_url="http://127.0.0.1:5071/RPC")
    assert (s.rpc_url, s.fifo, s.reconcile_interval_s, s.use_domain, s.table) == (
        "http://127.0.0.1:5071/RPC", None, 60.0, False, "location")
    s = source_config(fifo="run/kamailio_rpc.fifo", fifo_reply_dir="/tmp/k/",
                      reconcile_interval_s=0, use_domain=True, nat_bflag=3)
    assert s.fifo == Path("/etc/sidecar/run/kamailio_rpc.fifo")
    assert (s.reconcile_interval_s, s.use_domain, s.nat_bflag) == (0.0, True, 3)


@pytest.mark.parametrize(("table", "key"), [
    ({}, "sources[0].rpc_url"),
    ({"rpc_url": "http://x/RPC", "fifo": "/f"}, "sources[0].rpc_url"),
    ({"rpc_url": "ftp://127.0.0.1/RPC"}, "sources[0].rpc_url"),
    ({"rpc_url": "http://x/RPC", "reconcile_interval_s": -1}, "sources[0].reconcile_interval_s"),
    ({"rpc_url": "http://x/RPC", "use_domain": 1}, "sources[0].use_domain"),
    ({"rpc_url": "http://x/RPC", "table": ""}, "sources[0].table"),
    ({"rpc_url": "http://x/RPC", "nat_bflag": 40}, "sources[0].nat_bflag"),
    ({"rpc_url": "http://x/RPC", "interval": 5}, "sources[0].interval"),
])
def test_settings_errors_name_the_key(table, key):
    with pytest.raises(ConfigError) as err:
        source_config(**table)
    assert str(err.value).startswith(key + ":")


# --- the source: failures never end it --------------------------------------------------------

async def test_unreachable_kamailio_is_counted_and_retried():
    port = free_port("127.0.0.1")  # nothing listens there
    replica = Replica(1)
    settings = KamailioSettings(rpc_url=f"http://127.0.0.1:{port}/RPC",
                                reconcile_interval_s=0.05, timeout_s=1)
    source = KamailioSource(settings, SourceContext(replica, lambda: None, None, 1))  # type: ignore[arg-type]
    await source.start()
    try:
        async with asyncio.timeout(5):
            while source.status()["errors"] < 2:
                await asyncio.sleep(0.01)
        st = source.status()
        assert st["reconciles"] == 0 and "unreachable" in st["last_error"]
    finally:
        await source.stop()


@pytest.mark.slow
async def test_reconcile_over_fifo_from_a_real_kamailio(tmp_path):
    require_kamailio()
    require_sipp()
    async with KamailioInstance(tmp_path, sip_ip="127.0.0.2") as kam:
        port = free_port("127.0.0.1")
        await sipp_register(Phone(user="zoe", port=port, callid="z1@sipp"), kam)
        await sipp_register(Phone(user="nat", port=port, via_host="127.0.0.77",
                                  via_port=5060, contact="<sip:nat@127.0.0.77:5060>",
                                  callid="n1@sipp"), kam)
        replica = Replica(1)
        kicks: list[int] = []
        settings = KamailioSettings(fifo=kam.fifo_path, fifo_reply_dir=kam.reply_dir,
                                    reconcile_interval_s=0)
        source = KamailioSource(settings, SourceContext(replica, lambda: kicks.append(1),
                                                        None, 1))  # type: ignore[arg-type]
        counts = await source.reconcile_now()
        await source.stop()
        assert counts is not None and counts.puts == 2 and kicks
        truth = await proxy_dump(kam)
    assert compare(replica.store.records(), truth,
                   fields=("received", "socket", "path", "callid", "cseq")) == []
    assert replica.store.get("nat", "sip:nat@127.0.0.77:5060")[FLAGS] & FLAG_NAT
    assert source.status()["reconciles"] == 1 and source.status()["last_duration_s"] > 0


# --- the proof: 10,000 SIPp phones, a fresh sidecar reconciles --------------------------------

PROOF_FIELDS = ("received", "socket", "path", "callid", "cseq")


def reconcile_node(node_id: int, workdir: Path, rpc_url: str) -> NodeProcess:
    return NodeProcess(node_id, workdir, extra_toml=(
        f'[[sources]]\ntype = "kamailio"\nrpc_url = "{rpc_url}"\n'
        "reconcile_interval_s = 1\n"))


def wait_equal(node: NodeProcess, truth: list[dict], timeout: float) -> None:
    diffs: list[str] = []

    def equal() -> bool:
        nonlocal diffs
        # Two independent dumps of "seconds remaining" are each exact to +-1 s.
        diffs = compare(node_contacts(node), truth, tolerance_s=2, fields=PROOF_FIELDS)
        return not diffs

    try:
        wait_until(equal, timeout, interval=0.2, what="replica equal to ul.dump")
    except TimeoutError:
        raise AssertionError(f"{len(diffs)} differences, first: {diffs[:10]}") from None


@pytest.mark.slow
def test_fresh_sidecar_reconciles_10k_phones_and_later_unregistrations(tmp_path):
    require_kamailio()
    require_sipp()
    with KamailioInstance(tmp_path, sip_ip="127.0.0.2", pkg_mb=64) as kam:
        plan = plan_load(10_000, phone_port=free_port("127.0.0.1"))
        report = asyncio.run(run_load(plan, kam, workdir=tmp_path / "sipp", rate=2000))
        truth = asyncio.run(proxy_dump(kam))
        assert plan.check_proxy(truth, kam.sip_socket) == []

        c = reconcile_node(1, tmp_path / "c", kam.rpc_url)
        d = NodeProcess(2, tmp_path / "d")
        c.peers, d.peers = [d], [c]
        try:
            started = time.monotonic()
            c.start()
            d.start()
            wait_equal(c, truth, timeout=30)
            converged = time.monotonic() - started
            status = c.mi("sc_status")["sources"]["kamailio"]
            assert status["errors"] == 0 and status["puts"] == 9500, status

            # Some phones leave (Contact: * and a single Expires: 0): the next reconcile
            # deletes exactly those.
            kept = {(x["aor"], x["uri"]) for x in truth}
            leaving = [f"u{i}" for i in range(0, 10_000, 50) if i % 20 not in (1, 2, 4)]
            rows = [LoadRow(u, "*", f"{plan.phone_ip}:{plan.phone_port}", 0) for u in leaving]
            rows.append(LoadRow("u5", f"<sip:u5@{plan.phone_ip}:{plan.phone_port}>",
                                f"{plan.phone_ip}:{plan.phone_port}", 0))
            asyncio.run(run_rows(rows, kam, phone_ip=plan.phone_ip, phone_port=plan.phone_port,
                                 callid_pattern="leave-%u@load", workdir=tmp_path / "sipp",
                                 name="leave"))
            after = asyncio.run(proxy_dump(kam))
            gone = len(kept) - len(after)
            assert gone > 200
            wait_equal(c, after, timeout=15)
            end = c.mi("sc_status")["sources"]["kamailio"]
            assert end["deletes"] == gone and end["reconciles"] >= 2, end
            # Later reconciles found nothing to correct: no churn from expiry wobble.
            assert (end["puts"], end["refreshes"], end["stale"]) == (9500, 0, 0), end

            wait_until(lambda: c.mi("sc_digest") == d.mi("sc_digest"), 20, interval=0.2,
                       what="replica D equal to C")
            assert d.mi("sc_digest")["count"] == len(after)
            print(f"\nSIPp+Kamailio: {report.register.rate:.0f} REGISTER/s; fresh sidecar "
                  f"equal to ul.dump of {len(truth)} contacts {converged:.2f} s after its "
                  f"start (last ul.dump + reconcile {status['last_duration_s']} s)")
        finally:
            c.stop()
            d.stop()
