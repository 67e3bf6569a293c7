"""Local durability: snapshot files + change log (issue 5, item 1)."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.model import make_record, rec_bid
from sidecar.persist.change_log import (
    FRAME,
    LOG_HEADER_SIZE,
    PersistError,
    decode_log_header,
    frame,
    scan_frames,
)
from sidecar.persist.durability import (
    Durability,
    segment_name,
    snapshot_name,
    synthetic_records,
)
from sidecar.persist.snapshot_file import decode_snapshot_header, encode_snapshot_header
from sidecar.store import ContactStore

T0 = 1_700_000_000.0


def clock_at(t: float):
    return lambda: t


def new_store(t: float = T0) -> ContactStore:
    return ContactStore(clock=clock_at(t))


def records(n: int, start: int = 0, expires: int = int(T0) + 3600) -> list[tuple]:
    return synthetic_records(start + n, expires=expires)[start:]


def put(store: ContactStore, dur: Durability, rec: tuple) -> None:
    """What the Replica wiring does: log the stored version only when it won."""
    if store.put(rec):
        dur.record_put(store.last_put)


def delete(store: ContactStore, dur: Durability, rec: tuple, cseq_bump: int = 1) -> None:
    args = (rec[0], rec_bid(rec), rec[7], rec[8] + cseq_bump, rec[16] + 1, rec[17])
    if store.delete(*args):
        dur.record_delete(*args)


def restored(tmp_path: Path, t: float = T0) -> tuple[ContactStore, object]:
    store = new_store(t)
    report = Durability(tmp_path, node_id=1).restore(store)
    return store, report


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("changes-*.log"))


def frame_offsets(data: bytes) -> list[int]:
    """File offsets of every frame in a log segment."""
    out, pos = [], LOG_HEADER_SIZE
    while pos < len(data):
        out.append(pos)
        (length, _) = FRAME.unpack_from(data, pos)
        pos += FRAME.size + length
    return out


# ---------------------------------------------------------------------- round trips
def test_snapshot_plus_log_round_trip(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    recs = records(300)
    for r in recs[:200]:
        put(store, dur, r)
    info = dur.snapshot(store)
    assert info.records == 200 and info.path.exists()
    for r in recs[200:]:
        put(store, dur, r)
    # a refresh (new version of an existing binding) and a newer version of another
    refreshed = store.refresh(recs[5][17], recs[5][5] + 60, recs[5][8] + 1, recs[5][16] + 5)
    dur.record_put(refreshed)
    put(store, dur, (*recs[250][:8], recs[250][8] + 1, *recs[250][9:16], recs[250][16] + 9,
                     recs[250][17]))
    dur.close()

    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(store.records())
    assert report.clean and report.contacts == 300
    assert report.snapshot_path == info.path and report.snapshot_records == 200
    assert report.log_records == 102


def test_log_only_round_trip_without_snapshot(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    for r in records(50):
        put(store, dur, r)
    dur.close()
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(store.records())
    assert report.snapshot_path is None and report.clean


def test_expired_contacts_are_dropped(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    short = records(10, expires=int(T0) + 60)
    long = records(10, start=10, expires=int(T0) + 3600)
    permanent = [make_record(aor="sip:fax@example.com", uri="sip:fax@10.9.9.9", callid="c1",
                             cseq=1, expires=0, handle=(1 << 56) | 999, last_modified=1)]
    for r in short[:5] + long[:5]:
        put(store, dur, r)
    dur.snapshot(store)
    for r in short[5:] + long[5:] + permanent:
        put(store, dur, r)
    dur.close()

    got, report = restored(tmp_path, T0 + 600)  # the 60 s contacts are past expiry now
    assert sorted(got.records()) == sorted(long + permanent)
    assert report.expired_dropped == 10
    assert report.contacts == 11


def test_deletes_in_log_remove_contacts(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    recs = records(20)
    for r in recs:
        put(store, dur, r)
    dur.snapshot(store)
    for r in recs[:7]:
        delete(store, dur, r)
    dur.close()
    got, report = restored(tmp_path)
    assert len(got) == 13
    assert sorted(got.records()) == sorted(store.records())
    assert report.deletes_applied == 7
    # the tombstone keeps a stale replicated version from resurrecting a deleted contact
    assert not got.put(recs[0])


# ---------------------------------------------------------------------- damaged logs
def _write_log(tmp_path: Path, n: int) -> tuple[Path, list[tuple]]:
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    recs = records(n)
    for r in recs:
        put(store, dur, r)
    dur.close()
    (seg,) = segments(tmp_path)
    return seg, recs


def test_truncated_tail_at_every_byte_of_last_record(tmp_path):
    seg, recs = _write_log(tmp_path, 6)
    data = seg.read_bytes()
    last = frame_offsets(data)[-1]
    for cut in range(last, len(data)):
        seg.write_bytes(data[:cut])
        got, report = restored(tmp_path)
        assert sorted(got.records()) == sorted(recs[:5]), cut
        if cut == last:
            assert report.clean  # the file simply ends between records
            continue
        (damage,) = report.damage
        assert damage.kind == "truncated"
        assert damage.path == str(seg) and damage.offset == last
        assert damage.bytes_dropped == cut - last and damage.records_dropped == 1
    seg.write_bytes(data)
    got, report = restored(tmp_path)
    assert report.clean and len(got) == 6


def test_flipped_byte_in_the_middle_is_detected(tmp_path):
    seg, recs = _write_log(tmp_path, 10)
    data = bytearray(seg.read_bytes())
    offsets = frame_offsets(bytes(data))
    bad = offsets[4]
    data[bad + FRAME.size + 20] ^= 0x40  # inside record 4's payload
    seg.write_bytes(bytes(data))
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(recs[:4])
    (damage,) = report.damage
    assert damage.kind == "crc" and damage.offset == bad
    assert damage.records_dropped == 6  # the damaged one + 5 intact ones after it
    assert damage.bytes_dropped == len(data) - bad
    assert not report.clean


def test_corrupt_length_field_is_detected(tmp_path):
    seg, recs = _write_log(tmp_path, 5)
    data = bytearray(seg.read_bytes())
    bad = frame_offsets(bytes(data))[2]
    data[bad:bad + 4] = struct.pack("<I", 0xFFFFFFF0)
    seg.write_bytes(bytes(data))
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(recs[:2])
    assert report.damage[0].kind == "length" and report.damage[0].offset == bad


def test_segment_cut_inside_its_header(tmp_path):
    seg, _ = _write_log(tmp_path, 3)
    seg.write_bytes(seg.read_bytes()[:10])
    got, report = restored(tmp_path)
    assert len(got) == 0
    assert report.damage[0].kind == "truncated" and report.damage[0].offset == 0


def test_appends_after_a_damaged_tail_go_to_a_new_segment(tmp_path):
    seg, recs = _write_log(tmp_path, 5)
    seg.write_bytes(seg.read_bytes()[:-3])  # crash mid-append
    store, report = restored(tmp_path)
    assert len(store) == 4 and report.damage
    dur = Durability(tmp_path, node_id=1)  # the restarted process
    extra = records(3, start=100)
    for r in extra:
        put(store, dur, r)
    dur.close()
    assert len(segments(tmp_path)) == 2
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(recs[:4] + extra)
    assert len(report.damage) == 1  # the old tail, still reported


def test_intact_frame_with_bad_content_is_skipped_and_counted(tmp_path):
    seg, _ = _write_log(tmp_path, 3)
    with open(seg, "ab") as f:
        f.write(frame(msgpack.packb("not a change")))
        f.write(frame(b"\xc1"))  # msgpack's never-used byte
        f.write(frame(msgpack.packb((1, 2, 3, 4))))  # a refresh: never logged
    dur = Durability(tmp_path, node_id=1)
    store = new_store()
    put(store, dur, records(1, start=50)[0])
    dur.close()
    got, report = restored(tmp_path)
    assert len(got) == 4
    assert report.bad_records == 3 and not report.damage


# ---------------------------------------------------------------------- snapshots
def _set_snapshot_version(path: Path, version: int) -> None:
    data = bytearray(path.read_bytes())
    data[8:10] = struct.pack("<H", version)
    path.write_bytes(bytes(data))


def test_future_snapshot_version_is_refused_and_older_one_used(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1, retention=3)
    recs = records(40)
    for r in recs[:10]:
        put(store, dur, r)
    first = dur.snapshot(store)
    for r in recs[10:30]:
        put(store, dur, r)
    newest = dur.snapshot(store)
    for r in recs[30:]:
        put(store, dur, r)
    dur.close()
    _set_snapshot_version(newest.path, 2)

    with pytest.raises(PersistError) as err:
        Durability(tmp_path).restore(new_store(), newest.path)
    assert err.value.reason == "version" and "version 2" in str(err.value)

    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(store.records())  # older snapshot + all logs
    assert report.snapshot_path == first.path
    ((skipped, why),) = report.skipped_snapshots
    assert skipped == newest.path and "version 2 is not supported" in why


def test_future_version_without_fallback_restores_logs_and_reports(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    for r in records(5):
        put(store, dur, r)
    info = dur.snapshot(store)
    extra = records(3, start=10)
    for r in extra:
        put(store, dur, r)
    dur.close()
    _set_snapshot_version(info.path, 7)
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(extra)
    assert report.snapshot_path is None and len(report.skipped_snapshots) == 1


def test_corrupt_snapshot_chunk_falls_back(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    recs = records(20)
    for r in recs[:10]:
        put(store, dur, r)
    first = dur.snapshot(store)
    for r in recs[10:]:
        put(store, dur, r)
    newest = dur.snapshot(store)
    dur.close()
    data = bytearray(newest.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.path.write_bytes(bytes(data))
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(store.records())
    assert report.snapshot_path == first.path
    assert "crc" in report.skipped_snapshots[0][1]


@pytest.mark.parametrize("damage", ["truncate", "foreign", "trailing", "count"])
def test_damaged_snapshot_file_is_refused_with_a_clear_error(tmp_path, damage):
    store = new_store()
    for r in records(10):
        store.put(r)
    export = tmp_path / "export.snap"
    Durability(tmp_path / "state").snapshot(store, export)
    data = export.read_bytes()
    if damage == "truncate":
        data = data[:-5]
    elif damage == "foreign":
        data = b"SQLite format 3\x00" + data[16:]
    elif damage == "trailing":
        data += b"x"
    else:
        data = encode_snapshot_header(1, 0, 0, 11) + data[44:]
    export.write_bytes(data)
    target = new_store()
    with pytest.raises(PersistError) as err:
        Durability(tmp_path / "state").restore(target, export)
    assert err.value.reason in {"truncate", "truncated", "magic", "trailing", "count"}
    assert str(export) in str(err.value)
    assert len(target) == 0  # nothing half-loaded


def test_export_and_explicit_restore(tmp_path):
    store = new_store()
    recs = records(30)
    for r in recs:
        store.put(r)
    dur = Durability(tmp_path / "state", node_id=3)
    info = dur.snapshot(store, tmp_path / "backup.snap")
    assert info.log_seq == 0 and not segments(tmp_path / "state")  # export: no rotation
    header = decode_snapshot_header((tmp_path / "backup.snap").read_bytes()[:44])
    assert header.node_id == 3 and header.record_count == 30
    got = new_store()
    report = dur.restore(got, tmp_path / "backup.snap")
    assert sorted(got.records()) == sorted(store.records()) and report.clean


def test_leftover_temp_file_is_ignored(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1)
    recs = records(10)
    for r in recs:
        put(store, dur, r)
    info = dur.snapshot(store)
    dur.close()
    # an interrupted later snapshot: half a file under the temp name
    tmp = tmp_path / (snapshot_name(info.log_seq + 5) + ".tmp")
    tmp.write_bytes(info.path.read_bytes()[:100])
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(recs) and report.snapshot_path == info.path
    assert report.temp_files_ignored == [tmp]
    # the next process never reuses its seq, and the next snapshot removes it
    dur = Durability(tmp_path, node_id=1)
    again = dur.snapshot(got)
    dur.close()
    assert again.log_seq > info.log_seq + 5 and not tmp.exists()


def test_retention_keeps_n_snapshots_and_the_logs_they_need(tmp_path):
    store = new_store()
    dur = Durability(tmp_path, node_id=1, retention=2)
    recs = records(50)
    infos = []
    for i in range(5):
        for r in recs[i * 10:(i + 1) * 10]:
            put(store, dur, r)
        infos.append(dur.snapshot(store))
    dur.close()
    snaps = sorted(tmp_path.glob("snapshot-*.snap"))
    assert snaps == [infos[3].path, infos[4].path]
    assert [p.name for p in segments(tmp_path)] == [segment_name(infos[3].log_seq),
                                                    segment_name(infos[4].log_seq)]
    assert infos[4].removed  # the last rotation dropped snapshot 2 and its segment
    got, report = restored(tmp_path)
    assert sorted(got.records()) == sorted(store.records()) and report.clean


# ---------------------------------------------------------------------- fsync policies
def _frames_in(path: Path) -> int:
    with open(path, "rb") as f:  # a separate file handle from the writer's
        data = f.read()
    decode_log_header(data[:LOG_HEADER_SIZE])
    payloads, damage = scan_frames(data[LOG_HEADER_SIZE:])
    assert damage is None
    return len(payloads)


def test_fsync_always_without_loop_writes_each_change(tmp_path):
    dur = Durability(tmp_path, node_id=1, fsync="always")
    for r in records(3):
        dur.record_put(r)
    (seg,) = segments(tmp_path)
    assert _frames_in(seg) == 3
    assert dur.stats.syncs == 3
    dur.close()


async def test_fsync_always_group_commits_per_loop_iteration(tmp_path):
    dur = Durability(tmp_path, node_id=1, fsync="always", fsync_interval_s=60)
    await dur.start()
    try:
        for r in records(100):
            dur.record_put(r)
        (seg,) = segments(tmp_path)
        assert _frames_in(seg) == 0  # still buffered in this iteration
        await asyncio.sleep(0)
        assert _frames_in(seg) == 100
        assert dur.stats.syncs == 1
    finally:
        await dur.stop()


async def test_interval_policy_flushes_periodically(tmp_path):
    dur = Durability(tmp_path, node_id=1, fsync="interval", fsync_interval_s=0.01)
    await dur.start()
    try:
        for r in records(20):
            dur.record_put(r)
        (seg,) = segments(tmp_path)
        deadline = time.monotonic() + 5
        while _frames_in(seg) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert _frames_in(seg) == 20 and dur.stats.syncs >= 1
    finally:
        await dur.stop()


async def test_periodic_snapshot_task(tmp_path):
    store = new_store()
    for r in records(5000):
        store.put(r)
    dur = Durability(tmp_path, node_id=1, fsync="never", fsync_interval_s=0.01,
                     snapshot_interval_s=0.02)
    await dur.start(store)
    try:
        deadline = time.monotonic() + 5
        while dur.stats.snapshots < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert dur.stats.snapshots >= 2
    finally:
        await dur.stop()
    got, report = restored(tmp_path)
    assert len(got) == 5000 and report.clean


def test_bad_configuration_is_refused(tmp_path):
    with pytest.raises(PersistError):
        Durability(tmp_path, fsync="sometimes")
    with pytest.raises(PersistError):
        Durability(tmp_path, retention=0)


# ---------------------------------------------------------------------- fuzz
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_scan_frames_never_raises(data):
    payloads, damage = scan_frames(data, 32, "fuzz")
    consumed = sum(FRAME.size + len(p) for p in payloads)
    if damage is None:
        assert consumed == len(data)
    else:
        assert damage.offset == 32 + consumed and damage.bytes_dropped == len(data) - consumed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_headers_raise_only_persist_error(data):
    for decode in (decode_snapshot_header, decode_log_header):
        try:
            header = decode(data)
        except PersistError as exc:
            assert exc.reason in {"truncated", "magic", "version", "crc"}
        else:
            assert header.version == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0))
def test_random_snapshot_bodies_are_refused_cleanly(tmp_path_factory, body, count):
    path = tmp_path_factory.mktemp("fuzz") / "x.snap"
    path.write_bytes(encode_snapshot_header(1, 0, 0, count % 100) + body)
    store = new_store()
    try:
        Durability(path.parent / "state").restore(store, path)
    except PersistError:
        assert len(store) == 0
    os.unlink(path)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """A small export snapshot and a log segment to mutate (built once: fuzz is per-byte)."""
    d = tmp_path_factory.mktemp("sample")
    store = new_store()
    dur = Durability(d / "state", node_id=1)
    recs = records(6)
    for r in recs:
        put(store, dur, r)
    dur.close()
    dur.snapshot(store, d / "export.snap")
    (seg,) = segments(d / "state")
    return (d / "export.snap").read_bytes(), seg.read_bytes(), recs


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_snapshot_byte_is_refused(tmp_path_factory, sample_files, data):
    snap, _, _ = sample_files
    i = data.draw(st.integers(0, len(snap) - 1))
    flip = data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("flip") / "x.snap"
    path.write_bytes(snap[:i] + bytes([snap[i] ^ flip]) + snap[i + 1:])
    store = new_store()
    with pytest.raises(PersistError):
        Durability(path.parent / "state").restore(store, path)
    assert len(store) == 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_log_byte_never_yields_a_wrong_record(tmp_path_factory, sample_files, data):
    _, seg, recs = sample_files
    i = data.draw(st.integers(0, len(seg) - 1))
    flip = data.draw(st.integers(1, 255))
    d = tmp_path_factory.mktemp("flip")
    (d / segment_name(1)).write_bytes(seg[:i] + bytes([seg[i] ^ flip]) + seg[i + 1:])
    got, report = restored(d)
    assert set(got.records()) <= set(recs)
    assert report.damage  # every byte is covered by a header or frame checksum
    offsets = frame_offsets(seg)
    ends = [*offsets[1:], len(seg)]
    assert len(got) == sum(1 for end in ends if end <= i)  # exactly the frames before byte i


async def test_cancelled_snapshot_leaves_no_temp_file(tmp_path):
    store = new_store()
    for r in records(3 * 4096):
        store.put(r)
    dur = Durability(tmp_path, node_id=1)
    task = asyncio.create_task(dur.snapshot_async(store))
    while not list(tmp_path.glob("*.tmp")):  # mid-write: the temp file exists
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.snap"))
    info = await dur.snapshot_async(store)  # not stuck in "busy"
    assert info.records == 3 * 4096
    dur.close()


def test_unwritable_state_dir_counts_lost_changes_instead_of_raising(tmp_path):
    state = tmp_path / "state"
    dur = Durability(state, node_id=1)
    state.rmdir()  # the directory vanished under us (unmounted, deleted)
    recs = records(3)
    for r in recs:
        dur.record_put(r)
    assert dur.stats.lost_changes == 3 and dur.stats.errors == 1
    assert str(state) in dur.stats.last_error
    with pytest.raises(PersistError):
        dur.snapshot(new_store())
    dur.close()
