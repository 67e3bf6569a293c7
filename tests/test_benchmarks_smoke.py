"""Tiny runs of the benchmarks, so they cannot rot unnoticed between real benchmark runs.

Each benchmark function runs at toy sizes against the same real parts it uses at full size
(``sidecar run`` processes, the paced sender, Kamailio and SIPp when installed) and must
produce every JSON key with nothing lost. The numbers themselves mean nothing at these sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ingest
from benchmarks.replication import raw_limit, run_throughput, stamped
from sidecar.lab.synthetic import contacts

INGEST_KEYS = (
    "parser_msgs_per_s", "parser_register_msgs_per_s", "parser_ok_msgs_per_s",
    "capture_in_process_pps", "hep_in_process_msgs_per_s", "opensips_in_process_events_per_s",
    "capture_max_lossless_pps", "capture_steps", "capture_note",
    "hep_max_lossless_msgs_per_s", "hep_steps",
    "opensips_events_per_s", "opensips_steps",
    "storm_registrations", "storm_rate_per_s", "storm_lost", "storm_note",
    "machine", "wall_s",
)


@pytest.mark.slow
def test_ingest_benchmark_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ingest.json"
    assert ingest.main(quick=True, json_path=str(out), sizes=ingest.SMOKE) == 0
    doc = json.loads(out.read_text())
    assert [k for k in INGEST_KEYS if k not in doc] == []
    assert "ingest benchmark" in capsys.readouterr().out

    assert doc["parser_msgs_per_s"] > 0 and doc["parser_message_bytes"]["register"] > 400
    rate = ingest.SMOKE.rates[0]
    for name, best in (("hep", "hep_max_lossless_msgs_per_s"),
                       ("opensips", "opensips_events_per_s")):
        steps = doc[f"{name}_steps"]
        assert steps and all(s["lost"] == 0 and s["kernel_drops"] == 0 for s in steps), steps
        assert doc[best] == rate, steps
    if ingest.capture_permitted() is None:
        steps = doc["capture_steps"]
        assert steps and all(s["lost"] == 0 for s in steps), steps
        assert doc["capture_max_lossless_pps"] == rate
    else:
        assert doc["capture_max_lossless_pps"] is None and "skipped" in doc["capture_note"]

    if ingest.storm_available() is None:
        assert doc["storm_error"] is None
        assert doc["storm_registrations"] == ingest.SMOKE.storm_registrations
        assert doc["storm_lost"] == 0 and doc["storm_extra_in_replica"] == 0
        assert doc["storm_dump_bindings"] == ingest.SMOKE.storm_registrations
        if ingest.capture_permitted() is None:
            assert doc["storm_capture_lost"] == 0 and doc["storm_capture_error"] is None
    else:
        assert doc["storm_lost"] is None and "skipped" in doc["storm_note"]


def test_hep_template_matches_the_encoder() -> None:
    framer = ingest.HepFramer(("127.0.0.5", 5062), ("127.0.0.1", 5060))
    framer.check(ingest.register_message(7, 5062))  # raises if the layouts differ


def test_storm_comparison_finds_missing_different_and_late_bindings() -> None:
    def c(aor: str, expires: int, **kw: object) -> dict:
        return {"aor": aor, "uri": f"sip:{aor}@127.0.0.1:5060", "expires": expires,
                "received": None, "socket": "udp:127.0.0.2:5060", "path": None,
                "callid": f"{aor}-cid", "cseq": 1, **kw}

    # Kamailio wrote "remaining" seconds somewhere between 1000.2 and 1002.9
    dump = ingest.TimedDump([c("a", 600), c("b", 600), c("c", 600), c("d", 0)], 1000.2, 1002.9)
    replica = [c("a", 1601), c("b", 1600, received="sip:127.0.0.9:5060"), c("c", 1604),
               c("d", 0), c("e", 1600)]
    lost, extra, examples = ingest.storm_differences(replica, dump)
    assert (lost, extra) == (2, 1), examples  # b differs, c expires too late; e is extra
    assert ingest.storm_differences(replica[:1], dump)[0] == 3  # b, c and d missing


def test_expiry_outliers_use_the_dump_order() -> None:
    dump = ingest.TimedDump([{"aor": f"u{i}", "uri": f"sip:u{i}@x", "expires": 600}
                             for i in range(300)], 1000.0, 1003.0)
    # Kamailio's clock moved on while it wrote the dump: implied times rise from 1000 to 1003
    replica = [{"aor": f"u{i}", "uri": f"sip:u{i}@x", "expires": 1600 + i // 100}
               for i in range(300)]
    assert ingest.expiry_outliers(replica, dump) == 0
    replica[150] = {**replica[150], "expires": 1603}  # inside the window, 2 s off its neighbours
    assert ingest.expiry_outliers(replica, dump) == 1


@pytest.mark.slow
def test_replication_benchmark_parts_tiny(tmp_path: Path) -> None:
    assert raw_limit(stamped(contacts(0, 10_000))) > 0  # raises if the raw loop lost any
    result = run_throughput(tmp_path, 2_000)
    assert result["lost_changes"] == 0 and result["throughput_changes_per_s"] > 0


DURABILITY_KEYS = (
    "snapshot_write_s", "cold_restore_s", "restore_contacts", "log_append_changes_per_s",
    "redis_changes_per_s", "mesh3_throughput_changes_per_s", "antientropy_repair_s",
    "machine", "wall_s",
)


@pytest.mark.slow
def test_durability_benchmark_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import durability

    out = tmp_path / "durability.json"
    assert durability.main(quick=True, json_path=str(out), sizes=durability.SMOKE) == 0
    doc = json.loads(out.read_text())
    assert [k for k in DURABILITY_KEYS if k not in doc] == []
    assert "durability benchmark" in capsys.readouterr().out
    assert doc["restore_contacts"] == durability.SMOKE.contacts
    assert doc["restore_lost_contacts"] == 0 and doc["mesh3_lost_changes"] == 0
    assert doc["antientropy_found_differing"] == doc["antientropy_diverged_buckets"] > 0
    assert doc["antientropy_left_different"] == 0
    assert doc["log_append_changes_per_s"] > 0 and doc["mesh3_throughput_changes_per_s"] > 0
    if doc["redis_changes_per_s"] is None:
        assert "skipped" in doc["redis_note"]


def test_failover_reply_matching_part() -> None:
    """The in-process reply figure of the failover benchmark: real phone-style answers, every
    ping id recognised (reply_match_rate raises otherwise)."""
    from benchmarks.failover import phone_answer, reply_match_rate
    from sidecar.keepalive.messages import OptionsPinger
    from sidecar.sip.parser import SipResponse, parse_message

    pinger = OptionsPinger(tag="ab12")
    answer = phone_answer(pinger.build(7, "sip:u@192.0.2.1", ("127.0.0.1", 5060)), status=486)
    msg = parse_message(answer)
    assert isinstance(msg, SipResponse) and msg.status == 486 and msg.cseq_method == "OPTIONS"
    assert reply_match_rate(200, runs=1) > 0
