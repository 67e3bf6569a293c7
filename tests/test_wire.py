"""Wire codec: golden vectors, round trips, sizes, and fuzzing of every decoder."""

import contextlib
import json
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.lab.synthetic import contact
from sidecar.model import RECORD_LEN
from sidecar.replication import wire

VECTORS = Path(__file__).resolve().parents[1] / "proto" / "vectors"
DECODERS = {
    "B": lambda p: wire.decode_batch(p),
    "H": wire.decode_heartbeat,
    "SYNC": wire.decode_sync_request,
    "SNAP": wire.decode_snapshot_chunk,
    "END": wire.decode_sync_end,
    "ERR": wire.decode_error,
    # anti-entropy (PROTOCOL §15; more in tests/test_antientropy.py)
    "DIGREQ": wire.decode_digest_request,
    "BKTREQ": wire.decode_bucket_request,
    "CUT": wire.decode_cut,
    "DIGEST": wire.decode_digest,
    "BUCKETS": wire.decode_buckets,
}


def _jsonable(obj):
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    return obj


def _vector_names():
    return sorted(p.stem for p in VECTORS.glob("*.bin"))


def test_there_are_vectors():
    assert len(_vector_names()) >= 8


@pytest.mark.parametrize("name", _vector_names())
def test_golden_vector_decodes_and_reencodes(name):
    raw = (VECTORS / f"{name}.bin").read_bytes()
    expected = json.loads((VECTORS / f"{name}.json").read_text())
    decoded = msgpack.unpackb(raw, use_list=False, raw=False)
    assert _jsonable(decoded) == expected["decoded"]
    # the typed decoder accepts it
    DECODERS[expected["kind"]](raw)
    # and encoding the JSON again gives the very same bytes
    assert msgpack.packb(expected["decoded"], use_bin_type=True) == raw


def test_batch_vector_changes_are_all_valid():
    hdr, changes = wire.decode_batch((VECTORS / "batch_put_refresh_delete.bin").read_bytes())
    assert (hdr.node_id, hdr.epoch, hdr.seq_first, hdr.count) == (1, 3, 101, 4)
    assert [wire.check_change(c) for c in changes] == [18, 18, 4, 6]


def test_refresh_is_much_smaller_than_a_full_contact():
    c = contact(123456)
    handle = (1 << 56) | (1795000000 << 24) | 123456
    full = (*c[:17], handle)
    full = (*full[:16], 1795000000123, *full[17:])
    refresh = (handle, 1795003600, 315, 1200)
    full_size = len(msgpack.packb(full))
    refresh_size = len(msgpack.packb(refresh))
    assert refresh_size <= 24
    assert refresh_size * 5 < full_size


def test_roundtrip_every_message():
    hdr, changes = wire.decode_batch(wire.encode_batch(3, 9, 2, 7, 1000, [(5, 6, 7, 8)]))
    assert hdr == wire.BatchHeader(3, 9, 2, 7, 1, 1000) and changes == ((5, 6, 7, 8),)
    hb = wire.decode_heartbeat(wire.encode_heartbeat(3, 9, 2, 8, 1234, "passive"))
    assert hb == wire.Heartbeat(3, 9, 2, 8, 1234, "passive")
    req = wire.decode_sync_request(wire.encode_sync_request(2, 9, 5, 3))
    assert req == wire.SyncRequest(2, 9, 5, 3)
    end = wire.decode_sync_end(wire.encode_sync_end(9, 8, 3, wire.MODE_REPLAY, 0, 77))
    assert end == wire.SyncEnd(9, 8, 3, wire.MODE_REPLAY, 0, 77)
    chunk = wire.decode_snapshot_chunk(wire.encode_snapshot_chunk(9, 8, 3, 0, 77, []))
    assert chunk == wire.SnapshotChunk(9, 8, 3, 0, 77, ())
    assert wire.decode_error(wire.encode_error(3, "busy")) == (3, "busy")


@pytest.mark.parametrize("payload,reason", [
    (b"", "malformed"),
    (b"\xc1", "malformed"),  # never-used msgpack byte
    (msgpack.packb([2, 1, 1, 1, 1, 0, 0, []]), "version"),
    (msgpack.packb([2, 1]), "version"),  # a future major with a shorter layout
    (msgpack.packb([True, 1, 1, 1, 1, 0, 0, []]), "version"),  # true is not 1
    (msgpack.packb([1, 1, 1, 1, 1, 2, 0, [[1, 2, 3, 4]]]), "malformed"),  # count mismatch
    (msgpack.packb([1, 0, 1, 1, 1, 0, 0, []]), "malformed"),  # node 0
    (msgpack.packb([1, 1, -1, 1, 1, 0, 0, []]), "malformed"),  # negative incarnation
    (msgpack.packb({"a": 1}), "malformed"),
    (msgpack.packb([1, 1, 1, 1, 1, 0, 0, []]) + b"x", "malformed"),  # trailing bytes
])
def test_bad_batches_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(payload)
    assert e.value.reason == reason


def test_oversize_is_rejected_before_decoding(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE", 10)
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(wire.encode_batch(1, 1, 1, 1, 0, [(1, 2, 3, 4)] * 5))
    assert e.value.reason == "oversize"


@pytest.mark.parametrize("change", [
    (1, 2, 3),
    ("a", "b", "c", 1, 2, 0),  # delete with handle 0
    ("a", "b", "c", "1", 2, 5),
    (-1, 2, 3, 4),
    ("", *contact(1)[1:17], 1),  # empty AOR
    (*contact(1)[:5], "soon", *contact(1)[6:17], 1),  # expires not an int
    ["not", "a", "tuple", "x"],
    contact(1)[:13] + ("",) + contact(1)[14:17] + (1,),  # empty instance must be nil
])
def test_bad_changes_are_rejected(change):
    with pytest.raises(wire.WireError):
        wire.check_change(change)


def test_valid_record_passes():
    rec = (*contact(5)[:17], 77)
    assert wire.check_change(rec) == RECORD_LEN


@given(st.binary(max_size=300))
def test_fuzz_every_decoder_raises_only_wire_error(data):
    for decode in DECODERS.values():
        with contextlib.suppress(wire.WireError):
            decode(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30)


@given(st.lists(msgpack_values, max_size=9))
def test_fuzz_structured_garbage(values):
    payload = msgpack.packb([1, *values], use_bin_type=True)
    for decode in DECODERS.values():
        try:
            result = decode(payload)
        except wire.WireError:
            continue
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], tuple):
            for c in result[1]:  # a decoded batch: each change is checked on its own
                with contextlib.suppress(wire.WireError):
                    wire.check_change(c)


@given(st.binary(min_size=1, max_size=40), st.integers(0, 484))
def test_fuzz_mutated_golden_batch(junk, at):
    raw = bytearray((VECTORS / "batch_put_refresh_delete.bin").read_bytes())
    raw[at:at + len(junk)] = junk
    try:
        _, changes = wire.decode_batch(bytes(raw))
    except wire.WireError:
        return
    for c in changes:
        with contextlib.suppress(wire.WireError):
            wire.check_change(c)
